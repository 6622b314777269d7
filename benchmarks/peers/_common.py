"""What every peer adapter shares: the spec from bench.py, the source bytes, cold reads, rounds, the reply.

Adapters run inside their peer's own virtual environment (torch and numpy only from here; never
tiercache), read a JSON spec on stdin and print one JSON object on stdout:

    {"version": "...", "rows": [{"row": ..., "bound": ..., "seconds": [...], "bound_seconds": [...],
                                 "verified": bool}
                                | {"row": ..., "status": "not installed" | "failed", "detail": ...}],
     "lookup": [{"row": ..., "compare_to": "lookup, host hit" | ..., "us": [...], "verified": bool}]}

Each peer row is timed back to back with its bound, measured here in the same process as
tiercache bench measures it ("memcpy store", "memcpy load", "raw file write", "raw file read, cold",
"raw file read, warm"), alternating which goes first; `seconds` and `bound_seconds` hold one entry
per measured round for the whole workload, so tiercache bench can take same-round ratios. Lookup
rows hold µs per chunk (hashing included), one entry per measured round, and name the tiercache
lookup row they compare to. (The bounds are written again here because the peers' venvs cannot
import tiercache.)
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch


def read_spec() -> dict:
    return json.load(sys.stdin)


def load_source(spec: dict) -> torch.Tensor:
    """The workload bench.py generated, byte for byte ([layers, 2, tokens, heads, head_dim] bf16)."""
    raw = np.fromfile(spec["src_path"], dtype=np.uint8)
    return torch.from_numpy(raw).view(torch.bfloat16).view(*spec["shape"])


def chunks(spec: dict) -> int:
    return spec["shape"][2] // spec["chunk_tokens"]


def chunk(kv: torch.Tensor, c: int, tokens: int) -> torch.Tensor:
    return kv[:, :, c * tokens:(c + 1) * tokens]


def token_ids(seed: int, n: int, salt: int = 0) -> np.ndarray:
    return np.random.default_rng([seed, salt]).integers(0, 128_000, n, dtype=np.int64)


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def drop_from_page_cache(paths: list[str], global_drop: bool) -> None:
    """As bench.py does: fsync and posix_fadvise(DONTNEED) each file, then drop_caches if allowed."""
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
        except OSError:
            pass


def files_under(path: str) -> list[str]:
    return [os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs]


def _runs(kv: torch.Tensor, c: int, tokens: int) -> list[np.ndarray]:
    """The contiguous [layer, plane] runs of one chunk, as byte arrays (views)."""
    s = slice(c * tokens, (c + 1) * tokens)
    return [kv[layer, p, s].view(torch.uint8).numpy().reshape(-1)
            for layer in range(kv.shape[0]) for p in range(kv.shape[1])]


COPY_THREADS = 2  # as tiercache's copy engine (CacheConfig.io_threads)


class Bounds:
    """tiercache bench's bounds: memcpy of each chunk into a preallocated buffer and back (split over
    COPY_THREADS threads), and a plain file of the same bytes (os.writev / os.readv, no fsync)."""

    def __init__(self, spec: dict, src: torch.Tensor, dst: torch.Tensor) -> None:
        self.src, self.dst = src, dst
        self.n, self.B = chunks(spec), spec["chunk_tokens"]
        self.buf = torch.zeros((self.n, *chunk(src, 0, self.B).shape), dtype=src.dtype)
        self.path = os.path.join(spec["workdir"], "raw.bin")
        self._pool = ThreadPoolExecutor(max_workers=COPY_THREADS)

    def _copy(self, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        def run(part: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
            for d, s in part:
                d.copy_(s)

        for f in [self._pool.submit(run, pairs[i::COPY_THREADS]) for i in range(COPY_THREADS)]:
            f.result()

    def memcpy_store(self) -> None:
        self._copy([(self.buf[c], chunk(self.src, c, self.B)) for c in range(self.n)])

    def memcpy_load(self) -> None:
        self._copy([(chunk(self.dst, c, self.B), self.buf[c]) for c in range(self.n)])

    def raw_write(self) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            for c in range(self.n):
                os.writev(fd, _runs(self.src, c, self.B))
        finally:
            os.close(fd)

    def raw_read(self) -> None:
        fd = os.open(self.path, os.O_RDONLY)
        try:
            for c in range(self.n):
                bufs = _runs(self.dst, c, self.B)
                if os.readv(fd, bufs) != sum(b.nbytes for b in bufs):
                    raise OSError(f"short read from {self.path}")
        finally:
            os.close(fd)

    def run(self, bound: str) -> Callable[[], None]:
        return {"memcpy store": self.memcpy_store, "memcpy load": self.memcpy_load,
                "raw file write": self.raw_write, "raw file read, cold": self.raw_read,
                "raw file read, warm": self.raw_read}[bound]

    def loaded(self, _: object = None) -> bool:
        """Whether dst holds the source bytes (checked outside the clock); clears it for the next run."""
        ok = same_bytes(self.dst, self.src)
        self.dst.zero_()
        return ok


def _timed(fn: Callable[[], object]) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


class Rows:
    """Per-round seconds of each peer row and of its bound; only rounds after the warm-up count."""

    def __init__(self, bounds: Bounds) -> None:
        self.bounds = bounds
        self.rows: dict[str, dict] = {}
        self.lookups: dict[str, dict] = {}
        self.measuring = False
        self.round = 0

    def pair(self, row: str, bound: str, fn: Callable[[], object], verify: Callable[[object], bool]) -> None:
        """Time `fn` and its bound back to back (order alternating by round); verify each outside the clock."""
        r = self.rows.setdefault(row, {"row": row, "bound": bound, "seconds": [], "bound_seconds": [],
                                       "verified": True})
        check = self.bounds.loaded if "load" in bound or "read" in bound else (lambda _: True)
        entries = [("seconds", fn, verify), ("bound_seconds", self.bounds.run(bound), check)]
        for field, f, v in entries if self.round % 2 == 0 else entries[::-1]:
            seconds, out = _timed(f)
            r["verified"] = r["verified"] and bool(v(out))
            if self.measuring:
                r[field].append(seconds)

    def lookup(self, row: str, compare_to: str, fn: Callable[[], object], chunks: int,
               verify: Callable[[object], bool]) -> None:
        """Time one lookup call; records µs per chunk (the peer's hashing included)."""
        r = self.lookups.setdefault(row, {"row": row, "compare_to": compare_to, "us": [], "verified": True})
        seconds, out = _timed(fn)
        r["verified"] = r["verified"] and bool(verify(out))
        if self.measuring:
            r["us"].append(seconds / chunks * 1e6)

    def missing(self, row: str, status: str, detail: str) -> None:
        self.rows[row] = {"row": row, "status": status, "detail": detail[:300]}

    def run(self, spec: dict, round_fn: Callable[[int], None]) -> None:
        for r in range(spec["warmup"] + spec["rounds"]):
            self.measuring = r >= spec["warmup"]
            self.round = r
            round_fn(r)


_REPLY_FD: list[int] = []


def emit(version: str, rows: Rows) -> None:
    """Write the reply to the real stdout (everything else the peer prints was sent to stderr)."""
    text = json.dumps({"version": version, "rows": list(rows.rows.values()),
                       "lookup": list(rows.lookups.values())}) + "\n"
    fd = _REPLY_FD[0] if _REPLY_FD else sys.stdout.fileno()
    sys.stdout.flush()
    os.write(fd, text.encode())


def main_guard(fn: Callable[[], None]) -> None:
    """Run an adapter with stdout sent to stderr (peers log there); failures exit non-zero."""
    sys.stdout.flush()
    _REPLY_FD.append(os.dup(1))
    os.dup2(2, 1)
    try:
        fn()
    except Exception:
        traceback.print_exc()
        sys.exit(1)
