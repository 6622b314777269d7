"""The core's cost per block: Python and bookkeeping, measured with bytes too small to matter.

32 layers, 1 KV head of 8 fp16 values (so a block is a few KiB), 16- and 256-token
blocks, prompts of 2,048 blocks (512 with --quick runs of the bench). Each row is
microseconds per block, next to a memcpy of the same bytes in the same run, and
the cost over that memcpy. Goals (issue: two-phase core): lookup <= 1 us/block
including hashing; host-hit load <= 2 us/block over the memcpy; layer-wise load
<= 1.2x the whole-prefix load; eviction O(1) per victim (S3-FIFO and LRU at 10^6 keys).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable

import torch

from tiercache.config import CacheConfig, KVLayout
from tiercache.policy import make_eviction_policy


def _best(fn: Callable[[], object], reps: int) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _rows_for(block_size: int, blocks: int, reps: int) -> list[dict]:
    from tiercache.manager import TierCache
    layout = KVLayout(num_layers=32, num_kv_heads=1, head_dim=8, dtype=torch.float16, block_size=block_size)
    T = blocks * block_size
    tokens = list(range(T))
    kv = torch.randn(layout.kv_shape(T)).to(layout.dtype)
    dst = torch.empty_like(kv)
    memcpy = _best(lambda: dst.copy_(kv), reps) / blocks * 1e6
    rows = []

    def row(op: str, tier: str, seconds: float, verified: bool, goal: str = "") -> None:
        us = seconds / blocks * 1e6
        rows.append({"op": op, "tier": tier, "block_tokens": block_size, "blocks": blocks,
                     "us_per_block": round(us, 3), "memcpy_us_per_block": round(memcpy, 3),
                     "over_memcpy_us": round(us - memcpy, 3), "goal": goal, "verified": verified})

    with tempfile.TemporaryDirectory(prefix="tiercache-bench-core-") as d:
        cfg = CacheConfig(layout=layout, model_id="bench-core", host_bytes=2 * blocks * layout.block_bytes,
                          disk_path=d, disk_bytes=8 * blocks * layout.block_bytes + (64 << 20), io_threads=2,
                          write_queue_blocks=2 * blocks)  # the whole prompt reaches the disk (no backpressure)
        with TierCache(cfg) as c:
            store_s = _best(lambda: (c.store(tokens, kv), c.flush()), 1)
            c.flush()
            row("lookup (incl. hashing)", "host", _best(lambda: c.lookup(tokens), reps), c.lookup(tokens) == T,
                "<= 1 us/block")
            out = torch.empty_like(kv)
            t = _best(lambda: c.load(tokens, out=out), reps)
            row("load, whole prefix", "host", t, torch.equal(out, kv), "<= memcpy + 2 us/block")
            # layer-wise allocates its output: compare it with a whole-prefix load that allocates too
            whole = _best(lambda: c.load(tokens), reps)
            lw = _best(lambda: c.load_layers(tokens).wait(), reps)
            row("load, layer-wise", "host", lw, torch.equal(c.load_layers(tokens).wait(), kv),
                f"<= 1.2x whole, allocating ({lw / whole:.2f}x)")
            row("store (incl. queueing for disk)", "host", store_s, True)
        # the same blocks from disk only
        with TierCache(cfg.replace(host_bytes=0)) as c:
            row("lookup (incl. hashing)", "disk", _best(lambda: c.lookup(tokens), reps), c.lookup(tokens) == T)
            t = _best(lambda: c.load(tokens, out=out), reps)
            row("load, whole prefix", "disk", t, torch.equal(out, kv))
            whole = _best(lambda: c.load(tokens), reps)
            lw = _best(lambda: c.load_layers(tokens).wait(), reps)
            row("load, layer-wise", "disk", lw, torch.equal(c.load_layers(tokens).wait(), kv),
                f"<= 1.2x whole, allocating ({lw / whole:.2f}x)")
    return rows


def _eviction_rows(n: int) -> list[dict]:
    rows = []
    for name in ("lru", "s3fifo"):
        per = {}
        for size in (1000, n):
            p = make_eviction_policy(name)
            for k in range(size):
                p.insert(k)
            protected = {0, 1, 2}
            t0 = time.perf_counter()
            got = 0
            for _ in range(1000):
                v = p.victims(1, protected)
                for k in v:
                    p.remove(k)
                p.insert(("new", got))
                got += 1
            per[size] = (time.perf_counter() - t0) / 1000 * 1e6
        rows.append({"op": f"evict one ({name})", "tier": "-", "block_tokens": "-", "blocks": n,
                     "us_per_block": round(per[n], 3), "memcpy_us_per_block": "-",
                     "over_memcpy_us": "-", "goal": f"O(1): {per[n] / per[1000]:.2f}x the cost at 10^3",
                     "verified": True})
    return rows


def core_rows(quick: bool = True) -> list[dict]:
    blocks = 512 if quick else 2048
    reps = 3 if quick else 10
    rows = _rows_for(16, blocks, reps) + _rows_for(256, blocks // 8 if quick else blocks // 4, reps)
    return rows + _eviction_rows(100_000 if quick else 1_000_000)


if __name__ == "__main__":  # python -m tiercache.bench.core [--full]
    import sys
    for r in core_rows(quick="--full" not in sys.argv):
        print(r)
