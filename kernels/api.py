"""The gather/scatter entry points of tiercache_kernels (re-exported by the package)."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from . import reference
from .layouts import LAYOUTS, PLANES, PagedGeometry, describe

__all__ = ["LAYOUTS", "IMPLS", "gather", "scatter", "describe", "block_shape"]

IMPLS = ("auto", "triton", "torch", "runs")
NULL_BLOCK = 0


def block_shape(layers: Sequence[torch.Tensor], layout: str) -> tuple[int, ...]:
    """Shape of one canonical block of these layers: `[L, 2, block_size, kv_heads, head_dim]`."""
    geo = _geometry(layers, layout)
    return (len(layers), *geo.block_shape)


def gather(layers: Sequence[torch.Tensor], block_ids, layout: str, out: torch.Tensor | None = None,
           impl: str = "auto") -> torch.Tensor:
    """Copy blocks `block_ids` of every layer into canonical blocks `[n, L, 2, bs, H, D]` (returns `out`)."""
    layers = list(layers)
    geo = _geometry(layers, layout)
    ids = _block_ids(block_ids, geo, layers[0].device, for_scatter=False)
    shape = (ids.numel(), len(layers), *geo.block_shape)
    if out is None:
        out = torch.empty(shape, dtype=layers[0].dtype, device=layers[0].device)
    else:
        _check_blocks("out", out, shape, layers[0])
    _engine(impl, layers[0]).gather(layers, ids, geo, out)
    return out


def scatter(blocks: torch.Tensor, layers: Sequence[torch.Tensor], block_ids, layout: str,
            impl: str = "auto") -> None:
    """Copy canonical blocks `[n, L, 2, bs, H, D]` into blocks `block_ids` of every layer."""
    layers = list(layers)
    geo = _geometry(layers, layout)
    ids = _block_ids(block_ids, geo, layers[0].device, for_scatter=True)
    _check_blocks("blocks", blocks, (ids.numel(), len(layers), *geo.block_shape), layers[0])
    _engine(impl, layers[0]).scatter(blocks, layers, ids, geo)


# -- validation ------------------------------------------------------------------------------------
def _geometry(layers: list[torch.Tensor], layout: str) -> PagedGeometry:
    if not isinstance(layout, str) or layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {list(LAYOUTS)}, got {layout!r}")
    if not layers:
        raise ValueError("layers must hold at least one layer's KV-cache tensor, got none")
    first = layers[0]
    for i, t in enumerate(layers):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"layers[{i}] must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype != first.dtype or t.device != first.device:
            raise TypeError(f"layers[{i}] is {t.dtype} on {t.device}, layers[0] is {first.dtype} on {first.device}: "
                            "every layer must match")
        if t.shape != first.shape or t.stride() != first.stride():
            raise ValueError(f"layers[{i}] has shape {tuple(t.shape)} strides {t.stride()}, layers[0] has "
                             f"{tuple(first.shape)} strides {first.stride()}: every layer must match")
    if first.element_size() not in (1, 2, 4, 8) or first.dtype.is_complex or first.dtype == torch.bool:
        raise TypeError(f"layers: dtype {first.dtype} is not a KV-cache dtype")
    return describe(first, layout)


def _block_ids(block_ids, geo: PagedGeometry, device: torch.device, for_scatter: bool) -> torch.Tensor:
    if isinstance(block_ids, torch.Tensor):
        if block_ids.dtype not in (torch.int64, torch.int32) or block_ids.dim() != 1:
            raise TypeError(f"block_ids must be a 1-D int64 tensor, got {block_ids.dtype} with shape "
                            f"{tuple(block_ids.shape)}")
        ids = block_ids
    elif isinstance(block_ids, Sequence) and all(isinstance(b, int) and not isinstance(b, bool) for b in block_ids):
        ids = torch.tensor(list(block_ids), dtype=torch.int64)
    else:
        raise TypeError(f"block_ids must be a 1-D int64 tensor or a list of ints, got {type(block_ids).__name__}")
    if ids.numel():
        # Checked on the host: an out-of-range id would read or write another block's memory.
        host = ids.cpu() if ids.device.type != "cpu" else ids
        lo, hi = int(host.min()), int(host.max())
        if lo < 0 or hi >= geo.num_blocks:
            raise ValueError(f"block_ids must lie in [0, {geo.num_blocks}) (the layers' num_blocks), "
                             f"got ids from {lo} to {hi}")
        if for_scatter:
            if bool((host == NULL_BLOCK).any()):
                raise ValueError(f"block_ids: block {NULL_BLOCK} is vLLM's null block; a scatter never writes it")
            if torch.unique(host).numel() != host.numel():
                raise ValueError("block_ids: a scatter writes each block once, got repeated ids")
    return ids.to(device=device, dtype=torch.int64, non_blocking=True)


def _check_blocks(name: str, t: torch.Tensor, shape: tuple[int, ...], like: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != like.dtype:
        raise TypeError(f"{name} must have the layers' dtype {like.dtype}, got {t.dtype}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {list(shape)} ([n, layers, {PLANES}, block_size, kv_heads, "
                         f"head_dim]), got {list(t.shape)}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")
    if t.device != like.device:
        raise ValueError(f"{name} must be on the layers' device {like.device}, got {t.device}")


def _engine(impl: str, like: torch.Tensor):
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {list(IMPLS)}, got {impl!r}")
    if impl == "auto":
        impl = "triton" if like.is_cuda and _triton_available() else "runs" if not like.is_cuda else "torch"
    if impl == "torch":
        return reference
    if impl == "runs":
        from . import runs
        return runs
    if not like.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("impl='triton' on CPU tensors needs TRITON_INTERPRET=1 (set before triton is imported)")
    from . import triton_impl
    return triton_impl


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
