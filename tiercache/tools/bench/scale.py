"""Scale: lookup and store cost per block as a store grows from 10^3 to 10^5 (--full: 10^6) blocks.

A tiny layout (1 layer, 1 head, head_dim 8, 16-token blocks: 512 B) so the blocks fit; the store
grows in calls of 64 blocks; at each size, `scale_probes` probes time a store of a new sequence
and a lookup of a random stored one (then the same lookup again), for a host-only and a
disk-only cache (store includes `flush()`). Ratios divide by the cost at the smallest size.

The bound, measured the same way at the same sizes (tier "bound"): for stores, LMDB alone putting
the rows the disk tier puts per block (the frame, its metadata, its access time, its namespace
count), 64 blocks a transaction, random 16-byte keys, in an environment opened with the tier's
flags; for lookups, a Python dict of 16-byte keys probed for 64 stored keys. What grows there
grows in the store's medium, not in tiercache's code.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable

import numpy as np
import torch

from tiercache.config import CacheConfig, KVLayout
from tiercache.tools.bench.protocol import BenchConfig, realistic_kv, summary, token_ids

SCALE_LAYOUT = KVLayout(num_layers=1, num_kv_heads=1, head_dim=8, dtype=torch.bfloat16, block_size=16)
SCALE_CALL_BLOCKS = 64


def measure_scale(cfg: BenchConfig, workdir: str, log: Callable[[str], None]) -> list[dict]:
    """Lookup and store cost per block at each store size, for the host tier and the disk tier alone."""
    from tiercache.manager import TierCache

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
                    rows.append({"tier": tier, "op": op, "blocks": size, "verified": hits, **summary(us)})
        shutil.rmtree(path, ignore_errors=True)
    rows += _bound_rows(cfg, workdir, log)
    for r in rows:
        first = next(x for x in rows if x["tier"] == r["tier"] and x["op"] == r["op"])
        r["ratio"] = r["median"] / first["median"]
    return rows


def _bound_rows(cfg: BenchConfig, workdir: str, log: Callable[[str], None]) -> list[dict]:
    """LMDB alone (the disk tier's rows per block) and a plain dict, at each store size."""
    import struct

    import lmdb

    from tiercache.codec import BlockCodec
    from tiercache.tiers.disk_schema import _META, _SEQ, _U64

    L, per_call = SCALE_LAYOUT, SCALE_CALL_BLOCKS
    block = realistic_kv(L, L.block_size, cfg.seed).contiguous().view(torch.uint8).numpy().reshape(-1)
    frame = BlockCodec(L.fingerprint(), L.itemsize, L.num_layers, "none").encode(block, b"\0" * 16)
    path = os.path.join(workdir, "scale-bound")
    shutil.rmtree(path, ignore_errors=True)
    top = max(cfg.scale_sizes) + (len(cfg.scale_sizes) * cfg.scale_probes + 1) * per_call
    env = lmdb.open(path, map_size=int(top * 4600 * 1.1), max_dbs=8, subdir=True, readahead=True, sync=False,
                    metasync=False)  # the disk tier's flags (tiers/lmdb_env.py), writemap off as by default
    dbs = [env.open_db(n) for n in (b"blocks", b"meta", b"atime", b"nsref")]
    rng = np.random.default_rng([cfg.seed, 7])
    index: dict[bytes, int] = {}
    seq = 0

    def put(keys: list[bytes]) -> None:
        nonlocal seq
        blocks_db, meta_db, atime_db, ref_db = dbs
        with env.begin(write=True) as txn:
            for k in keys:
                txn.get(k, db=meta_db)
                n = txn.get(b"ns", db=ref_db)
                txn.put(b"ns", _U64.pack((_U64.unpack(n)[0] if n else 0) + 1), db=ref_db)
                seq += 1
                txn.put(k, frame, db=blocks_db)
                txn.put(k, _META.pack(seq, 4096, L.block_bytes, len(frame), b"\0" * 8, 0.0, 0.0), db=meta_db)
                txn.put(_SEQ.pack(seq) + k, b"", db=atime_db)
            txn.put(b"seq", struct.pack("<Q", seq), db=ref_db)

    def new_keys() -> list[bytes]:
        return [rng.bytes(16) for _ in range(per_call)]

    calls: list[list[bytes]] = []
    rows = []
    try:
        for size in cfg.scale_sizes:
            while len(calls) * per_call < size:
                keys = new_keys()
                put(keys)
                index.update((k, i) for i, k in enumerate(keys))
                calls.append(keys)
            log(f"scale: bound at {len(calls) * per_call} blocks")
            store_us, lookup_us, found = [], [], True
            for _ in range(cfg.scale_probes):
                keys = new_keys()
                t0 = time.perf_counter()
                put(keys)
                store_us.append((time.perf_counter() - t0) / per_call * 1e6)
                index.update((k, i) for i, k in enumerate(keys))
                calls.append(keys)
                probe = calls[int(rng.integers(len(calls)))]
                t0 = time.perf_counter()
                hits = [index.get(k) for k in probe]
                lookup_us.append((time.perf_counter() - t0) / per_call * 1e6)
                found = found and None not in hits
            for op, us, what in (("store", store_us, "LMDB alone, the disk tier's rows"),
                                 ("lookup", lookup_us, "a dict of 16-byte keys")):
                rows.append({"tier": "bound", "op": op, "blocks": size, "verified": found, "bound": what,
                             **summary(us)})
    finally:
        env.close()
        shutil.rmtree(path, ignore_errors=True)
    return rows
