"""Slots of one memory tier (device or host): which block is where, and which are in flight.

A slot is in one of three states:

    free      no block
    writing   reserved for a block whose bytes are being copied in; never readable
    ready     holds a complete block; readable; an eviction candidate unless pinned

    reserve(key)  free or evicted slot -> writing (returns the slot and what was evicted)
    commit(key)   writing -> ready           (the copy finished)
    abort(key)    writing -> free            (the copy failed: the bytes are never readable)
    pin/unpin     a ready block being read (or written below) cannot be evicted

No torch, no bytes, no lock: the BlockManager calls it under its own lock.
"""

from __future__ import annotations

from collections.abc import Hashable

from ..policy import EvictionPolicy

Key = Hashable


class SlotIndex:
    def __init__(self, name: str, num_slots: int, policy: EvictionPolicy) -> None:
        self.name = name
        self.num_slots = num_slots
        self.policy = policy
        self._ready: dict[Key, int] = {}
        self._writing: dict[Key, int] = {}
        self._pins: dict[Key, int] = {}
        self._free = list(range(num_slots - 1, -1, -1))  # pop() hands out slot 0 first

    # -- queries -------------------------------------------------------------------------
    def find(self, key: Key) -> int | None:
        """Slot of a ready block, or None."""
        return self._ready.get(key)

    def __contains__(self, key: object) -> bool:
        return key in self._ready

    def holds(self, key: Key) -> bool:
        """Ready or being written."""
        return key in self._ready or key in self._writing

    def __len__(self) -> int:
        return len(self._ready) + len(self._writing)

    def ready_keys(self) -> list[Key]:
        return list(self._ready)

    @property
    def num_pinned(self) -> int:
        return len(self._pins)

    @property
    def num_writing(self) -> int:
        return len(self._writing)

    # -- reads ---------------------------------------------------------------------------
    def pin(self, key: Key) -> int:
        slot = self._ready[key]
        self._pins[key] = self._pins.get(key, 0) + 1
        return slot

    def unpin(self, key: Key) -> None:
        n = self._pins[key] - 1
        if n:
            self._pins[key] = n
        else:
            del self._pins[key]

    def touch(self, key: Key) -> None:
        if key in self._ready:
            self.policy.touch(key)

    # batched forms of the above: one call per plan, not per block
    def pin_many(self, keys: list[Key]) -> None:
        pins = self._pins
        for k in keys:
            pins[k] = pins.get(k, 0) + 1

    def unpin_many(self, keys: list[Key]) -> None:
        pins = self._pins
        for k in keys:
            n = pins[k] - 1
            if n:
                pins[k] = n
            else:
                del pins[k]

    def touch_many(self, keys: list[Key]) -> None:
        ready = self._ready
        self.policy.touch_many([k for k in keys if k in ready])

    # -- writes --------------------------------------------------------------------------
    def reserve(self, key: Key) -> tuple[int, list[tuple[Key, int]]] | None:
        """A slot in `writing` state for `key`, evicting one ready block if none is free.

        Returns (slot, evicted) where evicted is [(victim, victim's old slot)] — that slot is the
        one returned, so a caller that must keep the victim (write-back) copies it out first —
        or None when the key is already held or every slot is in flight.
        """
        if self.num_slots == 0 or key in self._ready or key in self._writing:
            return None
        evicted: list[tuple[Key, int]] = []
        if not self._free:
            victims = self.policy.victims(1, self._pins)
            if victims is None:
                return None
            for v in victims:
                evicted.append((v, self._ready[v]))
                self._drop_ready(v)
        slot = self._free.pop()
        self._writing[key] = slot
        return slot, evicted

    def commit(self, key: Key) -> None:
        slot = self._writing.pop(key)
        self._ready[key] = slot
        self.policy.insert(key)

    def abort(self, key: Key) -> None:
        self._free.append(self._writing.pop(key))

    def evict(self, key: Key) -> int | None:
        """Remove a ready, unpinned block (e.g. it failed verification); its slot, or None."""
        if key not in self._ready or key in self._pins:
            return None
        slot = self._ready[key]
        self._drop_ready(key)
        return slot

    def _drop_ready(self, key: Key) -> None:
        self._free.append(self._ready.pop(key))
        self.policy.remove(key)
