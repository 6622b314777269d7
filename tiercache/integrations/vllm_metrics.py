"""The connector's numbers, carried by vLLM's connector-stats channel to the process serving /metrics.

Plain `vllm serve` sets no PROMETHEUS_MULTIPROC_DIR, so series registered in the engine or worker
processes never reach vLLM's `/metrics`. The scheduler and workers count into `TierCacheStats`
(plain dicts, summed across workers by vLLM) and `TierCachePromMetrics` turns them into `tiercache_*`
counters in the API server, next to `vllm:*`, with vLLM's labels (model_name, engine) added:

    tiercache_lookup_tokens_total            prompt tokens beyond vLLM's own prefix cache, looked up
    tiercache_hit_tokens_total{tier}         tokens loaded into vLLM, by the tier that served them
    tiercache_stored_tokens_total            tokens of new full blocks saved
    tiercache_dropped_writes_total{tier}     blocks not saved because the save queue was full
    tiercache_errors_total{tier,op}          loads and saves that failed (served as misses)
    tiercache_recomputed_blocks_total        blocks offered by a lookup that the worker could not
                                             serve (evicted since, corrupt, an error): vLLM recomputed them

With PROMETHEUS_MULTIPROC_DIR set, the worker's TierCache writes the full `tiercache_*` set into that
directory instead (see dashboards/README.md), and this hook registers nothing: one source per name.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorPromMetrics, KVConnectorStats

from .vllm_series import SERIES


@dataclass
class TierCacheStats(KVConnectorStats):
    data: dict[str, Any] = field(default_factory=dict)

    def count(self, key: str, n: float = 1) -> None:
        if key not in SERIES:
            raise KeyError(f"stats key {key!r} is not one of {sorted(SERIES)}")
        if n:
            self.data[key] = self.data.get(key, 0) + n

    def reset(self) -> None:
        self.data = {}

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        merged = Counter(self.data)
        merged.update(other.data)
        return TierCacheStats(data=dict(merged))

    def reduce(self) -> dict[str, int | float]:
        return dict(self.data)

    def is_empty(self) -> bool:
        return not any(self.data.values())

    def take(self) -> TierCacheStats | None:
        """These counts as a new object (None when there are none), leaving this one empty."""
        if self.is_empty():
            return None
        out = TierCacheStats(data=self.data)
        self.data = {}
        return out


class TierCachePromMetrics(KVConnectorPromMetrics):
    def __init__(self, vllm_config: Any, metric_types: dict, labelnames: list[str],
                 per_engine_labelvalues: dict[int, list[object]]) -> None:
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        self._metrics: dict[str, Any] = {}
        self.enabled = not os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        if not self.enabled:
            return
        families: dict[str, tuple[str, tuple[str, ...]]] = {}
        for name, doc, extra in SERIES.values():
            families[name] = (doc, tuple(k for k, _ in extra))
        for name, (doc, extra_labels) in families.items():
            # prometheus_client adds _total to counters itself
            self._metrics[name] = self._counter_cls(name=name.removesuffix("_total"), documentation=doc,
                                                    labelnames=list(labelnames) + list(extra_labels))
        # every series exists at zero from the start, as the library's own exporter does
        for idx in per_engine_labelvalues:
            for key in SERIES:
                self._series(key, idx)

    def _series(self, key: str, engine_idx: int) -> Any:
        name, _, extra = SERIES[key]
        return self._metrics[name].labels(*self.per_engine_labelvalues[engine_idx], *(v for _, v in extra))

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        if not self.enabled:
            return
        for key, value in transfer_stats_data.items():
            if key in SERIES and value:
                self._series(key, engine_idx).inc(value)
