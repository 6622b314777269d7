"""Shared bits of the stress scripts: a small layout, deterministic prompts and KV, RSS."""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from tiercache import KVLayout  # noqa: E402

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=32, dtype=torch.bfloat16, block_size=16)


def prompt(i: int, n: int = 64) -> list[int]:
    return list(range(i * 1000, i * 1000 + n))


def kv_of(i: int, n: int = 64) -> torch.Tensor:
    g = torch.Generator().manual_seed(i)
    return torch.randn(LAYOUT.kv_shape(n), generator=g).to(LAYOUT.dtype)


def check(out: torch.Tensor, i: int) -> int:
    """Blocks served for prompt i; raises AssertionError on a wrong byte."""
    n = out.shape[2]
    if n:
        want = kv_of(i)[:, :, :n]
        assert torch.equal(out.view(torch.uint8), want.view(torch.uint8)), f"wrong bytes for prompt {i}"
    return n // LAYOUT.block_size


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def peak_rss_mib() -> float:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
