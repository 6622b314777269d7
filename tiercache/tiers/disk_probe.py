"""`compression="auto"`: does compressing pay on this machine, for a store at this path?

Two figures decide it, both measured here:

- decode_gbps_per_core: the byte-plane codec decoding (and verifying) a synthetic bf16 block of
  Gaussian values, the shape of real KV, on one core (best of a few runs; about 10 ms in all);
- read_gbps: a cold sequential read of a file written next to the store and dropped from the page
  cache with posix_fadvise(DONTNEED) (never /proc/sys/vm/drop_caches).

The rule: loads from an uncompressed store run at read_gbps; from a compressed one at
min(read_gbps x ratio, cores x decode_gbps_per_core). Compressing buys `ratio` times the blocks in
the same disk_bytes (more hits) and costs a load slowdown of read_gbps / (cores x decode) at worst.
Byteplane is chosen while that slowdown is smaller than the capacity it buys:

    read_gbps / ratio < cores x decode_gbps_per_core

else none. Where the disk cannot be measured (no room, no permission) compression is kept: disk
space is then what is short. The figures and the choice are recorded in the store, so every process
on it writes frames of one kind (frames of either kind always decode: the codec is in each header).
"""

from __future__ import annotations

import os
import threading
import time

import numpy as np

PROBE_FILE = ".tiercache-read-probe"
PROBE_FILE_BYTES = 16 << 20
_DECODE_BLOCK_ELEMS = 256 << 10  # 512 KiB of bf16: the size of one layer of a large block
_decode_cache: tuple[float, float] | None = None
_decode_lock = threading.Lock()


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def synthetic_bf16(nelems: int, seed: int = 0) -> np.ndarray:
    """Gaussian values as bf16 bytes (the top half of float32), the statistics of real KV."""
    x = np.random.default_rng(seed).standard_normal(nelems, dtype=np.float32)
    return (x.view(np.uint32) >> 16).astype("<u2").view(np.uint8)


def measure_decode(budget_s: float = 0.03) -> tuple[float, float]:
    """(decode GB/s on one core, compression ratio) of the byte-plane codec; cached per process."""
    global _decode_cache
    with _decode_lock:
        if _decode_cache is not None:
            return _decode_cache
        from ..codec import BlockCodec
        raw = synthetic_bf16(_DECODE_BLOCK_ELEMS)
        codec = BlockCodec("tiercache-probe", 2, 1, "byteplane")
        key = b"probe-block-key!"
        frame = codec.encode(raw, key)
        out = np.empty_like(raw)
        best = float("inf")
        stop = time.perf_counter() + budget_s
        for i in range(20):
            t = time.perf_counter()
            codec.decode_into(frame, out, key=key)
            best = min(best, time.perf_counter() - t)
            if i >= 2 and time.perf_counter() > stop:
                break
        if not np.array_equal(out, raw):
            raise AssertionError("byteplane probe did not round-trip")
        _decode_cache = (len(raw) / best / 1e9, len(raw) / len(frame))
        return _decode_cache


def evict_from_page_cache(path: str) -> None:
    """Write `path` back and drop its pages from the page cache (this file only, never the machine's)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # dirty pages cannot be dropped
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def measure_read(directory: str, nbytes: int = PROBE_FILE_BYTES) -> float | None:
    """Cold sequential read GB/s of the filesystem holding `directory`; None if it cannot be measured."""
    path = os.path.join(directory, PROBE_FILE)
    buf = os.urandom(1 << 20)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    except OSError:
        return None
    try:
        for _ in range(nbytes // len(buf)):
            os.write(fd, buf)
        os.fsync(fd)  # dirty pages cannot be dropped
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.lseek(fd, 0, os.SEEK_SET)
        t = time.perf_counter()
        got = 0
        while True:
            n = len(os.read(fd, 4 << 20))
            if not n:
                break
            got += n
        dt = time.perf_counter() - t
        return got / max(dt, 1e-9) / 1e9 if got == nbytes else None
    except OSError:
        return None
    finally:
        os.close(fd)
        try:
            os.unlink(path)
        except OSError:
            pass


def decide(directory: str) -> dict:
    """Measure and choose: {"chosen", "decode_gbps_per_core", "read_gbps", "ratio", "cores", "why"}."""
    decode, ratio = measure_decode()
    read = measure_read(directory)
    n = cores()
    if read is None:
        chosen, why = "byteplane", "the disk read rate could not be measured: disk space is kept"
    elif read / ratio < n * decode:
        chosen, why = "byteplane", (f"read {read:.2f} GB/s / ratio {ratio:.2f} < {n} cores x decode "
                                    f"{decode:.2f} GB/s: the load slowdown is smaller than the capacity gained")
    else:
        chosen, why = "none", (f"read {read:.2f} GB/s / ratio {ratio:.2f} >= {n} cores x decode "
                               f"{decode:.2f} GB/s: decoding would cost more load speed than it buys capacity")
    return {"chosen": chosen, "decode_gbps_per_core": round(decode, 3),
            "read_gbps": None if read is None else round(read, 3), "ratio": round(ratio, 3), "cores": n,
            "why": why, "measured_at": time.time()}
