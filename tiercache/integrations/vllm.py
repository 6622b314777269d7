"""tiercache under vLLM: a KV connector (vLLM's GPU prefix cache above, tiercache's tiers below).

    vllm serve MODEL --kv-transfer-config '{"kv_connector": "TierCacheConnector",
        "kv_connector_module_path": "tiercache.integrations.vllm", "kv_role": "kv_both",
        "kv_connector_extra_config": {"disk_path": "/var/cache/tiercache", "disk_bytes": "500GiB",
                                      "host_bytes": "32GiB"}}'

The extra-config keys are `CacheConfig` field names (unknown ones are an error naming the key);
layout, model id and tensor-parallel rank come from vLLM. vLLM builds one instance per role:
the scheduler's (`vllm_scheduler.SchedulerSide`: the decision layer, lookups and plans, no KV
bytes) and one per worker (`vllm_worker.WorkerSide`: the host slab and the slow tiers; moves
bytes). Plans go down in `TierCacheMetadata` each step; every job comes back in
`TierCacheWorkerMeta` (vLLM's worker->scheduler channel) with the blocks that made it, and the
scheduler completes the plan only when every rank reported.

Correctness: a block the worker cannot serve is reported by `get_block_ids_with_load_errors`
and recomputed, because this connector sets `kv_load_failure_policy="recompute"` itself; what
vLLM receives is bit-identical to what was stored, or recomputed.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.v1.metrics.cache_hit_source import CacheHitSource

from .vllm_metrics import TierCachePromMetrics, TierCacheStats
from .vllm_scheduler import SchedulerSide, TierCacheMetadata, TierCacheWorkerMeta
from .vllm_worker import WorkerSide

__all__ = ["TierCacheConnector", "TierCacheMetadata"]

log = logging.getLogger("tiercache.vllm")


class TierCacheConnector(KVConnectorBase_V1):
    _cache_hit_source = CacheHitSource.DISK  # only a fallback: get_external_cache_hit_sources splits by tier

    def __init__(self, vllm_config: Any, role: KVConnectorRole, kv_cache_config: Any) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        self._scheduler: SchedulerSide | None = None
        self._worker: WorkerSide | None = None
        if role == KVConnectorRole.SCHEDULER:
            # A block we fail to load must be recomputed, never fail the requests sharing it.
            vllm_config.kv_transfer_config.kv_load_failure_policy = "recompute"
            self._scheduler = SchedulerSide(vllm_config, kv_cache_config)
        else:
            self._worker = WorkerSide(vllm_config, kv_cache_config)

    @property
    def requires_kv_delivery(self) -> bool:
        return False  # a best-effort cache: a dropped save is a future miss

    @property
    def worker(self) -> WorkerSide:
        if self._worker is None:
            raise RuntimeError("TierCacheConnector: a worker-side call on the scheduler's instance")
        return self._worker

    @property
    def scheduler(self) -> SchedulerSide:
        if self._scheduler is None:
            raise RuntimeError("TierCacheConnector: a scheduler-side call on a worker's instance")
        return self._scheduler

    # -- worker side -------------------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self.worker.register_kv_caches(kv_caches)

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        if isinstance(meta, TierCacheMetadata):
            self.worker.start_load(meta)

    def wait_for_layer_load(self, layer_name: str) -> None:
        # On a GPU, this layer's attention waits (on the device) for this layer's copies only; on the
        # CPU the loads finished in start_load_kv (the copy and the forward share the same cores).
        self.worker.wait_for_layer(layer_name)

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        return None  # saves happen once per step, in wait_for_save

    def wait_for_save(self) -> None:
        meta = self._connector_metadata
        if isinstance(meta, TierCacheMetadata):
            self.worker.save(meta)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        # saves copy their blocks during the step (nothing to report); asynchronous loads that are done
        return None, self.worker.finished_loads() or None

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self.worker.failed_blocks()

    def build_connector_worker_meta(self) -> TierCacheWorkerMeta | None:
        return self.worker.take_report()  # every job of this step, with the blocks that made it

    def shutdown(self) -> None:
        if self._worker is not None:
            self._worker.close()
        if self._scheduler is not None:
            self._scheduler.close()

    # -- scheduler side ----------------------------------------------------------------------------
    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int | None, bool]:
        return self.scheduler.num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        self.scheduler.update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: Any) -> KVConnectorMetadata:
        return self.scheduler.build_meta(scheduler_output)

    def update_connector_output(self, connector_output: Any) -> None:
        self.scheduler.update_connector_output(getattr(connector_output, "kv_connector_worker_meta", None))

    def get_external_cache_hit_sources(self, request: Any, num_external_tokens: int) -> dict[CacheHitSource, int]:
        names = {"host": CacheHitSource.HOST, "disk": CacheHitSource.DISK}
        out: dict[CacheHitSource, int] = {}
        for tier, n in self.scheduler.hit_sources(request, num_external_tokens).items():
            src = names.get(tier, CacheHitSource.EXTERNAL_UNSPECIFIED)  # remote: vLLM has no label for it
            out[src] = out.get(src, 0) + n
        return out

    def request_finished(self, request: Any, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        self.scheduler.request_finished(request)
        return False, None

    # -- metrics (both sides; see vllm_metrics) -----------------------------------------------------
    def get_kv_connector_stats(self) -> TierCacheStats | None:
        side = self._worker if self._worker is not None else self._scheduler
        return side.stats.take() if side is not None else None

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> TierCacheStats:
        return TierCacheStats(data=dict(data or {}))

    @classmethod
    def build_prom_metrics(cls, vllm_config: Any, metric_types: dict, labelnames: list[str],
                           per_engine_labelvalues: dict[int, list[object]]) -> TierCachePromMetrics:
        return TierCachePromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)
