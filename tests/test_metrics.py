"""PromMetrics: exact sample values, series at zero, isolation, multiprocess mode, the exporter."""

from __future__ import annotations

import inspect
import os
import signal
import subprocess
import sys
import textwrap
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from tiercache.metrics import (
    ERROR_OPS,
    LATENCY_BUCKETS,
    METRICS,
    PromMetrics,
    main_serve_metrics,
    metric_names,
    reap_dead_processes,
    start_exporter,
    stop_exporter,
)
from tiercache.stats import PREFETCH_OUTCOMES, TIERS, MetricsSink, Recorder

REPO = Path(__file__).resolve().parents[1]
DESIGN_NAMES = {
    "tiercache_lookup_tokens_total", "tiercache_hit_tokens_total", "tiercache_stored_tokens_total",
    "tiercache_stored_bytes_total", "tiercache_loaded_bytes_total", "tiercache_load_seconds",
    "tiercache_store_seconds", "tiercache_evictions_total", "tiercache_used_bytes", "tiercache_capacity_bytes",
    "tiercache_blocks", "tiercache_disk_raw_bytes_total", "tiercache_disk_compressed_bytes_total",
    "tiercache_corrupt_blocks_total", "tiercache_errors_total", "tiercache_prefetch_total",
    "tiercache_prefetch_wait_seconds", "tiercache_dropped_writes_total",
}


@pytest.fixture
def reg() -> CollectorRegistry:
    return CollectorRegistry()


def _v(reg: CollectorRegistry, name: str, **labels: str) -> float | None:
    return reg.get_sample_value(name, labels)


def _subprocess_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k.upper() != "PROMETHEUS_MULTIPROC_DIR"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(extra)
    return env


# --- names -----------------------------------------------------------------------------------------

# Added beyond the design's list (the contract allows additions, never renames).
ADDED_NAMES = {"tiercache_loaded_tokens_total"}


def test_metric_names_are_the_design_contract():
    families = {s.name for s in METRICS}
    assert families == DESIGN_NAMES | ADDED_NAMES
    hist = {s.name for s in METRICS if s.kind == "histogram"}
    assert hist == {"tiercache_load_seconds", "tiercache_store_seconds", "tiercache_prefetch_wait_seconds"}
    assert metric_names() == DESIGN_NAMES | ADDED_NAMES | {h + s for h in hist for s in ("_bucket", "_sum", "_count")}
    for s in METRICS:
        assert (s.kind == "counter") == s.name.endswith("_total"), s.name


def test_exposed_families_match_specs(reg):
    PromMetrics(("host", "disk"), reg)
    exposed = {}
    for fam in text_string_to_metric_families(generate_latest(reg).decode()):
        if fam.name.endswith("_created"):  # prometheus_client's creation timestamps (absent in multiprocess mode)
            continue
        exposed[fam.name + ("_total" if fam.type == "counter" else "")] = fam.type
    assert exposed == {s.name: s.kind for s in METRICS}


def test_nothing_registered_at_import_or_without_registry():
    m = PromMetrics(TIERS, registry=None)
    m.lookup(10, {"host": 10})
    assert b"tiercache" not in generate_latest(REGISTRY)


def test_sink_implements_the_protocol():
    proto = {n: f for n, f in inspect.getmembers(MetricsSink, inspect.isfunction) if not n.startswith("_")}
    assert proto, "MetricsSink lost its methods?"
    for name, fn in proto.items():
        impl = getattr(PromMetrics, name)
        assert list(inspect.signature(impl).parameters) == list(inspect.signature(fn).parameters), name


# --- values ----------------------------------------------------------------------------------------

def test_series_exist_at_zero_for_configured_tiers(reg):
    tiers = ("device", "host", "disk")
    PromMetrics(tiers, reg)
    for t in tiers:
        for name in ("tiercache_hit_tokens_total", "tiercache_stored_bytes_total", "tiercache_loaded_bytes_total",
                     "tiercache_evictions_total", "tiercache_used_bytes", "tiercache_capacity_bytes",
                     "tiercache_blocks", "tiercache_corrupt_blocks_total", "tiercache_dropped_writes_total",
                     "tiercache_load_seconds_count", "tiercache_store_seconds_count",
                     "tiercache_load_seconds_sum", "tiercache_store_seconds_sum"):
            assert _v(reg, name, tier=t) == 0.0, (name, t)
        for op in ERROR_OPS:
            assert _v(reg, "tiercache_errors_total", tier=t, op=op) == 0.0
    for outcome in PREFETCH_OUTCOMES:
        assert _v(reg, "tiercache_prefetch_total", outcome=outcome) == 0.0
    for name in ("tiercache_lookup_tokens_total", "tiercache_stored_tokens_total", "tiercache_disk_raw_bytes_total",
                 "tiercache_disk_compressed_bytes_total", "tiercache_prefetch_wait_seconds_count"):
        assert _v(reg, name) == 0.0
    assert _v(reg, "tiercache_hit_tokens_total", tier="remote") is None  # not configured: no series


def test_recorder_events_give_exact_values_and_match_stats(reg):
    rec = Recorder(("host", "disk"), PromMetrics(("host", "disk"), reg))
    rec.lookup(64, {"host": 32, "disk": 16}, {"host": 2, "disk": 1})
    rec.lookup(48, {"host": 16}, {"host": 1})
    rec.stored_tokens(96)
    rec.stored("host", 3 * 4096, 2e-5)
    rec.stored("disk", 3 * 4096, 0.003)
    rec.loaded("disk", 4096, 0.2)
    rec.loaded("host", 8192, 4e-5)
    rec.evicted("host", 2)
    rec.usage("host", 8192, 16384, 2)
    rec.disk_written(3 * 4096, 8000)
    rec.corrupt("disk")
    rec.error("disk", "load")
    rec.error("disk", "load")
    rec.dropped_write("disk", 3)
    rec.prefetch("ready", 4)
    rec.prefetch("late")
    rec.prefetch_wait(0.0075)

    assert _v(reg, "tiercache_lookup_tokens_total") == 112
    assert _v(reg, "tiercache_hit_tokens_total", tier="host") == 48
    assert _v(reg, "tiercache_hit_tokens_total", tier="disk") == 16
    assert _v(reg, "tiercache_stored_tokens_total") == 96
    assert _v(reg, "tiercache_stored_bytes_total", tier="host") == 12288
    assert _v(reg, "tiercache_loaded_bytes_total", tier="disk") == 4096
    assert _v(reg, "tiercache_loaded_bytes_total", tier="host") == 8192
    assert _v(reg, "tiercache_load_seconds_count", tier="disk") == 1
    assert _v(reg, "tiercache_load_seconds_sum", tier="disk") == pytest.approx(0.2)
    assert _v(reg, "tiercache_store_seconds_count", tier="disk") == 1
    assert _v(reg, "tiercache_evictions_total", tier="host") == 2
    assert _v(reg, "tiercache_used_bytes", tier="host") == 8192
    assert _v(reg, "tiercache_capacity_bytes", tier="host") == 16384
    assert _v(reg, "tiercache_blocks", tier="host") == 2
    assert _v(reg, "tiercache_disk_raw_bytes_total") == 12288
    assert _v(reg, "tiercache_disk_compressed_bytes_total") == 8000
    assert _v(reg, "tiercache_corrupt_blocks_total", tier="disk") == 1
    assert _v(reg, "tiercache_errors_total", tier="disk", op="load") == 2
    assert _v(reg, "tiercache_errors_total", tier="host", op="load") == 0
    assert _v(reg, "tiercache_dropped_writes_total", tier="disk") == 3
    assert _v(reg, "tiercache_prefetch_total", outcome="ready") == 4
    assert _v(reg, "tiercache_prefetch_total", outcome="late") == 1
    assert _v(reg, "tiercache_prefetch_total", outcome="dropped") == 0
    assert _v(reg, "tiercache_prefetch_wait_seconds_count") == 1
    assert _v(reg, "tiercache_prefetch_wait_seconds_sum") == pytest.approx(0.0075)

    # Prometheus and stats() see the same numbers
    s = rec.snapshot()
    assert s["lookup_tokens"] == _v(reg, "tiercache_lookup_tokens_total")
    for t in ("host", "disk"):
        assert s["hit_tokens"][t] == _v(reg, "tiercache_hit_tokens_total", tier=t)
        assert s["stored_bytes"][t] == _v(reg, "tiercache_stored_bytes_total", tier=t)
        assert s["loaded_bytes"][t] == _v(reg, "tiercache_loaded_bytes_total", tier=t)
        assert s["evictions"][t] == _v(reg, "tiercache_evictions_total", tier=t)
    assert s["prefetch"] == {o: _v(reg, "tiercache_prefetch_total", outcome=o) for o in PREFETCH_OUTCOMES}


def test_latency_buckets_span_10us_to_10s(reg):
    assert LATENCY_BUCKETS[0] == 1e-5 and LATENCY_BUCKETS[-1] == 10.0
    assert list(LATENCY_BUCKETS) == sorted(set(LATENCY_BUCKETS))
    m = PromMetrics(("host",), reg)
    m.loaded("host", 1, 3e-5)
    m.loaded("host", 1, 20.0)
    assert _v(reg, "tiercache_load_seconds_bucket", tier="host", le="2.5e-05") == 0
    assert _v(reg, "tiercache_load_seconds_bucket", tier="host", le="5e-05") == 1
    assert _v(reg, "tiercache_load_seconds_bucket", tier="host", le="10.0") == 1
    assert _v(reg, "tiercache_load_seconds_bucket", tier="host", le="+Inf") == 2


def test_unconfigured_but_valid_tier_is_counted(reg):
    m = PromMetrics(("host",), reg)
    m.lookup(32, {"disk": 16})
    assert _v(reg, "tiercache_hit_tokens_total", tier="disk") == 16


def test_two_instances_in_two_registries_do_not_clash():
    r1, r2 = CollectorRegistry(), CollectorRegistry()
    a, b = PromMetrics(("host",), r1), PromMetrics(("host", "disk"), r2)
    a.lookup(10, {"host": 5})
    b.lookup(7, {})
    assert _v(r1, "tiercache_lookup_tokens_total") == 10
    assert _v(r2, "tiercache_lookup_tokens_total") == 7
    assert _v(r1, "tiercache_hit_tokens_total", tier="disk") is None


def test_same_registry_twice_is_a_clear_error_until_closed(reg):
    first = PromMetrics(("host",), reg)
    with pytest.raises(ValueError, match="registry"):
        PromMetrics(("host",), reg)
    first.lookup(5, {})
    assert _v(reg, "tiercache_lookup_tokens_total") == 5  # the failed one left the first one intact
    first.close()
    first.close()  # idempotent
    assert _v(reg, "tiercache_lookup_tokens_total") is None
    second = PromMetrics(("host",), reg)
    assert _v(reg, "tiercache_lookup_tokens_total") == 0
    first.lookup(5, {})  # ignored after close
    assert _v(reg, "tiercache_lookup_tokens_total") == 0
    second.close()


def test_extra_labels_on_every_series(reg):
    PromMetrics(("host",), reg, extra_labels={"model": "m1", "tp_rank": "0"}).error("host", "store")
    assert _v(reg, "tiercache_errors_total", model="m1", tp_rank="0", tier="host", op="store") == 1
    assert _v(reg, "tiercache_lookup_tokens_total", model="m1", tp_rank="0") == 0
    for fam in text_string_to_metric_families(generate_latest(reg).decode()):
        for sample in fam.samples:
            assert sample.labels.get("model") == "m1", sample


@pytest.mark.parametrize("kwargs, field", [
    ({"tiers": ("host", "ssd")}, "tiers"),
    ({"tiers": ("host", "host")}, "tiers"),
    ({"tiers": ("host",), "extra_labels": {"tier": "x"}}, "extra_labels"),
    ({"tiers": ("host",), "extra_labels": {"bad-name": "x"}}, "extra_labels"),
    ({"tiers": ("host",), "extra_labels": {"instance": "x"}}, "extra_labels"),
])
def test_bad_constructor_arguments_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        PromMetrics(registry=CollectorRegistry(), **kwargs)


def test_bad_types_name_the_field():
    with pytest.raises(TypeError, match="tiers"):
        PromMetrics("host")
    with pytest.raises(TypeError, match="registry"):
        PromMetrics(("host",), registry={})
    with pytest.raises(TypeError, match="extra_labels"):
        PromMetrics(("host",), extra_labels={"model": 3})


def test_bad_events_name_the_field(reg):
    m = PromMetrics(("host",), reg)
    with pytest.raises(ValueError, match="tier"):
        m.loaded("ssd", 1, 0.1)
    with pytest.raises(ValueError, match="op"):
        m.error("host", "write")
    with pytest.raises(ValueError, match="outcome"):
        m.prefetch("early")
    with pytest.raises(ValueError, match="nbytes"):
        m.stored("host", -1, 0.1)
    with pytest.raises(ValueError, match="seconds"):
        m.prefetch_wait(float("nan"))
    with pytest.raises(ValueError, match="tier"):
        m.lookup(10, {"host": 5, "ssd": 5})
    assert _v(reg, "tiercache_lookup_tokens_total") == 0  # a rejected lookup counted nothing
    assert _v(reg, "tiercache_hit_tokens_total", tier="host") == 0


# --- exporter --------------------------------------------------------------------------------------

def test_start_exporter_on_a_free_port(reg):
    m = PromMetrics(("host",), reg)
    m.lookup(16, {"host": 16})
    server, thread, port = start_exporter(0, reg)
    try:
        assert port > 0
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        assert 'tiercache_hit_tokens_total{tier="host"} 16.0' in body
    finally:
        stop_exporter(server, thread)
    assert not thread.is_alive()


@pytest.mark.parametrize("port", [-1, 70000, "9000", True])
def test_start_exporter_rejects_bad_port(port):
    with pytest.raises(ValueError, match="port"):
        start_exporter(port, CollectorRegistry())


def test_serve_metrics_rejects_missing_multiproc_dir(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path / "absent"))
    assert main_serve_metrics(["--port", "0"]) == 2
    assert "PROMETHEUS_MULTIPROC_DIR" in capsys.readouterr().err


# --- multiprocess mode -----------------------------------------------------------------------------

_WORKERS = textwrap.dedent("""
    import os
    from tiercache.metrics import PromMetrics
    from tiercache.stats import Recorder

    pids = []
    for i in range(3):
        pid = os.fork()
        if pid == 0:
            rec = Recorder(("host", "disk"), PromMetrics(("host", "disk")))
            rec.lookup(100, {"host": 40}, {"host": 1})
            rec.stored("disk", 1000, 0.002)
            rec.usage("host", 500, 1000, 5)
            rec.prefetch("late")
            rec.prefetch_wait(0.01)
            rec.error("disk", "store")
            if i == 2:
                rec.sink.close()  # a closed cache drops out of the gauges' live sum
            os._exit(0)
        pids.append(pid)
    for pid in pids:
        _, status = os.waitpid(pid, 0)
        assert status == 0, status
    print(" ".join(map(str, pids)))
""")


@pytest.fixture
def multiproc_dir(tmp_path) -> tuple[Path, list[int]]:
    d = tmp_path / "prom"
    d.mkdir()
    out = subprocess.run([sys.executable, "-c", _WORKERS], env=_subprocess_env(PROMETHEUS_MULTIPROC_DIR=str(d)),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return d, [int(p) for p in out.stdout.split()]


def test_multiprocess_mode_aggregates_processes(multiproc_dir):
    d, pids = multiproc_dir
    reg = CollectorRegistry()
    MultiProcessCollector(reg, path=str(d))
    assert _v(reg, "tiercache_lookup_tokens_total") == 300
    assert _v(reg, "tiercache_hit_tokens_total", tier="host") == 120
    assert _v(reg, "tiercache_hit_tokens_total", tier="disk") == 0
    assert _v(reg, "tiercache_stored_bytes_total", tier="disk") == 3000
    assert _v(reg, "tiercache_store_seconds_count", tier="disk") == 3
    assert _v(reg, "tiercache_store_seconds_bucket", tier="disk", le="0.0025") == 3
    assert _v(reg, "tiercache_errors_total", tier="disk", op="store") == 3
    assert _v(reg, "tiercache_errors_total", tier="host", op="evict") == 0
    assert _v(reg, "tiercache_prefetch_total", outcome="late") == 3
    assert _v(reg, "tiercache_prefetch_total", outcome="dropped") == 0
    assert _v(reg, "tiercache_prefetch_wait_seconds_count") == 3
    assert _v(reg, "tiercache_used_bytes", tier="host") == 1000  # livesum of the two open caches
    assert _v(reg, "tiercache_capacity_bytes", tier="host") == 2000
    assert _v(reg, "tiercache_blocks", tier="disk") == 0
    # the workers have exited: reaping drops their live gauges, counters stay
    assert reap_dead_processes(str(d)) == sorted(pids)
    assert _v(reg, "tiercache_used_bytes", tier="host") is None
    assert _v(reg, "tiercache_lookup_tokens_total") == 300


def test_serve_metrics_serves_the_multiprocess_dir(multiproc_dir):
    d, _ = multiproc_dir
    code = "import sys; from tiercache.metrics import main_serve_metrics; sys.exit(main_serve_metrics(sys.argv[1:]))"
    proc = subprocess.Popen([sys.executable, "-c", code, "--port", "0"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_subprocess_env(PROMETHEUS_MULTIPROC_DIR=str(d)))
    try:
        line = proc.stdout.readline()  # blocks until the server is up (or the process died)
        assert "serving http://" in line, proc.stderr.read() if proc.poll() is not None else line
        url = line.split("serving ", 1)[1].strip()
        body = urllib.request.urlopen(url, timeout=10).read().decode()
        values = {(s.name, tuple(sorted(s.labels.items()))): s.value
                  for fam in text_string_to_metric_families(body) for s in fam.samples}
        assert values[("tiercache_lookup_tokens_total", ())] == 300
        assert values[("tiercache_hit_tokens_total", (("tier", "host"),))] == 120
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()


# --- a real TierCache ------------------------------------------------------------------------------

def test_real_cache_scripted_workload_gives_exact_counts(tmp_path):
    torch = pytest.importorskip("torch")
    from tiercache import CacheConfig, KVLayout, TierCache

    layout = KVLayout(num_layers=2, num_kv_heads=2, head_dim=16, dtype=torch.bfloat16, block_size=16)
    bb = layout.block_bytes
    reg = CollectorRegistry()
    cfg = CacheConfig(layout=layout, model_id="exact", host_bytes=8 * bb, disk_path=tmp_path / "lmdb",
                      disk_bytes="1MiB")
    a, b, c = list(range(0, 69)), list(range(1000, 1064)), list(range(2000, 2064))  # a: 4 blocks + 5 ignored
    with TierCache(cfg, registry=reg) as cache:
        for name in ("host", "disk"):
            assert _v(reg, "tiercache_hit_tokens_total", tier=name) == 0
        assert _v(reg, "tiercache_capacity_bytes", tier="host") == 8 * bb
        for tokens in (a, b, c):  # host holds 8 blocks: storing c evicts a's 4 blocks, which stay on disk
            assert cache.store(tokens, torch.randn(layout.kv_shape(len(tokens))).to(layout.dtype)) == 64
            cache.flush()
        asked = [a + [1] * 10, c, list(range(5000, 5040)), b[:40]]
        assert [cache.lookup(q) for q in asked] == [64, 64, 0, 32]
        assert _v(reg, "tiercache_lookup_tokens_total") == sum(map(len, asked)) == 223
        assert _v(reg, "tiercache_hit_tokens_total", tier="disk") == 64
        assert _v(reg, "tiercache_hit_tokens_total", tier="host") == 64 + 32
        assert _v(reg, "tiercache_stored_tokens_total") == 3 * 64
        assert _v(reg, "tiercache_stored_bytes_total", tier="host") == 12 * bb
        assert _v(reg, "tiercache_stored_bytes_total", tier="disk") == 12 * bb
        assert _v(reg, "tiercache_disk_raw_bytes_total") == 12 * bb
        assert _v(reg, "tiercache_disk_compressed_bytes_total") > 0
        assert _v(reg, "tiercache_evictions_total", tier="host") == 4
        assert _v(reg, "tiercache_used_bytes", tier="host") == 8 * bb
        assert _v(reg, "tiercache_blocks", tier="host") == 8
        assert _v(reg, "tiercache_blocks", tier="disk") == 12
        assert _v(reg, "tiercache_store_seconds_count", tier="disk") > 0

        assert cache.load(a).shape[2] == 64  # from disk, promoted into host
        assert _v(reg, "tiercache_loaded_bytes_total", tier="disk") == 4 * bb
        assert _v(reg, "tiercache_load_seconds_count", tier="disk") == 1
        assert _v(reg, "tiercache_lookup_tokens_total") == 223  # load() does not count lookups

        s = cache.stats()
        assert s["lookup_tokens"] == _v(reg, "tiercache_lookup_tokens_total")
        assert s["disk_compressed_bytes"] == _v(reg, "tiercache_disk_compressed_bytes_total")
        for name in ("host", "disk"):
            assert s["hit_tokens"][name] == _v(reg, "tiercache_hit_tokens_total", tier=name)
            assert s["stored_bytes"][name] == _v(reg, "tiercache_stored_bytes_total", tier=name)
            assert s["loaded_bytes"][name] == _v(reg, "tiercache_loaded_bytes_total", tier=name)
            assert s["evictions"][name] == _v(reg, "tiercache_evictions_total", tier=name)
            assert s["used_bytes"][name] == _v(reg, "tiercache_used_bytes", tier=name)
    assert _v(reg, "tiercache_lookup_tokens_total") is None  # close() unregistered the series


def test_every_op_the_tiers_count_is_a_valid_label():
    """The tiers count faults by op name; PromMetrics refuses unknown names (it would lose the count)."""
    import re

    from tiercache.metrics import ERROR_OPS
    src = "".join(p.read_text() for p in (REPO / "tiercache" / "tiers").glob("*.py"))
    src += (REPO / "tiercache" / "mover.py").read_text()
    used = set(re.findall(r'(?:_count|_fault|_off|_failed)\("([a-z_]+)"', src))
    used |= set(re.findall(r'recorder\.error\("[a-z]+", "([a-z_]+)"', src))
    assert used and used <= set(ERROR_OPS), used - set(ERROR_OPS)
