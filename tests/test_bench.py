"""`tiercache bench` in a tiny configuration: the JSON it prints, the markdown it writes, the peer protocol.

No timing thresholds: figures on a shared machine vary; only structure, bit-exactness and sanity are checked.
Peer rows need their venvs (benchmarks/setup_peers.sh); CI never has them, so those tests skip.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import subprocess

import pytest

from tiercache.tools import bench
from tiercache.tools.bench import e2e, peers

TINY = ["--chunks", "2", "--rounds", "2", "--warmup", "1", "--layers", "2", "--scale-sizes", "128,256",
        "--e2e", "tiny", "--quiet"]
STATUSES = {"PASS", "MISS", "not measured"}


def _finite_positive(*values: float) -> bool:
    return all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in values)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    out = tmp / "results.md"
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
    assert result["code"].startswith(("commit ", "tiercache "))

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
        assert _finite_positive(r["ratio"], r["frame_ratio"], r["disk_bytes"], r["raw_bytes"],
                                r["decode_gbps_per_core"], r["decode_gbps_threads"])
        assert r["decode_threads"] >= 1
    # the codec stores incompressible planes raw, and the realistic data does compress
    assert fp["uniform random bytes"]["frame_ratio"] >= 1.0
    assert fp["realistic bf16"]["frame_ratio"] < 1.0

    assert [r["row"] for r in result["lookup"]] == list(bench.LOOKUP_ROWS)
    assert all(r["verified"] and _finite_positive(r["median"]) for r in result["lookup"])

    scale = result["scale"]
    assert {(r["tier"], r["op"]) for r in scale} == {(t, o) for t in ("host", "disk")
                                                     for o in ("store", "lookup", "lookup, repeated")} | \
        {("bound", "store"), ("bound", "lookup")}
    assert sorted({r["blocks"] for r in scale}) == [128, 256]
    assert all(r["verified"] and _finite_positive(r["median"], r["ratio"]) for r in scale)
    assert {r["bound"] for r in scale if r["tier"] == "bound"} == {"LMDB alone, the disk tier's rows",
                                                                    "a dict of 16-byte keys"}


def test_scale_goal_names_the_bound_at_the_worst_size(tiny_run):
    """The scale goal judges tiercache's own rows (never the bound's) and says how the bound grew there."""
    result = copy.deepcopy(json.loads(tiny_run[1]))

    def row(tier: str, op: str, blocks: int, us: float, ratio: float) -> dict:
        extra = {"bound": "LMDB alone, the disk tier's rows"} if tier == "bound" else {}
        return {"tier": tier, "op": op, "blocks": blocks, "verified": True, "median": us, "min": us, "max": us,
                "n": 1, "ratio": ratio, **extra}
    result["scale"] = [row("disk", "store", 1000, 40.0, 1.0), row("disk", "store", 10**6, 60.0, 1.5),
                       row("host", "lookup", 1000, 1.0, 1.0), row("host", "lookup", 10**6, 1.1, 1.1),
                       row("bound", "store", 1000, 10.0, 1.0), row("bound", "store", 10**6, 30.0, 3.0)]
    goal = {g["goal"]: g for g in bench.judge(result)}[
        "lookup and store flat as the store grows (largest <= 1.2x the 10^3 cost)"]
    assert goal["value"] == pytest.approx(1.5) and goal["status"] == "MISS"
    assert goal["measured_on"] == ("disk store at 1,000,000 blocks (+20.00 µs a block); LMDB alone, the disk "
                                   "tier's rows: 3.00x (+20.00 µs a block)")
    text = bench.render_markdown({**result, "goals": bench.judge(result)})
    assert "| bound: LMDB alone, the disk tier's rows | store | 1,000,000 | 30.00 (30.00–30.00) | 3.00x |" in text
    assert result["cold_method"] == "posix_fadvise(DONTNEED)"  # nothing machine-wide unless --drop-caches


def test_end_to_end_rows(tiny_run):
    result = json.loads(tiny_run[1])
    e = result["e2e"]
    assert e["verified"] is True and e["size"] == "tiny"
    assert e["vllm"] == e2e.VLLM_ROW and "not measured" in e2e.VLLM_ROW
    assert e["model"]["random_init"] and e["model"]["layers"] == 2
    assert e["workload"]["requests"] == e2e.TINY["documents"] * e2e.TINY["questions"]
    assert 0 < e["workload"]["reused_tokens_median"] < e["workload"]["prompt_tokens_median"]
    rows = {r["row"]: r for r in e["rows"]}
    assert _finite_positive(rows["no cache (full prefill)"]["ttft_ms"]["median"])
    ideal = rows["ideal: suffix prefill + memcpy"]
    assert _finite_positive(ideal["ttft_ms"]["median"], ideal["prefill_ms"]["median"], ideal["memcpy_ms"]["median"])
    warm = [r for r in e["rows"] if "ratio" in r]
    assert {r["tier"] for r in warm} == set(e2e.TIERS)
    for tier in e2e.TIERS:  # exactly one default loading mode per tier
        assert sum(r["default"] for r in warm if r["tier"] == tier) == 1
    for r in warm:
        assert r["ttft_ms"]["n"] == e["workload"]["requests"]
        assert _finite_positive(r["ttft_ms"]["median"], r["ratio"]["median"], r["speedup"])
    # the cached prefix gives the same KV whichever tier serves it: warm runs match the ideal run
    assert e["first_tokens_equal_ideal"] == e["workload"]["requests"]
    # the disk rows come twice: the default codec (auto's choice recorded) and an uncompressed store
    assert set(e2e.TIERS) >= {"disk, page cache warm", "disk, compression none, page cache warm"}
    assert e["disk_codec"] in ("byteplane", "none")
    goals = {g["goal"]: g for g in result["goals"]}
    for tier in ("disk, page cache dropped", "disk, page cache warm"):
        plain = next(r for r in warm if r["tier"] == tier.replace("disk", "disk, compression none") and r["default"])
        on = goals[next(name for name in goals if name.endswith(f"ideal: {tier}"))]["measured_on"]
        assert on.endswith(f'compression="auto" chose {e["disk_codec"]}, with compression="none": '
                           f'{plain["ratio"]["median"]:.2f}x'), on


def test_goals_without_peers(tiny_run):
    result = json.loads(tiny_run[1])
    goals = {g["goal"]: g for g in result["goals"]}
    assert list(goals) == [g.name for g in bench.GOALS]
    for g in goals.values():
        assert g["status"] in STATUSES
        if g["status"] == "not measured":
            assert g["value"] is None and g["pass"] is None
        else:
            assert _finite_positive(g["value"]) and g["pass"] is (g["status"] == "PASS")
            assert bool(g["miss_by"]) is (g["status"] == "MISS")
    # the LMCache comparisons need --peers; everything else is measured in a plain run
    unmeasured = {name for name, g in goals.items() if g["status"] == "not measured"}
    assert unmeasured == {"disk store >= LMCache's best disk mode", "disk load, cold >= LMCache's best disk mode",
                          "disk load, warm >= LMCache's best disk mode", "lookup >= 5x faster than LMCache's"}
    # the compressed loads are judged against their own bound, measured in the same run
    fp = {r["row"]: r for r in result["footprint"]}["footprint realistic bf16"]
    rows = {r["row"]: r for r in result["throughput"]}
    for temp in ("cold", "warm"):
        g = goals[f"disk load, {temp}, byteplane >= 0.9x min(raw read x ratio, cores x decode)"]
        bound = min(rows[f"raw file read, {temp}"]["median"] / fp["frame_ratio"],
                    result["machine"]["cores"] * fp["decode_gbps_per_core"])
        assert g["value"] == pytest.approx(rows[f"disk load, {temp}, byteplane"]["median"] / bound)
        assert f"measured on {fp['decode_threads']} threads at once: {fp['decode_gbps_threads']:.2f}" in \
            g["measured_on"]


def test_goals_against_lmcache_rows(tiny_run):
    """The LMCache goals: ours / LMCache's best disk mode, and LMCache's lookup µs / ours (least favourable pair)."""
    result = copy.deepcopy(json.loads(tiny_run[1]))
    ours = {r["row"]: r for r in result["throughput"]}
    lookups = {r["row"]: r for r in result["lookup"]}

    def disk_row(mode: str, temp: str, gbs: float) -> dict:
        op = "store" if temp == "store" else f"load, {temp}"
        return {"row": f"LMCache LocalDiskBackend ({mode}) {op}", "status": "ok", "peer": "lmcache",
                "bound": "raw file write" if temp == "store" else f"raw file read, {temp}", "median": gbs,
                "min": gbs, "max": gbs, "ratio": 1.0, "ratio_min": 1.0, "ratio_max": 1.0, "verified": True}

    def lookup_row(row: str, compare_to: str, us: float) -> dict:
        return {"row": row, "compare_to": compare_to, "peer": "lmcache", "median": us, "min": us, "max": us,
                "verified": True}

    result["peer_rows"] = [disk_row("buffered", "cold", 1.0), disk_row("O_DIRECT", "cold", 2.0),
                           disk_row("buffered", "warm", 4.0), disk_row("O_DIRECT", "warm", 1.0),
                           disk_row("buffered", "store", 0.5), disk_row("O_DIRECT", "store", 3.0)]
    result["peer_lookup"] = [
        lookup_row("LMCache LocalCPUBackend lookup", "lookup, host hit", 10 * lookups["lookup, host hit"]["median"]),
        lookup_row("LMCache LocalDiskBackend (buffered) lookup", "lookup, disk hit",
                   3 * lookups["lookup, disk hit"]["median"]),
        # repeated calls are shown, not judged
        lookup_row("LMCache LocalCPUBackend lookup (repeated)", "lookup, host hit (repeated)", 1e-9),
    ]
    goals = {g["goal"]: g for g in bench.judge(result)}
    assert goals["disk load, cold >= LMCache's best disk mode"]["value"] == pytest.approx(
        ours["disk load, cold"]["median"] / 2.0)
    assert goals["disk load, warm >= LMCache's best disk mode"]["value"] == pytest.approx(
        ours["disk load, warm"]["median"] / 4.0)
    store = goals["disk store >= LMCache's best disk mode"]
    assert store["value"] == pytest.approx(ours["disk store"]["median"] / 3.0)
    direct = ours["disk store, O_DIRECT"]["median"]
    assert (f"with disk_direct_writes=True {direct:.2f} GB/s ({direct / 3.0:.2f}x; a raw O_DIRECT write "
            f"{ours['raw file write, O_DIRECT']['median']:.2f} GB/s)") in store["measured_on"]
    lookup = goals["lookup >= 5x faster than LMCache's"]
    assert lookup["value"] == pytest.approx(3.0) and lookup["status"] == "MISS" and "40.0% short" in lookup["miss_by"]
    text = bench.render_markdown({**result, "goals": list(goals.values())})
    assert "| lookup >= 5x faster than LMCache's | 3.000x |" in text


def test_markdown_results_file(tiny_run):
    _, stdout, out, _ = tiny_run
    text = out.read_text()
    result = json.loads(stdout)
    assert text.startswith(f"# tiercache bench — {result['date']} — {result['machine']['name']}")
    assert f"code: {result['code']}" in text
    for section in ("## Throughput", "## Disk footprint", "## Lookup", "## End to end", "## Scale", "## Goals"):
        assert section in text
    titles = [line for line in text.splitlines() if line.startswith("#")]
    assert not [t for t in titles if "issue" in t.lower()], titles  # a title says what it measures
    for name in bench.ROW_ORDER:
        assert f"| {name} |" in text
    assert "| GB/s median (min–max) |" in text
    assert e2e.VLLM_ROW in text
    assert sum(text.count(f"| {s} |") for s in STATUSES) == len(bench.GOALS)


def test_peers_report_missing_venvs(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(peers, "VENVS_DIR", tmp_path / "no-venvs")
    rc = bench.main([*TINY, "--scale-sizes", "", "--e2e", "off", "--peers", "--json", "--workdir", str(tmp_path),
                     "--out", str(tmp_path / "r.md")])
    result = json.loads(capsys.readouterr().out)
    assert rc == 0 and result["verified"] is True
    status = {p["peer"]: p["status"] for p in result["peers"]}
    assert status["lmcache"] == status["sglang"] == "not installed"
    # the file-format baselines need nothing but numpy (safetensors rows say if it is missing)
    assert status["baselines"] == "ok"
    rows = [r for r in result["peer_rows"] if r["status"] == "ok"]
    assert rows and all(r["verified"] and _finite_positive(r["median"], r["ratio"]) for r in rows)
    assert result["scale"] == [] and result["e2e"] is None
    goals = {g["goal"]: g["status"] for g in result["goals"]}
    assert goals["lookup and store flat as the store grows (largest <= 1.2x the 10^3 cost)"] == "not measured"
    assert goals["warm TTFT <= 1.2x ideal: host"] == "not measured"
    text = (tmp_path / "r.md").read_text()
    assert "| lmcache | not installed |" in text


@pytest.mark.skipif(not (peers.VENVS_DIR / "lmcache" / "bin" / "python").exists(),
                    reason="no LMCache venv (benchmarks/setup_peers.sh lmcache)")
def test_lmcache_adapter_reports_lookup_rows(tmp_path):
    """The LMCache adapter on a tiny workload: every row verified, lookup rows paired with ours."""
    import torch

    layout = bench.BenchConfig(num_layers=2).layout
    src = bench.realistic_kv(layout, 2 * bench.CHUNK_TOKENS)
    src.view(torch.uint8).numpy().tofile(tmp_path / "src.bin")
    spec = {"src_path": str(tmp_path / "src.bin"), "shape": list(src.shape), "dtype": "bfloat16",
            "chunk_tokens": bench.CHUNK_TOKENS, "rounds": 1, "warmup": 0, "drop_caches": False, "seed": 0,
            "workdir": str(tmp_path)}
    proc = subprocess.run([str(peers.VENVS_DIR / "lmcache" / "bin" / "python"), str(peers.PEERS_DIR /
                           "lmcache_adapter.py")], input=json.dumps(spec), capture_output=True, text=True,
                          timeout=600, env={"PYTHONHASHSEED": "0", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    reply = json.loads(proc.stdout)
    assert all(r["verified"] for r in reply["rows"])
    lookups = {r["row"]: r for r in reply["lookup"]}
    assert lookups["LMCache LocalCPUBackend lookup"]["compare_to"] == "lookup, host hit"
    assert lookups["LMCache LocalDiskBackend (O_DIRECT) lookup (repeated)"]["compare_to"] == \
        "lookup, disk hit (repeated)"
    assert all(r["verified"] and len(r["us"]) == 1 and r["us"][0] > 0 for r in lookups.values())


def test_cli_dispatch_help(capsys):
    from tiercache import cli
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--full" in out and "--e2e" in out


def test_default_run_prints_only_and_never_drops_the_machine_cache(tmp_path, monkeypatch, capsys):
    """Without --out nothing is written; without --drop-caches /proc/sys/vm/drop_caches is never opened."""
    from tiercache.tools.bench import protocol

    opened: list[str] = []

    def recording_open(path, *args, **kwargs):
        opened.append(str(path))
        return open(path, *args, **kwargs)

    monkeypatch.setattr(protocol, "open", recording_open, raising=False)
    monkeypatch.chdir(tmp_path)
    results_dir = protocol.REPO / "benchmarks" / "results"
    before = sorted(results_dir.iterdir()) if results_dir.is_dir() else []
    argv = [a for a in TINY if a != "--quiet"]
    rc = bench.main([*argv, "--scale-sizes", "", "--e2e", "off", "--json", "--workdir", str(tmp_path)])
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert rc == 0 and result["results_file"] is None
    assert list(tmp_path.iterdir()) == []  # the workdir is cleaned up and nothing lands in the cwd
    assert (sorted(results_dir.iterdir()) if results_dir.is_dir() else []) == before
    assert "took about" in captured.err and "minutes" in captured.err  # it says how long before it starts
    assert "/proc/sys/vm/drop_caches" not in opened and result["cold_method"] == "posix_fadvise(DONTNEED)"


def test_drop_caches_only_when_asked(tmp_path, monkeypatch):
    from tiercache.tools.bench import protocol

    opened: list[str] = []

    class Refused:
        def __init__(self, path, *args, **kwargs):
            opened.append(str(path))
            raise PermissionError(path)

    monkeypatch.setattr(protocol, "open", Refused, raising=False)
    f = tmp_path / "f.bin"
    f.write_bytes(b"x" * 8192)
    assert protocol.drop_from_page_cache([str(f)], global_drop=False) == "posix_fadvise(DONTNEED)"
    assert opened == []
    assert protocol.drop_from_page_cache([str(f)], global_drop=True) == "posix_fadvise(DONTNEED)"
    assert opened == ["/proc/sys/vm/drop_caches"]  # tried only when asked (and refused here: reported as such)
    cfg, _ = bench.parse_args(["--drop-caches"])
    assert cfg.drop_caches is True and bench.parse_args([])[0].drop_caches is False


def test_an_added_section_is_measured_and_rendered(tmp_path, monkeypatch, capsys):
    from tiercache.tools.bench import command

    def rows(cfg, log):
        return [{"row": "per block", "us": 1.5, "verified": True}]

    monkeypatch.setattr(command, "SECTIONS", [command.Section("extra", "Extra: a cost per block", rows)])
    out = tmp_path / "r.md"
    rc = bench.main([*TINY, "--scale-sizes", "", "--e2e", "off", "--json", "--workdir", str(tmp_path),
                     "--out", str(out)])
    result = json.loads(capsys.readouterr().out)
    assert rc == 0 and result["sections"] == [{"key": "extra", "title": "Extra: a cost per block",
                                              "rows": [{"row": "per block", "us": 1.5, "verified": True}]}]
    text = out.read_text()
    assert "## Extra: a cost per block" in text and "| per block | 1.5 | yes |" in text


def test_vllm_section_only_with_a_vllm_python_and_its_rows_render():
    from tiercache.tools.bench.command import SECTIONS, parse_args
    from tiercache.tools.bench.report import _table
    from tiercache.tools.bench.vllm_ttft import rows

    section = next(s for s in SECTIONS if s.key == "vllm")
    assert not section.enabled(parse_args([])[0])
    assert section.enabled(parse_args(["--vllm", "/opt/vllm/bin/python"])[0])
    result = {"exact": {"tiercache/connector_hit": True, "tiercache/connector_hit_new_process": False},
              "results": {"none/vllm_prefix_cache": {"median_ms": 40.0, "all_ms": [40.0]},
                          "tiercache/connector_hit": {"median_ms": 50.0, "all_ms": [50.0]},
                          "tiercache/connector_hit_new_process": {"median_ms": 80.0, "all_ms": [80.0]},
                          "none/no_reuse_seconds": {"median_ms": 1000.0, "all_ms": [1000.0, 990.0]},
                          "tiercache/no_reuse_seconds": {"median_ms": 1010.0, "all_ms": [1010.0, 1020.0]}}}
    got = {r["row"]: r for r in rows(result)}
    assert got["TTFT tiercache/connector_hit"]["ratio"] == 1.25
    assert got["TTFT tiercache/connector_hit_new_process"]["verified"] is False   # a wrong token is a failure
    assert got["no reuse, batch time (ratio: tiercache / no connector, best of runs)"]["ratio"] == round(1010 / 990, 3)
    table = _table(rows(result))
    assert "ratio" in table[0] and any("NO" in line for line in table)
