"""tiercache's own rows: host and disk tier throughput next to their bounds, lookup cost, disk footprint.

Each round stores a new token sequence from the source tensor and loads it back into a separate
tensor with `load(tokens, out=...)`; every load is checked bit-identical outside the clock. Disk
rows use a cache with only the disk tier (`host_bytes=0`), so every load decodes from LMDB; the
store clock stops when `flush()` returns (frames committed to LMDB, page cache, no fsync). Cold
reads close the environment first so its map does not keep the pages.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import numpy as np
import torch

from tiercache.config import CacheConfig
from tiercache.tiers.frame_files import allocated_bytes, store_files
from tiercache.tools.bench.protocol import (
    CHUNK_TOKENS,
    BenchConfig,
    ParallelCopy,
    Rounds,
    aligned_buffer,
    ratio_row,
    raw_read,
    raw_write,
    raw_write_direct,
    realistic_kv,
    same_bytes,
    timed,
    token_ids,
    uniform_kv,
)

BOUNDS = {"host store": "memcpy store", "host load": "memcpy load", "disk store": "raw file write",
          "disk store, O_DIRECT": "raw file write, O_DIRECT",
          "disk load, cold": "raw file read, cold", "disk load, warm": "raw file read, warm",
          "disk store, byteplane": "raw file write", "disk load, cold, byteplane": "raw file read, cold",
          "disk load, warm, byteplane": "raw file read, warm"}
# the plain disk rows store frames uncompressed (compression="none"); the byteplane rows the compressed
# codec compression="auto" picks where decoding is fast enough (see tiers.disk_probe)
CODEC_ROWS = {"none": ("disk store", "disk load, cold", "disk load, warm"),
              "byteplane": ("disk store, byteplane", "disk load, cold, byteplane", "disk load, warm, byteplane")}
ROW_ORDER = ("memcpy store", "memcpy load", "host store", "host load", "raw file write", "raw file write, O_DIRECT",
             "raw file read, cold", "raw file read, warm", "disk store", "disk store, O_DIRECT", "disk load, cold",
             "disk load, warm", "disk store, byteplane", "disk load, cold, byteplane", "disk load, warm, byteplane")
LOOKUP_ROWS = ("lookup, host hit", "lookup, host hit (repeated)", "hashing only", "lookup, disk hit",
               "lookup, disk hit (repeated)")


def measure_tiers(cfg: BenchConfig, src: torch.Tensor, workdir: str, log: Callable[[str], None]) -> Rounds:
    """The interleaved rounds: each tier row is timed right next to its bound, in alternating order."""
    from tiercache.manager import TierCache

    layout, n = cfg.layout, cfg.chunks
    T = n * CHUNK_TOKENS
    dst = torch.empty_like(src)
    buf = torch.empty((n, *layout.block_shape), dtype=layout.dtype)
    aligned = aligned_buffer(layout.block_bytes)  # the O_DIRECT raw write's buffer, a chunk's bytes
    rounds = Rounds(cfg, log)
    # the bound copies with as many threads as the cache's copy engine has, so it is not beaten by them
    copies = ParallelCopy(CacheConfig(layout=layout).io_threads)
    host = TierCache(CacheConfig(layout=layout, model_id="bench", host_bytes=n * layout.block_bytes))
    raw_path, lmdb_path = os.path.join(workdir, "raw.bin"), os.path.join(workdir, "lmdb")
    direct_path = os.path.join(workdir, "lmdb-direct")
    disk_cfgs = {c: CacheConfig(layout=layout, model_id="bench", host_bytes=0, disk_path=lmdb_path,
                                disk_bytes=2 * cfg.nbytes + (64 << 20), write_queue_blocks=max(n, 16), compression=c)
                 for c in CODEC_ROWS}
    direct_cfg = replace(disk_cfgs["none"], disk_path=direct_path, disk_direct_writes=True)

    def loaded(got: object = None) -> bool:
        """Verify (outside the clock) that dst holds the source bytes, then clear it for the next run."""
        ok = (got is None or got.shape[2] == T) and same_bytes(dst, src)
        dst.zero_()
        return ok

    def pair(r: int, *entries: tuple) -> None:
        """Time (row, run, verify) entries back to back, rotating which goes first from round to round."""
        k = r % len(entries)
        for name, fn, verify in entries[k:] + entries[:k]:
            seconds, out = timed(fn)
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
            seconds, hit = timed(lambda: cache.lookup(tokens))
            rounds.record(row, seconds / n * 1e6, hit == T, rounds.lookup_us)

    def host_probe(r: int) -> None:
        tokens = token_ids(cfg.seed, T, salt=1000 + r)
        pair(r, ("memcpy store", memcpy_store, lambda _: True),
             ("host store", lambda: host.store(tokens, src), stored))
        pair(r, ("memcpy load", memcpy_load, loaded), ("host load", lambda: host.load(tokens, out=dst), loaded))
        lookup_rows(host, tokens, "host")
        seconds, keys = timed(lambda: host.keys(tokens))
        rounds.record("hashing only", seconds / n * 1e6, len(keys) == n, rounds.lookup_us)

    def storing(cache: TierCache, tokens: np.ndarray) -> tuple[Callable[[], int], Callable[[object], bool]]:
        """A disk store (its clock stops when the frames are committed: page cache, no fsync) and its check."""
        def run() -> int:
            got = cache.store(tokens, src)
            cache.flush()
            return got

        def ok(got: object) -> bool:
            return got == T and cache.stats()["dropped_writes"].get("disk", 0) == 0
        return run, ok

    def disk_probe(r: int) -> None:
        """compression none, timed next to the raw-file rows; then byteplane (its bounds: the raw rows of this
        round, and the decode rate measured with the footprint); then the store with O_DIRECT writes."""
        tokens = token_ids(cfg.seed, T, salt=2000 + r)
        for codec, (store_row, cold_row, warm_row) in CODEC_ROWS.items():
            paired = codec == "none"
            shutil.rmtree(lmdb_path, ignore_errors=True)
            with TierCache(disk_cfgs[codec]) as cache:
                if paired:
                    pair(r, ("raw file write", lambda: raw_write(raw_path, src, n), lambda _: True),
                         (store_row, *storing(cache, tokens)))
                else:
                    run, ok = storing(cache, tokens)
                    seconds, got = timed(run)
                    rounds.record(store_row, seconds, ok(got))
            files = [raw_path, *store_files(lmdb_path)] if paired else store_files(lmdb_path)
            rounds.cold(files)  # the environment is closed: nothing maps it
            with TierCache(disk_cfgs[codec]) as cache:
                for temp, row in (("cold", cold_row), ("warm", warm_row)):
                    if paired:
                        pair(r, (f"raw file read, {temp}", lambda: raw_read(raw_path, dst, n), loaded),
                             (row, lambda: cache.load(tokens, out=dst), loaded))
                    else:
                        seconds, got = timed(lambda: cache.load(tokens, out=dst))
                        rounds.record(row, seconds, loaded(got))
                if paired:
                    lookup_rows(cache, tokens, "disk")
        # last, so that the loads above follow the same writes as before: the store with disk_direct_writes=True,
        # next to a raw O_DIRECT write of the same bytes
        shutil.rmtree(direct_path, ignore_errors=True)
        with TierCache(direct_cfg) as direct:
            pair(r, ("raw file write, O_DIRECT", lambda: raw_write_direct(raw_path, src, n, aligned), lambda ok: ok),
                 ("disk store, O_DIRECT", *storing(direct, tokens)))
        os.unlink(raw_path)
        shutil.rmtree(lmdb_path, ignore_errors=True)
        shutil.rmtree(direct_path, ignore_errors=True)

    try:
        rounds.run([host_probe, disk_probe])
    finally:
        host.close()
        copies.close()
    return rounds


def throughput_rows(rounds: Rounds, nbytes: int) -> list[dict]:
    rows = []
    for name in ROW_ORDER:
        s, bound = rounds.samples[name], BOUNDS.get(name, name)
        rows.append(ratio_row(name, bound, s.seconds, rounds.samples[bound].seconds, nbytes, s.verified))
    return rows


def measure_footprint(cfg: BenchConfig, workdir: str, log: Callable[[str], None]) -> list[dict]:
    """Allocated bytes of the store (data.mdb and frame files) per raw byte, for realistic bf16 KV and for
    uniform random bytes."""
    from tiercache.manager import TierCache

    layout, n = cfg.layout, cfg.footprint_chunks
    rows = []
    for name, make in (("realistic bf16", realistic_kv), ("uniform random bytes", uniform_kv)):
        log(f"footprint: {name}")
        kv = make(layout, n * CHUNK_TOKENS, cfg.seed + 7)
        path = os.path.join(workdir, "footprint")
        shutil.rmtree(path, ignore_errors=True)
        dcfg = CacheConfig(layout=layout, model_id="bench", host_bytes=0, disk_path=path, compression="byteplane",
                           disk_bytes=3 * n * layout.block_bytes + (64 << 20), write_queue_blocks=max(n, 16))
        tokens = token_ids(cfg.seed, n * CHUNK_TOKENS, salt=3)
        with TierCache(dcfg) as cache:
            cache.store(tokens, kv)
            cache.flush()
            s = cache.stats()
            decode, decode_together, decode_threads = decode_rates(cache, tokens)
        raw = n * layout.block_bytes
        allocated = allocated_bytes(path)  # data.mdb and the frame files
        with TierCache(dcfg) as cache:
            out = torch.empty_like(kv)
            ok = cache.load(tokens, out=out).shape[2] == n * CHUNK_TOKENS and same_bytes(out, kv)
        rows.append({"row": f"footprint {name}", "data": name, "raw_bytes": raw, "disk_bytes": allocated,
                     "decode_gbps_per_core": decode, "decode_gbps_threads": decode_together,
                     "decode_threads": decode_threads,
                     "frame_bytes": s["disk_compressed_bytes"], "ratio": allocated / raw,
                     "frame_ratio": s["disk_compressed_bytes"] / max(s["disk_raw_bytes"], 1), "verified": ok})
        shutil.rmtree(path, ignore_errors=True)
    return rows


def decode_rates(cache: object, tokens: np.ndarray) -> tuple[float, float, int]:
    """GB/s (decoded bytes) of the cache's codec verifying and decoding its stored frames: on one core, and
    on the cache's io_threads at once (each its share of the frames), with the frames read into memory
    first (outside the clock); best of three passes each. Returns (one core, together, threads)."""
    keys = cache.keys(tokens)
    bb = cache.layout.block_bytes
    frames = []
    with cache.disk.reader() as get:
        for k in keys:
            f = get(k)
            frames.append((k, bytes(f.read_all()) if hasattr(f, "read_all") else bytes(f)))
    threads = max(1, min(cache.cfg.io_threads, os.cpu_count() or 1, len(frames)))
    outs = [np.empty(bb, dtype=np.uint8) for _ in range(threads)]

    def decode(t: int) -> None:
        for k, f in frames[t::threads]:
            cache.codec.decode_into(f, outs[t], key=k)
    one = together = float("inf")
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(3):
            t0 = time.perf_counter()
            for t in range(threads):
                decode(t)
            one = min(one, time.perf_counter() - t0)
            t0 = time.perf_counter()
            list(pool.map(decode, range(threads)))
            together = min(together, time.perf_counter() - t0)
    total = len(frames) * bb
    return total / one / 1e9, total / together / 1e9, threads


INGEST_FACTORS = (0.5, 1.0, 2.0, None)  # None: back to back, as fast as store() returns


def measure_ingest(cfg: BenchConfig, log: Callable[[str], None]) -> list[dict]:
    """The rate at which a write-through store starts dropping disk writes.

    The sustained rate is measured first (every chunk stored, then flushed, the queue large enough for
    all: what the "disk store" row measures). Then, with a queue of 2 blocks, the chunks are offered at
    paced rates (multiples of the sustained rate) and back to back (a store call cannot go faster than
    its own copy, so the offered rate is measured too); a write is dropped when the queue is full.
    Every block that was written is loaded back and compared (outside the clocks)."""
    from tiercache.manager import TierCache

    layout = cfg.layout
    n = min(cfg.chunks, 16)
    kv = realistic_kv(layout, n * CHUNK_TOKENS, cfg.seed + 11)
    chunks = [kv[:, :, c * CHUNK_TOKENS:(c + 1) * CHUNK_TOKENS] for c in range(n)]
    path = os.path.join(cfg.workdir or tempfile.gettempdir(), f"tiercache-ingest-{os.getpid()}")
    rows = []

    def config(queue: int) -> CacheConfig:
        return CacheConfig(layout=layout, model_id="bench-ingest", host_bytes=0, disk_path=path,
                           disk_bytes=2 * n * layout.block_bytes + (64 << 20), write_queue_blocks=queue,
                           compression="none")

    def tokens(round_: int, c: int) -> np.ndarray:
        return token_ids(cfg.seed, CHUNK_TOKENS, salt=50_000 + round_ * 1000 + c)

    try:
        shutil.rmtree(path, ignore_errors=True)
        with TierCache(config(max(n, 16))) as cache:
            t0 = time.perf_counter()
            for c in range(n):
                cache.store(tokens(0, c), chunks[c])
            cache.flush()
            sustained = n * layout.block_bytes / (time.perf_counter() - t0) / 1e9
        for i, factor in enumerate(INGEST_FACTORS, start=1):
            shutil.rmtree(path, ignore_errors=True)
            gap = 0.0 if factor is None else layout.block_bytes / (factor * sustained * 1e9)
            with TierCache(config(2)) as cache:
                t0 = time.perf_counter()
                for c in range(n):
                    wait = t0 + c * gap - time.perf_counter()
                    if wait > 0:
                        time.sleep(wait)
                    cache.store(tokens(i, c), chunks[c])
                offered = n * layout.block_bytes / (time.perf_counter() - t0) / 1e9
                cache.flush()
                dropped = cache.stats()["dropped_writes"].get("disk", 0)
                ok = True
                for c in range(n):  # written blocks load back exact; dropped ones are misses
                    got = cache.load(tokens(i, c))
                    ok = ok and (got.shape[2] == 0 or same_bytes(got, chunks[c]))
                held = sum(cache.lookup(tokens(i, c)) > 0 for c in range(n))
            rows.append({"offered / sustained": round(offered / sustained, 2), "offered GB/s": round(offered, 3),
                         "sustained GB/s": round(sustained, 3), "dropped": f"{dropped}/{n}",
                         "verified": ok and held == n - dropped})
            log(f"ingest: offered {offered:.2f} GB/s ({offered / sustained:.2f}x sustained): {dropped}/{n} dropped")
    finally:
        shutil.rmtree(path, ignore_errors=True)
    return rows
