"""Counters and gauges of one TierCache, as a plain dataclass.

The manager reports every event to a `Recorder`; the recorder updates the
dataclass (what `TierCache.stats()` returns) and forwards the same event to an
optional sink (`tiercache.metrics.PromMetrics`) that turns it into Prometheus
series. Both see exactly the same numbers, so the exporter cannot drift from
`stats()`.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Protocol

TIERS = ("device", "host", "disk", "remote")
PREFETCH_OUTCOMES = ("ready", "late", "dropped")


class MetricsSink(Protocol):
    """What the manager's events look like to a metrics backend."""

    def lookup(self, asked_tokens: int, hit_tokens: dict[str, int]) -> None: ...
    def stored_tokens(self, n: int) -> None: ...
    def stored(self, tier: str, nbytes: int, seconds: float) -> None: ...
    def loaded(self, tier: str, nbytes: int, seconds: float, tokens: int) -> None: ...
    def evicted(self, tier: str, n: int) -> None: ...
    def usage(self, tier: str, used_bytes: int, capacity_bytes: int, blocks: int) -> None: ...
    def disk_written(self, raw_bytes: int, compressed_bytes: int) -> None: ...
    def corrupt(self, tier: str, n: int) -> None: ...
    def error(self, tier: str, op: str) -> None: ...
    def dropped_write(self, tier: str, n: int) -> None: ...
    def prefetch(self, outcome: str, n: int) -> None: ...
    def prefetch_wait(self, seconds: float) -> None: ...
    def close(self) -> None: ...


@dataclass
class TierStats:
    hit_blocks: int = 0
    hit_tokens: int = 0
    stored_bytes: int = 0
    loaded_bytes: int = 0
    loaded_tokens: int = 0
    store_seconds: float = 0.0
    load_seconds: float = 0.0
    evictions: int = 0
    used_bytes: int = 0
    capacity_bytes: int = 0
    blocks: int = 0
    corrupt_blocks: int = 0
    dropped_writes: int = 0
    errors: dict[str, int] = field(default_factory=lambda: defaultdict(int))


@dataclass
class CacheStats:
    lookups: int = 0
    lookup_tokens: int = 0
    stored_tokens: int = 0
    disk_raw_bytes: int = 0
    disk_compressed_bytes: int = 0
    prefetch: dict[str, int] = field(default_factory=lambda: {o: 0 for o in PREFETCH_OUTCOMES})
    prefetch_wait_seconds: float = 0.0
    tiers: dict[str, TierStats] = field(default_factory=dict)

    def as_dict(self) -> dict:
        """A plain, JSON-serialisable view: flat per-tier maps plus a nested `tiers` map."""
        tiers = {name: {
            "hit_blocks": t.hit_blocks, "hit_tokens": t.hit_tokens,
            "stored_bytes": t.stored_bytes, "loaded_bytes": t.loaded_bytes, "loaded_tokens": t.loaded_tokens,
            "store_seconds": t.store_seconds, "load_seconds": t.load_seconds,
            "evictions": t.evictions, "used_bytes": t.used_bytes,
            "capacity_bytes": t.capacity_bytes, "blocks": t.blocks,
            "corrupt_blocks": t.corrupt_blocks, "dropped_writes": t.dropped_writes,
            "errors": dict(t.errors),
        } for name, t in self.tiers.items()}
        hit_tokens_total = sum(t.hit_tokens for t in self.tiers.values())

        def per_tier(key: str) -> dict:
            return {name: v[key] for name, v in tiers.items()}

        return {
            "lookups": self.lookups,
            "lookup_tokens": self.lookup_tokens,
            "hit_tokens": per_tier("hit_tokens"),
            "hit_tokens_total": hit_tokens_total,
            "hit_rate": (hit_tokens_total / self.lookup_tokens) if self.lookup_tokens else 0.0,
            "hits": per_tier("hit_blocks"),
            "stored_tokens": self.stored_tokens,
            "stored_bytes": per_tier("stored_bytes"),
            "loaded_bytes": per_tier("loaded_bytes"),
            "loaded_tokens": per_tier("loaded_tokens"),
            "evictions": per_tier("evictions"),
            "used_bytes": per_tier("used_bytes"),
            "capacity_bytes": per_tier("capacity_bytes"),
            "blocks": per_tier("blocks"),
            "corrupt_blocks": per_tier("corrupt_blocks"),
            "dropped_writes": per_tier("dropped_writes"),
            "errors": {name: dict(t.errors) for name, t in self.tiers.items()},
            "errors_total": sum(sum(t.errors.values()) for t in self.tiers.values()),
            "disk_raw_bytes": self.disk_raw_bytes,
            "disk_compressed_bytes": self.disk_compressed_bytes,
            "disk_compression_ratio": (self.disk_raw_bytes / self.disk_compressed_bytes
                                       if self.disk_compressed_bytes else 0.0),
            "prefetch": dict(self.prefetch),
            "prefetch_wait_seconds": self.prefetch_wait_seconds,
            "tiers": tiers,
        }


class Recorder:
    """Thread-safe event intake: updates CacheStats and forwards to an optional sink."""

    def __init__(self, tiers: tuple[str, ...], sink: MetricsSink | None = None) -> None:
        self._lock = threading.Lock()
        self.stats = CacheStats(tiers={t: TierStats() for t in tiers})
        self.sink = sink

    def _t(self, tier: str) -> TierStats:
        t = self.stats.tiers.get(tier)
        if t is None:  # a tier that is off still gets counted rather than crash
            t = self.stats.tiers[tier] = TierStats()
        return t

    def lookup(self, asked_tokens: int, hit_tokens: dict[str, int], hit_blocks: dict[str, int]) -> None:
        with self._lock:
            self.stats.lookups += 1
            self.stats.lookup_tokens += asked_tokens
            for tier, n in hit_tokens.items():
                self._t(tier).hit_tokens += n
            for tier, n in hit_blocks.items():
                self._t(tier).hit_blocks += n
        if self.sink:
            self.sink.lookup(asked_tokens, hit_tokens)

    def stored_tokens(self, n: int) -> None:
        with self._lock:
            self.stats.stored_tokens += n
        if self.sink and n:
            self.sink.stored_tokens(n)

    def stored(self, tier: str, nbytes: int, seconds: float) -> None:
        with self._lock:
            t = self._t(tier)
            t.stored_bytes += nbytes
            t.store_seconds += seconds
        if self.sink:
            self.sink.stored(tier, nbytes, seconds)

    def loaded(self, tier: str, nbytes: int, seconds: float, tokens: int = 0) -> None:
        with self._lock:
            t = self._t(tier)
            t.loaded_bytes += nbytes
            t.loaded_tokens += tokens
            t.load_seconds += seconds
        if self.sink:
            self.sink.loaded(tier, nbytes, seconds, tokens)

    def evicted(self, tier: str, n: int) -> None:
        if not n:
            return
        with self._lock:
            self._t(tier).evictions += n
        if self.sink:
            self.sink.evicted(tier, n)

    def usage(self, tier: str, used_bytes: int, capacity_bytes: int, blocks: int) -> None:
        with self._lock:
            t = self._t(tier)
            t.used_bytes, t.capacity_bytes, t.blocks = used_bytes, capacity_bytes, blocks
        if self.sink:
            self.sink.usage(tier, used_bytes, capacity_bytes, blocks)

    def disk_written(self, raw_bytes: int, compressed_bytes: int) -> None:
        with self._lock:
            self.stats.disk_raw_bytes += raw_bytes
            self.stats.disk_compressed_bytes += compressed_bytes
        if self.sink:
            self.sink.disk_written(raw_bytes, compressed_bytes)

    def corrupt(self, tier: str, n: int = 1) -> None:
        with self._lock:
            self._t(tier).corrupt_blocks += n
        if self.sink:
            self.sink.corrupt(tier, n)

    def error(self, tier: str, op: str) -> None:
        with self._lock:
            self._t(tier).errors[op] += 1
        if self.sink:
            self.sink.error(tier, op)

    def dropped_write(self, tier: str, n: int = 1) -> None:
        with self._lock:
            self._t(tier).dropped_writes += n
        if self.sink:
            self.sink.dropped_write(tier, n)

    def prefetch(self, outcome: str, n: int = 1) -> None:
        with self._lock:
            self.stats.prefetch[outcome] = self.stats.prefetch.get(outcome, 0) + n
        if self.sink:
            self.sink.prefetch(outcome, n)

    def prefetch_wait(self, seconds: float) -> None:
        with self._lock:
            self.stats.prefetch_wait_seconds += seconds
        if self.sink:
            self.sink.prefetch_wait(seconds)

    def snapshot(self) -> dict:
        with self._lock:
            return self.stats.as_dict()
