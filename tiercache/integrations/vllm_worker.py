"""Worker side of the vLLM connector: owns the TierCache (host memory, disk, remote) and moves bytes.

Per step (vLLM calls these in this order):
    start_load   before the forward when the step has loads: each job's blocks come from
                 `TierCache.load` and are scattered into the fresh blocks vLLM allocated for
                 them. A block not served (evicted since the lookup, corrupt, an error) is
                 reported through `failed_blocks()`; vLLM recomputes it.
    save         after the forward: the blocks to save are gathered into a private copy at
                 once (so vLLM may reuse them from the next step on), and stored by a
                 background thread: the forward pass never waits for a store. A request with
                 a failed load this step saves nothing (its later blocks attended to bad KV).
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from ..manager import TierCache
from . import vllm_pages
from .vllm_metrics import TierCacheStats
from .vllm_scheduler import LoadJob, SaveJob, TierCacheMetadata
from .vllm_settings import cache_config

log = logging.getLogger("tiercache.vllm")

MAX_QUEUED_SAVES = 64  # saves waiting for the store thread; more are dropped and counted


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
        self.cache = TierCache(self.cfg)
        self.layers: list[torch.Tensor] = []
        self.page_layout: str | None = None
        self._failed: set[int] = set()
        self._failed_reqs: set[str] = set()
        self._lock = threading.Lock()
        self._queued = 0
        self._saver = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tiercache-vllm-save")
        # cumulative (what a test or an operator reads) and per-interval (what vLLM ships to /metrics)
        self.counters = {"loaded_tokens": 0, "failed_blocks": 0, "saved_tokens": 0, "dropped_saves": 0,
                         "save_errors": 0}
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
        log.info("tiercache: %d layers, page layout %s, %s", len(self.layers), self.page_layout,
                 lay.fingerprint())

    # -- loads -----------------------------------------------------------------------------------
    def start_load(self, meta: TierCacheMetadata) -> None:
        self._failed_reqs = set()
        for job in meta.loads:
            self._load(job)

    def _load(self, job: LoadJob) -> None:
        B, lay = self.layout.block_size, self.layout
        end = job.start_block + len(job.block_ids)
        served = job.start_block
        try:
            tiers = self._serving_tiers(job)
            kv = self.cache.load(job.tokens, salt=job.salt)  # [L, 2, tokens, H, D], the cached prefix
            served = max(job.start_block, min(kv.shape[2] // B, end))
            m = served - job.start_block
            if m:
                part = kv[:, :, job.start_block * B:served * B]
                blocks = part.reshape(lay.num_layers, 2, m, B, lay.num_kv_heads, lay.head_dim)
                vllm_pages.scatter(blocks.permute(2, 0, 1, 3, 4, 5).contiguous().to(self.layers[0].device), self.layers,
                                   job.block_ids[:m], self.page_layout)
                self.counters["loaded_tokens"] += m * B
                for tier in tiers[job.start_block:served]:
                    self.stats.count(f"hit_tokens.{tier}", B)
        except Exception:  # a storage fault is a miss: vLLM recomputes every block of this job
            log.exception("tiercache: load for request %s failed; its blocks are recomputed", job.req_id)
            self.stats.count("load_errors")
            served = job.start_block
        failed = job.block_ids[served - job.start_block:]
        if failed:
            self._failed.update(failed)
            self._failed_reqs.add(job.req_id)
            self.counters["failed_blocks"] += len(failed)
            self.stats.count("recomputed_blocks", len(failed))

    def _serving_tiers(self, job: LoadJob) -> list[str]:
        """Tier serving each block of the job's prefix right now (for the hit-by-tier counts only)."""
        keys = self.cache.keys(job.tokens, salt=job.salt)
        tiers = list(self.cache.core.lookup(keys))
        # a block that moved since is still counted for some tier; a metric, not a decision
        return tiers + ["disk"] * (len(keys) - len(tiers))

    def failed_blocks(self) -> set[int]:
        out, self._failed = self._failed, set()
        return out

    # -- saves -----------------------------------------------------------------------------------
    def save(self, meta: TierCacheMetadata) -> None:
        for job in meta.saves:
            if job.req_id in self._failed_reqs or not job.block_ids:
                continue
            with self._lock:
                if self._queued >= MAX_QUEUED_SAVES:
                    self.counters["dropped_saves"] += 1
                    self.stats.count("dropped_saves", len(job.block_ids) - job.first_new_block)
                    continue
                self._queued += 1
            try:
                # a private copy now: vLLM may hand these blocks to another request next step
                blocks = vllm_pages.gather(self.layers, job.block_ids, self.page_layout)
                ready = None
                if blocks.is_cuda:
                    # to host on the compute stream without waiting for it; the store thread waits on the event
                    host = torch.empty(blocks.shape, dtype=blocks.dtype, pin_memory=True)
                    host.copy_(blocks, non_blocking=True)
                    ready = torch.cuda.Event()
                    ready.record()
                    blocks = host
                self._saver.submit(self._store, job, blocks, ready)
            except BaseException:
                with self._lock:
                    self._queued -= 1
                raise

    def _store(self, job: SaveJob, blocks: torch.Tensor, ready: Any = None) -> None:
        try:
            if ready is not None:
                ready.synchronize()
            n, L = blocks.shape[0], blocks.shape[1]
            kv = blocks.permute(1, 2, 0, 3, 4, 5).reshape(L, 2, n * self.layout.block_size,
                                                          self.layout.num_kv_heads, self.layout.head_dim)
            self.cache.store(job.tokens, kv, salt=job.salt)
            self.counters["saved_tokens"] += len(job.tokens)
            self.stats.count("stored_tokens", (n - job.first_new_block) * self.layout.block_size)
        except Exception:
            self.counters["save_errors"] += 1
            self.stats.count("save_errors")
            log.exception("tiercache: saving request %s failed (a future miss, nothing else)", job.req_id)
        finally:
            with self._lock:
                self._queued -= 1

    def flush(self) -> None:
        """Wait for queued saves and the disk writes they started."""
        self._saver.submit(lambda: None).result()
        self.cache.flush()

    def close(self) -> None:
        self._saver.shutdown(wait=True)
        self.cache.close()
