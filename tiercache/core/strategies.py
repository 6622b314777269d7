"""Write policies and slow-tier membership indexes: pure Python, no torch, no bytes.

A write policy says where a stored block goes and what happens to an evicted one:

    write_through  every memory tier takes it and it is queued for the disk at once;
                   an evicted block is dropped (the disk has it, or admission said no)
    write_back     only the fastest memory tier takes it; an evicted block moves one
                   tier down (device -> host -> disk) before its slot is reused

The remote tier is always written through: sharing is its purpose.

A slow index answers "is this block in that slow tier?" for the decision layer:
`known(key)` from memory (fast, under the manager's lock) and `contains_many(keys)`
which may do I/O (called outside the lock).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass

Key = Hashable


@dataclass(frozen=True)
class WritePolicy:
    name: str
    fill_all_memory_tiers: bool   # store into every memory tier (else only the fastest)
    disk_on_store: bool           # queue new blocks for the disk at store time
    spill_on_evict: bool          # an evicted block moves down instead of being dropped
    flush_on_close: bool          # close() writes blocks held only in memory to disk


WRITE_POLICIES: dict[str, WritePolicy] = {
    "write_through": WritePolicy("write_through", True, True, False, False),
    "write_back": WritePolicy("write_back", False, False, True, True),
}


def make_write_policy(name: str) -> WritePolicy:
    try:
        return WRITE_POLICIES[name]
    except KeyError:
        raise ValueError(f"write_policy: expected one of {sorted(WRITE_POLICIES)}, got {name!r}") from None


class DiskIndex:
    """Keys of the disk tier, held in memory; rebuilt from the store at open.

    Kept exact for this process's own writes (the writer reports what it wrote and
    evicted). Other processes sharing the store are noticed through the store's
    change counter: while it differs from the value after our last own commit, a
    key not in memory is checked in the store itself. A key another process
    evicted is found missing when its frame is read, and that block is a miss.
    """

    name = "disk"

    def __init__(self, keys: Iterable[Key], change_counter: Callable[[], int],
                 check_many: Callable[[list[Key]], list[bool]]) -> None:
        self._keys: set[Key] = set(keys)
        self._counter = change_counter
        self._check_many = check_many
        self._own = change_counter()

    def __len__(self) -> int:
        return len(self._keys)

    def known(self, key: Key) -> bool:
        return key in self._keys

    def run_known(self, keys: list[Key]) -> int:
        """How many of `keys`, from the first, this index knows (a prefix walk without a call per key)."""
        known = self._keys
        n = 0
        for k in keys:
            if k not in known:
                break
            n += 1
        return n

    def may_hold_unknown(self) -> bool:
        """Whether another process wrote to the store since our last own commit."""
        return self._counter() != self._own

    def contains_many(self, keys: list[Key]) -> list[bool]:
        out = [k in self._keys for k in keys]
        if all(out) or not self.may_hold_unknown():
            return out
        rest = [i for i, hit in enumerate(out) if not hit]
        for i, hit in zip(rest, self._check_many([keys[i] for i in rest])):
            if hit:
                out[i] = True
                self._keys.add(keys[i])
        return out

    def added(self, keys: Iterable[Key]) -> None:
        self._keys.update(keys)

    def removed(self, keys: Iterable[Key]) -> None:
        self._keys.difference_update(keys)

    def committed(self, counter: int) -> None:
        """The store's change counter right after one of our own commits."""
        self._own = counter


class RemoteIndex:
    """Keys known to be on the remote server (written or seen by us), bounded; the server decides."""

    name = "remote"

    def __init__(self, exists_many: Callable[[list[Key]], list[bool]], memory: int = 1 << 18,
                 epoch: Callable[[], int] | None = None) -> None:
        self._exists_many = exists_many
        self._known: OrderedDict[Key, None] = OrderedDict()
        self._memory = memory
        self._epoch = epoch  # bumps when the server was unreachable: it may have restarted empty
        self._seen_epoch = epoch() if epoch is not None else 0

    def known(self, key: Key) -> bool:
        if self._epoch is not None and self._epoch() != self._seen_epoch:
            self._seen_epoch = self._epoch()
            self._known.clear()
        return key in self._known

    def contains_many(self, keys: list[Key]) -> list[bool]:
        out = self._exists_many(keys) if keys else []
        self.added(k for k, hit in zip(keys, out) if hit)
        self.removed(k for k, hit in zip(keys, out) if not hit)
        return out

    def added(self, keys: Iterable[Key]) -> None:
        for k in keys:
            self._known[k] = None
            self._known.move_to_end(k)
        while len(self._known) > self._memory:
            self._known.popitem(last=False)

    def removed(self, keys: Iterable[Key]) -> None:
        for k in keys:
            self._known.pop(k, None)
