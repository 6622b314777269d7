"""What the decision layer hands to the byte layer: plans of slot ids, and write jobs.

A location names where a block's bytes are or go, without holding them:

    ("device", slot) / ("host", slot)   a slot of a memory tier's slab
    ("stage", sid)                      a staging buffer (bytes on their way to a slow tier)
    ("disk", None) / ("remote", None)   a frame to read from a slow tier

Plans are plain data: a scheduler process can build one and ship it to a worker.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field

Key = Hashable
Loc = tuple[str, "int | None"]


@dataclass
class Spill:
    """Write-back: a block evicted from `src` moves to `dst` before its old slot is overwritten."""

    key: Key
    src: Loc
    dst: Loc
    done: bool = False


@dataclass
class WriteJob:
    """Bytes at `src` (pinned or staged) to be written to the slow tiers `dests`."""

    key: Key
    src: Loc
    dests: tuple[str, ...]
    tag: object = None  # the caller's note (namespace id) for the slow tier


@dataclass
class LoadPlan:
    keys: list[Key]
    srcs: list[Loc]                                  # where each block of the prefix is read from
    serving: list[str]                               # tier each block is attributed to
    promote: dict[int, list[Loc]] = field(default_factory=dict)  # block -> memory slots reserved for it
    spills: list[Spill] = field(default_factory=list)
    completed: bool = False
    cache: dict = field(default_factory=dict, repr=False)  # the byte layer's memo for this plan (index tensors)

    def __len__(self) -> int:
        return len(self.keys)

    def slow(self) -> list[int]:
        """Blocks whose bytes come from a slow tier (to be fetched and verified)."""
        return [i for i, (medium, _) in enumerate(self.srcs) if medium in ("disk", "remote")]


@dataclass
class StorePlan:
    keys: list[Key]
    present: list[bool]                              # block cached before this call
    dsts: dict[int, list[Loc]] = field(default_factory=dict)     # block -> locations to copy the KV into
    writes: dict[int, tuple[str, ...]] = field(default_factory=dict)  # block -> slow tiers to write it to
    spills: list[Spill] = field(default_factory=list)
    tag: object = None
    completed: bool = False

    def __len__(self) -> int:
        return len(self.keys)
