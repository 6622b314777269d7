"""Replay a request trace through the runtime's policies at given tier sizes, counting blocks, not bytes.

Each tier is a number of block slots and an eviction policy from `tiercache.policy`
(the same classes a TierCache's pools use; the disk tier's LMDB access index is LRU).
Per request, in the order of the trace, the replay does what a serving loop does
with the public API: `lookup`, `load` of the cached prefix and `store` of the prompt
if it has full blocks beyond that prefix (what `TierCachedLM` does), or with
`load=False` only `lookup` and `store`:

1. lookup: walk the prompt's full blocks from the first; each is served by the
   fastest tier holding it, and the walk stops at the first block no tier holds.
   That block count x block size is the request's hit tokens, per tier.
2. store: a block already in a memory tier is touched there; any other block gets
   a slot in the memory tiers (write-through: every one; write-back: the top one),
   evicting each tier's policy victim when it is full; slots taken in this call are
   not candidates (a tier reserves them and inserts them into its policy, in prompt
   order, once the call's copies are done). Under write-back a victim moves one tier
   down at once (device -> host -> disk). A block the disk does not hold is written
   there under write-through (if admitted); under write-back only if no memory tier
   took it. Disk writes happen after the call's decisions, in order (the write-behind
   does them after `store` returns), and evict least recently written blocks
   (neither `store` nor `load` refreshes a disk block).
3. load: each block of the cached prefix is promoted into the memory tiers above the
   tier serving it (slots as in a store, but the blocks being read are pinned, so never
   victims; write-back victims move down), then every
   loaded block is touched in each memory tier holding it; under second-hit admission
   a loaded block held in host memory but not on disk is offered to the disk.

Hit rate = hit tokens / prompt tokens looked up, per tier and in total. `unbounded`
is the same trace with no size limits: the share of tokens any cache could serve.
Not modelled: prefetch, the remote tier, asynchronous writes still queued (the
replay's disk is written at once, as if the write-behind kept up: in a runtime a host
block waiting to be written is pinned a little longer, and under backpressure writes
are dropped), and
frames of different compressed sizes (the disk tier is a number of blocks: its
bytes / the estimated bytes of one frame).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import xxhash

from tiercache.policy import EvictionPolicy, make_admission_policy, make_eviction_policy

MEMORY_TIERS = ("device", "host")
TIERS = ("device", "host", "disk")


def block_keys(tokens: Sequence[int], block_size: int) -> list[bytes]:
    """A chained digest per full block: key i names the whole prefix up to the end of block i."""
    arr = np.asarray(tokens, dtype="<i8")
    keys, prev = [], b""
    for i in range(len(arr) // block_size):
        prev = xxhash.xxh3_128_digest(prev + arr[i * block_size:(i + 1) * block_size].tobytes())
        keys.append(prev)
    return keys


@dataclass
class _Tier:
    name: str
    slots: int
    policy: EvictionPolicy

    def __contains__(self, key: bytes) -> bool:
        return key in self.policy

    def full(self, pending: int = 0) -> bool:
        return len(self.policy) + pending >= self.slots


@dataclass
class ReplayResult:
    requests: int = 0
    lookup_tokens: int = 0
    hit_tokens: dict[str, int] = field(default_factory=lambda: {t: 0 for t in TIERS})
    per_request: list[dict[str, int]] = field(default_factory=list)
    evictions: dict[str, int] = field(default_factory=lambda: {t: 0 for t in TIERS})

    @property
    def hit_tokens_total(self) -> int:
        return sum(self.hit_tokens.values())

    def hit_rate(self, tier: str | None = None) -> float:
        hits = self.hit_tokens_total if tier is None else self.hit_tokens[tier]
        return hits / self.lookup_tokens if self.lookup_tokens else 0.0

    def to_dict(self) -> dict:
        return {"requests": self.requests, "lookup_tokens": self.lookup_tokens, "hit_tokens": dict(self.hit_tokens),
                "hit_tokens_total": self.hit_tokens_total,
                "hit_rate": {t: self.hit_rate(t) for t in TIERS}, "hit_rate_total": self.hit_rate(),
                "evictions": dict(self.evictions)}


class TierReplay:
    """The tiers of one TierCache configuration, as block counts and policies."""

    def __init__(self, block_size: int, *, device_blocks: int = 0, host_blocks: int = 0, disk_blocks: int = 0,
                 eviction: str = "lru", write_policy: str = "write_through", admission: str = "all",
                 load: bool = True) -> None:
        for name, value in (("block_size", block_size), ("device_blocks", device_blocks),
                            ("host_blocks", host_blocks), ("disk_blocks", disk_blocks)):
            if isinstance(value, bool) or not isinstance(value, int) or value < (1 if name == "block_size" else 0):
                raise ValueError(f"{name}: expected a {'positive' if name == 'block_size' else 'non-negative'} int, "
                                 f"got {value!r}")
        if write_policy not in ("write_through", "write_back"):
            raise ValueError(f"write_policy: expected 'write_through' or 'write_back', got {write_policy!r}")
        self.block_size = block_size
        self.with_load = bool(load)
        self.write_back = write_policy == "write_back"
        self.admission = make_admission_policy(admission)
        sizes = {"device": device_blocks, "host": host_blocks, "disk": disk_blocks}
        self.tiers = {t: _Tier(t, n, make_eviction_policy(eviction if t in MEMORY_TIERS else "lru"))
                      for t, n in sizes.items() if n > 0}
        self.result = ReplayResult()
        self._reserved: dict[str, list[bytes]] = {}
        self._pending: set[bytes] = set()  # keys given a memory slot in the current call
        self._pinned: dict[str, set[bytes]] = {}  # per tier, the blocks the current load reads from it
        self._disk_queue: dict[bytes, None] = {}  # disk writes decided in the current store call, in order

    # -- the calls of a request -----------------------------------------------------------
    def serving(self, keys: list[bytes]) -> list[str]:
        """The serving tier of each block of the cached prefix (the fastest holding it)."""
        out = []
        for k in keys:
            tier = next((t for t in TIERS if t in self.tiers and k in self.tiers[t]), None)
            if tier is None:
                break
            out.append(tier)
        return out

    def lookup(self, keys: list[bytes]) -> dict[str, int]:
        """Tokens of the cached prefix by serving tier."""
        by_tier = {t: 0 for t in TIERS}
        for tier in self.serving(keys):
            by_tier[tier] += self.block_size
        return by_tier

    def load(self, keys: list[bytes]) -> None:
        """`load` of the cached prefix: each block is promoted into the memory tiers above the one serving
        it (evicting as a store does), then every loaded block is touched in each memory tier holding it."""
        mem = [self.tiers[t] for t in MEMORY_TIERS if t in self.tiers]
        self._reserved = {t.name: [] for t in mem}
        spilled: list[tuple[str, bytes]] = []
        promoted: list[tuple[_Tier, bytes]] = []
        moved_in: set[tuple[str, bytes]] = set()
        found = self.serving(keys)
        self._pinned = {t.name: {k for k, src in zip(keys, found) if src == t.name} for t in mem}
        for k, src in zip(keys, found):
            for t in mem:
                if t.name == src:
                    break
                if k in t or (t.name, k) in moved_in:
                    continue
                if self._take_slot(t, spilled):
                    promoted.append((t, k))
                    moved_in.add((t.name, k))
                    self._reserved[t.name].append(k)
                    self._pending.add(k)
                for tier, victim in spilled:
                    self._spill(tier, victim)
                spilled.clear()
        for t in mem:  # write-back victims moved down first, then the promotions, in prefix order
            for k in self._reserved[t.name]:
                if (t.name, k) not in moved_in:
                    t.policy.insert(k)
        for t, k in promoted:
            t.policy.insert(k)
        self._reserved, self._pending, self._pinned = {}, set(), {}
        host, disk = self.tiers.get("host"), self.tiers.get("disk")
        for k in keys[:len(found)]:
            for t in mem:
                if k in t:
                    t.policy.touch(k)
            # second-hit admission: a block read again from the host tier earns its place on disk
            if self.admission.name != "all" and host is not None and disk is not None and k in host \
                    and k not in disk and k not in self._disk_queue and self.admission.admit(k):
                self._disk_queue[k] = None
        self._flush_disk()

    def store(self, keys: list[bytes]) -> None:
        mem = [self.tiers[t] for t in MEMORY_TIERS if t in self.tiers]
        targets = mem[:1] if self.write_back else mem
        disk = self.tiers.get("disk")
        self._reserved = reserved = {t.name: [] for t in mem}
        spilled: list[tuple[str, bytes]] = []
        for k in keys:
            have = [t for t in mem if k in t]
            for t in have:
                t.policy.touch(k)
            if have or k in self._pending:
                continue
            took = False
            for t in targets:
                if self._take_slot(t, spilled):
                    reserved[t.name].append(k)
                    self._pending.add(k)
                    took = True
            for tier, victim in spilled:  # a write-back victim moves down before its slot is reused
                self._spill(tier, victim)
            spilled.clear()
            if disk is not None and k not in disk and (not self.write_back or not took):
                self._queue_disk(k)
        for t in mem:  # commit in prompt order (host: the write-back victims moved into it, in that order)
            for k in reserved[t.name]:
                t.policy.insert(k)
        self._reserved, self._pending = {}, set()
        self._flush_disk()

    def _flush_disk(self) -> None:
        """The disk is written after the call's decisions, in the order they were made (as the write-behind
        does): a block the disk held when the call decided is not written again, even if a write of this
        same call evicts it."""
        queued, self._disk_queue = self._disk_queue, {}
        for k in queued:
            self._write_disk(k)

    def _take_slot(self, t: _Tier, spilled: list[tuple[str, bytes]]) -> bool:
        """Room for one more block in `t`: a free slot, or its policy's victim (blocks reserved in this
        call are not in the policy yet, and blocks a load is reading are pinned: neither is a victim).
        False if no block may go."""
        if not t.full(len(self._reserved.get(t.name, ()))):
            return True
        victims = t.policy.victims(1, self._pinned.get(t.name, ()))
        if victims is None:
            return False
        t.policy.remove(victims[0])
        self.result.evictions[t.name] += 1
        if self.write_back:
            spilled.append((t.name, victims[0]))
        return True

    def _spill(self, tier: str, key: bytes) -> None:
        """Write-back: a victim of `tier` moves one tier down (device -> host, host -> disk)."""
        host = self.tiers.get("host")
        if tier == "device" and host is not None:
            if key in host or key in self._pending:
                return  # already there (or arriving in this call)
            spilled: list[tuple[str, bytes]] = []
            if self._take_slot(host, spilled):
                self._reserved.setdefault("host", []).append(key)  # committed with the call's other slots
                self._pending.add(key)
                for lower, victim in spilled:
                    self._spill(lower, victim)
                return
        disk = self.tiers.get("disk")
        if disk is not None and key not in disk:
            self._queue_disk(key)

    def _queue_disk(self, key: bytes) -> None:
        if key not in self._disk_queue and self.admission.admit(key):
            self._disk_queue[key] = None

    def _write_disk(self, key: bytes) -> None:
        disk = self.tiers["disk"]
        if key in disk:
            return
        if disk.full():
            victims = disk.policy.victims(1)
            if victims is None:
                return
            disk.policy.remove(victims[0])
            self.result.evictions["disk"] += 1
        disk.policy.insert(key)

    # -- a whole request / trace ----------------------------------------------------------
    def request(self, tokens: Sequence[int]) -> dict[str, int]:
        """One request as a server makes it: lookup; with `load`, load the cached prefix and store the
        prompt only if it has full blocks beyond that prefix (as `TierCachedLM` does); else store it."""
        keys = block_keys(tokens, self.block_size)
        hits = self.lookup(keys)
        if self.with_load:
            n = sum(hits.values()) // self.block_size
            if n:
                self.load(keys[:n])
            if len(keys) > n:
                self.store(keys)
        else:
            self.store(keys)
        r = self.result
        r.requests += 1
        r.lookup_tokens += len(tokens)
        for t, n in hits.items():
            r.hit_tokens[t] += n
        r.per_request.append(hits)
        return hits

    def run(self, trace: Iterable[Sequence[int]]) -> ReplayResult:
        for tokens in trace:
            self.request(tokens)
        return self.result


def unbounded_hit_rate(trace: Sequence[Sequence[int]], block_size: int) -> float:
    """Share of prompt tokens served by earlier prompts' full blocks if nothing were ever evicted."""
    seen: set[bytes] = set()
    hits = total = 0
    for tokens in trace:
        keys = block_keys(tokens, block_size)
        n = 0
        while n < len(keys) and keys[n] in seen:
            n += 1
        hits += n * block_size
        total += len(tokens)
        seen.update(keys)
    return hits / total if total else 0.0


# -- traces ---------------------------------------------------------------------------------
_TOKEN_FIELDS = ("token_ids", "prompt_token_ids", "tokens", "input_ids")


def read_trace(path: str) -> list[list[int]]:
    """Token id lists from a JSONL file: one request per line, a JSON list of ints or an object with
    `token_ids` (`prompt_token_ids`, `tokens`, `input_ids`), as `python -m tiercache.workload` writes."""
    if not os.path.isfile(path):
        raise ValueError(f"--trace: {path} does not exist")
    return list(_iter_trace(path))


def _iter_trace(path: str) -> Iterator[list[int]]:
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"--trace: {path} line {lineno} is not JSON ({e.msg})") from None
            if isinstance(obj, dict):
                obj = next((obj[k] for k in _TOKEN_FIELDS if k in obj), None)
            if not isinstance(obj, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in obj):
                raise ValueError(f"--trace: {path} line {lineno}: expected a list of token ids or an object with "
                                 f"one of {list(_TOKEN_FIELDS)}")
            yield obj
