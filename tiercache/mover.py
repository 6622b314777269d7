"""The byte layer: executes the core's plans over the media. It decides nothing.

    spills     write-back victims copied to their new home before their slots are reused
    fetch      frames of slow blocks read (one LMDB snapshot, one Redis MGET) and decoded,
               verified, into the block's promotion slot or a scratch buffer
    gather     the served prefix copied into the caller's tensor: one index_select per medium
    promote    blocks copied into the memory slots reserved for them above their source

Every copy between the host and a CUDA device goes through the pinned staging pool
(`tiercache.pinned`): host rows are gathered into pinned buffers and copied asynchronously
on the current stream (a buffer is reused only after its copy has run); device rows come
down through pinned buffers before the host reads them.

Every decode task is waited for before a plan is completed, whatever happened
(an error in a sibling task, a KeyboardInterrupt in the caller): no task may
still write into a slot once the core has released it.
"""

from __future__ import annotations

import concurrent.futures as cf
import threading
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch

from . import pinned
from .codec import CODEC_NONE, CODEC_OFFSET, frame_segments
from .config import KVLayout
from .core.plans import LoadPlan, Loc, Spill
from .errors import CorruptFrame, OnceLogger
from .tiers.slab import MemorySlab, StagingArea, staging_pool

# A block is decoded straight into a token-major result when its rows (one layer's one plane) are at
# least this long; below it, one copy per row costs more than decoding into scratch and one gather
# (measured: 64 KiB blocks of 4 KiB rows, 51 us/block in place against about half that via scratch).
_MIN_IN_PLACE_ROW = 16 << 10
# Scratch buffers kept between loads (decoded slow blocks with no host slot to land in): at most this
# many, each at most this big.
SCRATCH_KEEP, SCRATCH_KEEP_BYTES = 2, 64 << 20


def _run_start(idx: torch.Tensor) -> int | None:
    """The first index when `idx` (1-D, CPU) is one ascending run of consecutive integers, else None."""
    n = idx.numel()
    if not n or idx.device.type != "cpu":
        return None
    first = int(idx[0])
    return first if int(idx[-1]) - first == n - 1 and (n < 3 or bool((idx.diff() == 1).all())) else None


def as_bytes(t: torch.Tensor) -> np.ndarray:
    return t.reshape(-1).view(torch.uint8).numpy()


def _in_memory_raw(frame: Any) -> bool:
    """A frame held in memory (an LMDB value, a Redis reply) whose header says uncompressed: decoding it is
    a memcpy and a checksum, done faster by the calling thread than handed to the pool (measured, 64 KiB
    blocks, 2 threads, A/B interleaved: block-major loads 38.7 -> 25.2 us a block, token-major 32.2 -> 31.1).
    Frames read from files, and compressed ones, go to the pool.
    Only a scheduling hint: every frame is still fully verified when it is decoded."""
    return not hasattr(frame, "readinto") and len(frame) > CODEC_OFFSET and frame[CODEC_OFFSET] == CODEC_NONE


_NUMPY_COPY_BYTES = 256 << 10  # blocks below this are staged with numpy copies (see Mover._small_blocks)


class Mover:
    def __init__(self, layout: KVLayout, slabs: dict[str, MemorySlab], staging: StagingArea, *, disk: Any,
                 remote: Any, codec: Any, io: cf.ThreadPoolExecutor, io_threads: int, recorder: Any,
                 log: OnceLogger, on_corrupt: Callable[[str, Any, Exception], None],
                 on_missing: Callable[[str, list], None] | None = None,
                 pool: pinned.StagingPool | None = None) -> None:
        self._pool = pool
        self._pool_lock = threading.Lock()
        self._scratch_free: list[torch.Tensor] = []
        self._scratch_lock = threading.Lock()
        self._on_missing = on_missing or (lambda tier, keys: None)
        self.layout = layout
        self.slabs = slabs
        self.staging = staging
        self.disk, self.remote, self.codec = disk, remote, codec
        self._io = io
        self._threads = io_threads
        # bytes of one layer's one plane of a block: a contiguous run of a token-major tensor
        self._row_bytes = layout.block_bytes // (layout.num_layers * layout.planes)
        self.recorder = recorder
        self._log = log
        self._on_corrupt = on_corrupt

    @property
    def pool(self) -> pinned.StagingPool:
        """The pinned staging pool for host<->device copies (the cache's, else the host slab's or its own)."""
        with self._pool_lock:
            if self._pool is None:
                host = next((s for s in self.slabs.values() if s.device.type == "cpu"), None)
                self._pool = host.staging if host is not None else staging_pool(self.layout)
            return self._pool

    def copy_block(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """dst <- src for one block (or one layer of it); through pinned staging across host and device.
        Returns with dst usable by the host (when dst is on the host) or by the current stream."""
        if not pinned.crosses(dst.device, src.device):
            dst.copy_(src)
        elif src.device.type == "cpu":
            pinned.host_to_device(self.pool, src.unsqueeze(0), 0, None, dst.unsqueeze(0))
        else:
            pinned.device_to_host(self.pool, src.unsqueeze(0), 0, dst.unsqueeze(0))

    # -- locations -----------------------------------------------------------------------
    def tensor(self, loc: Loc) -> torch.Tensor:
        medium, slot = loc
        if medium == "stage":
            return self.staging.get(slot)
        return self.slabs[medium].view(slot)

    def tensor_of_job(self, job: Any) -> torch.Tensor:
        """The bytes of a write job (a pinned host slot or a staging buffer)."""
        return self.tensor(job.src)

    def bytes_of_job(self, job: Any) -> np.ndarray:
        """tensor_of_job as uint8 numpy bytes, from views made once (a torch-to-numpy view costs ~3 us)."""
        medium, slot = job.src
        if medium == "stage":
            return self.staging.bytes(slot)
        return self.slabs[medium].row_bytes(slot)

    def write_blocks(self, plan: Any, kv6: torch.Tensor) -> None:
        """Copy the caller's blocks (kv6: [L, planes, n, B, H, D]) into every slot the store plan reserved."""
        per_slab: dict[str, tuple[list[int], list[int]]] = {}
        staged: list[tuple[int, int]] = []
        for i, dsts in plan.dsts.items():
            for medium, slot in dsts:
                if medium == "stage":
                    staged.append((i, slot))
                else:
                    pos, slots = per_slab.setdefault(medium, ([], []))
                    pos.append(i)
                    slots.append(slot)
        if staged and pinned.crosses(kv6.device, torch.device("cpu")):
            # device -> staging buffers: gathered on the device, brought down through pinned buffers at once
            picked = kv6.index_select(2, torch.tensor([i for i, _ in staged], device=kv6.device))
            host = torch.empty(picked.shape, dtype=picked.dtype)
            pinned.device_to_host(self.pool, picked, 2, host)
            for j, (_, sid) in enumerate(staged):
                self.staging.get(sid).copy_(host[:, :, j])
        elif staged:
            small = self._small_blocks(kv6)
            if small is not None:  # numpy copies: ~1 us a small block where torch's copy_ costs ~6
                shape = small.shape[1:]
                for i, sid in staged:
                    np.copyto(self.staging.bytes(sid).reshape(shape), small[i])
            else:
                for i, sid in staged:
                    self.staging.get(sid).copy_(kv6[:, :, i])
        for medium, (pos, slots) in per_slab.items():
            src = kv6 if len(pos) == kv6.shape[2] else \
                kv6.index_select(2, torch.tensor(pos, device=kv6.device))
            self.slabs[medium].scatter(slots, src)

    def _small_blocks(self, kv6: torch.Tensor) -> np.ndarray | None:
        """kv6's blocks as numpy bytes [n, L, planes, B, H, D * itemsize] where blocks are small enough that a
        per-call cost decides a copy (large ones keep torch's multi-threaded copy), else None."""
        if kv6.device.type != "cpu" or self.layout.block_bytes >= _NUMPY_COPY_BYTES or kv6.stride(-1) != 1:
            return None
        return kv6.detach().view(torch.uint8).numpy().transpose(2, 0, 1, 3, 4, 5)

    def run_spills(self, spills: list[Spill], complete: Callable[[Spill, bool], Any], jobs: list) -> None:
        """Copy each victim to its new home, in order (deeper spills come first); report each.

        Write jobs the reports produce go into `jobs` as they come, so that they survive an
        exception (a KeyboardInterrupt) raised by a later spill."""
        for s in spills:
            ok = False
            try:
                self.copy_block(self.tensor(s.dst), self.tensor(s.src))
                ok = True
            except Exception as e:
                self.recorder.error(s.src[0], "spill")
                self._log.warning("spill", "tiercache: moving an evicted block down failed (%r); it is dropped", e)
            job = complete(s, ok)
            if job is not None:
                jobs.append(job)

    # -- slow blocks ---------------------------------------------------------------------
    def fetch_targets(self, plan: LoadPlan, direct: torch.Tensor | None = None,
                      block_major: bool = False) -> dict[int, Loc | torch.Tensor]:
        """Where each slow block is decoded: its host (or CPU device) promotion slot, else its place in
        `direct` (the load's contiguous CPU result, [L, planes, T, H, D] or block-major [n, L, planes,
        B, H, D], covering the whole plan), else scratch."""
        slow = plan.slow()
        targets: dict[int, Loc | torch.Tensor] = {}
        need_scratch = []
        # decode destinations as numpy bytes (rows of one view per buffer: a tensor-to-numpy view per block
        # cost ~5 us); the blocks decoded straight into the result are not gathered after
        dsts: dict[int, Any] = {}
        in_place: set[int] = set()
        rows_of = None
        promote = plan.promote
        for i in slow:
            loc = next((d for d in promote[i] if self.slabs[d[0]].device.type == "cpu"), None) \
                if i in promote else None
            if loc is not None:
                targets[i] = loc
            elif direct is not None and (block_major or self._row_bytes >= _MIN_IN_PLACE_ROW):
                if rows_of is None:  # one numpy view of the result (a view per block cost ~4 us)
                    rows_of = as_bytes(direct).reshape(len(direct), -1) if block_major else self._row_view(direct)
                if block_major:
                    targets[i] = direct[i]
                    dsts[i] = rows_of[i]
                else:
                    targets[i] = direct[:, :, i * self.layout.block_size:(i + 1) * self.layout.block_size]
                    dsts[i] = self._rows(rows_of, i)
            else:
                need_scratch.append(i)
        in_place.update(dsts)
        plan.cache["in_place"], plan.cache["dst"] = in_place, dsts
        if need_scratch:
            scratch = self._take_scratch(plan, len(need_scratch))
            rows = as_bytes(scratch).reshape(len(need_scratch), -1)
            for j, i in enumerate(need_scratch):
                targets[i] = scratch[j]
                dsts[i] = rows[j]
            plan.cache["scratch"] = (scratch, {i: j for j, i in enumerate(need_scratch)})
        return targets

    @staticmethod
    def _row_view(kv: torch.Tensor) -> np.ndarray:
        """A contiguous token-major [L, planes, T, H, D] tensor as bytes [L, planes, T * H * D * itemsize]."""
        return kv.view(torch.uint8).numpy().reshape(kv.shape[0], kv.shape[1], -1)

    def _rows(self, a: np.ndarray, i: int) -> list[list[np.ndarray]]:
        """Block i of `_row_view(kv)` as decode rows: per layer, its planes' contiguous byte ranges."""
        rb = self._row_bytes
        return [[a[l_, p, i * rb:(i + 1) * rb] for p in range(a.shape[1])] for l_ in range(a.shape[0])]

    def _take_scratch(self, plan: LoadPlan, n: int) -> torch.Tensor:
        """n blocks of scratch for a plan: a kept buffer when one is free and big enough (its pages are
        faulted in already: a fresh 14 MiB buffer cost ~40 us a 64 KiB block in page faults), else new.
        Given back by `release_scratch` when the plan is done."""
        nbytes = n * self.layout.block_bytes
        buf = None
        if nbytes <= SCRATCH_KEEP_BYTES:
            with self._scratch_lock:
                fits = [k for k, b in enumerate(self._scratch_free) if b.numel() >= nbytes]
                if fits:  # by index: list.remove would compare tensors with ==, element by element
                    buf = self._scratch_free.pop(min(fits, key=lambda k: self._scratch_free[k].numel()))
        if buf is None:
            buf = torch.empty(nbytes, dtype=torch.uint8)
        plan.cache["scratch_buf"] = buf
        return buf[:nbytes].view(self.layout.dtype).view(n, *self.layout.block_shape)

    def release_scratch(self, plan: LoadPlan) -> None:
        """The plan's scratch is no longer read (its gathers and promotions have run): keep it for the next."""
        buf = plan.cache.pop("scratch_buf", None)
        if buf is None or buf.numel() > SCRATCH_KEEP_BYTES:
            return
        with self._scratch_lock:
            self._scratch_free.append(buf)
            if len(self._scratch_free) > SCRATCH_KEEP:
                sizes = [b.numel() for b in self._scratch_free]
                self._scratch_free.pop(sizes.index(min(sizes)))

    def target_tensor(self, t: Loc | torch.Tensor) -> torch.Tensor:
        return t if isinstance(t, torch.Tensor) else self.tensor(t)

    def fetch(self, plan: LoadPlan, targets: dict[int, Loc | torch.Tensor], layers: range | None = None,
              disk_get: Callable[[Any], Any] | None = None, whole: set[int] | None = None) -> set[int]:
        """Read and decode the slow blocks of `plan` (all layers, or `layers`); the set decoded and verified.

        `disk_get`: a read snapshot's get, opened by the caller when it planned the load."""
        by_tier: dict[str, list[int]] = {}
        for i in targets:
            by_tier.setdefault(plan.srcs[i][0], []).append(i)
        good: set[int] = set()
        if by_tier.get("disk"):
            idx = by_tier["disk"]
            with self.disk.reader() if disk_get is None else nullcontext(disk_get) as get:
                items, gone = [], []
                for i in idx:
                    f = get(plan.keys[i])
                    if f is not None:
                        items.append((i, f))
                    else:  # gone (another process evicted it): a miss, and no longer in the index
                        gone.append(plan.keys[i])
                if gone:
                    self._on_missing("disk", gone)
                good |= self._decode(plan, "disk", items, targets, layers, whole)
        if by_tier.get("remote"):
            idx = by_tier["remote"]
            frames = self.remote.get_many([plan.keys[i] for i in idx])
            gone = [plan.keys[i] for i, f in zip(idx, frames) if f is None]
            if gone:  # evicted by the server, or it restarted empty
                self._on_missing("remote", gone)
            good |= self._decode(plan, "remote", [(i, f) for i, f in zip(idx, frames) if f is not None],
                                 targets, layers, whole)
        return good

    def _decode(self, plan: LoadPlan, tier: str, items: list[tuple[int, Any]],
                targets: dict[int, Loc | torch.Tensor], layers: range | None,
                whole: set[int] | None = None) -> set[int]:
        if not items:
            return set()
        L = self.layout.num_layers
        spans = [layers] if layers is not None else None
        if spans is None:
            parts = max(1, min(L, -(-self._threads // len(items))))
            spans = [range(L * p // parts, L * (p + 1) // parts) for p in range(parts)]
        tasks = [(i, f, r) for i, f in items for r in spans]
        errors: dict[int, BaseException] = {}

        dsts = plan.cache.get("dst", {})

        def one(task: tuple[int, Any, range]) -> None:
            i, frame, r = task
            dst = dsts.get(i)
            if dst is None:  # a host slot
                dst = as_bytes(self.target_tensor(targets[i]))
            if layers is not None and frame_segments(frame) == 1:
                # a small block is one segment: decoded whole the first time any layer of it is asked for
                self.codec.decode_into(frame, dst, key=plan.keys[i])
                if whole is not None:
                    whole.add(i)
                return
            full = r.start == 0 and r.stop == L
            self.codec.decode_into(frame, dst, None if full else r, key=plan.keys[i])

        def run(chunk: list[tuple[int, Any, range]]) -> dict[int, BaseException]:
            errs: dict[int, BaseException] = {}
            for task in chunk:
                try:
                    one(task)
                except Exception as e:
                    errs.setdefault(task[0], e)
            return errs

        # a few chunks per thread, not one task per block: a thread-pool hop costs more than a small decode
        nchunks = 1 if all(_in_memory_raw(f) for _, f, _ in tasks) else min(len(tasks), 2 * self._threads)
        chunks = [tasks[c::nchunks] for c in range(nchunks)]
        if nchunks == 1:
            errors.update(run(chunks[0]))
        else:
            futs = {self._io.submit(run, c): c for c in chunks}
            try:
                cf.wait(futs)
            finally:
                for f in futs:
                    f.cancel()
                cf.wait(futs)  # even when interrupted: nothing may write into a slot after we return
            for f, chunk in futs.items():
                if f.cancelled() or f.exception() is not None:
                    e = f.exception() if not f.cancelled() else RuntimeError("decode cancelled")
                    for task in chunk:
                        errors.setdefault(task[0], e)
                else:
                    for i, e in f.result().items():
                        errors.setdefault(i, e)
        for i, e in errors.items():
            if isinstance(e, CorruptFrame):
                self._on_corrupt(tier, plan.keys[i], e)
            else:
                self.recorder.error(tier, "load")
                self._log.warning(f"decode-{tier}", "tiercache: reading a %s block failed (%r); treated as a miss",
                                  tier, e)
        return {i for i, _ in items if i not in errors}

    # -- gather and promote --------------------------------------------------------------
    def effective_src(self, plan: LoadPlan, i: int, targets: dict[int, Loc | torch.Tensor]) -> Loc | torch.Tensor:
        return targets[i] if i in targets else plan.srcs[i]

    def gather(self, plan: LoadPlan, n: int, out6: torch.Tensor, targets: dict, layer: int | None = None) -> None:
        """out6 ([L, planes, n, B, H, D], or one layer's [planes, n, B, H, D]) <- blocks 0..n-1."""
        first = plan.srcs[0][0] if n else None
        if not targets and first in self.slabs and all(m == first for m, _ in plan.srcs[:n]):
            # the common case: one slab. The index tensor is built once per plan (a layer-wise load
            # gathers once per layer).
            idx = plan.cache.get(("idx", n))
            if idx is None:
                idx = plan.cache[("idx", n)] = self.slabs[first].index([s for _, s in plan.srcs[:n]])
            self.slabs[first].gather(idx, out6, layer)
            return
        groups, loose = self._groups(plan, n, targets)
        dim = 2 if layer is None else 1
        for medium, (pos, idx, whole) in groups.items():
            by_layer = plan.cache["scratch"][0].permute(1, 2, 0, 3, 4, 5) if medium == "scratch" \
                else self.slabs[medium]._by_layer
            src = by_layer if layer is None else by_layer[layer]
            if pinned.crosses(src.device, out6.device):
                if src.device.type == "cpu":  # pinned staging, async on the current stream
                    pinned.host_to_device(self.pool, src, dim, idx, out6, None if whole else pos)
                else:
                    pinned.device_to_host(self.pool, torch.index_select(src, dim, idx.to(src.device)), dim, out6,
                                          None if whole else pos)
                continue
            start = _run_start(idx)
            # slots (or scratch rows) in one ascending run: a view, not an index_select copy first
            picked = src.narrow(dim, start, idx.numel()) if start is not None \
                else torch.index_select(src, dim, idx.to(src.device))
            if whole:
                out6.copy_(picked, non_blocking=True)
            else:
                out6.index_copy_(dim, pos.to(out6.device), picked.to(out6.device, non_blocking=True))
            if medium in self.slabs:
                self.slabs[medium].note_read()
        for i, t in loose:
            self.copy_block(out6.select(dim, i), t if layer is None else t[layer])

    def _groups(self, plan: LoadPlan, n: int, targets: dict) -> tuple[dict, list]:
        """Blocks 0..n-1 grouped by the medium they are read from (memoised per plan: a layer-wise load
        gathers once per layer): medium -> (positions, slots, covers all n)."""
        got = plan.cache.get(("groups", n))
        if got is not None:
            return got
        scratch = plan.cache.get("scratch", (None, {}))[1]
        in_place = plan.cache.get("in_place", ())
        lists: dict[str, tuple[list[int], list[int]]] = {}
        loose: list[tuple[int, torch.Tensor]] = []
        for i in range(n):
            if i in in_place:
                continue  # decoded straight into the result
            if i in scratch:
                medium, slot = "scratch", scratch[i]
            else:
                src = self.effective_src(plan, i, targets)
                if isinstance(src, torch.Tensor) or src[0] == "stage":
                    loose.append((i, self.target_tensor(src)))
                    continue
                medium, slot = src
            pos, slots = lists.setdefault(medium, ([], []))
            pos.append(i)
            slots.append(slot)
        groups = {m: (torch.tensor(pos), torch.tensor(slots), len(pos) == n) for m, (pos, slots) in lists.items()}
        plan.cache[("groups", n)] = (groups, loose)
        return groups, loose

    def promote(self, plan: LoadPlan, good: set[int], targets: dict) -> set[int]:
        """Copy blocks into the memory slots reserved for them; the set whose every slot was filled."""
        per_slab: dict[str, tuple[list[int], list[torch.Tensor]]] = {}
        done = {i for i in plan.promote if i in good}
        for i in done:
            src = self.effective_src(plan, i, targets)
            for loc in plan.promote[i]:
                if loc == src:
                    continue  # decoded straight into it
                slots, srcs = per_slab.setdefault(loc[0], ([], []))
                slots.append(loc[1])
                srcs.append(self.target_tensor(src))
        for medium, (slots, srcs) in per_slab.items():
            self.slabs[medium].scatter(slots, torch.stack(srcs).permute(1, 2, 0, 3, 4, 5))
        return done
