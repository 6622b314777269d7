"""Disk tier store / cold load / warm load GB/s next to a raw file of the same bytes, in one run.

    python benchmarks/disk_speed.py [--dir DIR] [--mib 256] [--repeats 3] [--json]

Llama-8B-shaped bf16 KV (32 layers x K,V x 8 heads x 128 dims) in 256-token chunks of 16-token blocks
(2 MiB frames), Gaussian values. Every row sees the same bytes in the same run:

- raw file: one file per chunk written with os.write (no fsync, as the tier does not sync per write);
  cold read after fsync + posix_fadvise(DONTNEED), warm read right after;
- disk tier rows: DiskTier.write_batch of one chunk per transaction ("put": frames encoded beforehand;
  "store": encode + put), cold load after fsync + DONTNEED of data.mdb, warm load after; every load
  decodes and verifies every block's checksums into one buffer.

Rows cover writemap off/on (writemap preallocates the map) and compression none/byteplane. Ratios
to the raw file are printed next to each figure; nothing is asserted (speed is measured, not tested).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

from tiercache import KVLayout
from tiercache.codec import BlockCodec
from tiercache.keys import BlockKey
from tiercache.tiers.disk import DiskTier
from tiercache.tiers.disk_probe import evict_from_page_cache, synthetic_bf16

LAYOUT = KVLayout(num_layers=32, num_kv_heads=8, head_dim=128, dtype=torch.bfloat16, block_size=16)
CHUNK_BLOCKS = 256 // LAYOUT.block_size
NS = b"bench-ns"


drop_cache = evict_from_page_cache  # this file's pages only, never the machine's


def raw_row(d: str, blocks: list[np.ndarray]) -> dict:
    nbytes = sum(len(b) for b in blocks)
    paths = [os.path.join(d, f"chunk{i}") for i in range(0, len(blocks), CHUNK_BLOCKS)]
    t = time.perf_counter()
    for ci, p in enumerate(paths):
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        for b in blocks[ci * CHUNK_BLOCKS:(ci + 1) * CHUNK_BLOCKS]:
            os.write(fd, b)
        os.close(fd)
    store = nbytes / (time.perf_counter() - t)
    for p in paths:
        drop_cache(p)
    out = np.empty(CHUNK_BLOCKS * LAYOUT.block_bytes, dtype=np.uint8)
    loads = []
    for _ in range(2):  # cold, then warm
        t = time.perf_counter()
        for p in paths:
            with open(p, "rb", buffering=0) as f:
                f.readinto(memoryview(out))
        loads.append(nbytes / (time.perf_counter() - t))
    for p in paths:
        os.unlink(p)
    return {"store": store, "put": store, "cold": loads[0], "warm": loads[1]}


def tier_row(d: str, blocks: list[np.ndarray], keys: list[BlockKey], compression: str, writemap: bool) -> dict:
    nbytes = sum(len(b) for b in blocks)
    codec = BlockCodec(LAYOUT.fingerprint(), 2, LAYOUT.num_layers, compression)
    path = os.path.join(d, f"store-{compression}-{int(writemap)}")
    t0 = time.perf_counter()
    disk = DiskTier(path, LAYOUT, 2 * nbytes + (64 << 20), writemap=writemap)
    open_s = time.perf_counter() - t0
    assert disk.available
    t = time.perf_counter()
    frames = [codec.encode(b, k) for b, k in zip(blocks, keys)]
    encode_s = time.perf_counter() - t
    t = time.perf_counter()
    for i in range(0, len(blocks), CHUNK_BLOCKS):
        items = [(keys[j], frames[j], NS, {"model_id": "bench"}) for j in range(i, min(i + CHUNK_BLOCKS, len(blocks)))]
        written, _, dropped = disk.write_batch(items)
        assert not dropped and len(written) == len(items)
    put_s = time.perf_counter() - t
    frame_bytes = sum(len(f) for f in frames)
    del frames
    disk.close()  # unmapped: pages still mapped (writemap) would not leave the page cache
    drop_cache(os.path.join(path, "data.mdb"))
    disk = DiskTier(path, LAYOUT, 2 * nbytes + (64 << 20), writemap=writemap)
    out = np.empty(CHUNK_BLOCKS * LAYOUT.block_bytes, dtype=np.uint8)
    bb = LAYOUT.block_bytes
    loads = []
    for _ in range(2):
        t = time.perf_counter()
        with disk.reader() as get:
            for j, k in enumerate(keys):
                o = (j % CHUNK_BLOCKS) * bb
                codec.decode_into(get(k), out[o:o + bb], key=k)
        loads.append(nbytes / (time.perf_counter() - t))
    j = len(keys) - 1
    assert np.array_equal(out[(j % CHUNK_BLOCKS) * bb:(j % CHUNK_BLOCKS + 1) * bb], blocks[j])
    allocated = os.stat(os.path.join(path, "data.mdb")).st_blocks * 512
    disk.close()
    shutil.rmtree(path)
    return {"store": nbytes / (encode_s + put_s), "put": nbytes / put_s, "cold": loads[0], "warm": loads[1],
            "ratio": nbytes / frame_bytes, "allocated_over_raw": allocated / nbytes, "open_s": open_s}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default=None, help="where to write (default: a temporary directory under the cwd)")
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    d = tempfile.mkdtemp(prefix="tiercache-diskspeed-", dir=args.dir or os.getcwd())
    n = max(CHUNK_BLOCKS, args.mib * (1 << 20) // LAYOUT.block_bytes // CHUNK_BLOCKS * CHUNK_BLOCKS)
    elems = LAYOUT.block_bytes // 2
    base = synthetic_bf16(elems * 4, seed=1)
    blocks = [np.roll(base, i * 4098)[:LAYOUT.block_bytes].copy() for i in range(n)]  # distinct, realistic
    keys = [BlockKey(i.to_bytes(8, "little") * 2) for i in range(n)]
    rows = {"raw file": [], "none, writemap off": [], "none, writemap on": [],
            "byteplane, writemap off": [], "byteplane, writemap on": []}
    try:
        for _ in range(args.repeats):  # interleaved: drift in the machine's load hits every row alike
            rows["raw file"].append(raw_row(d, blocks))
            for comp in ("none", "byteplane"):
                for wm in (False, True):
                    rows[f"{comp}, writemap {'on' if wm else 'off'}"].append(tier_row(d, blocks, keys, comp, wm))
    finally:
        shutil.rmtree(d, ignore_errors=True)
    med = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in rows.items()}
    load = os.getloadavg()
    if args.json:
        print(json.dumps({"bytes": n * LAYOUT.block_bytes, "loadavg": load, "rows": med}))
        return 0
    raw = med["raw file"]
    print(f"{n * LAYOUT.block_bytes >> 20} MiB of Llama-8B-shaped bf16 KV, {n // CHUNK_BLOCKS} chunks of 256 tokens, "
          f"2 MiB blocks; medians of {args.repeats}; loadavg {load[0]:.2f} {load[1]:.2f}; {os.cpu_count()} cpus")
    print(f"{'row':<26}{'store':>13}{'put':>13}{'load cold':>15}{'load warm':>15}{'ratio':>7}{'alloc/raw':>10}")
    for name, m in med.items():
        def cell(k, w, m=m):
            return f"{m[k] / 1e9:6.2f} ({m[k] / raw[k]:4.2f}x)".rjust(w)
        extra = f"{m['ratio']:7.2f}{m['allocated_over_raw']:10.2f}" if "ratio" in m else ""
        print(f"{name:<26}{cell('store', 13)}{cell('put', 13)}{cell('cold', 15)}{cell('warm', 15)}{extra}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
