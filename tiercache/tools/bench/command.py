"""`tiercache bench`: the run (every part in one process, peers in theirs) and the command line."""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from tiercache.tools.bench.e2e import measure_e2e
from tiercache.tools.bench.goals import judge
from tiercache.tools.bench.peers import peer_lookup_rows, peer_rows, run_peers
from tiercache.tools.bench.protocol import (
    CHUNK_TOKENS,
    E2E_SIZES,
    FULL,
    QUICK,
    BenchConfig,
    CpuWatch,
    realistic_kv,
    summary,
)
from tiercache.tools.bench.report import code_state, machine_info, render_markdown
from tiercache.tools.bench.scale import measure_scale
from tiercache.tools.bench.tiers import LOOKUP_ROWS, measure_footprint, measure_tiers, throughput_rows

DESCRIPTION = ("measure tiercache's tiers against memcpy and raw file reads, LMCache, SGLang and file formats, "
               "and TTFT end to end, in the same run")


@dataclass(frozen=True)
class Section:
    """An extra part of the run: `measure(cfg, log) -> rows` (a list of flat dicts with a `verified` bool),
    shown in the results under `title` as a table of the rows' keys. Append to SECTIONS to add one."""

    key: str
    title: str
    measure: Callable[[BenchConfig, Callable[[str], None]], list[dict]]
    enabled: Callable[[BenchConfig], bool] = lambda cfg: True


SECTIONS: list[Section] = []


def _core_section(cfg: BenchConfig, log: Callable[[str], None]) -> list[dict]:
    from tiercache.tools.bench.core import core_rows
    log("core: cost per block of lookup, store, load and layer-wise load; eviction at scale")
    return core_rows(quick=cfg.chunks < 32)


SECTIONS.append(Section("core", "Core cost per block (32 layers, tiny blocks): us per block next to a memcpy",
                        _core_section))


def _ingest_section(cfg: BenchConfig, log: Callable[[str], None]) -> list[dict]:
    from tiercache.tools.bench.tiers import measure_ingest
    log("ingest: stores offered at paced rates around the sustained disk write rate (compression none)")
    return measure_ingest(cfg, log)


SECTIONS.append(Section("ingest", "Disk ingest (compression none, write_queue_blocks=2): stores offered at a paced "
                        "rate, as a multiple of the sustained rate measured first; where writes start being dropped",
                        _ingest_section))


def _vllm_section(cfg: BenchConfig, log: Callable[[str], None]) -> list[dict]:
    """TTFT on a real vLLM (its own virtual environment): tiercache's hits next to vLLM's own prefix cache."""
    import subprocess

    log(f"vllm: TTFT with {cfg.vllm_python} (8 layers, 2,048-token prompts; a few minutes)")
    proc = subprocess.run([cfg.vllm_python, "-m", "tiercache.tools.bench.vllm_ttft", "--json",
                           "--reps", "3" if cfg.chunks < 32 else "5"], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"--vllm: the TTFT run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])["rows"]


SECTIONS.append(Section("vllm", "TTFT on vLLM (CPU backend, 8 layers, 2,048-token prompts): ms, and the ratio to "
                        "vLLM's own prefix cache (goal: a warm hit <= 1.3x)", _vllm_section,
                        enabled=lambda cfg: cfg.vllm_python is not None))


def duration_note(cfg: BenchConfig) -> str:
    """How long the run takes, from runs measured on this project's 2-core CPU-only VM (benchmarks/README.md)."""
    if cfg == QUICK:
        known, extra = "this configuration took about 3 minutes", " (plus the core and ingest sections, added since)"
    elif cfg == replace(FULL, peers=True):
        known, extra = "this configuration took about 17 minutes", ""
    else:
        known, extra = "the quick run took about 3 minutes, --full --peers about 17,", ""
    return (f"[bench] {known} on a 2-core CPU-only VM{extra}; it keeps the CPUs busy and each round logs "
            "the time left")


def run(cfg: BenchConfig, log: Callable[[str], None] = lambda s: None, command: str = "tiercache bench") -> dict:
    code = code_state()  # before measuring: what was imported is what was on disk at start
    workdir = tempfile.mkdtemp(prefix="tiercache-bench-", dir=cfg.workdir)
    watch = CpuWatch()
    extra: dict[str, list[dict]] = {}
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
        for section in SECTIONS:
            if section.enabled(cfg):
                log(f"{section.title}")
                extra[section.key] = watch.measure(section.key, lambda s=section: s.measure(cfg, log))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    resident = (f"{max(rounds.cold_resident) * 100:.1f}% at most (fincore)" if rounds.cold_resident
                else "not checked (no fincore)")
    result = {"date": _dt.date.today().isoformat(), "command": command, "code": code, "machine": machine_info(),
              "config": {k: v for k, v in asdict(cfg).items() if k != "workdir"}, "layout": layout.fingerprint(),
              "chunk_bytes": layout.block_bytes, "other_cpu": watch.parts, "cold_method": rounds.cold_method,
              "cold_resident": resident,
              "throughput": throughput, "footprint": footprint, "lookup": lookup, "e2e": e2e, "scale": scale,
              "peers": peers, "peer_rows": peer_rows(peers, cfg.nbytes), "peer_lookup": peer_lookup_rows(peers),
              "sections": [{"key": s.key, "title": s.title, "rows": extra[s.key]} for s in SECTIONS if s.key in extra]}
    result["goals"] = judge(result)
    checked = throughput + footprint + lookup + scale + result["peer_lookup"] + [r for rows in extra.values()
                                                                                  for r in rows]
    result["verified"] = (all(r.get("verified", True) for r in checked)
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
    p.add_argument("--out", help="also write the markdown results to this file (default: print only)")
    p.add_argument("--chunks", type=int, help="256-token chunks in the workload (quick 8, full 32)")
    p.add_argument("--rounds", type=int, help="measured rounds")
    p.add_argument("--warmup", type=int, help="warm-up rounds (not measured)")
    p.add_argument("--layers", type=int, help="layers of the KV layout (default 32; fewer for a smoke test)")
    p.add_argument("--scale-sizes", help="comma-separated store sizes in blocks for the scale test ('' skips it)")
    p.add_argument("--e2e", choices=E2E_SIZES, help="end-to-end size: the demo's default workload (quick), its "
                   "--full one (full), a 2-layer model on a few hundred tokens (tiny), or off (quick mode: quick, "
                   "--full: full)")
    p.add_argument("--workdir", help="directory for the temporary files (default: the system temp dir)")
    p.add_argument("--drop-caches", action="store_true",
                   help="before cold reads, also drop the WHOLE machine's page cache (/proc/sys/vm/drop_caches, "
                   "needs root; slows every other process). Default: evict only the bench's own files with "
                   "posix_fadvise(DONTNEED)")
    p.add_argument("--no-drop-caches", action="store_true", help=argparse.SUPPRESS)  # the default; old scripts
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.add_argument("--vllm", metavar="PYTHON", help="a Python interpreter with vLLM installed (e.g. "
                   ".venv-vllm/bin/python): adds TTFT on vLLM with and without tiercache")
    a = p.parse_args(argv)
    cfg = FULL if a.full else QUICK
    if a.drop_caches and a.no_drop_caches:
        p.error("--drop-caches and --no-drop-caches: choose one")
    changes: dict = {"peers": a.peers, "workdir": a.workdir, "drop_caches": a.drop_caches, "vllm_python": a.vllm}
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

    if cfg.e2e != "off":
        try:
            import transformers  # noqa: F401  (the end-to-end part runs the demo's model)
        except ModuleNotFoundError:
            print("tiercache bench: error: the end-to-end part needs transformers, which is not installed; run: "
                  "pip install 'tiercache[transformers]', or pass --e2e off", file=sys.stderr)
            return 2
    out = Path(a.out) if a.out else None
    if out is not None and out.parent and not out.parent.is_dir():
        p_error = f"tiercache bench: error: --out: directory {out.parent} does not exist"
        print(p_error, file=sys.stderr)
        return 2
    if not a.quiet:
        print(duration_note(cfg) + ". Cold reads evict only the bench's own files"
              + (" and drop the whole page cache (--drop-caches)" if cfg.drop_caches else "") + ".",
              file=sys.stderr, flush=True)
    result = run(cfg, log, command=" ".join(["tiercache bench", *argv]))
    md = render_markdown(result)
    result["results_file"] = None
    if out is not None:
        out.write_text(md)
        result["results_file"] = str(out)
    if a.json:
        print(json.dumps(result))
    else:
        print(md)
    if out is not None:
        log(f"results written to {out}")
    return 0 if result["verified"] else 1
