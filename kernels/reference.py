"""The pure-torch engine: the CPU path, and the reference the Triton kernel is tested against.

One `index_select` (gather) or `index_copy_` (scatter) per layer and plane, on the strided
`[B, T1, T2, H, D1, D2]` view of the layer's storage that `layouts.describe` gives: the view lists a
plane in canonical order, so no per-block copies and no per-element Python.
"""

from __future__ import annotations

import torch

from .layouts import PagedGeometry


def _plane_view(layer: torch.Tensor, geo: PagedGeometry, p: int) -> torch.Tensor:
    pv = geo.planes[p]
    return torch.as_strided(layer, (geo.num_blocks, *pv.sizes), (geo.block_stride, *pv.strides),
                            layer.storage_offset() + pv.offset)


def gather(layers: list[torch.Tensor], ids: torch.Tensor, geo: PagedGeometry, out: torch.Tensor) -> None:
    n = ids.numel()
    for i, layer in enumerate(layers):
        for p in range(len(geo.planes)):
            picked = _plane_view(layer, geo, p).index_select(0, ids)  # [n, T1, T2, H, D1, D2], contiguous
            out[:, i, p].copy_(picked.view(n, geo.block_size, geo.num_kv_heads, geo.head_dim))


def scatter(blocks: torch.Tensor, layers: list[torch.Tensor], ids: torch.Tensor, geo: PagedGeometry) -> None:
    n = ids.numel()
    for i, layer in enumerate(layers):
        for p in range(len(geo.planes)):
            dst = _plane_view(layer, geo, p)
            # blocks[:, i, p] is [n, bs, H, D] with D innermost: splitting bs and D is a view, never a copy
            dst.index_copy_(0, ids, blocks[:, i, p].view(n, *dst.shape[1:]))
