"""The connector's settings: vLLM's configs plus `kv_connector_extra_config` -> a CacheConfig.

The extra-config keys are `CacheConfig` field names, validated by CacheConfig itself (its errors
name the field). What vLLM decides is not configurable here: the KV layout (from the KV-cache
spec), the tensor-parallel rank and size, and the device tier (vLLM's own GPU prefix cache is the
device tier; tiercache adds host, disk and remote below it).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ..config import CacheConfig, KVLayout

# Fields vLLM decides; naming one in the extra config is an error that says why.
_SET_BY_VLLM = {
    "layout": "comes from vLLM's KV-cache spec",
    "tp_rank": "comes from vLLM's tensor-parallel rank",
    "tp_size": "comes from vLLM's tensor_parallel_size",
    "device": "the host tiers live in host memory; vLLM's KV cache is the device tier",
    "device_bytes": "vLLM's own prefix cache is the device tier",
    "extra": "not a setting",
}
ALLOWED_KEYS = tuple(f.name for f in dataclasses.fields(CacheConfig) if f.name not in _SET_BY_VLLM)


def layout_from_vllm(kv_cache_config: Any) -> KVLayout:
    """The KV layout of vLLM's (single) attention KV-cache group."""
    groups = list(getattr(kv_cache_config, "kv_cache_groups", None) or [])
    if len(groups) != 1:
        raise ValueError(f"kv_cache_groups: the tiercache connector supports models with one KV-cache group "
                         f"(full attention in every layer), got {len(groups)}")
    spec = groups[0].kv_cache_spec
    head_v = getattr(spec, "head_size_v", spec.head_size)
    if type(spec).__name__ != "FullAttentionSpec" or head_v != spec.head_size:
        raise ValueError(f"kv_cache_spec: the tiercache connector supports full attention with equal K and V head "
                         f"sizes, got {type(spec).__name__} (head_size={spec.head_size}, head_size_v={head_v})")
    return KVLayout(num_layers=len(groups[0].layer_names), num_kv_heads=spec.num_kv_heads,
                    head_dim=spec.head_size, dtype=spec.dtype, block_size=spec.block_size)


def cache_config(vllm_config: Any, kv_cache_config: Any, tp_rank: int = 0, **overrides: Any) -> CacheConfig:
    """The CacheConfig a connector instance uses; ValueError/TypeError naming the offending key."""
    extra = dict(vllm_config.kv_transfer_config.kv_connector_extra_config or {})
    for key in extra:
        if key in _SET_BY_VLLM:
            raise ValueError(f"kv_connector_extra_config: {key!r} cannot be set ({_SET_BY_VLLM[key]})")
        if key not in ALLOWED_KEYS:
            raise ValueError(f"kv_connector_extra_config: unknown key {key!r}; expected CacheConfig field names: "
                             f"{list(ALLOWED_KEYS)}")
    model = vllm_config.model_config
    extra.setdefault("model_id", str(model.model))  # the weights (path or hub name), not the served alias
    if extra.get("weights_revision") is None and getattr(model, "revision", None):
        extra["weights_revision"] = str(model.revision)
    if isinstance(extra.get("hash_secret"), str):
        extra["hash_secret"] = extra["hash_secret"].encode()
    extra.update(overrides)
    tp_size = vllm_config.parallel_config.tensor_parallel_size
    try:
        cfg = CacheConfig(layout=layout_from_vllm(kv_cache_config), device="cpu", device_bytes=0,
                          tp_rank=tp_rank, tp_size=tp_size, **extra)
    except (ValueError, TypeError) as e:
        raise type(e)(f"kv_connector_extra_config: {e}") from e
    if host_slots(cfg) == 0 and not cfg.disk_enabled and not cfg.remote_url:
        raise ValueError("kv_connector_extra_config: host_bytes, disk_path, remote_url: the connector needs at least "
                         "one tier below vLLM's own cache (host_bytes of one block or more, a disk tier or a remote)")
    # Write-back would keep blocks only in worker memory and spill them on eviction: the workers would have to
    # run the spills the scheduler decides. Under write-through every block is written down when it is saved.
    if cfg.write_policy != "write_through":
        raise ValueError(f"kv_connector_extra_config: write_policy: the vLLM connector supports 'write_through' "
                         f"only, got {cfg.write_policy!r}")
    return cfg


def host_slots(cfg: CacheConfig) -> int:
    """Blocks the host tier of each worker holds (the scheduler's decision layer mirrors them)."""
    return cfg.host_bytes // cfg.layout.block_bytes
