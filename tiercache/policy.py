"""Eviction and admission policies: pure Python, no torch, no bytes moved.

An eviction policy tracks the keys a tier holds and names victims:

    insert(key)  a key entered the tier
    touch(key)   a key was read
    remove(key)  a key left the tier for another reason
    victims(n, protected) -> list | None
                 exactly n keys to evict, none of them in `protected`
                 (blocks being read or written), or None if that is impossible;
                 atomic: the caller removes what it is given, or nothing changes.

Policies are chosen by name from EVICTION_POLICIES / ADMISSION_POLICIES, whose
errors list the valid names.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Container, Hashable

Key = Hashable


class EvictionPolicy:
    name = ""

    def insert(self, key: Key) -> None:
        raise NotImplementedError

    def touch(self, key: Key) -> None:
        raise NotImplementedError

    def touch_many(self, keys: list[Key]) -> None:
        for k in keys:
            self.touch(k)

    def remove(self, key: Key) -> None:
        raise NotImplementedError

    def victims(self, n: int, protected: Container[Key] = ()) -> list | None:
        raise NotImplementedError

    def __len__(self) -> int:
        raise NotImplementedError

    def __contains__(self, key: object) -> bool:
        raise NotImplementedError


class LRUPolicy(EvictionPolicy):
    """Least recently used first."""

    name = "lru"

    def __init__(self) -> None:
        self._order: OrderedDict[Key, None] = OrderedDict()

    def insert(self, key: Key) -> None:
        self._order[key] = None
        self._order.move_to_end(key)

    def touch(self, key: Key) -> None:
        if key in self._order:
            self._order.move_to_end(key)

    def touch_many(self, keys: list[Key]) -> None:
        order, to_end = self._order, self._order.move_to_end
        for k in keys:
            if k in order:
                to_end(k)

    def remove(self, key: Key) -> None:
        self._order.pop(key, None)

    def victims(self, n: int, protected: Container[Key] = ()) -> list | None:
        if n <= 0:
            return []
        if len(self._order) - sum(1 for k in protected if k in self._order) < n:
            return None  # fail fast: callers pass only the (few) keys in flight as `protected`
        out = []
        for key in self._order:  # oldest first; skips at most len(protected) keys
            if key not in protected:
                out.append(key)
                if len(out) == n:
                    return out
        return None

    def __len__(self) -> int:
        return len(self._order)

    def __contains__(self, key: object) -> bool:
        return key in self._order


class FIFOPolicy(LRUPolicy):
    """First in, first out: reads do not refresh a key."""

    name = "fifo"

    def touch(self, key: Key) -> None:
        pass

    def touch_many(self, keys: list[Key]) -> None:
        pass


class S3FIFOPolicy(EvictionPolicy):
    """S3-FIFO (Yang et al., SOSP'23): a small probationary FIFO, a main FIFO and a ghost set.

    New keys enter `small`; a key read again while in `small` moves to `main` when
    it reaches the head, otherwise it is evicted and remembered in `ghost`; a key
    re-inserted while remembered goes straight to `main`. `main` gives keys with
    a nonzero frequency another round (frequency capped at 3).
    """

    name = "s3fifo"

    def __init__(self, small_ratio: float = 0.1) -> None:
        self._small: OrderedDict[Key, None] = OrderedDict()
        self._main: OrderedDict[Key, None] = OrderedDict()
        self._ghost: OrderedDict[Key, None] = OrderedDict()
        self._freq: dict[Key, int] = {}
        self._small_ratio = small_ratio

    def insert(self, key: Key) -> None:
        if key in self._freq:
            self.touch(key)
            return
        self._freq[key] = 0
        if key in self._ghost:
            del self._ghost[key]
            self._main[key] = None
        else:
            self._small[key] = None

    def touch(self, key: Key) -> None:
        if key in self._freq:
            self._freq[key] = min(self._freq[key] + 1, 3)

    def remove(self, key: Key) -> None:
        if self._freq.pop(key, None) is not None:
            self._small.pop(key, None)
            self._main.pop(key, None)

    def victims(self, n: int, protected: Container[Key] = ()) -> list | None:
        if n <= 0:
            return []
        # Atomic without copying the state: decide first whether n victims exist. Every key that
        # is not protected is eventually evicted (its frequency only drops), so the loop below
        # then always finds n; it works in place, O(1) amortised per victim.
        if len(self._freq) - sum(1 for k in protected if k in self._freq) < n:
            return None
        small, main, freq = self._small, self._main, self._freq
        out: list = []
        budget = 8 * len(freq) + 8  # safety bound; unreachable when the check above holds
        while len(out) < n and budget:
            budget -= 1
            take_small = bool(small) and (len(small) >= self._small_ratio * (len(small) + len(main)) or not main)
            queue = small if take_small else main
            key, _ = queue.popitem(last=False)
            if key in protected:
                queue[key] = None  # in flight: back to the tail, untouched
            elif freq[key] > 0:
                freq[key] = 0 if take_small else freq[key] - 1
                main[key] = None
            else:
                out.append(key)
                del freq[key]
                self._ghost[key] = None
        if len(out) < n:  # pragma: no cover - guarded by the feasibility check
            for key in out:
                self._ghost.pop(key, None)
                freq[key] = 0
                main[key] = None
            return None
        while len(self._ghost) > max(16, len(freq)):
            self._ghost.popitem(last=False)
        return out

    def __len__(self) -> int:
        return len(self._freq)

    def __contains__(self, key: object) -> bool:
        return key in self._freq


EVICTION_POLICIES: dict[str, Callable[[], EvictionPolicy]] = {
    "lru": LRUPolicy,
    "fifo": FIFOPolicy,
    "s3fifo": S3FIFOPolicy,
}


def make_eviction_policy(name: str) -> EvictionPolicy:
    try:
        return EVICTION_POLICIES[name]()
    except KeyError:
        raise ValueError(f"eviction: expected one of {sorted(EVICTION_POLICIES)}, got {name!r}") from None


class AdmissionPolicy:
    """Decides whether a block offered to a (slow) tier is written there."""

    name = ""
    offer_on_hit = False  # re-offer a block read from memory (a hit is a second sighting)

    def admit(self, key: Key) -> bool:
        raise NotImplementedError


class AdmitAll(AdmissionPolicy):
    name = "all"

    def admit(self, key: Key) -> bool:
        return True


class SecondHit(AdmissionPolicy):
    """Admit a key the second time it is offered; remembers up to `memory` keys seen once."""

    name = "second_hit"
    offer_on_hit = True

    def __init__(self, memory: int = 1 << 20) -> None:
        self._seen: OrderedDict[Key, None] = OrderedDict()
        self._memory = memory

    def admit(self, key: Key) -> bool:
        if key in self._seen:
            del self._seen[key]
            return True
        self._seen[key] = None
        if len(self._seen) > self._memory:
            self._seen.popitem(last=False)
        return False


ADMISSION_POLICIES: dict[str, Callable[[], AdmissionPolicy]] = {
    "all": AdmitAll,
    "second_hit": SecondHit,
}


def make_admission_policy(name: str) -> AdmissionPolicy:
    try:
        return ADMISSION_POLICIES[name]()
    except KeyError:
        raise ValueError(f"admission: expected one of {sorted(ADMISSION_POLICIES)}, got {name!r}") from None
