"""Peers (--peers): adapters in benchmarks/peers/ run in their own virtual environments.

bench writes the source tensor to a file; each adapter reads it, runs the same rounds (warm-up
included) with its bounds measured in its own process next to its rows, verifies every load and
prints one JSON object: throughput rows (seconds per round, and the bound's) and lookup rows (µs
per chunk, hashing included). A peer whose venv is missing is reported as "not installed".
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable

import torch

from tiercache.tools.bench.protocol import CHUNK_TOKENS, REPO, BenchConfig, ratio_row, summary

PEERS_DIR = REPO / "benchmarks" / "peers"
VENVS_DIR = REPO / "benchmarks" / ".venvs"
PEERS = (  # (name, adapter script in benchmarks/peers/, venv in benchmarks/.venvs/)
    ("baselines", "baselines.py", "baselines"),
    ("lmcache", "lmcache_adapter.py", "lmcache"),
    ("sglang", "sglang_adapter.py", "sglang"),
)


def peer_python(name: str, venv: str) -> str | None:
    exe = VENVS_DIR / venv / "bin" / "python"
    if exe.exists():
        return str(exe)
    # the file-format baselines need only numpy and torch; their safetensors rows say if it is missing
    return sys.executable if name == "baselines" else None


def run_peers(cfg: BenchConfig, src: torch.Tensor, workdir: str, log: Callable[[str], None]) -> list[dict]:
    """Run each peer's adapter on the same bytes; returns its rows (seconds per run) or a 'not installed' row."""
    src_path = os.path.join(workdir, "src.bin")
    src.view(torch.uint8).numpy().tofile(src_path)
    spec = {"src_path": src_path, "shape": list(src.shape), "dtype": "bfloat16", "chunk_tokens": CHUNK_TOKENS,
            "rounds": cfg.rounds, "warmup": cfg.warmup, "drop_caches": cfg.drop_caches, "seed": cfg.seed}
    results = []
    for name, script, venv in PEERS:
        exe = peer_python(name, venv)
        adapter = PEERS_DIR / script
        if exe is None or not adapter.exists():
            results.append({"peer": name, "status": "not installed",
                            "detail": f"no venv at benchmarks/.venvs/{venv} (see benchmarks/setup_peers.sh)"})
            continue
        log(f"peer: {name}")
        pdir = os.path.join(workdir, f"peer-{name}")
        os.makedirs(pdir, exist_ok=True)
        try:
            proc = subprocess.run([exe, str(adapter)], input=json.dumps({**spec, "workdir": pdir}),
                                  capture_output=True, text=True, timeout=3600,
                                  env={**os.environ, "PYTHONHASHSEED": "0"})  # LMCache's builtin hash wants it
            if proc.returncode != 0:
                raise RuntimeError(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed")
            results.append({"peer": name, "status": "ok", **json.loads(proc.stdout)})
        except (RuntimeError, subprocess.SubprocessError, json.JSONDecodeError) as e:
            results.append({"peer": name, "status": "failed", "detail": str(e)[:300]})
        finally:
            shutil.rmtree(pdir, ignore_errors=True)
    os.unlink(src_path)
    return results


def peer_rows(peers: list[dict], nbytes: int) -> list[dict]:
    """Peer throughput rows against the bounds each adapter measured next to them, in the peer's own process."""
    rows = []
    for p in peers:
        if p["status"] != "ok":
            rows.append({"row": p["peer"], "status": p["status"], "detail": p.get("detail", "")})
            continue
        for r in p["rows"]:
            if r.get("status", "ok") != "ok":
                rows.append({"row": r["row"], "status": r["status"], "detail": r.get("detail", "")})
            else:
                rows.append({**ratio_row(r["row"], r["bound"], r["seconds"], r["bound_seconds"], nbytes,
                                         bool(r["verified"])), "status": "ok", "peer": p["peer"]})
    return rows


def peer_lookup_rows(peers: list[dict]) -> list[dict]:
    """Peer lookup rows (µs per chunk, hashing included), paired with the tiercache row they compare to."""
    rows = []
    for p in peers:
        if p["status"] != "ok":
            continue
        for r in p.get("lookup", []):
            rows.append({"row": r["row"], "unit": "us/chunk", **summary(r["us"]), "verified": bool(r["verified"]),
                         "peer": p["peer"], "compare_to": r.get("compare_to")})
    return rows
