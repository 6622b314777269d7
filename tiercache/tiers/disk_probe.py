"""`compression="auto"`: does compressing pay on this machine, for a store at this path?

Two figures decide it, both measured here:

- decode_gbps_per_core: the byte-plane codec decoding (and verifying) a synthetic bf16 segment of
  Gaussian values (the statistics of real KV) the size of this store's own segments (one layer of a
  block, or the whole block where blocks are small: the fixed cost per segment decides the rate of
  small blocks), on one thread;
- decode_gbps: the same on as many threads at once as a load decodes with (io_threads, at most the
  cores): what a load can decode per second here, GIL and memory bandwidth included;
- read_gbps: a cold sequential read of a file written next to the store and dropped from the page
  cache with posix_fadvise(DONTNEED) (never /proc/sys/vm/drop_caches).

The rule: loads from an uncompressed store run at read_gbps; from a compressed one at
min(read_gbps x ratio, decode_gbps). Compressing buys `ratio` times the blocks in the same
disk_bytes (more hits) and costs a load slowdown of read_gbps / decode_gbps at worst. Byteplane is
chosen while that slowdown is smaller than the capacity it buys:

    read_gbps / ratio < decode_gbps

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
_DECODE_SEGMENT_BYTES = 512 << 10  # one layer of a large block, where the layout is not known
_DECODE_SEGMENT_MAX = 4 << 20  # larger segments decode at the rate of this size: the probe stays short
_decode_cache: dict[tuple[int, int], dict] = {}
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


def segment_bytes_of(layout: object) -> int:
    """Bytes of one frame segment for `layout`: a layer of a block, or the whole block below
    codec.MIN_SEGMENT_BYTES a layer (what the encoder does)."""
    from ..codec import MIN_SEGMENT_BYTES
    per_layer = layout.block_bytes // layout.num_layers
    return per_layer if per_layer >= MIN_SEGMENT_BYTES else layout.block_bytes


def measure_decode(segment_bytes: int = _DECODE_SEGMENT_BYTES, threads: int = 1,
                   budget_s: float = 0.03) -> dict:
    """The byte-plane codec on a synthetic bf16 segment of `segment_bytes`: {"decode_gbps_per_core" (one
    thread), "decode_gbps" (`threads` threads at once), "decode_threads", "segment_bytes", "ratio"}.
    Cached per process and (segment size, threads)."""
    segment_bytes = max(2, min(int(segment_bytes), _DECODE_SEGMENT_MAX) // 2 * 2)
    threads = max(1, min(int(threads), cores()))
    with _decode_lock:
        got = _decode_cache.get((segment_bytes, threads))
        if got is not None:
            return got
        from ..codec import BlockCodec
        raw = synthetic_bf16(segment_bytes // 2)
        codec = BlockCodec("tiercache-probe", 2, 1, "byteplane")
        key = b"probe-block-key!"
        frame = codec.encode(raw, key)
        out = np.empty_like(raw)
        best = float("inf")
        stop = time.perf_counter() + budget_s / 2
        for i in range(200):
            t = time.perf_counter()
            codec.decode_into(frame, out, key=key)
            best = min(best, time.perf_counter() - t)
            if i >= 2 and time.perf_counter() > stop:
                break
        if not np.array_equal(out, raw):
            raise AssertionError("byteplane probe did not round-trip")
        together = len(raw) / best / 1e9
        if threads > 1:
            together = _decode_together(codec, frame, key, len(raw), threads, budget_s / 2)
        got = {"decode_gbps_per_core": len(raw) / best / 1e9, "decode_gbps": together,
               "decode_threads": threads, "segment_bytes": segment_bytes, "ratio": len(raw) / len(frame)}
        _decode_cache[(segment_bytes, threads)] = got
        return got


def _decode_together(codec: object, frame: bytes, key: bytes, nbytes: int, threads: int, budget_s: float) -> float:
    """GB/s of `threads` threads decoding `frame` over and over, started together, for about budget_s."""
    start = threading.Barrier(threads + 1)
    done = [0] * threads
    failed: list[BaseException] = []

    def work(t: int) -> None:
        out = np.empty(nbytes, dtype=np.uint8)
        start.wait()
        stop = time.perf_counter() + budget_s
        try:
            while time.perf_counter() < stop or done[t] < 2:
                codec.decode_into(frame, out, key=key)
                done[t] += 1
        except BaseException as e:  # reported by the caller: a probe that fails decides nothing
            failed.append(e)
    workers = [threading.Thread(target=work, args=(t,), daemon=True) for t in range(threads)]
    for w in workers:
        w.start()
    start.wait()
    t0 = time.perf_counter()
    for w in workers:
        w.join()
    if failed:
        raise failed[0]
    return sum(done) * nbytes / (time.perf_counter() - t0) / 1e9


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


def decide(directory: str, segment_bytes: int = _DECODE_SEGMENT_BYTES, threads: int = 1) -> dict:
    """Measure and choose: {"chosen", "why", "read_gbps", "cores", "measured_at"} and measure_decode's
    figures, for segments of `segment_bytes` decoded by `threads` threads."""
    dec = measure_decode(segment_bytes, threads)
    decode, ratio = dec["decode_gbps"], dec["ratio"]
    read = measure_read(directory)
    n = cores()
    on = f"{dec['decode_threads']} thread(s), {dec['segment_bytes'] >> 10} KiB segments"
    if read is None:
        chosen, why = "byteplane", "the disk read rate could not be measured: disk space is kept"
    elif read / ratio < decode:
        chosen, why = "byteplane", (f"read {read:.2f} GB/s / ratio {ratio:.2f} < decode {decode:.2f} GB/s ({on}): "
                                    "the load slowdown is smaller than the capacity gained")
    else:
        chosen, why = "none", (f"read {read:.2f} GB/s / ratio {ratio:.2f} >= decode {decode:.2f} GB/s ({on}): "
                               "decoding would cost more load speed than it buys capacity")
    return {"chosen": chosen, **{k: round(v, 3) if isinstance(v, float) else v for k, v in dec.items()},
            "read_gbps": None if read is None else round(read, 3), "cores": n, "why": why,
            "measured_at": time.time()}

