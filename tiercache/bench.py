"""`tiercache bench`: tier throughput next to the bounds that limit it, measured in the same run.

Protocol (issues 2 and 5):

- Workload: Llama-8B-shaped KV (32 layers, 8 KV heads, head_dim 128, bf16) in 256-token
  chunks (one block, 32 MiB each), held in a CPU tensor [32, 2, tokens, 8, 128]. Quick: 8
  chunks (256 MiB); --full: 32 chunks (1 GiB). Each round stores a new token sequence from
  the source tensor and loads it back into a separate tensor with `load(tokens, out=...)`;
  every load is checked bit-identical (torch.equal on uint8 views).
- Bounds, measured in the same rounds: memcpy (torch copy_ of each chunk into a preallocated
  buffer, and back, spread over as many threads as the cache's copy engine uses), and a plain
  file of the same bytes (writev/readv, no fsync for either).
- Cold reads: the file is synced, then dropped from the page cache with
  posix_fadvise(DONTNEED) (and /proc/sys/vm/drop_caches when root may write it); the LMDB
  environment is closed first so its map does not keep the pages. The method used is reported.
- Every tier row is timed back to back with its bound, alternating which goes first, round
  after round (after warm-up rounds); rows report the median and min-max, and ratios are the
  median of the per-round ratios row / bound, so drifts of a shared machine hit both sides alike.
- Disk footprint: allocated bytes of data.mdb per raw byte, for realistic bf16 KV (see
  `realistic_kv`) and for uniform random bytes.
- Lookup cost per chunk (hashing included), and a scale test: lookup and store cost per block
  as a store with a tiny layout grows from 10^3 to 10^5 (--full: 10^6) blocks.
- Peers (--peers): adapters in benchmarks/peers/ run in their own virtual environments, pair
  each row with a bound measured in their own process, and report over stdout; rows say
  "not installed" when a venv is missing.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from .config import CacheConfig, KVLayout

CHUNK_TOKENS = 256
REPO = Path(__file__).resolve().parents[1]
PEERS_DIR = REPO / "benchmarks" / "peers"
VENVS_DIR = REPO / "benchmarks" / ".venvs"
# (goal, row whose ratio is judged, comparison, target); issue 5's goals, judged on the median ratio
GOALS = (
    ("host store >= 0.9x memcpy", "host store", ">=", 0.9),
    ("host load >= 0.9x memcpy", "host load", ">=", 0.9),
    ("disk footprint <= 0.7x raw (realistic bf16)", "footprint realistic bf16", "<=", 0.7),
    ("lookup and store flat as the store grows (largest <= 1.5x the 10^3 cost)", "scale", "<=", 1.5),
)


@dataclass(frozen=True)
class BenchConfig:
    chunks: int = 8
    rounds: int = 5
    warmup: int = 2
    num_layers: int = 32
    num_kv_heads: int = 8
    head_dim: int = 128
    footprint_chunks: int = 8
    scale_sizes: tuple[int, ...] = (1_000, 10_000, 100_000)
    scale_probes: int = 15
    drop_caches: bool = True    # also write /proc/sys/vm/drop_caches when permitted
    peers: bool = False
    workdir: str | None = None
    seed: int = 0

    @property
    def layout(self) -> KVLayout:
        return KVLayout(num_layers=self.num_layers, num_kv_heads=self.num_kv_heads, head_dim=self.head_dim,
                        dtype=torch.bfloat16, block_size=CHUNK_TOKENS)

    @property
    def nbytes(self) -> int:
        return self.chunks * self.layout.block_bytes


QUICK = BenchConfig()
FULL = replace(QUICK, chunks=32, footprint_chunks=32, scale_sizes=(1_000, 10_000, 100_000, 1_000_000))


# -- data ----------------------------------------------------------------------------------
def realistic_kv(layout: KVLayout, tokens: int, seed: int = 0) -> torch.Tensor:
    """bf16 KV drawn to match the statistics of real K/V projections (random weights do not).

    Per (layer, head, channel): a log-normal scale (sigma 0.6) on a per-layer base (K around 1-2,
    V growing from 0.05 in early layers to 1); 3% of K channels and 1% of V channels are outliers,
    4-16x larger, and K outlier channels carry a constant offset (the "massive activations" of
    real models). Values are Gaussian around that; RoPE (theta 500000, Llama 3) rotates K by
    position; the first token is an attention sink, 4x larger.
    """
    g = torch.Generator().manual_seed(seed)
    L, P, H, D = layout.num_layers, layout.planes, layout.num_kv_heads, layout.head_dim
    out = torch.empty(layout.kv_shape(tokens), dtype=layout.dtype)
    half = D // 2
    inv_freq = 1.0 / (500000.0 ** (torch.arange(half, dtype=torch.float64) / half))
    angle = torch.arange(tokens, dtype=torch.float64)[:, None] * inv_freq[None, :]
    cos, sin = angle.cos().float()[:, None, :], angle.sin().float()[:, None, :]   # [T, 1, D/2]
    for layer in range(L):
        depth = layer / max(L - 1, 1)
        for p in range(P):
            is_k = p == 0 and P == 2
            base = (1.0 + depth) if is_k else (0.05 + 0.95 * depth)
            scale = torch.exp(torch.randn(H, D, generator=g) * 0.6) * base
            outlier = torch.rand(H, D, generator=g) < (0.03 if is_k else 0.01)
            scale = torch.where(outlier, scale * (4 + 12 * torch.rand(H, D, generator=g)), scale)
            offset = torch.where(outlier, scale * torch.randn(H, D, generator=g), 0.0) if is_k else 0.0
            x = torch.randn(tokens, H, D, generator=g) * scale + offset
            x[0] *= 4.0
            if is_k:
                a, b = x[..., :half], x[..., half:]
                x = torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)
            out[layer, p] = x.to(layout.dtype)
    return out


def uniform_kv(layout: KVLayout, tokens: int, seed: int = 0) -> torch.Tensor:
    """Uniformly random bytes in the KV's shape (incompressible; some are NaN patterns, which is fine)."""
    g = torch.Generator().manual_seed(seed)
    n = math.prod(layout.kv_shape(tokens)) * layout.itemsize
    return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g).view(layout.dtype).view(
        layout.kv_shape(tokens))


def token_ids(seed: int, n: int, salt: int = 0) -> np.ndarray:
    return np.random.default_rng([seed, salt]).integers(0, 128_000, n, dtype=np.int64)


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


# -- page cache ------------------------------------------------------------------------------
def drop_from_page_cache(paths: list[str], global_drop: bool) -> str:
    """Write back and evict `paths` from the page cache; returns the method that was used."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    if global_drop:
        try:
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("1\n")
            return "posix_fadvise(DONTNEED) + /proc/sys/vm/drop_caches"
        except OSError:
            pass
    return "posix_fadvise(DONTNEED)"


def resident_fraction(path: str) -> float | None:
    """Share of `path` in the page cache (util-linux fincore), or None if it cannot be told."""
    exe = shutil.which("fincore")
    size = os.path.getsize(path)
    if exe is None or size == 0:
        return None
    try:
        out = subprocess.run([exe, "--bytes", "--noheadings", "--output", "RES", path], capture_output=True,
                             text=True, timeout=10, check=True).stdout.split()
        return int(out[0]) / size
    except (subprocess.SubprocessError, ValueError, IndexError, OSError):
        return None


# -- raw file baseline ------------------------------------------------------------------------
def _pieces(kv: torch.Tensor, chunk: int) -> list[np.ndarray]:
    """The contiguous [layer, plane] runs of one chunk, as byte arrays (views, no copy)."""
    s = slice(chunk * CHUNK_TOKENS, (chunk + 1) * CHUNK_TOKENS)
    return [kv[layer, p, s].view(torch.uint8).numpy().reshape(-1)
            for layer in range(kv.shape[0]) for p in range(kv.shape[1])]


def raw_write(path: str, src: torch.Tensor, chunks: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for c in range(chunks):
            os.writev(fd, _pieces(src, c))
    finally:
        os.close(fd)


def raw_read(path: str, dst: torch.Tensor, chunks: int) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        for c in range(chunks):
            bufs = _pieces(dst, c)
            want = sum(b.nbytes for b in bufs)
            if os.readv(fd, bufs) != want:
                raise OSError(f"short read from {path}")
    finally:
        os.close(fd)


class ParallelCopy:
    """memcpy as the bound: torch copy_ of (dst, src) pairs, split round-robin over `threads` threads."""

    def __init__(self, threads: int) -> None:
        self._pool = ThreadPoolExecutor(max_workers=threads)
        self._threads = threads

    def copy(self, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        def run(part: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
            for d, s in part:
                d.copy_(s)

        for f in [self._pool.submit(run, pairs[i::self._threads]) for i in range(self._threads)]:
            f.result()

    def close(self) -> None:
        self._pool.shutdown()


# -- the measured rounds ----------------------------------------------------------------------
@dataclass
class Samples:
    """Per-round measurements of one row: seconds for `nbytes`, and whether every run verified."""

    seconds: list[float] = field(default_factory=list)
    verified: bool = True

    def add(self, seconds: float, ok: bool = True) -> None:
        self.seconds.append(seconds)
        self.verified = self.verified and ok


class Rounds:
    """Runs every probe once per round in a rotating order; keeps samples after the warm-up."""

    def __init__(self, cfg: BenchConfig, log: Callable[[str], None]) -> None:
        self.cfg = cfg
        self.log = log
        self.samples: dict[str, Samples] = {}
        self.lookup_us: dict[str, Samples] = {}
        self.cold_method = "posix_fadvise(DONTNEED)"
        self.cold_resident: list[float] = []
        self._measuring = False

    def record(self, row: str, seconds: float, ok: bool = True, table: dict | None = None) -> None:
        if self._measuring:
            (self.samples if table is None else table).setdefault(row, Samples()).add(seconds, ok)

    def run(self, probes: list[Callable[[int], None]]) -> None:
        total = self.cfg.warmup + self.cfg.rounds
        for r in range(total):
            self._measuring = r >= self.cfg.warmup
            self.log(f"round {r + 1}/{total}{' (warm-up)' if not self._measuring else ''}")
            for i in range(len(probes)):
                probes[(i + r) % len(probes)](r)

    def cold(self, paths: list[str]) -> None:
        self.cold_method = drop_from_page_cache(paths, self.cfg.drop_caches)
        fracs = [resident_fraction(p) for p in paths]
        if self._measuring and None not in fracs:
            self.cold_resident.append(max(fracs))


def _timed(fn: Callable[[], object]) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def measure_tiers(cfg: BenchConfig, src: torch.Tensor, workdir: str, log: Callable[[str], None]) -> Rounds:
    """The interleaved rounds: each tier row is timed right next to its bound, in alternating order."""
    from .manager import TierCache

    layout, n = cfg.layout, cfg.chunks
    T = n * CHUNK_TOKENS
    dst = torch.empty_like(src)
    buf = torch.empty((n, *layout.block_shape), dtype=layout.dtype)
    rounds = Rounds(cfg, log)
    # the bound copies with as many threads as the cache's copy engine has, so it is not beaten by them
    copies = ParallelCopy(CacheConfig(layout=layout).io_threads)
    host = TierCache(CacheConfig(layout=layout, model_id="bench", host_bytes=n * layout.block_bytes))
    raw_path, lmdb_path = os.path.join(workdir, "raw.bin"), os.path.join(workdir, "lmdb")
    disk_cfg = CacheConfig(layout=layout, model_id="bench", host_bytes=0, disk_path=lmdb_path,
                           disk_bytes=2 * cfg.nbytes + (64 << 20), write_queue_blocks=max(n, 16))

    def loaded(got: object = None) -> bool:
        """Verify (outside the clock) that dst holds the source bytes, then clear it for the next run."""
        ok = (got is None or got.shape[2] == T) and same_bytes(dst, src)
        dst.zero_()
        return ok

    def pair(r: int, a: tuple, b: tuple) -> None:
        """Time two (row, run, verify) entries back to back, alternating which goes first."""
        for name, fn, verify in (a, b) if r % 2 == 0 else (b, a):
            seconds, out = _timed(fn)
            rounds.record(name, seconds, bool(verify(out)))

    def memcpy_store() -> None:
        copies.copy([(buf[c], src[:, :, c * CHUNK_TOKENS:(c + 1) * CHUNK_TOKENS]) for c in range(n)])

    def memcpy_load() -> None:
        copies.copy([(dst[:, :, c * CHUNK_TOKENS:(c + 1) * CHUNK_TOKENS], buf[c]) for c in range(n)])

    def stored(got: object) -> bool:
        return got == T

    def lookup_rows(cache: TierCache, tokens: np.ndarray, tier: str) -> None:
        # first call right after a load (CPU caches cold, as for a new request), then the same call again
        for row in (f"lookup, {tier} hit", f"lookup, {tier} hit (repeated)"):
            seconds, hit = _timed(lambda: cache.lookup(tokens))
            rounds.record(row, seconds / n * 1e6, hit == T, rounds.lookup_us)

    def host_probe(r: int) -> None:
        tokens = token_ids(cfg.seed, T, salt=1000 + r)
        pair(r, ("memcpy store", memcpy_store, lambda _: True),
             ("host store", lambda: host.store(tokens, src), stored))
        pair(r, ("memcpy load", memcpy_load, loaded), ("host load", lambda: host.load(tokens, out=dst), loaded))
        lookup_rows(host, tokens, "host")
        seconds, keys = _timed(lambda: host.keys(tokens))
        rounds.record("hashing only", seconds / n * 1e6, len(keys) == n, rounds.lookup_us)

    def disk_probe(r: int) -> None:
        tokens = token_ids(cfg.seed, T, salt=2000 + r)
        shutil.rmtree(lmdb_path, ignore_errors=True)
        with TierCache(disk_cfg) as cache:
            def disk_store() -> int:
                got = cache.store(tokens, src)
                cache.flush()  # the clock stops when the frames are committed to LMDB (page cache, no fsync)
                return got

            pair(r, ("raw file write", lambda: raw_write(raw_path, src, n), lambda _: True),
                 ("disk store", disk_store,
                  lambda got: got == T and cache.stats()["dropped_writes"].get("disk", 0) == 0))
        rounds.cold([raw_path, os.path.join(lmdb_path, "data.mdb")])  # the environment is closed: nothing maps it
        with TierCache(disk_cfg) as cache:
            for temp in ("cold", "warm"):
                pair(r, (f"raw file read, {temp}", lambda: raw_read(raw_path, dst, n), loaded),
                     (f"disk load, {temp}", lambda: cache.load(tokens, out=dst), loaded))
            lookup_rows(cache, tokens, "disk")
        os.unlink(raw_path)
        shutil.rmtree(lmdb_path, ignore_errors=True)

    try:
        rounds.run([host_probe, disk_probe])
    finally:
        host.close()
        copies.close()
    return rounds


# -- footprint -------------------------------------------------------------------------------
def measure_footprint(cfg: BenchConfig, workdir: str, log: Callable[[str], None]) -> list[dict]:
    from .manager import TierCache

    layout, n = cfg.layout, cfg.footprint_chunks
    rows = []
    for name, make in (("realistic bf16", realistic_kv), ("uniform random bytes", uniform_kv)):
        log(f"footprint: {name}")
        kv = make(layout, n * CHUNK_TOKENS, cfg.seed + 7)
        path = os.path.join(workdir, "footprint")
        shutil.rmtree(path, ignore_errors=True)
        dcfg = CacheConfig(layout=layout, model_id="bench", host_bytes=0, disk_path=path,
                           disk_bytes=3 * n * layout.block_bytes + (64 << 20), write_queue_blocks=max(n, 16))
        tokens = token_ids(cfg.seed, n * CHUNK_TOKENS, salt=3)
        with TierCache(dcfg) as cache:
            cache.store(tokens, kv)
            cache.flush()
            s = cache.stats()
        raw = n * layout.block_bytes
        allocated = os.stat(os.path.join(path, "data.mdb")).st_blocks * 512
        with TierCache(dcfg) as cache:
            out = torch.empty_like(kv)
            ok = cache.load(tokens, out=out).shape[2] == n * CHUNK_TOKENS and same_bytes(out, kv)
        rows.append({"row": f"footprint {name}", "data": name, "raw_bytes": raw, "disk_bytes": allocated,
                     "frame_bytes": s["disk_compressed_bytes"], "ratio": allocated / raw,
                     "frame_ratio": s["disk_compressed_bytes"] / max(s["disk_raw_bytes"], 1), "verified": ok})
        shutil.rmtree(path, ignore_errors=True)
    return rows


# -- scale -----------------------------------------------------------------------------------
SCALE_LAYOUT = KVLayout(num_layers=1, num_kv_heads=1, head_dim=8, dtype=torch.bfloat16, block_size=16)
SCALE_CALL_BLOCKS = 64


def measure_scale(cfg: BenchConfig, workdir: str, log: Callable[[str], None]) -> list[dict]:
    """Lookup and store cost per block at each store size, for the host tier and the disk tier alone."""
    from .manager import TierCache

    L, per_call = SCALE_LAYOUT, SCALE_CALL_BLOCKS
    ntok = per_call * L.block_size
    kv = realistic_kv(L, ntok, cfg.seed)
    top = max(cfg.scale_sizes) + (len(cfg.scale_sizes) * cfg.scale_probes + 1) * per_call
    path = os.path.join(workdir, "scale")
    rows = []
    for tier in ("host", "disk"):
        shutil.rmtree(path, ignore_errors=True)
        if tier == "host":
            scfg = CacheConfig(layout=L, model_id="scale", host_bytes=top * L.block_bytes)
        else:
            scfg = CacheConfig(layout=L, model_id="scale", host_bytes=0, disk_path=path,
                               disk_bytes=int(top * 4600 * 1.1), write_queue_blocks=2 * per_call)
        seq = 0
        with TierCache(scfg) as cache:
            for size in cfg.scale_sizes:
                while seq * per_call < size:
                    cache.store(token_ids(cfg.seed, ntok, salt=seq), kv)
                    if tier == "disk":
                        cache.flush()
                    seq += 1
                log(f"scale: {tier} tier at {seq * per_call} blocks")
                store_us, lookup_us, repeat_us, hits = [], [], [], True
                rng = np.random.default_rng([cfg.seed, size])
                for _ in range(cfg.scale_probes):
                    tokens = token_ids(cfg.seed, ntok, salt=seq)
                    t0 = time.perf_counter()
                    cache.store(tokens, kv)
                    if tier == "disk":
                        cache.flush()
                    store_us.append((time.perf_counter() - t0) / per_call * 1e6)
                    seq += 1
                    tokens = token_ids(cfg.seed, ntok, salt=int(rng.integers(seq)))
                    t0 = time.perf_counter()
                    hit = cache.lookup(tokens)
                    t1 = time.perf_counter()
                    again = cache.lookup(tokens)  # the same keys again: index pages now cached and mapped
                    t2 = time.perf_counter()
                    lookup_us.append((t1 - t0) / per_call * 1e6)
                    repeat_us.append((t2 - t1) / per_call * 1e6)
                    hits = hits and hit == again == ntok
                for op, us in (("store", store_us), ("lookup", lookup_us), ("lookup, repeated", repeat_us)):
                    rows.append({"tier": tier, "op": op, "blocks": size, "verified": hits, **_summary(us)})
        shutil.rmtree(path, ignore_errors=True)
    for r in rows:
        first = next(x for x in rows if x["tier"] == r["tier"] and x["op"] == r["op"])
        r["ratio"] = r["median"] / first["median"]
    return rows


# -- peers -----------------------------------------------------------------------------------
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


# -- summary ---------------------------------------------------------------------------------
def _summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


BOUNDS = {"host store": "memcpy store", "host load": "memcpy load", "disk store": "raw file write",
          "disk load, cold": "raw file read, cold", "disk load, warm": "raw file read, warm"}
ROW_ORDER = ("memcpy store", "memcpy load", "host store", "host load", "raw file write", "raw file read, cold",
             "raw file read, warm", "disk store", "disk load, cold", "disk load, warm")


def _row(name: str, bound: str, seconds: list[float], bound_seconds: list[float], nbytes: int,
         verified: bool) -> dict:
    paired = [b / t for t, b in zip(seconds, bound_seconds)]  # same-round ratio of GB/s
    return {"row": name, "unit": "GB/s", **_summary([nbytes / t / 1e9 for t in seconds]), "bound": bound,
            "ratio": statistics.median(paired), "ratio_min": min(paired), "ratio_max": max(paired),
            "verified": verified}


def throughput_rows(rounds: Rounds, nbytes: int) -> list[dict]:
    rows = []
    for name in ROW_ORDER:
        s, bound = rounds.samples[name], BOUNDS.get(name, name)
        rows.append(_row(name, bound, s.seconds, rounds.samples[bound].seconds, nbytes, s.verified))
    return rows


def peer_rows(peers: list[dict], nbytes: int) -> list[dict]:
    """Peer rows against the bounds each adapter measured next to them, in the peer's own process."""
    rows = []
    for p in peers:
        if p["status"] != "ok":
            rows.append({"row": p["peer"], "status": p["status"], "detail": p.get("detail", "")})
            continue
        for r in p["rows"]:
            if r.get("status", "ok") != "ok":
                rows.append({"row": r["row"], "status": r["status"], "detail": r.get("detail", "")})
            else:
                rows.append({**_row(r["row"], r["bound"], r["seconds"], r["bound_seconds"], nbytes,
                                    bool(r["verified"])), "status": "ok", "peer": p["peer"]})
    return rows


def judge(result: dict) -> list[dict]:
    by_row = {r["row"]: r for r in result["throughput"] + result["footprint"]}
    out = []
    for goal, row, cmp, target in GOALS:
        if row == "scale":
            if not result["scale"]:
                continue
            # first lookups of random stored sequences and stores; repeated lookups are a diagnostic
            worst = max((r for r in result["scale"] if r["op"] in ("store", "lookup")), key=lambda r: r["ratio"])
            value, where = worst["ratio"], f"{worst['tier']} {worst['op']} at {worst['blocks']:,} blocks"
        else:
            value, where = by_row[row]["ratio"], row
        ok = value >= target if cmp == ">=" else value <= target
        out.append({"goal": goal, "value": value, "target": f"{cmp} {target}", "pass": ok, "measured_on": where})
    return out


# -- machine and report ----------------------------------------------------------------------
def machine_info() -> dict:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    mem = None
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None

    def slug(text: str, default: str) -> str:
        return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or default

    cpu_short = slug(re.sub(r"\((r|tm)\)|cpu|processor|intel|amd|@.*", "", cpu, flags=re.I), "cpu")
    host = slug(socket.gethostname().split(".")[0], "host")
    return {"name": f"{host}-{cpu_short}-{slug(gpu, 'gpu') if gpu else 'cpu-only'}",
            "hostname": socket.gethostname(), "cpu": cpu,
            "cores": os.cpu_count(), "memory_bytes": mem, "gpu": gpu, "kernel": platform.release(),
            "python": platform.python_version(), "torch": torch.__version__, "torch_threads": torch.get_num_threads()}


def code_state() -> str:
    """The commit measured, and which of tiercache's files differed from it (the core changes fast)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10,
                              check=True).stdout

    try:
        head = git("rev-parse", "--short", "HEAD").strip()
        dirty = [line[3:] for line in git("status", "--porcelain", "--", "tiercache").splitlines() if line]
    except (OSError, subprocess.SubprocessError):
        from . import __version__
        return f"tiercache {__version__} (not a git checkout)"
    return f"commit {head}" + (f", with uncommitted changes to {', '.join(dirty)}" if dirty else "")


def _fmt_range(r: dict, digits: int = 2) -> str:
    return f"{r['median']:.{digits}f} ({r['min']:.{digits}f}–{r['max']:.{digits}f})"


def render_markdown(result: dict) -> str:
    m, c = result["machine"], result["config"]
    gib = c["chunks"] * result["chunk_bytes"] / 2**30
    lines = [f"# tiercache bench — {result['date']} — {m['name']}", "",
             f"- command: `{result['command']}`; code: {result['code']}",
             f"- device: {m['cpu']}, {m['cores']} cores, {(m['memory_bytes'] or 0) / 2**30:.0f} GiB RAM, "
             f"{m['gpu'] or 'no GPU (CPU-only)'}; Linux {m['kernel']}, Python {m['python']}, torch {m['torch']} "
             f"({m['torch_threads']} threads)",
             f"- workload: {result['layout']}, {c['chunks']} chunks of {CHUNK_TOKENS} tokens "
             f"({result['chunk_bytes'] / 2**20:.0f} MiB each, {gib:.2f} GiB), {c['warmup']} warm-up + "
             f"{c['rounds']} measured rounds, interleaved; every load verified bit-identical",
             f"- cold reads: {result['cold_method']}; resident after the drop: {result['cold_resident']}",
             "- ratio: median over rounds of row ÷ bound measured in the same round (min–max in brackets); "
             "peers' bounds are measured inside each peer's process, next to its rows", "",
             "## Throughput", "", "| row | GB/s median (min–max) | bound | ratio to the bound | verified |",
             "| --- | --- | --- | --- | --- |"]
    for r in result["throughput"] + result["peer_rows"]:
        if r.get("status", "ok") != "ok":
            lines.append(f"| {r['row']} | {r['status']} | | | |")
            continue
        own = r["bound"] == r["row"]
        ratio = "—" if own else f"{r['ratio']:.2f}x ({r['ratio_min']:.2f}–{r['ratio_max']:.2f})"
        lines.append(f"| {r['row']} | {_fmt_range(r)} | {'—' if own else r['bound']} | {ratio} | "
                     f"{'yes' if r['verified'] else 'NO'} |")
    lines += ["", "## Disk footprint", "", "| data | disk bytes per raw byte (data.mdb allocated) | "
              "frame bytes per raw byte | verified |", "| --- | --- | --- | --- |"]
    for r in result["footprint"]:
        lines.append(f"| {r['data']} | {r['ratio']:.3f} | {r['frame_ratio']:.3f} | "
                     f"{'yes' if r['verified'] else 'NO'} |")
    lines += ["", "## Lookup (Llama-8B layout, hashing included)", "", "| row | µs per chunk, median (min–max) |",
              "| --- | --- |"]
    lines += [f"| {r['row']} | {_fmt_range(r, 1)} |" for r in result["lookup"]]
    lines += ["", f"## Scale ({SCALE_LAYOUT.fingerprint()}, {SCALE_CALL_BLOCKS} blocks a call)", "",
              "| tier | op | blocks stored | µs per block, median (min–max) | ratio to the smallest store |",
              "| --- | --- | --- | --- | --- |"]
    lines += [f"| {r['tier']} | {r['op']} | {r['blocks']:,} | {_fmt_range(r, 2)} | {r['ratio']:.2f}x |"
              for r in result["scale"]]
    lines += ["", "## Goals (issue 5)", "", "| goal | measured | result |", "| --- | --- | --- |"]
    lines += [f"| {g['goal']} | {g['value']:.3f}x ({g['measured_on']}) | {'PASS' if g['pass'] else 'MISS'} |"
              for g in result["goals"]]
    return "\n".join(lines) + "\n"


def default_out(machine: dict, date: str) -> Path:
    base = REPO / "benchmarks" / "results" if (REPO / "benchmarks").is_dir() else Path.cwd()
    return base / f"{date}-{machine['name']}.md"


# -- entry point -----------------------------------------------------------------------------
def run(cfg: BenchConfig, log: Callable[[str], None] = lambda s: None, command: str = "tiercache bench") -> dict:
    code = code_state()  # before measuring: what was imported is what was on disk at start
    workdir = tempfile.mkdtemp(prefix="tiercache-bench-", dir=cfg.workdir)
    try:
        layout = cfg.layout
        src = realistic_kv(layout, cfg.chunks * CHUNK_TOKENS, cfg.seed)
        log(f"workload: {cfg.chunks} chunks of {layout.block_bytes / 2**20:.1f} MiB in {workdir}")
        rounds = measure_tiers(cfg, src, workdir, log)
        throughput = throughput_rows(rounds, cfg.nbytes)
        lookup = [{"row": k, "unit": "us/chunk", **_summary(v.seconds), "verified": v.verified}
                  for k, v in rounds.lookup_us.items()]
        footprint = measure_footprint(cfg, workdir, log)
        scale = measure_scale(cfg, workdir, log) if cfg.scale_sizes else []
        peers = run_peers(cfg, src, workdir, log) if cfg.peers else []
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    resident = (f"{max(rounds.cold_resident) * 100:.1f}% at most (fincore)" if rounds.cold_resident
                else "not checked (no fincore)")
    result = {"date": _dt.date.today().isoformat(), "command": command, "code": code, "machine": machine_info(),
              "config": {k: v for k, v in asdict(cfg).items() if k != "workdir"}, "layout": layout.fingerprint(),
              "chunk_bytes": layout.block_bytes, "cold_method": rounds.cold_method, "cold_resident": resident,
              "throughput": throughput, "footprint": footprint, "lookup": lookup, "scale": scale, "peers": peers,
              "peer_rows": peer_rows(peers, cfg.nbytes)}
    result["goals"] = judge(result)
    result["verified"] = all(r["verified"] for r in throughput + footprint + lookup + scale
                             + [r for r in result["peer_rows"] if r["status"] == "ok"])
    return result


def parse_args(argv: list[str]) -> tuple[BenchConfig, argparse.Namespace]:
    p = argparse.ArgumentParser(prog="tiercache bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--full", action="store_true", help="1 GiB (32 chunks), scale test up to 10^6 blocks")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout (progress goes to stderr)")
    p.add_argument("--peers", action="store_true", help="also run LMCache, SGLang and file-format baselines "
                                                        "where their venvs exist (benchmarks/setup_peers.sh)")
    p.add_argument("--out", help="markdown results file (default benchmarks/results/<date>-<machine>.md)")
    p.add_argument("--chunks", type=int, help="256-token chunks in the workload (quick 8, full 32)")
    p.add_argument("--rounds", type=int, help="measured rounds")
    p.add_argument("--warmup", type=int, help="warm-up rounds (not measured)")
    p.add_argument("--layers", type=int, help="layers of the KV layout (default 32; fewer for a smoke test)")
    p.add_argument("--scale-sizes", help="comma-separated store sizes in blocks for the scale test ('' skips it)")
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
