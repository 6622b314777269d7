"""Per-tier capacity arithmetic: bytes per token and block, blocks, tokens and full-length sequences that fit.

Memory tiers (GPU KV, host) hold raw blocks: blocks = budget // block bytes.
The disk tier holds codec frames: a block costs its compressed size plus the frame
header, rounded up to LMDB's 4 KiB overflow pages, plus ~256 bytes of index entries
(`tiers.disk.charged_bytes`). `disk_bytes` bounds the LMDB file (data.mdb never grows
past it); blocks are charged against 85% of it (the rest is room for LMDB's
copy-on-write pages), so blocks = 0.85 x disk_bytes // that cost. If the filesystem
has less free space than that, it fills first: the tier then evicts down and
retries, so it holds fewer blocks than planned.
"""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass

from tiercache.tools.plan.model import ModelShape

DISK_BUDGET_FRACTION = 0.85  # tiers/disk.py: charged bytes stay below 85% of the map (disk_bytes, >= 1 MiB)
MIN_MAP = 1 << 20


def frame_header_bytes(shape: ModelShape) -> int:
    """Estimated codec frame header: fixed fields plus one segment entry per layer."""
    return 64 + 16 * shape.num_layers


def disk_block_cost(shape: ModelShape, block_size: int, ratio: float) -> int:
    """Estimated bytes one block costs against disk_bytes at compression `ratio` (raw / stored)."""
    if not ratio > 0:
        raise ValueError(f"disk ratio: expected a positive compression ratio (raw / stored), got {ratio!r}")
    from tiercache.tiers.disk import charged_bytes

    return charged_bytes(math.ceil(shape.block_bytes(block_size) / ratio) + frame_header_bytes(shape))


def disk_budget(disk_bytes: int) -> int:
    """The bytes of blocks a disk tier of `disk_bytes` holds at most."""
    return min(disk_bytes, int(max(disk_bytes, MIN_MAP) * DISK_BUDGET_FRACTION))


@dataclass(frozen=True)
class TierSize:
    tier: str
    budget_bytes: int
    bytes_per_token: float     # what the tier spends per token (disk: after compression, overheads included)
    bytes_per_block: int
    blocks: int
    block_size: int
    max_seq_len: int | None

    @property
    def tokens(self) -> int:
        return self.blocks * self.block_size

    @property
    def sequences(self) -> int | None:
        """Full-length sequences (max_seq_len tokens each) whose KV fits at once."""
        if not self.max_seq_len:
            return None
        return self.tokens // (math.ceil(self.max_seq_len / self.block_size) * self.block_size)

    def to_dict(self) -> dict:
        return {"tier": self.tier, "budget_bytes": self.budget_bytes, "bytes_per_token": self.bytes_per_token,
                "bytes_per_block": self.bytes_per_block, "blocks": self.blocks, "tokens": self.tokens,
                "full_length_sequences": self.sequences}


def size_tiers(shape: ModelShape, block_size: int, budgets: dict[str, int], disk_ratio: float = 1.0,
               max_seq_len: int | None = None) -> list[TierSize]:
    """One TierSize per tier with a nonzero budget, in the order device (GPU KV), host, disk."""
    raw_block = shape.block_bytes(block_size)
    seq = max_seq_len or shape.max_seq_len
    out = []
    for tier in ("device", "host", "disk"):
        budget = budgets.get(tier, 0)
        if not budget:
            continue
        if tier == "disk":
            per_block = disk_block_cost(shape, block_size, disk_ratio)
            blocks = disk_budget(budget) // per_block
        else:
            per_block, blocks = raw_block, budget // raw_block
        out.append(TierSize(tier, budget, per_block / block_size, per_block, blocks, block_size, seq))
    return out


def free_space(path: str) -> tuple[str, int] | None:
    """(the existing directory checked, its filesystem's free bytes) for a disk_path that may not exist yet."""
    p = os.path.abspath(path)
    while not os.path.exists(p):
        parent = os.path.dirname(p)
        if parent == p:
            return None
        p = parent
    return p, shutil.disk_usage(p).free
