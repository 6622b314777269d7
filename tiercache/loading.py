"""The read side of TierCache: load, prefetch and layer-wise load.

Every read follows the same two phases:

1. plan (under the lock): for each key of the prefix, the memory slot that
   holds it (pinned now, so it cannot be evicted or overwritten), or "slow"
   (disk or remote), until the first key found nowhere;
2. move (no lock): slow blocks are decoded from the LMDB snapshot (or Redis)
   straight into host slots reserved for them (promotion), then everything is
   copied to its destination by the transfer engine; then, under the lock,
   reservations are committed and pins released.

A frame that fails validation ends the prefix there: it is a miss, is
deleted and counted, and is never returned.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .codec import frame_segments
from .errors import CorruptFrame
from .keys import BlockKey, tokens_to_array
from .layerwise import KVUnavailable, LayerLoad, PrefetchHandle

_MAX_QUEUED_PREFETCHES = 64


@dataclass(eq=False)
class _Src:
    key: BlockKey
    tier: str                        # serving tier: device | host | disk | remote
    tensor: torch.Tensor | None      # where the block's bytes are (None until a slow block is fetched)
    slow: bool = False               # to be fetched from disk or remote
    pin: str | None = None           # pool pinned for this read
    reserved: str | None = None      # pool whose slot was reserved to receive a slow block
    dev_reserved: bool = False       # a device slot was reserved to promote this block into
    scratch: bool = False            # tensor is a borrowed scratch buffer (no slot was free)
    frame: Any = None


@dataclass
class _Plan:
    srcs: list[_Src] = field(default_factory=list)

    @property
    def slow(self) -> list[_Src]:
        return [s for s in self.srcs if s.slow]


def _as_bytes(t: torch.Tensor) -> np.ndarray:
    return t.reshape(-1).view(torch.uint8).numpy()


class LoadPath:
    """Mixin of TierCache: everything that reads blocks."""

    # -- planning ------------------------------------------------------------------------
    def _plan(self, keys: list[BlockKey]) -> _Plan:
        plan = _Plan()
        slow_ok = self.disk is not None or self.remote is not None
        with self._lock:
            for k in keys:
                for name, pool in self.pools.items():
                    slot = pool.get(k)
                    if slot is not None:
                        pool.pin(k)
                        plan.srcs.append(_Src(k, name, pool.view(slot), pin=name))
                        break
                else:
                    pending = self._pending.get(k)
                    if pending is not None:
                        plan.srcs.append(_Src(k, "disk", pending))
                    elif slow_ok:
                        plan.srcs.append(_Src(k, "disk", None, slow=True))
                    else:
                        break
        return plan

    def _release(self, srcs: list[_Src], commit: bool) -> None:
        """Unpin memory sources; commit (or abort) slots reserved for slow blocks."""
        with self._lock:
            for s in srcs:
                if s.scratch:
                    if len(self._scratch) < self._scratch_max:
                        self._scratch.append(s.tensor)
                    s.scratch = False
                if s.pin is not None:
                    self.pools[s.pin].unpin(s.key)
                    s.pin = None
                if s.reserved is not None:
                    pool = self.pools[s.reserved]
                    pool.commit(s.key) if commit else pool.abort(s.key)
                    s.reserved = None

    def _reserve_slow(self, srcs: list[_Src], promote: bool) -> None:
        """Give every slow block a destination: a host slot (promotion) or a private buffer."""
        host = self.pools.get("host") if promote else None
        spills = []
        with self._lock:
            for s in srcs:
                r = host.reserve(s.key, None) if host is not None else None
                if r is not None:
                    slot, evicted = r
                    s.tensor, s.reserved = host.view(slot), "host"
                    if self.cfg.write_policy == "write_back":
                        spills += [("host", v, vs, tag) for v, vs, tag in evicted]
                    else:
                        self.recorder.evicted("host", len(evicted))
        for tier, v, vs, tag in spills:
            self._spill(tier, v, vs, tag)
        # no slot: a scratch buffer, reused across loads (fresh multi-MiB allocations page-fault
        # on first touch, which measured ~1.3x slower warm disk loads)
        with self._lock:
            for s in srcs:
                if s.tensor is None and self._scratch:
                    s.tensor, s.scratch = self._scratch.pop(), True
        for s in srcs:
            if s.tensor is None:
                s.tensor, s.scratch = torch.empty(self.layout.block_shape, dtype=self.layout.dtype), True

    def _fetch_slow(self, plan: _Plan, promote: bool = True) -> int:
        """Fetch and decode the slow blocks of `plan` in order; returns the usable prefix length.

        Blocks from the first one missing or corrupt onwards are dropped from the plan.
        """
        slow = plan.slow
        if not slow:
            return len(plan.srcs)
        missing_at = None
        if self.disk is not None:
            with self.disk.reader() as get:
                found = []
                for s in slow:
                    f = get(s.key)
                    if f is None:
                        break
                    s.frame = f
                    found.append(s)
                self._reserve_slow(found, promote)
                bad = self._decode_all(found)
                for s in found:
                    s.frame = None
            if bad is not None:
                missing_at = plan.srcs.index(bad)
            elif len(found) < len(slow):
                rest = slow[len(found):]
                got = self._fetch_remote(rest, promote)
                if got < len(rest):
                    missing_at = plan.srcs.index(rest[got])
            if found:
                self.disk.note_access(s.key for s in found)
        else:
            got = self._fetch_remote(slow, promote)
            if got < len(slow):
                missing_at = plan.srcs.index(slow[got])
        if missing_at is not None:
            self._release(plan.srcs[missing_at:], commit=False)
            del plan.srcs[missing_at:]
        return len(plan.srcs)

    def _decode_all(self, srcs: list[_Src]) -> _Src | None:
        """Decode frames on the I/O pool, split by layers so even one block uses every thread.

        Returns the first corrupt source (in order), or None.
        """
        L = self.layout.num_layers
        parts = max(1, min(L, -(-self.cfg.io_threads // max(len(srcs), 1))))
        bounds = [range(L * p // parts, L * (p + 1) // parts) for p in range(parts)]
        tasks = [(s, r) for s in srcs for r in bounds]

        def one(task: tuple[_Src, range]) -> CorruptFrame | None:
            s, layers = task
            try:
                self.codec.decode_into(s.frame, _as_bytes(s.tensor), layers, key=s.key)
                return None
            except CorruptFrame as e:
                return e
        results = list(self._io.map(one, tasks)) if len(tasks) > 1 else [one(t) for t in tasks]
        errors: dict[int, CorruptFrame] = {}
        for (s, _), err in zip(tasks, results):
            if err is not None:
                errors.setdefault(id(s), err)
        bad = next((s for s in srcs if id(s) in errors), None)
        if bad is not None:
            self._corrupt("disk", bad.key, errors[id(bad)])
        return bad

    def _fetch_remote(self, srcs: list[_Src], promote: bool) -> int:
        if self.remote is None or not srcs:
            return 0
        frames = self.remote.get_many([s.key for s in srcs], self.recorder)
        n = next((i for i, f in enumerate(frames) if f is None), len(frames))
        ok = srcs[:n]
        self._reserve_slow(ok, promote)
        for i, (s, f) in enumerate(zip(ok, frames)):
            s.tier = "remote"
            try:
                self.codec.decode_into(f, _as_bytes(s.tensor), key=s.key)
            except CorruptFrame as e:
                self._corrupt("remote", s.key, e)
                return i
        return n

    def _corrupt(self, tier: str, key: BlockKey, err: Exception) -> None:
        self.recorder.corrupt(tier)
        self._log.warning(f"corrupt-{tier}", "tiercache: corrupt %s block %s (%s); treated as a miss",
                          tier, key.hex(), err)
        if tier == "disk" and self._writer is not None:
            self._writer.delete_later(key)
        elif tier == "remote" and self.remote is not None:
            self.remote.delete(key)

    def _device_promotions(self, srcs: list[_Src]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Reserve device slots for blocks served from below; (dst, src) copies to make."""
        dev = self.pools.get("device")
        pairs = []
        if dev is None:
            return pairs
        with self._lock:
            for s in srcs:
                if s.tier == "device" or s.key in dev:
                    continue
                r = dev.reserve(s.key, None)
                if r is None:
                    continue
                slot, evicted = r
                self.recorder.evicted("device", len(evicted))
                pairs.append((dev.view(slot), s.tensor))
                s.dev_reserved = True
        return pairs

    def _commit_device(self, srcs: list[_Src]) -> None:
        dev = self.pools.get("device")
        if dev is None:
            return
        with self._lock:
            for s in srcs:
                if s.dev_reserved:
                    dev.commit(s.key)
                    s.dev_reserved = False

    def _account(self, srcs: list[_Src], seconds: float) -> None:
        by_tier: dict[str, int] = {}
        with self._lock:
            for s in srcs:
                by_tier[s.tier] = by_tier.get(s.tier, 0) + 1
                pool = self.pools.get(s.tier)
                if pool is not None:
                    pool.touch(s.key)
        for tier, n in by_tier.items():
            self.recorder.loaded(tier, n * self.layout.block_bytes, seconds)
        if self.cfg.admission == "second_hit" and self.disk is not None:
            # a block read again from memory has earned its place on disk
            mem = [s for s in srcs if s.tier in ("device", "host")]
            if mem:
                on_disk = self.disk.count_each([s.key for s in mem])
                for s, there in zip(mem, on_disk):
                    if not there:
                        self._offer_disk_from_pool(s.key)

    # -- public --------------------------------------------------------------------------
    def load(self, tokens: Any, out: torch.Tensor | None = None, salt: Any = None) -> torch.Tensor:
        """KV of the longest cached prefix, [L, planes, n, H, D] on cfg.device (n = 0 on a miss).

        With `out=`, the blocks are written into that preallocated tensor (its token
        axis bounds how many are loaded) and the filled view out[:, :, :n] is returned.
        """
        self._check_open()
        L = self.layout
        keys = self.keys(tokens_to_array(tokens), salt)
        if out is not None:
            if not isinstance(out, torch.Tensor):
                raise TypeError(f"out: expected a torch.Tensor, got {type(out).__name__}")
            if out.dtype != L.dtype:
                raise TypeError(f"out: expected dtype {L.dtype} (the layout's), got {out.dtype}")
            if out.dim() != 5 or (out.shape[0], out.shape[1], out.shape[3], out.shape[4]) != \
                    (L.num_layers, L.planes, L.num_kv_heads, L.head_dim):
                raise ValueError(f"out: expected shape [{L.num_layers}, {L.planes}, T, {L.num_kv_heads}, "
                                 f"{L.head_dim}], got {list(out.shape)}")
            keys = keys[: out.shape[2] // self._B]
        t0 = time.perf_counter()
        plan = self._plan(keys)
        try:
            n = self._fetch_slow(plan, promote=True)
            B = self._B
            if out is None:
                out = torch.empty(L.kv_shape(n * B), dtype=L.dtype, device=self.cfg.device)
            pairs = [(out[:, :, i * B:(i + 1) * B], s.tensor) for i, s in enumerate(plan.srcs)]
            pairs += self._device_promotions(plan.srcs)
            self.engine.copy(pairs).wait()
            self._commit_device(plan.srcs)
        finally:
            self._release(plan.srcs, commit=True)
        self._account(plan.srcs, time.perf_counter() - t0)
        self._update_usage()
        return out[:, :, : n * self._B]

    def prefetch(self, tokens: Any, salt: Any = None) -> PrefetchHandle:
        """Bring the cached prefix up into the memory tiers in the background."""
        self._check_open()
        keys = self.keys(tokens_to_array(tokens), salt)
        if self._prefetch_queued >= _MAX_QUEUED_PREFETCHES:
            return PrefetchHandle(None, self.recorder, dropped=True)
        with self._lock:
            self._prefetch_queued += 1
        return PrefetchHandle(self._prefetcher.submit(self._prefetch_job, keys), self.recorder)

    def _prefetch_job(self, keys: list[BlockKey]) -> int:
        with self._lock:
            self._prefetch_queued -= 1
        if self._closed:
            return 0
        t0 = time.perf_counter()
        plan = self._plan(keys)
        try:
            if not self.pools:
                return 0
            n = self._fetch_slow(plan, promote=True)
            pairs = self._device_promotions(plan.srcs)
            self.engine.copy(pairs).wait()
            self._commit_device(plan.srcs)
        finally:
            self._release(plan.srcs, commit=True)
        moved = [s for s in plan.srcs if s.slow]
        if moved:
            self._account(moved, time.perf_counter() - t0)
        self._update_usage()
        return n * self._B

    def load_layers(self, tokens: Any, salt: Any = None, num_tokens: int | None = None) -> LayerLoad:
        """Start a layer-by-layer load of the cached prefix; see tiercache.layerwise.LayerLoad."""
        self._check_open()
        keys = self.keys(tokens_to_array(tokens), salt)
        if num_tokens is not None:
            keys = keys[: num_tokens // self._B]
        plan = self._plan(keys)
        slow = plan.slow
        if slow:
            present = self.disk.count_each([s.key for s in slow]) if self.disk is not None else [False] * len(slow)
            cut = next((i for i, p in enumerate(present) if not p), None)
            if cut is not None:
                at = plan.srcs.index(slow[cut])
                self._release(plan.srcs[at:], commit=False)
                del plan.srcs[at:]
                slow = slow[:cut]
            self._reserve_slow(slow, promote=True)
        n = len(plan.srcs) * self._B
        L = self.layout
        out = torch.empty(L.kv_shape(n), dtype=L.dtype, device=self.cfg.device)
        ll = LayerLoad(out, n, self.recorder, cuda_events=self.engine.cuda)
        self._layer_worker.submit(self._layer_job, plan, ll)
        return ll

    def _layer_job(self, plan: _Plan, ll: LayerLoad) -> None:
        t0 = time.perf_counter()
        B = self._B
        slow = plan.slow
        ok = False
        handle = None
        try:
            with self.disk.reader() if (slow and self.disk is not None) else _null() as get:
                frames = {}
                for s in slow:
                    f = get(s.key)
                    if f is None:
                        raise KVUnavailable(f"block {s.key.hex()} left the disk tier")
                    frames[s.key] = f
                whole = {k for k, f in frames.items() if frame_segments(f) == 1}  # small blocks: one segment
                for i in range(ll.num_layers):
                    pairs = []
                    for j, s in enumerate(plan.srcs):
                        if s.key in frames and (s.key not in whole or i == 0):
                            try:
                                if s.key in whole:
                                    self.codec.decode_into(frames[s.key], _as_bytes(s.tensor), key=s.key)
                                else:
                                    self.codec.decode_layer_into(frames[s.key], i, _as_bytes(s.tensor[i]),
                                                                    key=s.key)
                            except CorruptFrame as e:
                                self._corrupt("disk", s.key, e)
                                raise
                        pairs.append((ll.out[i, :, j * B:(j + 1) * B], s.tensor[i]))
                    handle = self.engine.copy(pairs)
                    if self.engine.cuda:
                        ll.layer_ready(i, handle._event)
                    else:
                        handle.wait()
                        ll.layer_ready(i)
            ok = True
        except BaseException as e:  # a failed layer load is a miss for the caller, not a crash
            ll.fail(e)
        finally:
            if handle is not None:
                handle.wait()  # copies out of pinned slots must finish before the pins go
            self._release(plan.srcs, commit=ok)
        if ok:
            if slow and self.disk is not None:
                self.disk.note_access(s.key for s in slow)
            self._account(plan.srcs, time.perf_counter() - t0)
            ll.finish()


class _null:
    def __enter__(self):
        return lambda key: None

    def __exit__(self, *exc: object) -> None:
        return None
