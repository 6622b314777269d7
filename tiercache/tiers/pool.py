"""A preallocated pool of block slots in one memory (device or host).

The pool owns its slab and its key -> slot map; it asks its eviction policy
for victims and never decides anything else. It is not thread-safe on its
own: the manager calls it under its lock. Copies into and out of slots happen
outside that lock, while the slot is pinned:

    slot = pool.get(key); pool.pin(key)   # under the lock
    ... copy from pool.view(slot) ...     # no lock
    pool.unpin(key)                       # under the lock

A pinned slot is never chosen as a victim, so it cannot be overwritten while
it is being read or written.
"""

from __future__ import annotations

from collections import Counter

import torch

from ..config import KVLayout
from ..keys import BlockKey
from ..policy import EvictionPolicy


class BlockPool:
    def __init__(self, name: str, layout: KVLayout, capacity_bytes: int, device: torch.device,
                 policy: EvictionPolicy, pin_memory: bool = False) -> None:
        self.name = name
        self.layout = layout
        self.block_bytes = layout.block_bytes
        self.num_slots = capacity_bytes // layout.block_bytes
        self.capacity_bytes = self.num_slots * layout.block_bytes
        self.device = device
        self.policy = policy
        # Allocated once; pinned when it backs a GPU so H2D/D2H copies can be async.
        self.slab = torch.empty((self.num_slots, *layout.block_shape), dtype=layout.dtype, device=device,
                                pin_memory=pin_memory and device.type == "cpu")
        self.pinned_memory = bool(pin_memory and device.type == "cpu")
        if device.type == "cpu" and not self.pinned_memory:
            self.slab.zero_()  # fault the pages in now, not on the first store's hot path
        self._slots: dict[BlockKey, int] = {}
        self._free = list(range(self.num_slots - 1, -1, -1))
        self._pins: Counter[BlockKey] = Counter()
        self._ready: set[BlockKey] = set()  # slots whose bytes are complete (two-phase writes)
        self._tags: dict[BlockKey, object] = {}  # the caller's note per block (its namespace id)

    # -- queries -------------------------------------------------------------------------
    def __contains__(self, key: object) -> bool:
        return key in self._ready

    def __len__(self) -> int:
        return len(self._slots)

    def keys(self) -> list[BlockKey]:
        return list(self._ready)

    def get(self, key: BlockKey) -> int | None:
        """Slot of a complete block, or None."""
        return self._slots.get(key) if key in self._ready else None

    def view(self, slot: int) -> torch.Tensor:
        return self.slab[slot]

    @property
    def used_bytes(self) -> int:
        return len(self._slots) * self.block_bytes

    def touch(self, key: BlockKey) -> None:
        self.policy.touch(key)

    # -- pins ----------------------------------------------------------------------------
    def pin(self, key: BlockKey) -> None:
        self._pins[key] += 1

    def unpin(self, key: BlockKey) -> None:
        self._pins[key] -= 1
        if self._pins[key] <= 0:
            del self._pins[key]

    def tag(self, key: BlockKey) -> object:
        return self._tags.get(key)

    def reserve(self, key: BlockKey, tag: object = None) -> tuple[int, list[tuple[BlockKey, int, object]]] | None:
        """Phase 1: a slot for `key`, evicting if needed. Returns (slot, evicted) or None.

        `evicted` lists the (key, slot, tag) of the block pushed out; its slot is
        the one returned, so a caller that must keep the victim (write-back)
        copies it out before writing the new block. The new slot is pinned and
        not readable until `commit`.
        """
        if self.num_slots == 0 or key in self._slots:
            return None
        evicted: list[tuple[BlockKey, int, object]] = []
        if not self._free:
            victims = self.policy.victims(1, self._pins)
            if victims is None:
                return None
            for v in victims:
                evicted.append((v, self._slots[v], self._tags.get(v)))
                self._drop(v)
        slot = self._free.pop()
        self._slots[key] = slot
        self._tags[key] = tag
        self._pins[key] += 1
        return slot, evicted

    def commit(self, key: BlockKey) -> None:
        """Phase 2: the slot's bytes are complete; the block becomes readable."""
        self._ready.add(key)
        self.policy.insert(key)
        self.unpin(key)

    def abort(self, key: BlockKey) -> None:
        self.unpin(key)
        self._drop(key)

    def _drop(self, key: BlockKey) -> None:
        slot = self._slots.pop(key)
        self._tags.pop(key, None)
        self._ready.discard(key)
        self.policy.remove(key)
        self._free.append(slot)
