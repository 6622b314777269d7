"""`tiercache bench` in a tiny configuration: the JSON it prints, the markdown it writes, the peer protocol.

No timing thresholds: figures on a shared machine vary; only structure, bit-exactness and sanity are checked.
"""

from __future__ import annotations

import json
import math

import pytest

from tiercache import bench

TINY = ["--chunks", "2", "--rounds", "2", "--warmup", "1", "--layers", "2", "--scale-sizes", "128,256",
        "--no-drop-caches", "--quiet"]


def _finite_positive(*values: float) -> bool:
    return all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in values)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    out = tmp / "results.md"
    import contextlib
    import io
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = bench.main([*TINY, "--json", "--workdir", str(tmp), "--out", str(out)])
    return rc, buf.getvalue(), out, tmp


def test_json_is_one_object_and_every_row_verified(tiny_run):
    rc, stdout, out, _ = tiny_run
    assert rc == 0
    result = json.loads(stdout)  # stdout is exactly one JSON object
    assert result["verified"] is True
    assert result["results_file"] == str(out)
    assert result["config"]["chunks"] == 2 and result["config"]["num_layers"] == 2
    assert result["machine"]["name"].endswith("cpu-only") or result["machine"]["gpu"]

    rows = {r["row"]: r for r in result["throughput"]}
    assert list(rows) == list(bench.ROW_ORDER)
    for name, r in rows.items():
        assert r["verified"] is True, name
        assert r["n"] == 2
        assert _finite_positive(r["median"], r["min"], r["max"], r["ratio"], r["ratio_min"], r["ratio_max"]), r
        assert r["min"] <= r["median"] <= r["max"]
        assert r["bound"] in rows
    for name, bound in bench.BOUNDS.items():
        assert rows[name]["bound"] == bound
    assert rows["memcpy store"]["ratio"] == 1.0  # a bound is its own reference


def test_footprint_lookup_and_scale(tiny_run):
    result = json.loads(tiny_run[1])
    fp = {r["data"]: r for r in result["footprint"]}
    assert set(fp) == {"realistic bf16", "uniform random bytes"}
    for r in fp.values():
        assert r["verified"] is True
        assert _finite_positive(r["ratio"], r["frame_ratio"], r["disk_bytes"], r["raw_bytes"])
    # the codec stores incompressible planes raw, and the realistic data does compress
    assert fp["uniform random bytes"]["frame_ratio"] >= 1.0
    assert fp["realistic bf16"]["frame_ratio"] < 1.0

    lookups = {r["row"]: r for r in result["lookup"]}
    assert set(lookups) == {"lookup, host hit", "lookup, host hit (repeated)", "hashing only", "lookup, disk hit",
                            "lookup, disk hit (repeated)"}
    assert all(r["verified"] and _finite_positive(r["median"]) for r in lookups.values())

    scale = result["scale"]
    assert {(r["tier"], r["op"]) for r in scale} == {(t, o) for t in ("host", "disk")
                                                     for o in ("store", "lookup", "lookup, repeated")}
    assert sorted({r["blocks"] for r in scale}) == [128, 256]
    assert all(r["verified"] and _finite_positive(r["median"], r["ratio"]) for r in scale)

    goals = result["goals"]
    assert len(goals) == len(bench.GOALS)
    assert all(isinstance(g["pass"], bool) and _finite_positive(g["value"]) for g in goals)
    assert result["cold_method"].startswith("posix_fadvise")


def test_markdown_results_file(tiny_run):
    _, stdout, out, _ = tiny_run
    text = out.read_text()
    result = json.loads(stdout)
    assert text.startswith(f"# tiercache bench — {result['date']} — {result['machine']['name']}")
    for section in ("## Throughput", "## Disk footprint", "## Lookup", "## Scale", "## Goals"):
        assert section in text
    for name in bench.ROW_ORDER:
        assert f"| {name} |" in text
    assert "| GB/s median (min–max) |" in text
    assert text.count("PASS") + text.count("MISS") >= len(bench.GOALS)


def test_peers_report_missing_venvs(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench, "VENVS_DIR", tmp_path / "no-venvs")
    rc = bench.main([*TINY, "--scale-sizes", "", "--peers", "--json", "--workdir", str(tmp_path),
                     "--out", str(tmp_path / "r.md")])
    result = json.loads(capsys.readouterr().out)
    assert rc == 0 and result["verified"] is True
    status = {p["peer"]: p["status"] for p in result["peers"]}
    assert status["lmcache"] == status["sglang"] == "not installed"
    # the file-format baselines need nothing but numpy (safetensors rows say if it is missing)
    assert status["baselines"] == "ok"
    rows = [r for r in result["peer_rows"] if r["status"] == "ok"]
    assert rows and all(r["verified"] and _finite_positive(r["median"], r["ratio"]) for r in rows)
    assert result["scale"] == [] and all("flat" not in g["goal"] for g in result["goals"])
    text = (tmp_path / "r.md").read_text()
    assert "| lmcache | not installed |" in text


def test_cli_dispatch_help(capsys):
    from tiercache import cli
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "--help"])
    assert e.value.code == 0
    assert "--full" in capsys.readouterr().out
