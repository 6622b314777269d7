"""Worker side of the vLLM connector: owns the host slab and the slow tiers, and moves bytes.

It decides nothing: the scheduler's plans name the host slots (see vllm_scheduler). Per step (vLLM
calls these in this order):

    start_load   before the forward when the step has loads: host blocks are gathered from their
                 slots in one index_select and written into vLLM's pages; slow blocks come from the
                 worker's `TierCache` (disk, remote: verified frames) and are also copied into the host
                 slot the plan reserved for them. A block not served (a slot whose key is not the
                 block's, a frame evicted or corrupt, an error) is reported by `failed_blocks()`;
                 vLLM recomputes it.
    save         after the forward: the new full blocks are gathered from vLLM's pages once (so
                 vLLM may reuse them from the next step on), copied into their host slots, and
                 written through to the slow tiers by a background thread: the forward pass never
                 waits for disk or network. A request with a failed load this step saves nothing
                 (its later blocks attended to KV that was not there).

Every job is reported back with a per-block ok list (`take_report`): the scheduler makes a slot
readable only when every rank filled it. Each slot also carries the key of the block in it, set
only after its bytes arrived and cleared before they are overwritten, and checked on every read:
whatever the scheduler believes, a worker never serves a slot holding another block.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from ..keys import BlockKey
from ..manager import TierCache
from ..tiers.slab import MemorySlab
from . import vllm_pages
from .vllm_metrics import TierCacheStats
from .vllm_scheduler import LoadJob, SaveJob, TierCacheMetadata, TierCacheWorkerMeta
from .vllm_settings import cache_config, host_slots

log = logging.getLogger("tiercache.vllm")

MAX_QUEUED_SAVES = 64  # saves waiting for the slow-tier writer; more are dropped (and counted)


def _tp_rank() -> int:
    try:
        from vllm.distributed.parallel_state import get_tensor_model_parallel_rank
        return get_tensor_model_parallel_rank()
    except (ImportError, AssertionError, AttributeError):
        return 0


class WorkerSide:
    def __init__(self, vllm_config: Any, kv_cache_config: Any) -> None:
        self.vllm_config = vllm_config
        self.layer_names = list(kv_cache_config.kv_cache_groups[0].layer_names)
        self.cfg = cache_config(vllm_config, kv_cache_config, tp_rank=_tp_rank())
        self.layout = self.cfg.layout
        n = host_slots(self.cfg)
        self.host = MemorySlab("host", self.layout, n, torch.device("cpu"), pin=torch.cuda.is_available()) \
            if n else None
        self.slot_keys: list[bytes | None] = [None] * n
        self._held = 0   # slots holding a block
        # The slow tiers (this rank's namespace). Host memory is the slab above, decided by the scheduler.
        # Its recorder also counts the host slab (hits, stores, usage) for tiercache's own exporter.
        self.cache = TierCache(dataclasses.replace(self.cfg, host_bytes=0), external_tiers=("host",) if n else ()) \
            if self.cfg.disk_enabled or self.cfg.remote_url or n else None
        self.layers: list[torch.Tensor] = []
        self.page_layout: str | None = None
        self._layer_index = {name: i for i, name in enumerate(self.layer_names)}
        self._layer_events: dict[int, list] = {}   # CUDA: layer -> events of this step's loads into it
        self._stream = None
        self._failed: set[int] = set()
        self._failed_reqs: set[str] = set()
        self._done: dict[int, list[bool]] = {}
        self._lock = threading.Lock()
        self._queued = 0
        self._saver = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tiercache-vllm-save")
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tiercache-vllm-load")
        self._recved: set[str] = set()   # asynchronous loads finished (their failed blocks are already in _failed)
        # cumulative (what a test or an operator reads) and per-interval (what vLLM ships to /metrics)
        self.counters = {"loaded_tokens": 0, "failed_blocks": 0, "saved_tokens": 0, "dropped_saves": 0,
                         "save_errors": 0, "host_loaded_tokens": 0, "slow_loaded_tokens": 0}
        self.stats = TierCacheStats()

    # -- set-up ----------------------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        missing = [n for n in self.layer_names if n not in kv_caches]
        if missing:
            raise ValueError(f"kv_caches: no KV cache for layers {missing} of the KV-cache group")
        self.layers = [kv_caches[n] for n in self.layer_names]
        lay = self.layout
        want = (lay.num_kv_heads, lay.block_size, 2 * lay.head_dim)
        for name, t in zip(self.layer_names, self.layers):
            if t.dim() != 4 or tuple(t.shape[1:]) != want or t.dtype != lay.dtype:
                raise ValueError(f"kv_caches[{name!r}]: expected [num_blocks, {want[0]}, {want[1]}, {want[2]}] "
                                 f"{lay.dtype}, got {list(t.shape)} {t.dtype}")
        if self.layers[0].device.type == "cpu":
            ctx = self.vllm_config.compilation_config.static_forward_context
            isa = getattr(ctx[self.layer_names[0]], "isa", None)
            self.page_layout = vllm_pages.layout_for_isa(isa)
            vllm_pages.check_cpu_layout(self.page_layout, self.layers[0], isa)
        else:
            self.page_layout = "flash"
        log.info("tiercache: %d layers, page layout %s, %d host slots, %s", len(self.layers), self.page_layout,
                 len(self.slot_keys), lay.fingerprint())

    # -- host slots ------------------------------------------------------------------------------
    def _fill_slots(self, slots: list[int], keys: list[bytes], blocks: torch.Tensor) -> None:
        """Copy blocks [n, L, 2, B, H, D] into host slots; each slot's key is set only once its bytes are in."""
        t0 = time.perf_counter()
        with self._lock:  # an asynchronous load's promotion may run beside a save (other slots)
            for s in slots:
                if self.slot_keys[s] is not None:
                    self.slot_keys[s] = None  # what the slot held is gone from here on
                    self._held -= 1
        idx = torch.tensor(slots, dtype=torch.long)
        self.host.tensor.index_copy_(0, idx, blocks if blocks.device.type == "cpu" else blocks.cpu())
        with self._lock:
            for s, k in zip(slots, keys):
                self.slot_keys[s] = k
            self._held += len(slots)
        bb = self.layout.block_bytes
        rec = self.cache.recorder
        rec.stored("host", len(slots) * bb, time.perf_counter() - t0)
        rec.usage("host", self._held * bb, len(self.slot_keys) * bb, self._held)

    # -- loads -----------------------------------------------------------------------------------
    def start_load(self, meta: TierCacheMetadata) -> None:
        self._failed_reqs = set()
        sync = [job for job in meta.loads if not job.is_async]
        for job in meta.loads:
            if job.is_async:  # the request waits (not scheduled) until get_finished reports it
                self._loader.submit(self._run_async, job)
        for i, job in enumerate(sync):
            ok = [False] * len(job.block_ids)   # block j is in vLLM's pages
            unfilled: set[int] = set()          # ... but the host slot reserved for it was not filled
            try:
                self._load(job, ok, unfilled)
            except BaseException:  # KeyboardInterrupt: this job and the ones after it end as they are
                for rest in sync[i + 1:]:
                    self._loaded(rest, [False] * len(rest.block_ids), set())
                raise
            finally:  # the scheduler releases exactly what did not arrive
                self._loaded(job, ok, unfilled)

    def _run_async(self, job: LoadJob) -> None:
        ok = [False] * len(job.block_ids)
        unfilled: set[int] = set()
        try:
            self._load(job, ok, unfilled)
        finally:
            self._loaded(job, ok, unfilled)
            with self._lock:  # failed blocks are recorded before the request is reported finished
                self._recved.add(job.req_id)

    def finished_loads(self) -> set[str]:
        """Requests whose asynchronous load is done (vLLM's finished_recving)."""
        with self._lock:
            out, self._recved = self._recved, set()
        return out

    def _job_keys(self, job: LoadJob | SaveJob, n: int) -> list:
        """This rank's keys of a job's blocks, hashed by the scheduler (which hashes each block once)."""
        rank = self.cfg.tp_rank
        keys = job.keys[rank] if rank < len(job.keys) else []
        if len(keys) != n:
            raise ValueError(f"job {job.job_id}: {len(keys)} keys for rank {rank} and {n} blocks")
        return [BlockKey(k) for k in keys]

    def _load(self, job: LoadJob, ok: list[bool], unfilled: set[int]) -> None:
        B = self.layout.block_size
        n = len(job.block_ids)
        try:
            keys = self._job_keys(job, n)
            h = len(job.host_slots)
            if h and self.host is not None:
                good = [j for j in range(h) if self.slot_keys[job.host_slots[j]] == keys[j]]
                if good:
                    t0 = time.perf_counter()
                    idx = torch.tensor([job.host_slots[j] for j in good], dtype=torch.long)
                    dev = self.layers[0].device
                    if dev.type == "cpu":
                        blocks = self.host.tensor.index_select(0, idx)       # [m, L, 2, B, H, D]
                        self._to_pages(blocks, [job.block_ids[j] for j in good], job.is_async)
                    else:
                        with self._load_stream(job.is_async):  # up through pinned staging, on the load stream
                            blocks = torch.empty((len(good), *self.layout.block_shape), dtype=self.layout.dtype,
                                                 device=dev)
                            self.host.gather(idx, blocks.permute(1, 2, 0, 3, 4, 5))
                            self._to_pages(blocks, [job.block_ids[j] for j in good], job.is_async)
                    for j in good:
                        ok[j] = True
                    self.counters["host_loaded_tokens"] += len(good) * B
                    self.cache.recorder.loaded("host", len(good) * self.layout.block_bytes,
                                               time.perf_counter() - t0, len(good) * B)
            if h < n and self.cache is not None:
                blocks = self.cache.load_keys(keys[h:], block_major=True)  # [m, L, 2, B, H, D], the served run
                m = blocks.shape[0]
                if m:
                    promote = [(j, job.promote[j]) for j in range(h, h + m) if j in job.promote]
                    with self._load_stream(job.is_async):
                        self._to_pages(blocks.to(self.layers[0].device), job.block_ids[h:h + m], job.is_async)
                    for j in range(h, h + m):
                        ok[j] = True
                    self.counters["slow_loaded_tokens"] += m * B
                    if promote and self.host is not None:
                        try:
                            self._fill_slots([s for _, s in promote], [keys[j] for j, _ in promote],
                                             blocks[[j - h for j, _ in promote]])
                        except Exception:  # the pages are loaded; only the promotion is lost
                            log.exception("tiercache: promoting loaded blocks to host memory failed")
                            unfilled.update(j for j, _ in promote)
        except Exception:  # a storage fault is a miss: vLLM recomputes what was not loaded
            log.exception("tiercache: load for request %s failed; its blocks are recomputed", job.req_id)
            self.stats.count("load_errors")

    # -- into vLLM's pages: layer by layer on a GPU ----------------------------------------------
    def _load_stream(self, is_async: bool) -> Any:
        """CUDA: a side stream ordered after the compute stream's work so far (vLLM allocated and may have
        zeroed these pages there); the compute stream waits for each layer in wait_for_layer_load."""
        if not self.layers or self.layers[0].device.type != "cuda" or is_async:
            return contextlib.nullcontext()
        if self._stream is None:
            self._stream = torch.cuda.Stream(device=self.layers[0].device, priority=-1)
        self._stream.wait_stream(torch.cuda.current_stream(self.layers[0].device))
        return torch.cuda.stream(self._stream)

    def _to_pages(self, blocks: torch.Tensor, block_ids: list[int], is_async: bool) -> None:
        """Scatter canonical blocks into vLLM's pages. On a GPU, for a load the step waits on, one scatter per
        layer with an event after each: layer i's attention waits only for layer i (wait_for_layer_load). An
        asynchronous load finishes all layers before its request is reported."""
        if not blocks.is_cuda or is_async:
            vllm_pages.scatter(blocks, self.layers, block_ids, self.page_layout)
            if blocks.is_cuda:
                torch.cuda.current_stream(blocks.device).synchronize()
            return
        stream = torch.cuda.current_stream(blocks.device)
        for i, layer in enumerate(self.layers):
            vllm_pages.scatter(blocks[:, i:i + 1].contiguous(), [layer], block_ids, self.page_layout)
            ev = torch.cuda.Event()
            ev.record(stream)
            self._layer_events.setdefault(i, []).append(ev)
        blocks.record_stream(stream)

    def wait_for_layer(self, layer_name: str) -> None:
        """The compute stream waits (on the device, not the host) for this layer's loads of this step."""
        i = self._layer_index.get(layer_name)
        events = self._layer_events.pop(i, None) if i is not None else None
        if events:
            compute = torch.cuda.current_stream(self.layers[0].device)
            for ev in events:
                compute.wait_event(ev)

    def _wait_all_layers(self) -> None:
        for name in list(self.layer_names):
            self.wait_for_layer(name)

    def _loaded(self, job: LoadJob, ok: list[bool], unfilled: set[int]) -> None:
        B = self.layout.block_size
        served = ok.count(True)
        self.counters["loaded_tokens"] += served * B
        failed = [bid for bid, good in zip(job.block_ids, ok) if not good]
        if failed:
            with self._lock:
                self._failed.update(failed)
            if not job.is_async:  # this step's forward attended to what was not loaded: no saves from it
                self._failed_reqs.add(job.req_id)
            self.counters["failed_blocks"] += len(failed)
            self.stats.count("recomputed_blocks", len(failed))
        self._report(job.job_id, [good and j not in unfilled for j, good in enumerate(ok)])

    def failed_blocks(self) -> set[int]:
        with self._lock:
            out, self._failed = self._failed, set()
        return out

    # -- saves -----------------------------------------------------------------------------------
    def save(self, meta: TierCacheMetadata) -> None:
        self._wait_all_layers()  # a layer vLLM did not wait for is still ordered before what follows
        for i, job in enumerate(meta.saves):
            ok = [False] * len(job.block_ids)
            try:
                ok = self._save(job)
            except BaseException:  # KeyboardInterrupt: the saves not made are reported as such
                for rest in meta.saves[i + 1:]:
                    self._report(rest.job_id, [False] * len(rest.block_ids))
                raise
            finally:  # unfilled slots are released by the scheduler, never made readable
                self._report(job.job_id, ok)

    def _save(self, job: SaveJob) -> list[bool]:
        n = len(job.block_ids)
        if job.req_id in self._failed_reqs or not n:
            return [False] * n
        try:
            # a private copy now: vLLM may hand these blocks to another request next step
            blocks = vllm_pages.gather(self.layers, job.block_ids, self.page_layout)   # [n, L, 2, B, H, D]
            if blocks.is_cuda:
                host = torch.empty(blocks.shape, dtype=blocks.dtype, pin_memory=True)
                host.copy_(blocks, non_blocking=True)
                torch.cuda.current_stream().synchronize()
                blocks = host
            keys = self._job_keys(job, n)
            if job.host_slots and self.host is not None:
                js = sorted(job.host_slots)
                self._fill_slots([job.host_slots[j] for j in js], [keys[j] for j in js],
                                 blocks if len(js) == n else blocks[js])
        except Exception:
            self.counters["save_errors"] += 1
            self.stats.count("save_errors")
            log.exception("tiercache: saving request %s failed (a future miss, nothing else)", job.req_id)
            return [False] * n
        self.counters["saved_tokens"] += n * self.layout.block_size
        if job.write and self.cache is not None:
            with self._lock:
                full = self._queued >= MAX_QUEUED_SAVES
                if not full:
                    self._queued += 1
            if full:
                self.counters["dropped_saves"] += 1
                self.stats.count("dropped_saves", n)
            else:
                try:
                    self._saver.submit(self._write, job, keys, blocks)
                except BaseException:
                    with self._lock:
                        self._queued -= 1
                    raise
        return [True] * n

    def _write(self, job: SaveJob, keys: list, blocks: torch.Tensor) -> None:
        try:
            self.cache.store_keys(keys, blocks.permute(1, 2, 0, 3, 4, 5), salt=job.salt)
        except Exception:
            self.counters["save_errors"] += 1
            self.stats.count("save_errors")
            log.exception("tiercache: writing request %s to the slow tiers failed (a future miss)", job.req_id)
        finally:
            with self._lock:
                self._queued -= 1

    # -- reports ---------------------------------------------------------------------------------
    def _report(self, job_id: int, ok: list[bool]) -> None:
        with self._lock:
            self._done[job_id] = ok

    def take_report(self) -> TierCacheWorkerMeta | None:
        with self._lock:
            if not self._done:
                return None
            done, self._done = self._done, {}
        return TierCacheWorkerMeta({jid: (1, ok) for jid, ok in done.items()})

    def flush(self) -> None:
        """Wait for queued saves and the disk writes they started."""
        self._saver.submit(lambda: None).result()
        if self.cache is not None:
            self.cache.flush()

    def close(self) -> None:
        self._loader.shutdown(wait=True)
        self._saver.shutdown(wait=True)
        if self.cache is not None:
            self.cache.close()
        if self.host is not None:
            self.host.close()
