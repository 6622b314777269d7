"""dashboards/: generated from tiercache.metrics, committed as generated, valid for Prometheus and Grafana."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tiercache.integrations.vllm_series import series_names
from tiercache.metrics import metric_names
from tiercache.tools.dashboards import (
    alert_queries,
    alert_rules,
    dashboard,
    dashboard_queries,
    main,
    render,
    scrape_config,
    to_yaml,
)

DASHBOARDS = Path(__file__).resolve().parents[1] / "dashboards"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
needs_promtool = pytest.mark.skipif(not Path(PROMTOOL).exists(), reason="promtool not installed")


def test_committed_files_equal_the_generated_ones():
    for name, text in render().items():
        path = DASHBOARDS / name
        assert path.exists(), f"{path} missing: run python -m tiercache.tools.dashboards"
        assert path.read_text() == text, f"{path} is stale: run python -m tiercache.tools.dashboards"
    assert main(["--check", "--out", str(DASHBOARDS)]) == 0


def test_check_reports_stale_files(tmp_path, capsys):
    assert main(["--check", "--out", str(tmp_path)]) == 1
    assert main(["--out", str(tmp_path)]) == 0
    assert main(["--check", "--out", str(tmp_path)]) == 0
    assert "up to date" in capsys.readouterr().out


def test_every_metric_name_in_dashboards_exists():
    files = sorted(p for p in DASHBOARDS.iterdir() if p.is_file())
    assert {p.name for p in files} >= {"tiercache.json", "alerts.yml", "prometheus.yml", "README.md"}
    used = set()
    for p in files:
        used |= set(re.findall(r"\btiercache_[a-z0-9_]+", p.read_text()))
    assert used, "no metric names found?"
    # the exporter's names, and those the vLLM connector publishes on vLLM's /metrics (dashboards/README.md)
    assert used <= metric_names() | series_names(), used - metric_names() - series_names()
    # and every family is shown somewhere
    families = {n for n in metric_names() if not n.endswith(("_bucket", "_sum", "_count"))}
    text = (DASHBOARDS / "tiercache.json").read_text()
    missing = {n for n in families if n not in text and n + "_bucket" not in text and n + "_sum" not in text}
    assert not missing


def test_dashboard_is_importable_grafana_json():
    dash = json.loads((DASHBOARDS / "tiercache.json").read_text())
    assert dash["uid"] and dash["title"] and dash["id"] is None and dash["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    ids, titles = set(), set()
    for panel in dash["panels"]:
        assert panel["id"] not in ids
        ids.add(panel["id"])
        g = panel["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0
        if panel["type"] == "row":
            continue
        assert panel["title"] not in titles
        titles.add(panel["title"])
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)) and panel["targets"]
        for t in panel["targets"]:
            assert t["datasource"]["uid"] == "${datasource}"
    wanted = ["hit rate", "tokens per second", "bytes moved", "load latency", "store latency", "used vs capacity",
              "evictions", "compression", "prefetch late", "stall", "corrupt", "errors", "prefill tokens saved"]
    lowered = " | ".join(titles).lower()
    assert all(w in lowered for w in wanted), [w for w in wanted if w not in lowered]
    quantiles = [e for _, e in dashboard_queries(dash) if "histogram_quantile" in e]
    assert any("0.99" in e and "load_seconds" in e for e in quantiles)
    assert any("0.5," in e and "store_seconds" in e for e in quantiles)


def test_alerts_have_runbooks_and_cover_the_failure_modes():
    rules = alert_rules()["groups"][0]["rules"]
    names = {r["alert"] for r in rules}
    assert {"TiercacheHitRateCollapse", "TiercacheErrors", "TiercacheCorruptBlocks", "TiercacheDiskNearCapacity",
            "TiercachePrefetchStalls"} <= names
    for r in rules:
        assert r["labels"]["severity"] in ("info", "warning", "critical")
        ann = r["annotations"]
        assert ann["summary"] and ann["description"]
        assert len(ann["runbook"].strip().splitlines()) >= 3, r["alert"]
    assert len(alert_queries(alert_rules())) == len(rules)


def test_generated_yaml_round_trips():
    yaml = pytest.importorskip("yaml")
    assert yaml.safe_load(to_yaml(alert_rules())) == alert_rules()
    assert yaml.safe_load(to_yaml(scrape_config())) == scrape_config()
    tricky = {"a": "yes", "b": "x: y", "c": "15m", "d": "-1", "e": ["", "multi\nline\n"], "f": {}, "g": 1.5}
    assert yaml.safe_load(to_yaml(tricky)) == tricky


def test_dashboard_generation_is_deterministic():
    assert dashboard() == dashboard()
    assert render() == render()


def test_scrape_config_rejects_bad_interval():
    with pytest.raises(ValueError, match="scrape_interval"):
        scrape_config(scrape_interval="often")


@needs_promtool
def test_promtool_accepts_rules_and_config():
    for args in (["check", "rules", "alerts.yml"], ["check", "config", "prometheus.yml"]):
        out = subprocess.run([PROMTOOL, *args], cwd=DASHBOARDS, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stdout + out.stderr
