"""The measurement protocol shared by every part of `tiercache bench`: configuration, data, bounds, rounds.

- Workload: Llama-8B-shaped KV (32 layers, 8 KV heads, head_dim 128, bf16) in 256-token chunks
  (one block, 32 MiB each), held in a CPU tensor [32, 2, tokens, 8, 128]; quick: 8 chunks,
  --full: 32 chunks (1 GiB).
- Bounds, re-measured in every run: memcpy (torch copy_ of each chunk into a preallocated buffer
  and back, over as many threads as the cache's copy engine) and a plain file of the same bytes
  (writev / readv, no fsync on either side).
- Cold reads: the bench's own files are fsync'ed and evicted with posix_fadvise(DONTNEED);
  the machine-wide /proc/sys/vm/drop_caches only with --drop-caches; the method is reported.
- Rounds: every probe runs once per round, in a rotating order, after warm-up rounds; each row is
  timed back to back with its bound, alternating which goes first, and ratios are medians of
  same-round ratios, so the drift of a shared machine hits both sides alike.
"""

from __future__ import annotations

import math
import os
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from tiercache.config import KVLayout

CHUNK_TOKENS = 256
REPO = Path(__file__).resolve().parents[3]
E2E_SIZES = ("off", "tiny", "quick", "full")


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
    e2e: str = "quick"          # end-to-end workload size: off | tiny | quick (the demo's default) | full (demo --full)
    drop_caches: bool = False   # also write /proc/sys/vm/drop_caches (whole machine; only when asked)
    peers: bool = False
    workdir: str | None = None
    seed: int = 0
    vllm_python: str | None = None  # a Python with vLLM: adds the TTFT-on-vLLM section

    @property
    def layout(self) -> KVLayout:
        return KVLayout(num_layers=self.num_layers, num_kv_heads=self.num_kv_heads, head_dim=self.head_dim,
                        dtype=torch.bfloat16, block_size=CHUNK_TOKENS)

    @property
    def nbytes(self) -> int:
        return self.chunks * self.layout.block_bytes


QUICK = BenchConfig()
FULL = replace(QUICK, chunks=32, footprint_chunks=32, scale_sizes=(1_000, 10_000, 100_000, 1_000_000),
               e2e="full")


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
    from tiercache.tiers.disk_probe import evict_from_page_cache
    for path in paths:
        evict_from_page_cache(path)
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


# -- bounds ----------------------------------------------------------------------------------
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


def aligned_buffer(nbytes: int) -> np.ndarray:
    """A page-aligned byte buffer (an anonymous map), as O_DIRECT wants."""
    import mmap
    return np.frombuffer(mmap.mmap(-1, nbytes), dtype=np.uint8)


def raw_write_direct(path: str, src: torch.Tensor, chunks: int, buf: np.ndarray) -> bool:
    """The same file with O_DIRECT: each chunk's runs copied into `buf` (aligned_buffer of a chunk's bytes,
    a multiple of 4 KiB), then written from it, one chunk at a time. Returns False where the filesystem
    refuses O_DIRECT (then the writes were buffered)."""
    import fcntl
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        try:
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_DIRECT)
            direct = True
        except (OSError, AttributeError):
            direct = False
        for c in range(chunks):
            at = 0
            for p in _pieces(src, c):
                buf[at:at + p.nbytes] = p
                at += p.nbytes
            view = memoryview(buf)[:at]
            while len(view):
                view = view[os.write(fd, view):]
    finally:
        os.close(fd)
    return direct


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


# -- rounds ----------------------------------------------------------------------------------
@dataclass
class Samples:
    """Per-round measurements of one row, and whether every run verified."""

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
        t0 = time.perf_counter()
        for r in range(total):
            self._measuring = r >= self.cfg.warmup
            left = "" if r == 0 else f", about {(time.perf_counter() - t0) / r * (total - r):.0f} s of rounds left"
            self.log(f"round {r + 1}/{total}{' (warm-up)' if not self._measuring else ''}{left}")
            for i in range(len(probes)):
                probes[(i + r) % len(probes)](r)

    def cold(self, paths: list[str]) -> None:
        self.cold_method = drop_from_page_cache(paths, self.cfg.drop_caches)
        fracs = [resident_fraction(p) for p in paths]
        if self._measuring and None not in fracs:
            self.cold_resident.append(max(fracs))


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def ratio_row(name: str, bound: str, seconds: list[float], bound_seconds: list[float], nbytes: int,
              verified: bool) -> dict:
    """A throughput row (GB/s) and its same-round ratio to its bound (bound seconds / row seconds)."""
    paired = [b / t for t, b in zip(seconds, bound_seconds)]
    return {"row": name, "unit": "GB/s", **summary([nbytes / t / 1e9 for t in seconds]), "bound": bound,
            "ratio": statistics.median(paired), "ratio_min": min(paired), "ratio_max": max(paired),
            "verified": verified}


class CpuWatch:
    """CPU time other processes used while each part of the run was measured (a shared machine's noise).

    From /proc/stat (all CPUs' busy time) minus this process's and its waited-for children's CPU
    time (os.times), divided by the wall time: the mean number of cores others kept busy.
    """

    def __init__(self) -> None:
        self.parts: dict[str, float] = {}

    @staticmethod
    def _sample() -> tuple[float, float, float] | None:
        try:
            with open("/proc/stat") as f:
                fields = [int(x) for x in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        hz = os.sysconf("SC_CLK_TCK")
        busy = (sum(fields[:8]) - fields[3] - fields[4]) / hz  # everything but idle and iowait
        t = os.times()
        return time.perf_counter(), busy, t.user + t.system + t.children_user + t.children_system

    def measure(self, name: str, fn: Callable[[], object]) -> object:
        before = self._sample()
        out = fn()
        after = self._sample()
        if before is not None and after is not None and after[0] > before[0]:
            others = (after[1] - before[1]) - (after[2] - before[2])
            self.parts[name] = max(others, 0.0) / (after[0] - before[0])
        return out
