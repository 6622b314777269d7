"""Prometheus export of a TierCache's events (the `MetricsSink` of stats.py).

One `PromMetrics` per TierCache: the manager's `Recorder` forwards each event
here, so Prometheus and `TierCache.stats()` see the same numbers. Metric objects
are created in the constructor (nothing is registered at import time) and
registered only into the registry passed in; with `registry=None` they are
registered nowhere, which is what prometheus_client's multiprocess mode wants
(PROMETHEUS_MULTIPROC_DIR set, as vLLM runs it): values go to the mmap files
and whoever serves the directory (vLLM's /metrics, `tiercache serve-metrics`)
aggregates every process. Gauges use "livesum": the sum over live processes.

`METRICS` below is the single list of names; `tiercache.tools.dashboards` builds the
Grafana dashboard and alert rules from it, and the tests check both against it.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
import threading
from dataclasses import dataclass
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from .stats import PREFETCH_OUTCOMES, TIERS

ERROR_OPS = ("lookup", "store", "load", "prefetch", "evict", "delete", "open", "keys", "stats", "spill",
             "store_map_full", "store_dropped")  # the `op` label of errors_total
# 10 µs .. 10 s: a host hit on one block is tens of µs, a cold disk batch or a Redis round trip can take seconds.
LATENCY_BUCKETS = (1e-05, 2.5e-05, 5e-05, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01,
                   0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
DEFAULT_PORT = 9460
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# labels that PromMetrics sets itself, or that Prometheus attaches at scrape time and would rename
_RESERVED_LABELS = frozenset({"tier", "op", "outcome", "le", "quantile", "job", "instance"})
_LABEL_RE = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")


@dataclass(frozen=True)
class MetricSpec:
    name: str                  # the family name as PromQL sees it (counters end in _total)
    kind: str                  # "counter" | "gauge" | "histogram"
    help: str
    labels: tuple[str, ...] = ()


METRICS: tuple[MetricSpec, ...] = (
    MetricSpec("tiercache_lookup_tokens_total", "counter",
               "Prompt tokens asked for by lookup() (the hit-rate denominator)."),
    MetricSpec("tiercache_hit_tokens_total", "counter",
               "Looked-up tokens found cached (prefill tokens saved), by the fastest tier holding the block.",
               ("tier",)),
    MetricSpec("tiercache_stored_tokens_total", "counter", "Tokens whose KV was stored (full blocks only)."),
    MetricSpec("tiercache_stored_bytes_total", "counter", "Bytes of KV blocks written into a tier.", ("tier",)),
    MetricSpec("tiercache_loaded_bytes_total", "counter", "Bytes of KV blocks read from a tier.", ("tier",)),
    MetricSpec("tiercache_loaded_tokens_total", "counter",
               "Tokens served by load()/load_layers()/prefetch(), by the tier that served them.", ("tier",)),
    MetricSpec("tiercache_load_seconds", "histogram", "Time to read a batch of blocks from a tier.", ("tier",)),
    MetricSpec("tiercache_store_seconds", "histogram", "Time to write a batch of blocks into a tier.", ("tier",)),
    MetricSpec("tiercache_evictions_total", "counter", "Blocks evicted from a tier.", ("tier",)),
    MetricSpec("tiercache_used_bytes", "gauge", "Bytes of a tier holding blocks.", ("tier",)),
    MetricSpec("tiercache_capacity_bytes", "gauge", "Configured capacity of a tier in bytes.", ("tier",)),
    MetricSpec("tiercache_blocks", "gauge", "Blocks held by a tier.", ("tier",)),
    MetricSpec("tiercache_disk_raw_bytes_total", "counter", "Uncompressed bytes of blocks written to disk."),
    MetricSpec("tiercache_disk_compressed_bytes_total", "counter",
               "Bytes of codec frames written to disk (after compression)."),
    MetricSpec("tiercache_corrupt_blocks_total", "counter",
               "Frames rejected (checksum, length or layout mismatch), deleted and served as misses.", ("tier",)),
    MetricSpec("tiercache_errors_total", "counter",
               "Storage faults turned into misses, by tier and operation.", ("tier", "op")),
    MetricSpec("tiercache_prefetch_total", "counter",
               "Prefetches by outcome: ready (in time), late (compute waited), dropped.", ("outcome",)),
    MetricSpec("tiercache_prefetch_wait_seconds", "histogram", "Time compute stalled waiting for prefetched KV."),
    MetricSpec("tiercache_dropped_writes_total", "counter",
               "Blocks not written to a tier because its write queue was full (backpressure).", ("tier",)),
)
_SPECS = {s.name: s for s in METRICS}
_HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def metric_names() -> set[str]:
    """Every name PromQL can use: the families above plus the _bucket/_sum/_count series of histograms."""
    names = set()
    for spec in METRICS:
        names.add(spec.name)
        if spec.kind == "histogram":
            names.update(spec.name + s for s in _HISTOGRAM_SUFFIXES)
    return names


def is_multiprocess() -> bool:
    """True when prometheus_client runs in multiprocess mode (the env var is read at its import)."""
    return bool(os.environ.get(MULTIPROC_ENV) or os.environ.get(MULTIPROC_ENV.lower()))


def _check_tiers(tiers: Any) -> tuple[str, ...]:
    if isinstance(tiers, str) or not isinstance(tiers, (tuple, list)):
        raise TypeError(f"tiers: expected a tuple of tier names from {TIERS}, got {tiers!r}")
    for t in tiers:
        if t not in TIERS:
            raise ValueError(f"tiers: expected names from {TIERS}, got {t!r}")
    if len(set(tiers)) != len(tiers):
        raise ValueError(f"tiers: names must be unique, got {tuple(tiers)!r}")
    return tuple(tiers)


def _check_extra_labels(extra: Any) -> dict[str, str]:
    if extra is None:
        return {}
    if not isinstance(extra, dict):
        raise TypeError(f"extra_labels: expected a dict of label name -> string, got {type(extra).__name__}")
    for k, v in extra.items():
        if not isinstance(k, str) or not _LABEL_RE.match(k) or k.startswith("__"):
            raise ValueError(f"extra_labels: {k!r} is not a valid Prometheus label name")
        if k in _RESERVED_LABELS:
            raise ValueError(f"extra_labels: {k!r} is reserved (not one of {sorted(_RESERVED_LABELS)})")
        if not isinstance(v, str):
            raise TypeError(f"extra_labels: value of {k!r} must be a string, got {v!r}")
    return dict(extra)


def _nonneg(value: Any, field_name: str) -> None:
    if not value >= 0:  # also rejects NaN
        raise ValueError(f"{field_name}: expected a non-negative number, got {value!r}")


class PromMetrics:
    """Prometheus series for one TierCache; implements `tiercache.stats.MetricsSink`.

    `tiers` are the configured tiers: their labelled series exist at zero from the
    start. `extra_labels` (e.g. {"model": "llama-8b", "tp_rank": "0"}) are added to
    every series. One instance per registry: the family names are fixed.
    Events after `close()` are ignored.
    """

    def __init__(self, tiers: tuple[str, ...], registry: CollectorRegistry | None = None,
                 extra_labels: dict[str, str] | None = None) -> None:
        self.tiers = _check_tiers(tiers)
        if registry is not None and not callable(getattr(registry, "register", None)):
            raise TypeError(f"registry: expected a prometheus_client CollectorRegistry or None, "
                            f"got {type(registry).__name__}")
        self.registry = registry
        self.extra_labels = _check_extra_labels(extra_labels)
        self._extra_names = tuple(self.extra_labels)
        self._extra_values = tuple(self.extra_labels.values())
        self._closed = False
        self._metrics: dict[str, Any] = {}
        try:
            for spec in METRICS:
                self._metrics[spec.name] = self._make(spec)
        except ValueError as e:  # a duplicate in the registry: undo what was registered
            self._unregister()
            raise ValueError(f"registry: cannot register tiercache metrics ({e}); "
                             "use one PromMetrics per registry, or close() the previous one") from e
        m = self._metrics
        self._lookup_tokens = self._bind(m["tiercache_lookup_tokens_total"])
        self._stored_tokens = self._bind(m["tiercache_stored_tokens_total"])
        self._disk_raw = self._bind(m["tiercache_disk_raw_bytes_total"])
        self._disk_compressed = self._bind(m["tiercache_disk_compressed_bytes_total"])
        self._prefetch_wait = self._bind(m["tiercache_prefetch_wait_seconds"])
        self._tiered: dict[str, dict[str, Any]] = {name: {} for name, s in _SPECS.items() if s.labels == ("tier",)}
        self._errors: dict[tuple[str, str], Any] = {}
        self._prefetch: dict[str, Any] = {}
        for tier in self.tiers:  # labelled series exist at zero from the start
            for name in self._tiered:
                self._child(name, tier)
            for op in ERROR_OPS:
                self._error_child(tier, op)
        for outcome in PREFETCH_OUTCOMES:
            self._prefetch_child(outcome)

    def _make(self, spec: MetricSpec) -> Any:
        labelnames = self._extra_names + spec.labels
        if spec.kind == "counter":
            return Counter(spec.name, spec.help, labelnames, registry=self.registry)
        if spec.kind == "gauge":
            return Gauge(spec.name, spec.help, labelnames, registry=self.registry, multiprocess_mode="livesum")
        return Histogram(spec.name, spec.help, labelnames, registry=self.registry, buckets=LATENCY_BUCKETS)

    def _bind(self, metric: Any, *values: str) -> Any:
        labelvalues = self._extra_values + values
        return metric.labels(*labelvalues) if labelvalues else metric

    def _child(self, name: str, tier: str) -> Any:
        children = self._tiered[name]
        child = children.get(tier)
        if child is None:
            if tier not in TIERS:
                raise ValueError(f"tier: expected one of {TIERS}, got {tier!r}")
            child = children[tier] = self._bind(self._metrics[name], tier)
        return child

    def _error_child(self, tier: str, op: str) -> Any:
        child = self._errors.get((tier, op))
        if child is None:
            if tier not in TIERS:
                raise ValueError(f"tier: expected one of {TIERS}, got {tier!r}")
            if op not in ERROR_OPS:
                raise ValueError(f"op: expected one of {ERROR_OPS}, got {op!r}")
            child = self._errors[(tier, op)] = self._bind(self._metrics["tiercache_errors_total"], tier, op)
        return child

    def _prefetch_child(self, outcome: str) -> Any:
        child = self._prefetch.get(outcome)
        if child is None:
            if outcome not in PREFETCH_OUTCOMES:
                raise ValueError(f"outcome: expected one of {PREFETCH_OUTCOMES}, got {outcome!r}")
            child = self._prefetch[outcome] = self._bind(self._metrics["tiercache_prefetch_total"], outcome)
        return child

    # --- MetricsSink -------------------------------------------------------------------------

    def lookup(self, asked_tokens: int, hit_tokens: dict[str, int]) -> None:
        if self._closed:
            return
        _nonneg(asked_tokens, "asked_tokens")
        for tier, n in hit_tokens.items():
            _nonneg(n, f"hit_tokens[{tier!r}]")
            self._child("tiercache_hit_tokens_total", tier)  # validate every tier before counting anything
        self._lookup_tokens.inc(asked_tokens)
        for tier, n in hit_tokens.items():
            if n:
                self._child("tiercache_hit_tokens_total", tier).inc(n)

    def stored_tokens(self, n: int) -> None:
        if self._closed:
            return
        _nonneg(n, "n")
        self._stored_tokens.inc(n)

    def stored(self, tier: str, nbytes: int, seconds: float) -> None:
        if self._closed:
            return
        _nonneg(nbytes, "nbytes")
        _nonneg(seconds, "seconds")
        self._child("tiercache_stored_bytes_total", tier).inc(nbytes)
        self._child("tiercache_store_seconds", tier).observe(seconds)

    def loaded(self, tier: str, nbytes: int, seconds: float, tokens: int = 0) -> None:
        if self._closed:
            return
        _nonneg(nbytes, "nbytes")
        _nonneg(seconds, "seconds")
        _nonneg(tokens, "tokens")
        self._child("tiercache_loaded_bytes_total", tier).inc(nbytes)
        if tokens:
            self._child("tiercache_loaded_tokens_total", tier).inc(tokens)
        self._child("tiercache_load_seconds", tier).observe(seconds)

    def evicted(self, tier: str, n: int) -> None:
        if self._closed:
            return
        _nonneg(n, "n")
        self._child("tiercache_evictions_total", tier).inc(n)

    def usage(self, tier: str, used_bytes: int, capacity_bytes: int, blocks: int) -> None:
        if self._closed:
            return
        _nonneg(used_bytes, "used_bytes")
        _nonneg(capacity_bytes, "capacity_bytes")
        _nonneg(blocks, "blocks")
        self._child("tiercache_used_bytes", tier).set(used_bytes)
        self._child("tiercache_capacity_bytes", tier).set(capacity_bytes)
        self._child("tiercache_blocks", tier).set(blocks)

    def disk_written(self, raw_bytes: int, compressed_bytes: int) -> None:
        if self._closed:
            return
        _nonneg(raw_bytes, "raw_bytes")
        _nonneg(compressed_bytes, "compressed_bytes")
        self._disk_raw.inc(raw_bytes)
        self._disk_compressed.inc(compressed_bytes)

    def corrupt(self, tier: str, n: int = 1) -> None:
        if self._closed:
            return
        _nonneg(n, "n")
        self._child("tiercache_corrupt_blocks_total", tier).inc(n)

    def error(self, tier: str, op: str) -> None:
        if self._closed:
            return
        self._error_child(tier, op).inc()

    def dropped_write(self, tier: str, n: int = 1) -> None:
        if self._closed:
            return
        _nonneg(n, "n")
        self._child("tiercache_dropped_writes_total", tier).inc(n)

    def prefetch(self, outcome: str, n: int = 1) -> None:
        if self._closed:
            return
        _nonneg(n, "n")
        self._prefetch_child(outcome).inc(n)

    def prefetch_wait(self, seconds: float) -> None:
        if self._closed:
            return
        _nonneg(seconds, "seconds")
        self._prefetch_wait.observe(seconds)

    def close(self) -> None:
        """Zero this cache's gauges (so multiprocess sums drop it) and unregister; idempotent."""
        if self._closed:
            return
        self._closed = True
        for name in ("tiercache_used_bytes", "tiercache_capacity_bytes", "tiercache_blocks"):
            for child in self._tiered[name].values():
                child.set(0)
        self._unregister()

    def _unregister(self) -> None:
        if self.registry is None:
            return
        for metric in self._metrics.values():
            try:
                self.registry.unregister(metric)
            except KeyError:
                pass


# --- serving /metrics ----------------------------------------------------------------------------

def multiprocess_registry(path: str | None = None) -> CollectorRegistry:
    """A registry that aggregates every process's files under PROMETHEUS_MULTIPROC_DIR (or `path`)."""
    path = path or os.environ.get(MULTIPROC_ENV) or os.environ.get(MULTIPROC_ENV.lower())
    if not path or not os.path.isdir(path):
        raise ValueError(f"{MULTIPROC_ENV}: expected an existing directory, got {path!r}")
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=path)
    return registry


def start_exporter(port: int, registry: CollectorRegistry | None = None,
                   addr: str = "127.0.0.1") -> tuple[Any, threading.Thread, int]:
    """Serve /metrics on a daemon thread; port 0 picks a free port. Returns (server, thread, bound_port).

    With `registry=None`: the multiprocess directory in multiprocess mode, else prometheus_client's
    default registry. Stop with `stop_exporter(server, thread)`.
    """
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueError(f"port: expected an int in 0..65535 (0 picks a free port), got {port!r}")
    if not isinstance(addr, str) or not addr:
        raise ValueError(f"addr: expected a host address like '127.0.0.1' or '0.0.0.0', got {addr!r}")
    if registry is None:
        registry = multiprocess_registry() if is_multiprocess() else REGISTRY
    server, thread = start_http_server(port, addr=addr, registry=registry)
    return server, thread, server.server_port


def stop_exporter(server: Any, thread: threading.Thread | None = None, timeout: float = 5.0) -> None:
    server.shutdown()
    server.server_close()
    if thread is not None:
        thread.join(timeout)


def reap_dead_processes(path: str) -> list[int]:
    """Drop the live-gauge files of processes that no longer exist (same pid namespace only)."""
    dead = set()
    for fname in os.listdir(path):
        m = re.match(r"^gauge_live\w*?_(\d+)\.db$", fname)
        if not m:
            continue
        pid = int(m.group(1))
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            dead.add(pid)
        except PermissionError:  # exists, owned by someone else
            pass
    for pid in dead:
        mark_process_dead(pid, path)
    return sorted(dead)


def main_serve_metrics(argv: list[str] | None = None) -> int:
    """`tiercache serve-metrics`: serve the multiprocess directory's metrics until interrupted."""
    parser = argparse.ArgumentParser(
        prog="tiercache serve-metrics",
        description=f"Serve tiercache metrics on /metrics. With {MULTIPROC_ENV} set, aggregates every "
                    "process writing there (vLLM workers); otherwise serves the default registry.")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0 = any)")
    parser.add_argument("--addr", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--reap-dead", action="store_true",
                        help="every second, drop the gauges of processes that have exited "
                             "(only when this runs in the same pid namespace as the workers)")
    args = parser.parse_args(argv)
    path = os.environ.get(MULTIPROC_ENV) or os.environ.get(MULTIPROC_ENV.lower())
    try:
        if path:
            registry = multiprocess_registry(path)
        else:
            print(f"tiercache serve-metrics: {MULTIPROC_ENV} is not set; serving the default registry "
                  "(no tiercache series unless this process creates them)", file=sys.stderr)
            registry = REGISTRY
        server, thread, port = start_exporter(args.port, registry, args.addr)
    except (ValueError, OSError) as e:
        print(f"tiercache serve-metrics: {e}", file=sys.stderr)
        return 2
    print(f"tiercache serve-metrics: serving http://{args.addr}:{port}/metrics", flush=True)
    stop = threading.Event()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.wait(1.0):
            if path and args.reap_dead:
                reap_dead_processes(path)
    except KeyboardInterrupt:
        pass
    finally:
        stop_exporter(server, thread)
    return 0
