"""A real Prometheus scrapes live exporters and evaluates every dashboard query and alert rule.

Two targets: a real TierCache (host + LMDB disk, small enough to evict) running a
mixed workload, and a PromMetrics driven with faults (errors, corruption, a full
disk, late prefetches, stalls) so that every alert rule has something to fire on.
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from prometheus_client import CollectorRegistry

from tiercache import CacheConfig, KVLayout, TierCache
from tiercache.metrics import PromMetrics, start_exporter, stop_exporter
from tiercache.stats import Recorder
from tiercache.tools.dashboards import alert_queries, alert_rules, dashboard_queries, scrape_config, to_yaml

PROMETHEUS = "/usr/bin/prometheus"
DASHBOARDS = Path(__file__).resolve().parents[1] / "dashboards"
pytestmark = [
    pytest.mark.prometheus,
    pytest.mark.skipif(not os.access(PROMETHEUS, os.X_OK),
                       reason=f"{PROMETHEUS} not installed (apt-get install prometheus) - real-Prometheus test"),
]
# what Grafana substitutes: "All" for the job/instance variables, a few scrape intervals for the windows
GRAFANA_VARS = {"$__rate_interval": "10s", "$__range": "5m", "$job": ".*", "$instance": ".*"}
DEADLINE_S = 90.0
LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=16, dtype=torch.bfloat16, block_size=16)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def grafana_to_promql(expr: str) -> str:
    for var, value in GRAFANA_VARS.items():
        expr = expr.replace(var, value)
    assert "$" not in expr, f"unsubstituted Grafana variable in {expr!r}"
    return expr


class Workload(threading.Thread):
    """Calls `step` every `period` seconds until stopped or `max_seconds` passed; keeps the first error."""

    def __init__(self, step: Callable[[int], None], period: float = 0.05, max_seconds: float = 120.0) -> None:
        super().__init__(daemon=True)
        self.step, self.period, self.max_seconds = step, period, max_seconds
        self.stop_event = threading.Event()
        self.error: BaseException | None = None
        self.ticks = 0

    def run(self) -> None:
        end = time.monotonic() + self.max_seconds
        try:
            while time.monotonic() < end and not self.stop_event.wait(self.period):
                self.step(self.ticks)
                self.ticks += 1
        except BaseException as e:  # surfaced by stop()
            self.error = e

    def stop(self) -> None:
        self.stop_event.set()
        self.join(30)
        assert not self.is_alive(), "workload did not stop"
        if self.error is not None:
            raise self.error


def real_cache_step(cache: TierCache) -> Callable[[int], None]:
    """Store new prompts (host evicts to disk, disk fills and evicts), look up old and new, load, prefetch."""
    B = LAYOUT.block_size

    def prompt(i: int) -> list[int]:
        return [1_000_000 + 100 * i + j for j in range(4 * B)]  # 4 full blocks

    def step(tick: int) -> None:
        cache.store(prompt(tick), torch.randn(LAYOUT.kv_shape(4 * B)).to(LAYOUT.dtype))
        for i in (tick, tick - 1, max(tick - 5, 0), tick + 10_000):  # host hit, host hit, disk hit, miss
            cache.lookup(prompt(i) + [7, 8, 9])
        if tick % 2 == 0:
            cache.load(prompt(max(tick - 6, 0)))
        else:
            cache.prefetch(prompt(max(tick - 7, 0))).wait()
    return step


def faulty_step(rec: Recorder) -> Callable[[int], None]:
    """Synthetic events that make every alert rule true and every dashboard series move."""
    blk = LAYOUT.block_bytes

    def step(tick: int) -> None:
        rec.lookup(1000, {"host": 10, "disk": 0}, {"host": 1})  # 1% hit rate: HitRateCollapse
        rec.stored_tokens(64)
        rec.stored("host", 4 * blk, 2e-4)
        rec.stored("disk", 4 * blk, 4e-3)
        rec.disk_written(4 * blk, 3 * blk)
        rec.loaded("host", blk, 5e-5)
        rec.loaded("disk", 2 * blk, 0.03)
        rec.evicted("host", 2)
        rec.evicted("disk", 3)                                   # with 97% full: DiskNearCapacity
        rec.usage("host", 30 * blk, 32 * blk, 30)
        rec.usage("disk", 970 * blk, 1000 * blk, 970)
        rec.corrupt("disk")                                      # CorruptBlocks
        rec.error("disk", "load")                                # Errors
        rec.dropped_write("disk")                                # DroppedWrites
        rec.prefetch("ready")
        rec.prefetch("late")                                     # 50% late: PrefetchLate
        rec.prefetch("dropped")
        rec.prefetch_wait(0.2)                                   # 4 s/s stalled: PrefetchStalls
    return step


class Prometheus:
    def __init__(self, url: str, proc: subprocess.Popen, log: Path) -> None:
        self.url, self.proc, self.log = url, proc, log

    def get(self, path: str, **params: str) -> dict:
        q = ("?" + urllib.parse.urlencode(params)) if params else ""
        try:
            with urllib.request.urlopen(f"{self.url}{path}{q}", timeout=10) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:  # 400/422 carry a JSON error body
            return json.loads(e.read())

    def query(self, expr: str) -> dict:
        return self.get("/api/v1/query", query=expr)


@pytest.fixture
def targets(tmp_path):
    """The live exporters: a real TierCache and a fault generator, each on its own registry and port."""
    real_reg, fault_reg = CollectorRegistry(), CollectorRegistry()
    cfg = CacheConfig(layout=LAYOUT, model_id="prom-test", host_bytes=8 * LAYOUT.block_bytes,
                      disk_path=tmp_path / "lmdb", disk_bytes="1MiB", write_queue_blocks=4096)
    cache = TierCache(cfg, registry=real_reg)
    fault_metrics = PromMetrics(("host", "disk"), fault_reg)
    fault_rec = Recorder(("host", "disk"), fault_metrics)
    servers = [start_exporter(0, real_reg), start_exporter(0, fault_reg)]
    yield {"cache": cache, "real": f"127.0.0.1:{servers[0][2]}", "fault": f"127.0.0.1:{servers[1][2]}",
           "real_step": real_cache_step(cache), "fault_step": faulty_step(fault_rec)}
    for server, thread, _ in servers:
        stop_exporter(server, thread)
    cache.close()
    fault_metrics.close()


@pytest.fixture
def prometheus(tmp_path, targets):
    cfg = scrape_config(tiercache_targets=[targets["real"], targets["fault"]], vllm_targets=(),
                        rule_files=[str(DASHBOARDS / "alerts.yml")], scrape_interval="1s", evaluation_interval="1s")
    (tmp_path / "prometheus.yml").write_text(to_yaml(cfg))
    port = _free_port()
    log = tmp_path / "prometheus.log"
    with open(log, "wb") as logf:
        proc = subprocess.Popen([PROMETHEUS, f"--config.file={tmp_path / 'prometheus.yml'}",
                                 f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                                 f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
                                stdout=logf, stderr=subprocess.STDOUT)
    prom = Prometheus(f"http://127.0.0.1:{port}", proc, log)
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, f"prometheus exited: {log.read_text()[-2000:]}"
            try:
                with urllib.request.urlopen(f"{prom.url}/-/ready", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, f"prometheus not ready after 30 s: {log.read_text()[-2000:]}"
            time.sleep(0.2)
        yield prom
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _problem(res: dict, need_value: bool) -> str | None:
    if res.get("status") != "success":
        return f"error: {res.get('errorType')}: {res.get('error')}"
    result = res["data"]["result"]
    if not result:
        return "empty result"
    if need_value and not any(math.isfinite(float(r["value"][1])) for r in result):
        return f"only NaN/Inf: {result}"
    return None


def _poll(what: str, check: Callable[[], dict[str, str]], deadline: float) -> None:
    """Re-run `check` (name -> problem) until nothing is left or the deadline passes."""
    while True:
        left = check()
        if not left:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: {len(left)} still failing after {DEADLINE_S:.0f} s:\n"
                        + "\n".join(f"  {k}: {v}" for k, v in sorted(left.items())))
        time.sleep(0.5)


def test_every_dashboard_query_and_alert_rule_evaluates(prometheus, targets):
    dash = json.loads((DASHBOARDS / "tiercache.json").read_text())
    queries = {f"panel {name}": grafana_to_promql(e) for name, e in dashboard_queries(dash)}
    alerts = {f"alert {name}": e for name, e in alert_queries(alert_rules())}
    assert len(queries) >= 25 and len(alerts) >= 5
    workloads = [Workload(targets["real_step"]), Workload(targets["fault_step"])]
    for w in workloads:
        w.start()
    deadline = time.monotonic() + DEADLINE_S
    try:
        def targets_up() -> dict[str, str]:
            active = prometheus.get("/api/v1/targets")["data"]["activeTargets"]
            up = {t["labels"]["instance"]: t["health"] for t in active}
            return {i: up.get(i, "absent") for i in (targets["real"], targets["fault"]) if up.get(i) != "up"}

        def all_queries() -> dict[str, str]:
            left = {}
            for name, expr in {**queries, **alerts}.items():
                problem = _problem(prometheus.query(expr), need_value=name.startswith("panel"))
                if name.startswith("panel vLLM:") and problem and not problem.startswith("error"):
                    problem = None  # its series exist only on a vLLM server's /metrics: valid PromQL is checked
                if problem and problem.startswith("error"):  # bad PromQL never heals
                    pytest.fail(f"{name}: {problem}\n{expr}")
                if problem:
                    left[name] = problem
            return left

        def rules_active() -> dict[str, str]:
            groups = prometheus.get("/api/v1/rules")["data"]["groups"]
            seen = {r["name"]: r for g in groups for r in g["rules"]}
            left = {}
            for name in (n.removeprefix("alert ") for n in alerts):
                r = seen.get(name)
                if r is None or r["health"] != "ok" or r["state"] not in ("pending", "firing"):
                    left[name] = "not loaded" if r is None else f"health={r['health']} state={r['state']}"
            return left

        def real_cache_busy() -> dict[str, str]:  # the real TierCache, not only the fault generator, shows up
            inst = targets["real"]
            checks = {
                "host hits": f'rate(tiercache_hit_tokens_total{{instance="{inst}", tier="host"}}[10s]) > 0',
                "disk hits": f'rate(tiercache_hit_tokens_total{{instance="{inst}", tier="disk"}}[10s]) > 0',
                "disk loads": f'rate(tiercache_loaded_bytes_total{{instance="{inst}", tier="disk"}}[10s]) > 0',
                "disk writes": f'rate(tiercache_disk_compressed_bytes_total{{instance="{inst}"}}[10s]) > 0',
                "host evictions": f'rate(tiercache_evictions_total{{instance="{inst}", tier="host"}}[10s]) > 0',
                "disk evictions": f'tiercache_evictions_total{{instance="{inst}", tier="disk"}} > 0',
                "prefetches": f'sum(tiercache_prefetch_total{{instance="{inst}"}}) > 0',
            }
            return {k: p for k, e in checks.items() if (p := _problem(prometheus.query(e), need_value=True))}

        variables = [v for v in dash["templating"]["list"] if v["type"] == "query"]
        assert {v["name"] for v in variables} == {"job", "instance"}

        def template_variables() -> dict[str, str]:  # label_values(selector, label) as Grafana runs it
            left = {}
            for v in variables:
                m = re.fullmatch(r"label_values\((.+), *(\w+)\)", v["query"])
                assert m, v["query"]
                res = prometheus.get(f"/api/v1/label/{m.group(2)}/values", **{"match[]": grafana_to_promql(m.group(1))})
                if res.get("status") != "success" or not res["data"]:
                    left[v["name"]] = str(res)
            return left

        _poll("targets up", targets_up, deadline)
        _poll("template variables", template_variables, deadline)
        _poll("real TierCache series", real_cache_busy, deadline)
        _poll("queries", all_queries, deadline)
        _poll("alert rules pending or firing", rules_active, deadline)
    finally:
        for w in workloads:
            w.stop()

    # Once the workload stops, what Prometheus scraped equals the cache's own stats, exactly.
    cache = targets["cache"]
    cache.flush()
    s = cache.stats()
    inst = targets["real"]
    expected = {f'tiercache_lookup_tokens_total{{instance="{inst}"}}': s["lookup_tokens"],
                f'tiercache_stored_tokens_total{{instance="{inst}"}}': s["stored_tokens"],
                f'tiercache_disk_raw_bytes_total{{instance="{inst}"}}': s["disk_raw_bytes"]}
    for tier in ("host", "disk"):
        sel = f'instance="{inst}", tier="{tier}"'
        expected[f"tiercache_hit_tokens_total{{{sel}}}"] = s["hit_tokens"][tier]
        expected[f"tiercache_stored_bytes_total{{{sel}}}"] = s["stored_bytes"][tier]
        expected[f"tiercache_loaded_bytes_total{{{sel}}}"] = s["loaded_bytes"][tier]
        expected[f"tiercache_evictions_total{{{sel}}}"] = s["evictions"][tier]
        expected[f"tiercache_used_bytes{{{sel}}}"] = s["used_bytes"][tier]
    assert s["hit_tokens"]["host"] > 0 and s["hit_tokens"]["disk"] > 0 and s["evictions"]["disk"] > 0

    def scraped_equals_stats() -> dict[str, str]:
        left = {}
        for expr, want in expected.items():
            res = prometheus.query(expr)["data"]["result"]
            got = float(res[0]["value"][1]) if len(res) == 1 else None
            if got != want:
                left[expr] = f"Prometheus has {got}, stats() has {want}"
        return left

    _poll("scraped values equal stats()", scraped_equals_stats, time.monotonic() + 30)
