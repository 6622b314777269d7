"""BlockManager: every decision about which tier holds which block. No torch, no bytes.

Verbs, each batched per request and two-phase:

    lookup(keys) -> [tier, ...]            serving tier of each block of the cached prefix
    prepare_load(keys) -> LoadPlan         sources pinned, promotion slots reserved
    complete_load(plan, ok) -> [WriteJob]  ok[i]: block i's bytes reached every slot reserved for it
    prepare_store(keys) -> StorePlan       slots reserved, victims chosen, slow writes decided
    complete_store(plan, ok) -> [WriteJob] the jobs to hand to the write-behind
    complete_spill(spill, ok)              a write-back victim reached (or missed) its new home
    complete_write(job, results)           a write-behind job finished, per slow tier

A block in flight is protected (pinned or reserved). `complete_*` with ok=False
releases exactly what was reserved and never makes those slots readable. When no
plan is open and no write job is queued, nothing is pinned or reserved.
"""

from __future__ import annotations

import threading
from collections.abc import Hashable, Iterable
from typing import Any

from ..policy import make_admission_policy, make_eviction_policy
from .index import SlotIndex
from .plans import LoadPlan, Loc, Spill, StorePlan, WriteJob
from .staging import Staged, StageTable
from .strategies import make_write_policy
from .where import Where

Key = Hashable
MEMORY_TIERS = ("device", "host")


class _NoEvents:
    def evicted(self, tier: str, n: int) -> None: ...
    def dropped_write(self, tier: str, n: int = 1) -> None: ...


class BlockManager:
    def __init__(self, slots: dict[str, int], *, eviction: str = "lru", admission: str = "all",
                 write_policy: str = "write_through", disk: Any = None, remote: Any = None,
                 stage_limit: int = 1024, events: Any = None, on_stage_free: Any = None) -> None:
        unknown = set(slots) - set(MEMORY_TIERS)
        if unknown:
            raise ValueError(f"slots: expected tiers among {list(MEMORY_TIERS)}, got {sorted(unknown)}")
        self.mem: dict[str, SlotIndex] = {t: SlotIndex(t, slots[t], make_eviction_policy(eviction))
                                          for t in MEMORY_TIERS if slots.get(t)}
        self._order = list(self.mem)
        self.disk = disk
        self.remote = remote
        self.policy = make_write_policy(write_policy)
        self.admission = make_admission_policy(admission)
        self.events = events or _NoEvents()
        self._lock = threading.Lock()
        self._stage = StageTable(stage_limit, on_stage_free)
        self._where = Where(self.mem, self._order, self._stage, disk, remote)
        self._tags: dict[Key, object] = {}

    @property
    def tiers(self) -> tuple[str, ...]:
        return tuple(self._order) + (("disk",) if self.disk is not None else ()) + \
            (("remote",) if self.remote is not None else ())

    # -- where is a block ----------------------------------------------------------------
    def _locate(self, keys: list[Key]) -> list[tuple[str, Loc]]:
        """The cached prefix; the caller holds the lock, which this releases around slow-tier I/O."""
        where = self._where
        found, miss = where.walk(keys, None)
        if miss is None or (self.remote is None and (self.disk is None or not self.disk.may_hold_unknown())):
            return found
        self._lock.release()
        try:
            slow = where.slow_membership(keys, miss)
        finally:
            self._lock.acquire()
        found, _ = where.walk(keys, slow)
        return found

    def lookup(self, keys: list[Key]) -> list[str]:
        """Serving tier of each block of the cached prefix. Moves nothing, pins nothing."""
        with self._lock:
            return [tier for tier, _ in self._locate(keys)]

    # -- reservations --------------------------------------------------------------------
    def _reserve(self, tier: str, key: Key, spills: list[Spill], tag: object = None) -> int | None:
        r = self.mem[tier].reserve(key)
        if r is None:
            return None
        slot, evicted = r
        if evicted:
            self.events.evicted(tier, len(evicted))
        for victim, vslot in evicted:
            if self.policy.spill_on_evict:
                self._spill(tier, victim, vslot, spills)
            elif not self._held(victim):
                self._tags.pop(victim, None)
        if tag is not None:
            self._tags[key] = tag
        return slot

    def _held(self, key: Key) -> bool:
        return any(ix.holds(key) for ix in self.mem.values()) or key in self._stage

    def _spill(self, tier: str, key: Key, slot: int, spills: list[Spill]) -> None:
        """Write-back: the victim at (tier, slot) moves down before that slot is overwritten."""
        below = self._order[self._order.index(tier) + 1:]
        for lower in below:
            if self.mem[lower].holds(key):
                return
            dst = self._reserve(lower, key, spills)  # its own victims are spilled (appended) first
            if dst is not None:
                spills.append(Spill(key, (tier, slot), (lower, dst)))
                return
        if self.disk is None or self.disk.known(key) or key in self._stage:
            if not self._held(key) and not (self.disk is not None and self.disk.known(key)):
                self._tags.pop(key, None)
            return
        if not self.admission.admit(key):  # admission's choice, not a lost write
            self._tags.pop(key, None)
            return
        sid = self._stage.alloc()
        if sid is None:  # every staging buffer is in flight: the write is dropped, and counted
            self.events.dropped_write("disk")
            self._tags.pop(key, None)
            return
        self._stage[key] = Staged(("stage", sid), ("disk",), self._tags.get(key))
        spills.append(Spill(key, (tier, slot), ("stage", sid)))

    # -- load ----------------------------------------------------------------------------
    def prepare_load(self, keys: list[Key], promote: bool = True) -> LoadPlan:
        """Pin the sources of the cached prefix; reserve memory slots to promote it into."""
        with self._lock:
            found = self._locate(keys)
            plan = LoadPlan(keys=list(keys[:len(found)]), srcs=[loc for _, loc in found],
                            serving=[tier for tier, _ in found])
            by_medium = self._by_medium(plan)
            for medium, ks in by_medium.items():
                if medium in self.mem:
                    self.mem[medium].pin_many(ks)
                elif medium == "stage":
                    for k in ks:
                        self._stage[k].pins += 1
            top = self._order[0] if self._order else None
            if promote and set(by_medium) != {top}:  # (nothing is above the top tier)
                for i, k in enumerate(plan.keys):
                    medium = plan.srcs[i][0]
                    if medium == top:
                        continue
                    dsts = []
                    for t in self._order:  # only the memory tiers above the source
                        if t == medium:
                            break
                        if not self.mem[t].holds(k):
                            slot = self._reserve(t, k, plan.spills, self._tags.get(k))
                            if slot is not None:
                                dsts.append((t, slot))
                    if dsts:
                        plan.promote[i] = dsts
            return plan

    def complete_load(self, plan: LoadPlan, ok: list[bool]) -> list[WriteJob]:
        """Release the plan: unpin sources, commit promotions whose bytes arrived, abort the rest."""
        jobs: list[WriteJob] = []
        with self._lock:
            if plan.completed:
                return jobs
            plan.completed = True
            self._finish_spills(plan.spills)
            for medium, ks in self._by_medium(plan).items():
                if medium in self.mem:
                    self.mem[medium].unpin_many(ks)
                elif medium == "stage":
                    for k, loc in zip(plan.keys, plan.srcs):
                        if loc[0] == "stage":
                            self._unpin_src(k, loc)
            for i, dsts in plan.promote.items():
                good = i < len(ok) and ok[i]
                for t, _slot in dsts:
                    (self.mem[t].commit if good else self.mem[t].abort)(plan.keys[i])
            served = plan.keys if all(ok) and len(ok) >= len(plan.keys) else \
                [k for i, k in enumerate(plan.keys) if i < len(ok) and ok[i]]
            for ix in self.mem.values():
                ix.touch_many(served)
            if self.disk is not None and self.admission.offer_on_hit:
                jobs = self._readmit(served)
        return jobs

    @staticmethod
    def _by_medium(plan: LoadPlan) -> dict[str, list[Key]]:
        """The plan's keys grouped by the medium they are read from (one group in the common case)."""
        srcs = plan.srcs
        if srcs and all(loc[0] == srcs[0][0] for loc in srcs):
            return {srcs[0][0]: plan.keys}
        out: dict[str, list[Key]] = {}
        for k, loc in zip(plan.keys, srcs):
            out.setdefault(loc[0], []).append(k)
        return out

    def _unpin_src(self, key: Key, loc: Loc) -> None:
        medium = loc[0]
        if medium in self.mem:
            self.mem[medium].unpin(key)
        elif medium == "stage":
            st = self._stage.get(key)
            if st is not None and st.src == loc and st.pins > 0:
                st.pins -= 1
                if st.released and st.pins == 0:
                    self._drop_stage(key, st)

    def _readmit(self, keys: list[Key]) -> list[WriteJob]:
        """Second-hit admission: a block read again from memory earns its place on disk."""
        jobs = []
        host = self.mem.get("host")
        for k in keys:
            if host is None or k not in host or k in self._stage or self.disk.known(k):
                continue
            if self.admission.admit(k):
                jobs.append(self._stage_from_host(k, ("disk",)))
        return jobs

    def _stage_from_host(self, key: Key, dests: tuple[str, ...]) -> WriteJob:
        slot = self.mem["host"].pin(key)
        st = self._stage[key] = Staged(("host", slot), dests, self._tags.get(key), ready=True)
        return WriteJob(key, st.src, dests, st.tag)

    # -- store ---------------------------------------------------------------------------
    def prepare_store(self, keys: list[Key], tag: object = None) -> StorePlan:
        """Reserve slots for the blocks no memory tier holds; decide which go to slow tiers."""
        with self._lock:
            plan = StorePlan(keys=list(keys), present=[False] * len(keys), tag=tag)
            targets = self._order if self.policy.fill_all_memory_tiers else self._order[:1]
            for i, k in enumerate(keys):
                held = [ix for ix in self.mem.values() if k in ix]
                if held:
                    for ix in held:
                        ix.touch(k)
                    plan.present[i] = True
                    continue
                if any(ix.holds(k) for ix in self.mem.values()):
                    continue  # another call is writing this block right now: it caches it
                st = self._stage.get(k)
                staged = st is not None  # already on its way down (or being spilled there)
                on_disk = self.disk is not None and self.disk.known(k)
                on_remote = self.remote is not None and self.remote.known(k)
                plan.present[i] = (staged and st.ready) or on_disk or on_remote
                dsts = []
                for t in targets:
                    slot = self._reserve(t, k, plan.spills, tag)
                    if slot is not None:
                        dsts.append((t, slot))
                dests = []
                if not staged:
                    if self.disk is not None and not on_disk and (self.policy.disk_on_store or not dsts) \
                            and self.admission.admit(k):
                        dests.append("disk")
                    if self.remote is not None and not on_remote:
                        dests.append("remote")
                if dests and not any(t == "host" for t, _ in dsts):
                    sid = self._stage.alloc()
                    if sid is None:
                        for d in dests:
                            self.events.dropped_write(d)
                        dests = []
                    else:
                        dsts.append(("stage", sid))
                if dsts:
                    plan.dsts[i] = dsts
                if dests:
                    plan.writes[i] = tuple(dests)
            return plan

    def complete_store(self, plan: StorePlan, ok: list[bool]) -> tuple[list[bool], list[WriteJob]]:
        """Commit what arrived; returns (cached after this call, per block) and the write jobs."""
        jobs: list[WriteJob] = []
        cached = list(plan.present)
        with self._lock:
            if plan.completed:
                return cached, jobs
            plan.completed = True
            self._finish_spills(plan.spills)
            for i, dsts in plan.dsts.items():
                good = i < len(ok) and ok[i]
                k = plan.keys[i]
                for t, slot in dsts:
                    if t == "stage":
                        if not good:
                            self._stage.release(slot)
                        continue
                    if good:
                        self.mem[t].commit(k)
                        cached[i] = True
                    else:
                        self.mem[t].abort(k)
                if not good and not self._held(k):
                    self._tags.pop(k, None)
            for i, dests in plan.writes.items():
                if not (i < len(ok) and ok[i]):
                    continue
                k = plan.keys[i]
                sid = next((s for t, s in plan.dsts.get(i, ()) if t == "stage"), None)
                if k in self._stage:  # another call staged it meanwhile
                    if sid is not None:
                        self._stage.release(sid)
                elif sid is None:
                    jobs.append(self._stage_from_host(k, dests))
                else:
                    st = self._stage[k] = Staged(("stage", sid), dests, plan.tag, ready=True)
                    jobs.append(WriteJob(k, st.src, dests, plan.tag))
                cached[i] = True
        return cached, jobs

    # -- spills and writes ----------------------------------------------------------------
    def complete_spill(self, spill: Spill, ok: bool) -> WriteJob | None:
        with self._lock:
            return self._complete_spill(spill, ok)

    def _complete_spill(self, spill: Spill, ok: bool) -> WriteJob | None:
        if spill.done:
            return None
        spill.done = True
        medium, slot = spill.dst
        if medium in self.mem:
            (self.mem[medium].commit if ok else self.mem[medium].abort)(spill.key)
            if not ok:
                self.events.dropped_write(medium)
            return None
        st = self._stage.get(spill.key)
        if ok and st is not None:
            st.ready = True
            return WriteJob(spill.key, st.src, st.dests, st.tag)
        if st is not None:
            del self._stage[spill.key]
            self._stage.release(slot)
        self.events.dropped_write("disk")
        return None

    def _finish_spills(self, spills: list[Spill]) -> None:
        for s in spills:  # any spill the executor did not report did not happen
            self._complete_spill(s, False)

    def complete_write(self, job: WriteJob, results: dict[str, bool]) -> None:
        """A write-behind job finished: record where the block now is, then release its source."""
        with self._lock:
            for dest, ok in results.items():
                index = self.disk if dest == "disk" else self.remote
                if ok and index is not None:
                    index.added([job.key])
            st = self._stage.get(job.key)
            if st is None or st.src != job.src:
                return
            if st.pins:
                st.released = True  # a reader is still copying from it; the last unpin frees it
            else:
                self._drop_stage(job.key, st)

    def _drop_stage(self, key: Key, st: Staged) -> None:
        del self._stage[key]
        medium, slot = st.src
        if medium == "host":
            self.mem["host"].unpin(key)
        else:
            self._stage.release(slot)
        if not self._held(key):
            self._tags.pop(key, None)

    def slow_removed(self, tier: str, keys: Iterable[Key]) -> None:
        """A slow tier lost blocks (evicted, found corrupt, deleted)."""
        index = self.disk if tier == "disk" else self.remote
        if index is not None:
            with self._lock:
                index.removed(keys)

    def forget(self, key: Key) -> None:
        """Drop a block from the memory tiers where it is idle (its bytes are known bad)."""
        with self._lock:
            for ix in self.mem.values():
                ix.evict(key)

    # -- write-back at close -------------------------------------------------------------
    def prepare_write_back(self) -> tuple[list[WriteJob], list[Spill]]:
        """Every block held only in memory, on its way to disk: host blocks directly, device
        blocks through a staging copy (the spills, pinned at their source)."""
        jobs: list[WriteJob] = []
        spills: list[Spill] = []
        if self.disk is None:
            return jobs, spills
        with self._lock:
            for t in reversed(self._order):  # host first: its blocks need no staging copy
                for k in self.mem[t].ready_keys():
                    if k in self._stage or self.disk.known(k):
                        continue
                    if t == "host":
                        jobs.append(self._stage_from_host(k, ("disk",)))
                    else:
                        sid = self._stage.alloc(unbounded=True)
                        slot = self.mem[t].pin(k)
                        self._stage[k] = Staged(("stage", sid), ("disk",), self._tags.get(k))
                        spills.append(Spill(k, (t, slot), ("stage", sid)))
        return jobs, spills

    def finish_write_back_spill(self, spill: Spill, ok: bool) -> WriteJob | None:
        with self._lock:
            self.mem[spill.src[0]].unpin(spill.key)
            return self._complete_spill(spill, ok)

    # -- introspection -------------------------------------------------------------------
    def tag(self, key: Key) -> object:
        return self._tags.get(key)

    def cached_locally(self, keys: list[Key]) -> list[bool]:
        """Whether each block is readable from memory, staging or the disk index right now."""
        with self._lock:
            return [self._where.local(k) is not None for k in keys]

    def held_by(self, tier: str) -> int:
        with self._lock:
            ix = self.mem.get(tier)
            return len(ix) if ix is not None else 0

    def in_flight(self) -> dict[str, dict[str, int]]:
        """Per tier: blocks pinned and slots reserved right now (all zero when idle)."""
        with self._lock:
            out = {t: {"pinned": ix.num_pinned, "reserved": ix.num_writing} for t, ix in self.mem.items()}
            for slow in ("disk", "remote"):
                if (self.disk if slow == "disk" else self.remote) is not None:
                    out[slow] = {"pinned": 0, "reserved": self._stage.reserved_for(slow)}
            out["staged"] = {"pinned": self._stage.pins(), "reserved": len(self._stage)}
            return out
