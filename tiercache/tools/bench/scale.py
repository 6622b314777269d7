"""Scale: lookup and store cost per block as a store grows from 10^3 to 10^5 (--full: 10^6) blocks.

A tiny layout (1 layer, 1 head, head_dim 8, 16-token blocks: 512 B) so the blocks fit; the store
grows in calls of 64 blocks; at each size, `scale_probes` probes time a store of a new sequence
and a lookup of a random stored one (then the same lookup again), for a host-only and a
disk-only cache (store includes `flush()`). Ratios divide by the cost at the smallest size.
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
    for r in rows:
        first = next(x for x in rows if x["tier"] == r["tier"] and x["op"] == r["op"])
        r["ratio"] = r["median"] / first["median"]
    return rows
