"""The read side of TierCache: load, prefetch and layer-wise load, each one plan.

    plan     core.prepare_load pins the sources and reserves promotion slots; under the
             eviction gate, the disk snapshot its slow blocks come from is opened
    move     spills, slow frames fetched and verified, the prefix gathered, promotions
    complete core.complete_load with what arrived, in a `finally`, whatever happened

A layer-wise load hands layer i to the caller as soon as it is in place. Its
length is fixed when it starts; if a block cannot be read after all, the load
fails closed (KVUnavailable) and the caller recomputes — never wrong KV.

On a GPU the copies are asynchronous, so host clocks miss them: a load's seconds are its host
work (plan, reads, decode, staging) plus the device time of its copies between CUDA events,
reported to the same metrics once the device has passed them (transfer.DeviceTimes). A background
read (prefetch, layer-wise) promotes on the engine's H2D stream and waits for those copies before
the plan completes: its slots become readable, to any stream, only once their bytes are there.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from .config import KVLayout
from .core import WriteJob
from .layerwise import KVUnavailable, LayerLoad, PrefetchHandle
from .transfer import DeviceTimes

_MAX_QUEUED_PREFETCHES = 64


class ReadPath:
    def __init__(self, *, layout: KVLayout, device: torch.device, core: Any, mover: Any, disk: Any, gate: Any,
                 engine: Any, recorder: Any, queue: Any) -> None:
        self.layout, self.device = layout, device
        self._B = layout.block_size
        self.core, self.mover, self.disk, self._gate = core, mover, disk, gate
        self.engine, self.recorder, self._queue = engine, recorder, queue
        self._prefetcher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tiercache-prefetch")
        self._layer_worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tiercache-layers")
        self._prefetch_queued = 0
        self._prefetch_lock = threading.Lock()
        self._closed = False
        self.times = DeviceTimes()  # CUDA: timings still on the device (loads, layer stalls)

    def close(self) -> None:
        self._closed = True
        self._prefetcher.shutdown(wait=True)
        self._layer_worker.shutdown(wait=True)
        self.settle(block=True)

    def settle(self, block: bool = False) -> None:
        """Report the timings the device has finished (all of them with `block=True`)."""
        self.times.settle(block)

    def _promote(self, plan: Any, good: set[int], targets: dict, background: bool) -> set[int]:
        """Copy blocks into their promotion slots. On the caller's thread the copies run on its stream
        (what it reads next is ordered after them); a background read (prefetch, layer worker) runs them
        on the engine's H2D stream and waits for them before complete_load makes the slots readable,
        since its reader is on another stream."""
        if self.engine is None or not background:
            return self.mover.promote(plan, good, targets)
        got: list[set[int]] = []
        job = self.engine.submit(lambda: got.append(self.mover.promote(plan, good, targets)), "h2d", after=[],
                                 track=False)
        job.wait()
        return got[0]

    # -- plan and move -------------------------------------------------------------------
    def _plan(self, keys: list) -> tuple[Any, Any, Any]:
        """prepare_load, and the disk snapshot its slow blocks are read from, opened before any
        eviction can be committed in between (see writebehind.EvictionGate)."""
        if self.disk is None:
            return self.core.prepare_load(keys), None, None
        with self._gate.shared():
            plan = self.core.prepare_load(keys)
            if not any(src[0] == "disk" for src in plan.srcs):
                return plan, None, None
            try:
                reader = self.disk.reader()
                return plan, reader, reader.__enter__()
            except BaseException:
                self.core.complete_load(plan, [False] * len(plan))
                raise

    def _run(self, keys: list, out: torch.Tensor | None, want_out: bool,
             copy_events: list | None = None, block_major: bool = False) -> tuple[Any, list[bool], Any]:
        """One whole-prefix read: (plan, ok per block, the filled `out` or None). On CUDA, `copy_events`
        receives (host seconds before the copy, start and end events around it on the current stream)."""
        t0 = time.perf_counter()
        plan, reader, get = self._plan(keys)
        ok = [False] * len(plan)
        jobs: list[WriteJob] = []
        try:
            self.mover.run_spills(plan.spills, self.core.complete_spill, jobs)
            direct = None
            if want_out and self.device.type == "cpu" and plan.slow() and (out is None or out.is_contiguous()):
                # slow blocks without a host slot to land in are decoded straight into the result (no
                # scratch buffer, no copy after): allocated for the whole plan, returned cut to what loaded
                if block_major:
                    out = torch.empty((len(plan), *self.layout.block_shape), dtype=self.layout.dtype)
                elif out is None:
                    out = torch.empty(self.layout.kv_shape(len(plan) * self._B), dtype=self.layout.dtype)
                direct = out
            targets = self.mover.fetch_targets(plan, direct, block_major)
            good = (set(range(len(plan))) - set(targets)) | self.mover.fetch(plan, targets, disk_get=get)
            n = next((i for i in range(len(plan)) if i not in good), len(plan))
            if want_out:
                if block_major:  # [n, L, planes, B, H, D]: what a paged cache takes, one copy less
                    if direct is None:
                        out = torch.empty((n, *self.layout.block_shape), dtype=self.layout.dtype,
                                          device=self.device)
                    out6 = out[:n].permute(1, 2, 0, 3, 4, 5)
                else:
                    if out is None:
                        out = torch.empty(self.layout.kv_shape(n * self._B), dtype=self.layout.dtype,
                                          device=self.device)
                    out6 = out[:, :, :n * self._B].unflatten(2, (n, self._B))
                if n:
                    timed = copy_events is not None and out.is_cuda
                    if timed:
                        start = torch.cuda.Event(enable_timing=True)
                        start.record(torch.cuda.current_stream(out.device))
                        host = time.perf_counter() - t0
                    self.mover.gather(plan, n, out6, targets)
                    if timed:
                        end = torch.cuda.Event(enable_timing=True)
                        end.record(torch.cuda.current_stream(out.device))
                        copy_events.append((host, start, end))
            promoted = self._promote(plan, good, targets, background=not want_out)
            ok = [i in good and (i not in plan.promote or i in promoted) for i in range(len(plan))]
        finally:
            if reader is not None:
                reader.__exit__(None, None, None)
            self.mover.release_scratch(plan)
            jobs += self.core.complete_load(plan, ok)
            self._queue(jobs)
        return plan, ok, out

    def _account(self, serving: list[str], seconds: float) -> None:
        for t, n in Counter(serving).items():
            self.recorder.loaded(t, n * self.layout.block_bytes, seconds, n * self._B)

    # -- the three reads ------------------------------------------------------------------
    def load(self, keys: list, out: torch.Tensor | None, block_major: bool = False) -> torch.Tensor:
        self.settle()
        t0 = time.perf_counter()
        copy_events: list = []
        plan, ok, out = self._run(keys, out, want_out=True, copy_events=copy_events, block_major=block_major)
        n = next((i for i, g in enumerate(ok) if not g), len(ok))
        if copy_events:  # CUDA: host work, then the copy's device time (the host did not wait for it)
            host, start, end = copy_events[0]
            self.times.add(lambda s, served=plan.serving[:n]: self._account(served, s), start, end, host)
        else:
            self._account(plan.serving[:n], time.perf_counter() - t0)
        return out[:n] if block_major else out[:, :, : n * self._B]

    def prefetch(self, keys: list) -> PrefetchHandle:
        with self._prefetch_lock:
            if self._prefetch_queued >= _MAX_QUEUED_PREFETCHES:
                return PrefetchHandle(None, self.recorder, dropped=True)
            self._prefetch_queued += 1
        return PrefetchHandle(self._prefetcher.submit(self._prefetch_job, keys), self.recorder)

    def _prefetch_job(self, keys: list) -> int:
        with self._prefetch_lock:
            self._prefetch_queued -= 1
        if self._closed or not self.mover.slabs:
            return 0
        t0 = time.perf_counter()
        plan, ok, _ = self._run(keys, None, want_out=False)
        n = next((i for i, g in enumerate(ok) if not g), len(ok))
        moved = [plan.serving[i] for i in range(n) if plan.srcs[i][0] in ("disk", "remote")]
        if moved:
            self._account(moved, time.perf_counter() - t0)
        return n * self._B

    def load_layers(self, keys: list) -> LayerLoad:
        self.settle()
        plan = self.core.prepare_load(keys)
        try:
            n = len(plan) * self._B
            out = torch.empty(self.layout.kv_shape(n), dtype=self.layout.dtype, device=self.device)
            ll = LayerLoad(out, n, self.recorder, cuda_events=self.engine is not None, times=self.times)
            # what the caller's stream has enqueued so far (out's allocation included) comes first
            fence = self.engine.fence() if self.engine is not None else None
            self._layer_worker.submit(self._layer_job, plan, ll, fence)
        except BaseException:
            self.core.complete_load(plan, [False] * len(plan))
            raise
        return ll

    def _layer_job(self, plan: Any, ll: LayerLoad, fence: Any) -> None:
        t0 = time.perf_counter()
        ok = [False] * len(plan)
        jobs: list[WriteJob] = []
        first = last = None  # the first and last layers' copy jobs (CUDA): sources stay pinned until it has run
        host = 0.0
        # The snapshot is opened here, on the thread that uses it (LMDB read transactions and the
        # disk tier's resize lock belong to a thread). A frame evicted since the plan fails the load.
        reader = get = None
        try:
            if self.disk is not None and any(s[0] == "disk" for s in plan.srcs):
                reader = self.disk.reader()
                get = reader.__enter__()
            self.mover.run_spills(plan.spills, self.core.complete_spill, jobs)
            targets = self.mover.fetch_targets(plan)
            n = len(plan)
            out6 = ll.out.unflatten(2, (n, self._B)) if n else None
            pending, whole = dict(targets), set()
            if self.engine is None and not pending and n:
                # CPU, every block in memory: nothing to overlap (the copy competes with compute for the
                # same cores), so one gather for all layers, then every layer is ready at once
                self.mover.gather(plan, n, out6, targets)
            for i in range(ll.num_layers):
                if self.engine is None and not targets:
                    ll.layer_ready(i)
                    continue
                if pending:
                    got = self.mover.fetch(plan, pending, range(i, i + 1), disk_get=get, whole=whole)
                    if len(got) < len(pending):
                        raise KVUnavailable(f"layer {i}: {len(pending) - len(got)} blocks could not be read")
                    for j in whole:  # one-segment blocks arrived whole with their first layer
                        pending.pop(j, None)
                if n and self.engine is not None:
                    # a worker thread's own stream is not the caller's: order after the caller's fence,
                    # and hand the consumer an event to wait on (on the device, not the host)
                    if first is None:
                        host = time.perf_counter() - t0
                    last = self.engine.submit(lambda i=i: self.mover.gather(plan, n, out6[i], targets, layer=i),
                                              "h2d", priority=True, after=fence, tensors=[ll.out], track=False)
                    first = first or last
                    ll.layer_ready(i, last._event)
                    continue
                if n:
                    self.mover.gather(plan, n, out6[i], targets, layer=i)
                ll.layer_ready(i)
            promoted = self._promote(plan, set(range(n)), targets, background=True)
            ok = [i not in plan.promote or i in promoted for i in range(n)]
        except BaseException as e:  # a failed layer-wise load is a miss for the caller, never wrong KV
            ll.fail(e)
        finally:
            if last is not None:
                try:
                    last.wait()  # copies out of pinned slots finish before the pins go
                except BaseException as e:
                    ll.fail(e)
                    ok = [False] * len(plan)
            if get is not None:
                reader.__exit__(None, None, None)
            self.mover.release_scratch(plan)
            jobs += self.core.complete_load(plan, ok)
            self._queue(jobs)
        if all(ok):
            if first is not None and first._start is not None:
                # host work up to the first copy, then the copies' span on the device (first start -> last end)
                self.times.add(lambda s: self._account(plan.serving, s), first._start, last._event, host)
            else:
                self._account(plan.serving, time.perf_counter() - t0)
            ll.finish()
