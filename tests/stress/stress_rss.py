"""Block operations on one disk store (write, read, membership, eviction, many namespaces): RSS stays flat.

    python tests/stress/stress_rss.py --ops 1000000
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile

from common import rss_mib

from tiercache import KVLayout
from tiercache.errors import OnceLogger
from tiercache.keys import BlockKey
from tiercache.tiers.disk import DiskTier


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ops", type=int, default=1_000_000)
    args = ap.parse_args()
    import torch
    lay = KVLayout(num_layers=1, num_kv_heads=1, head_dim=8, dtype=torch.bfloat16, block_size=16)
    disk = DiskTier(tempfile.mkdtemp(prefix="tc-rss-") + "/s", lay, 16 << 20, log=OnceLogger())
    rng = random.Random(0)
    frame = bytes(300)
    samples = []
    done = 0
    batch = 64
    while done < args.ops:
        base = rng.randrange(1 << 40)
        keys = [BlockKey((base + j).to_bytes(8, "little") * 2) for j in range(batch)]
        ns = rng.randrange(1 << 30).to_bytes(8, "little")               # a new tenant every batch
        disk.write_batch([(k, frame, ns, {"model_id": "m"}) for k in keys])
        disk.count_each(keys)
        with disk.reader() as get:
            for k in keys[:16]:
                get(k)
        disk.note_access(keys[:16])
        done += batch * 2 + 16
        if len(samples) < (done * 20) // args.ops:
            samples.append(rss_mib())
    used, blocks = disk.used()
    disk.close()
    print(f"{done} block operations: RSS MiB at each 5%: {[round(s) for s in samples]}; "
          f"store holds {blocks} blocks ({used >> 20} MiB charged)")
    first, last = samples[len(samples) // 4], samples[-1]
    return 1 if last > first * 1.5 + 50 else 0


if __name__ == "__main__":
    sys.exit(main())
