"""Where a block is: the serving tier and location of each block of a prefix. No torch, no bytes.

Memory tiers first (fastest first), then blocks staged on their way down (served from their
staged bytes), then the disk index held in memory; `slow_membership` asks the slow tiers
themselves (may do I/O: the manager calls it without its lock).
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

from .index import SlotIndex
from .plans import Loc
from .staging import StageTable

Key = Hashable
_ON_DISK = ("disk", ("disk", None))


class Where:
    def __init__(self, mem: dict[str, SlotIndex], order: list[str], stage: StageTable, disk: Any,
                 remote: Any) -> None:
        self.mem, self.order, self.stage, self.disk, self.remote = mem, order, stage, disk, remote

    def local(self, key: Key) -> tuple[str, Loc] | None:
        for t in self.order:
            slot = self.mem[t].find(key)
            if slot is not None:
                return t, (t, slot)
        st = self.stage.get(key)
        if st is not None and st.ready and not st.released:
            return st.dests[0], st.src  # on its way down: served from its staged bytes
        if self.disk is not None and self.disk.known(key):
            return "disk", ("disk", None)
        return None

    def walk(self, keys: list[Key], slow: dict[int, str] | None) -> tuple[list[tuple[str, Loc]], int | None]:
        """(serving tier, location) of each block of the prefix, and the index of the first local miss."""
        out: list[tuple[str, Loc]] = []
        local = self.local
        if len(self.order) == 1:  # the common shape (one memory tier): one dict probe per block
            t = self.order[0]
            ready = self.mem[t]._ready
            for k in keys:
                slot = ready.get(k)
                if slot is None:
                    break
                out.append((t, (t, slot)))
            else:
                return out, None
            start = len(out)
        elif not self.order and not self.stage and self.disk is not None:
            # a disk-only cache with nothing on its way down: the disk index alone, in one call
            n = self.disk.run_known(keys)
            out = [_ON_DISK] * n
            if n == len(keys):
                return out, None
            start = n
        else:
            start = 0
        for i in range(start, len(keys)):
            k = keys[i]
            hit = local(k)
            if hit is None:
                tier = slow.get(i) if slow is not None else None
                if tier is None:
                    return out, i
                hit = (tier, (tier, None))
            out.append(hit)
        return out, None

    def slow_membership(self, keys: list[Key], start: int) -> dict[int, str]:
        """Which of keys[start:] the slow tiers hold (may do I/O; called without the lock)."""
        found: dict[int, str] = {}
        idx = list(range(start, len(keys)))
        for index in (self.disk, self.remote):
            if index is None or not idx:
                continue
            hits = index.contains_many([keys[i] for i in idx])
            found.update((i, index.name) for i, hit in zip(idx, hits) if hit)
            idx = [i for i, hit in zip(idx, hits) if not hit]
        return found

