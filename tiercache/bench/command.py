"""`tiercache bench`: the run (every part in one process, peers in theirs) and the command line."""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

from .e2e import measure_e2e
from .goals import judge
from .peers import peer_lookup_rows, peer_rows, run_peers
from .protocol import CHUNK_TOKENS, E2E_SIZES, FULL, QUICK, BenchConfig, CpuWatch, realistic_kv, summary
from .report import code_state, default_out, machine_info, render_markdown
from .scale import measure_scale
from .tiers import LOOKUP_ROWS, measure_footprint, measure_tiers, throughput_rows

DESCRIPTION = ("measure tiercache's tiers against memcpy and raw file reads, LMCache, SGLang and file formats, "
               "and TTFT end to end, in the same run")


def run(cfg: BenchConfig, log: Callable[[str], None] = lambda s: None, command: str = "tiercache bench") -> dict:
    code = code_state()  # before measuring: what was imported is what was on disk at start
    workdir = tempfile.mkdtemp(prefix="tiercache-bench-", dir=cfg.workdir)
    watch = CpuWatch()
    try:
        layout = cfg.layout
        src = realistic_kv(layout, cfg.chunks * CHUNK_TOKENS, cfg.seed)
        log(f"workload: {cfg.chunks} chunks of {layout.block_bytes / 2**20:.1f} MiB in {workdir}")
        rounds = watch.measure("tiers", lambda: measure_tiers(cfg, src, workdir, log))
        throughput = throughput_rows(rounds, cfg.nbytes)
        lookup = [{"row": k, "unit": "us/chunk", **summary(rounds.lookup_us[k].seconds),
                   "verified": rounds.lookup_us[k].verified} for k in LOOKUP_ROWS]
        footprint = watch.measure("footprint", lambda: measure_footprint(cfg, workdir, log))
        e2e = watch.measure("end to end", lambda: measure_e2e(cfg, workdir, log)) if cfg.e2e != "off" else None
        scale = watch.measure("scale", lambda: measure_scale(cfg, workdir, log)) if cfg.scale_sizes else []
        peers = watch.measure("peers", lambda: run_peers(cfg, src, workdir, log)) if cfg.peers else []
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    resident = (f"{max(rounds.cold_resident) * 100:.1f}% at most (fincore)" if rounds.cold_resident
                else "not checked (no fincore)")
    result = {"date": _dt.date.today().isoformat(), "command": command, "code": code, "machine": machine_info(),
              "config": {k: v for k, v in asdict(cfg).items() if k != "workdir"}, "layout": layout.fingerprint(),
              "chunk_bytes": layout.block_bytes, "other_cpu": watch.parts, "cold_method": rounds.cold_method,
              "cold_resident": resident,
              "throughput": throughput, "footprint": footprint, "lookup": lookup, "e2e": e2e, "scale": scale,
              "peers": peers, "peer_rows": peer_rows(peers, cfg.nbytes), "peer_lookup": peer_lookup_rows(peers)}
    result["goals"] = judge(result)
    checked = throughput + footprint + lookup + scale + result["peer_lookup"]
    result["verified"] = (all(r["verified"] for r in checked)
                          and all(r["verified"] for r in result["peer_rows"] if r["status"] == "ok")
                          and (e2e is None or e2e["verified"]))
    return result


def parse_args(argv: list[str]) -> tuple[BenchConfig, argparse.Namespace]:
    p = argparse.ArgumentParser(prog="tiercache bench", description=DESCRIPTION)
    p.add_argument("--full", action="store_true", help="1 GiB (32 chunks), scale test up to 10^6 blocks, "
                                                       "the demo's full RAG workload end to end")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout (progress goes to stderr)")
    p.add_argument("--peers", action="store_true", help="also run LMCache, SGLang and file-format baselines "
                                                        "where their venvs exist (benchmarks/setup_peers.sh)")
    p.add_argument("--out", help="markdown results file (default benchmarks/results/<date>-<machine>.md)")
    p.add_argument("--chunks", type=int, help="256-token chunks in the workload (quick 8, full 32)")
    p.add_argument("--rounds", type=int, help="measured rounds")
    p.add_argument("--warmup", type=int, help="warm-up rounds (not measured)")
    p.add_argument("--layers", type=int, help="layers of the KV layout (default 32; fewer for a smoke test)")
    p.add_argument("--scale-sizes", help="comma-separated store sizes in blocks for the scale test ('' skips it)")
    p.add_argument("--e2e", choices=E2E_SIZES, help="end-to-end size: the demo's workload (default), its --quick "
                   "one (quick), a 2-layer model on a few hundred tokens (tiny), or off (quick mode: quick, "
                   "--full: default)")
    p.add_argument("--workdir", help="directory for the temporary files (default: the system temp dir)")
    p.add_argument("--no-drop-caches", action="store_true",
                   help="never write /proc/sys/vm/drop_caches (posix_fadvise alone evicts the files)")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    a = p.parse_args(argv)
    cfg = FULL if a.full else QUICK
    changes: dict = {"peers": a.peers, "workdir": a.workdir, "drop_caches": not a.no_drop_caches}
    for name, value in (("chunks", a.chunks), ("rounds", a.rounds), ("warmup", a.warmup), ("num_layers", a.layers)):
        if value is not None:
            if value < (0 if name == "warmup" else 1):
                p.error(f"--{name.replace('num_', '')}: expected a positive number, got {value}")
            changes[name] = value
    if a.chunks is not None:
        changes["footprint_chunks"] = a.chunks
    if a.e2e is not None:
        changes["e2e"] = a.e2e
    if a.scale_sizes is not None:
        try:
            changes["scale_sizes"] = tuple(int(s) for s in a.scale_sizes.split(",") if s.strip())
        except ValueError:
            p.error(f"--scale-sizes: expected comma-separated integers, got {a.scale_sizes!r}")
    return replace(cfg, **changes), a


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg, a = parse_args(argv)

    def log(msg: str) -> None:
        if not a.quiet:
            print(f"[bench] {msg}", file=sys.stderr, flush=True)

    result = run(cfg, log, command=" ".join(["tiercache bench", *argv]))
    out = Path(a.out) if a.out else default_out(result["machine"], result["date"])
    out.parent.mkdir(parents=True, exist_ok=True)
    md = render_markdown(result)
    out.write_text(md)
    result["results_file"] = str(out)
    if a.json:
        print(json.dumps(result))
    else:
        print(md)
    log(f"results written to {out}")
    return 0 if result["verified"] else 1
