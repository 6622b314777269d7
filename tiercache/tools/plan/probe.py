"""Bandwidth per tier on this machine: a short probe through TierCache's public API, or a bench results file.

The probe stores `probe_bytes` of synthetic bf16-like KV (the benchmark's realistic
generator, in the model's block shape) and times `load(tokens, out=...)`:
- host: a host-only cache; on a CUDA machine `out` is on the GPU, so the copy up is included;
- disk: a disk-only cache; the LMDB file is written, the cache closed, the file evicted
  from the page cache with posix_fadvise(DONTNEED) (this file only; nothing system-wide),
  then the cache is reopened and loaded: a cold read, decompression included;
- device: a device-tier cache on the GPU (CUDA only).
GB/s counts raw KV bytes delivered. The disk probe also gives the codec's compression
ratio on that synthetic KV (real KV compresses differently; pass --disk-ratio to override).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from typing import Any

from tiercache.tiers.disk_probe import evict_from_page_cache as _evict_file
from tiercache.tools.plan.model import ModelShape


def probe_layout(shape: ModelShape, block_size: int) -> Any:
    import torch

    from tiercache.config import KVLayout

    dtype = {1: torch.uint8, 2: torch.bfloat16, 4: torch.float32}[shape.dtype_bytes]
    if shape.dtype in ("float16", "fp16", "half"):
        dtype = torch.float16
    return KVLayout(num_layers=shape.num_layers, num_kv_heads=shape.num_kv_heads, head_dim=shape.head_dim,
                    dtype=dtype, block_size=block_size, planes=shape.planes)


def _best_load(cache: Any, tokens: Any, out: Any, repeats: int) -> float:
    import torch

    best = float("inf")
    for _ in range(repeats):
        if out.is_cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        got = cache.load(tokens, out=out)
        if out.is_cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
        if got.shape[2] != out.shape[2]:
            raise RuntimeError(f"probe: load returned {got.shape[2]} of {out.shape[2]} tokens")
    return best




def run_probe(shape: ModelShape, block_size: int, probe_bytes: int = 64 << 20, workdir: str | None = None) -> dict:
    """Measure load bandwidth per tier with the real cache; returns {tier: GB/s, ..., "disk_ratio": r, ...}."""
    import numpy as np
    import torch

    from tiercache import CacheConfig, TierCache
    from tiercache.tools.bench.protocol import realistic_kv

    layout = probe_layout(shape, block_size)
    blocks = max(4, probe_bytes // layout.block_bytes)
    T = blocks * block_size
    nbytes = blocks * layout.block_bytes
    kv = realistic_kv(layout, T, seed=0)
    tokens = np.arange(T, dtype=np.int64) + 1000
    cuda = torch.cuda.is_available()
    gpu = torch.device("cuda") if cuda else torch.device("cpu")
    out: dict[str, Any] = {"source": "probe", "probe_bytes": nbytes, "blocks": blocks, "into": str(gpu)}
    t_start = time.perf_counter()

    dst = torch.empty_like(kv, device=gpu)
    with TierCache(CacheConfig(layout=layout, model_id="plan-probe", device=gpu, host_bytes=nbytes,
                               disk_path=None)) as cache:
        cache.store(tokens, kv)
        out["host"] = nbytes / _best_load(cache, tokens, dst, 3) / 1e9
    if cuda:
        with TierCache(CacheConfig(layout=layout, model_id="plan-probe", device=gpu, device_bytes=nbytes,
                                   host_bytes=0)) as cache:
            cache.store(tokens, kv)
            out["device"] = nbytes / _best_load(cache, tokens, dst, 3) / 1e9

    tmp = tempfile.mkdtemp(prefix="tiercache-plan-", dir=workdir)
    try:
        cfg = CacheConfig(layout=layout, model_id="plan-probe", device=gpu, host_bytes=0, disk_path=tmp,
                          disk_bytes=3 * nbytes + (64 << 20), compression="auto", write_queue_blocks=blocks + 4)
        with TierCache(cfg) as cache:
            cache.store(tokens, kv)
            cache.flush()
            s = cache.stats()
        out["disk_ratio"] = s["disk_raw_bytes"] / s["disk_compressed_bytes"] if s["disk_compressed_bytes"] else 1.0
        # what compression="auto" chose for this layout here (a ratio of ~1.0 when it chose "none")
        out["disk_codec"] = (s.get("disk_codec") or {}).get("chosen")
        _evict_file(os.path.join(tmp, "data.mdb"))
        with TierCache(cfg) as cache:
            out["disk"] = nbytes / _best_load(cache, tokens, dst, 1) / 1e9
            out["disk_warm"] = nbytes / _best_load(cache, tokens, dst, 2) / 1e9
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    out["seconds"] = time.perf_counter() - t_start
    return out


def bandwidth_from_results(path: str) -> dict:
    """Tier bandwidths from `tiercache bench --json` output, or from an earlier `tiercache plan --json`."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"--bandwidth-from: cannot read {path} as JSON ({e})") from None
    if isinstance(data, dict) and isinstance(data.get("bandwidth"), dict):  # a plan --json
        bw = dict(data["bandwidth"])
        bw["source"] = f"{path} (plan)"
        return bw
    rows = {r.get("row"): r for r in data.get("throughput", [])} if isinstance(data, dict) else {}
    if "host load" not in rows or "disk load, cold" not in rows:
        raise ValueError(f"--bandwidth-from: {path} is neither `tiercache bench --json` output (throughput rows "
                         "'host load' and 'disk load, cold') nor `tiercache plan --json` output")
    out: dict[str, Any] = {"source": f"{path} (bench, {data.get('machine', {}).get('name', 'unknown machine')})",
                           "host": rows["host load"]["median"], "disk": rows["disk load, cold"]["median"]}
    if "disk load, warm" in rows:
        out["disk_warm"] = rows["disk load, warm"]["median"]
    footprint = {r.get("data"): r for r in data.get("footprint", [])}
    if footprint.get("realistic bf16", {}).get("frame_ratio"):
        out["disk_ratio"] = 1.0 / footprint["realistic bf16"]["frame_ratio"]
    return out


def measure_prefill(model_path: str, tokens: int, device: str = "cpu", dtype: str | None = None) -> float:
    """Prefill rate (tokens/s) of the model at `model_path` for a `tokens`-long prompt.

    Uses the checkpoint's weights when the directory has them, else random weights from its
    config (the compute is the same). One untimed warm-up prefill, then the best of two.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    path = model_path if os.path.isdir(model_path) else os.path.dirname(os.path.abspath(model_path))
    cfg = AutoConfig.from_pretrained(path, local_files_only=True)
    has_weights = any(f.endswith((".safetensors", ".bin")) for f in os.listdir(path))
    from tiercache.config import parse_dtype

    want = dtype or getattr(cfg, "torch_dtype", None) or torch.bfloat16
    torch_dtype = want if isinstance(want, torch.dtype) else parse_dtype(str(want), "--dtype")
    if has_weights:
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch_dtype)
    else:
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch_dtype)
    model = model.to(device).eval()
    vocab = int(getattr(cfg.get_text_config(decoder=True), "vocab_size", 1000) or 1000)
    ids = torch.randint(0, vocab, (1, tokens), device=device)
    best = float("inf")
    with torch.no_grad():
        for i in range(3):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            model(ids, use_cache=True)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            if i:
                best = min(best, time.perf_counter() - t0)
    return tokens / best
