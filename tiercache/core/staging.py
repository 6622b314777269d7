"""Blocks on their way to slow tiers (disk, remote), and the staging ids behind their bytes.

A staged block is readable from its source (a pinned host slot, or a staging buffer
the byte layer keeps under a staging id) once `ready`, until the write-behind reports
that every slow tier it was meant for has it (or refused it). Staging ids are bounded
(`limit`, the write queue's size): a write that finds none free is dropped and counted.
Only close-time write-back may go past the limit.

No torch, no bytes: the BlockManager calls it under its own lock.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass

from .plans import Loc

Key = Hashable


@dataclass
class Staged:
    """A block on its way to slow tiers; readable from `src` once `ready`."""

    src: Loc
    dests: tuple[str, ...]
    tag: object
    ready: bool = False
    pins: int = 0
    released: bool = False  # the write finished while a reader still had it pinned


class StageTable(dict):
    """key -> Staged, plus the allocator of staging ids."""

    def __init__(self, limit: int, on_free: Callable[[int], None] | None = None) -> None:
        super().__init__()
        self.limit = limit
        self._free = list(range(limit - 1, -1, -1))
        self._next = limit
        self._on_free = on_free  # the byte layer drops the buffer behind a staging id

    def alloc(self, unbounded: bool = False) -> int | None:
        """A free staging id, or None when all are in flight (close-time write-back may go past)."""
        if self._free:
            return self._free.pop()
        if not unbounded:
            return None
        self._next += 1
        return self._next - 1

    def release(self, sid: int) -> None:
        if self._on_free is not None:
            self._on_free(sid)
        if sid < self.limit:
            self._free.append(sid)

    def reserved_for(self, tier: str) -> int:
        return sum(1 for st in self.values() if tier in st.dests)

    def pins(self) -> int:
        return sum(st.pins for st in self.values())
