"""The CPU engine: the reference's strided views, copied run by run, and widened where a plane allows.

Two things make the reference slow on a CPU, and this engine avoids both:

- `index_select`/`index_copy_` on a strided view go element by element through an index. Blocks
  vLLM hands a request are mostly consecutive ids: each run of consecutive ids is one plain strided
  `copy_` between the plane's view and the canonical blocks (no temporary, no index). Ids scattered
  into many short runs fall back to one indexed copy per layer and plane.
- A plane whose innermost pair of elements is contiguous on both sides (the CPU backend's AMX K
  plane keeps bf16 dim pairs together) is copied as 32-bit elements: half the elements to move.

Results are bit-identical to `reference` (tests/test_kernels.py checks every layout and dtype).
"""

from __future__ import annotations

import torch

from .layouts import PagedGeometry

_WIDE = {4: torch.int32, 8: torch.int64}
_MAX_RUNS_FRACTION = 4   # more runs than n / 4 (and more than 2): one indexed copy instead


def runs(ids: list[int]) -> list[tuple[int, int, int]]:
    """(first id, count, position in ids) for each run of consecutive ids."""
    out: list[tuple[int, int, int]] = []
    start = 0
    for j in range(1, len(ids) + 1):
        if j == len(ids) or ids[j] != ids[j - 1] + 1:
            out.append((ids[start], j - start, start))
            start = j
    return out


def _widen(geo: PagedGeometry, p: int, itemsize: int) -> int:
    """Elements of plane p that can move as one wider element (1: none)."""
    pv = geo.planes[p]
    f = pv.sizes[-1]
    if f < 2 or pv.strides[-1] != 1 or f * itemsize not in _WIDE:
        return 1
    if any(s % f for s in pv.strides[:-1]) or geo.block_stride % f or pv.offset % f:
        return 1
    return f


def _plane(layer: torch.Tensor, geo: PagedGeometry, p: int, f: int) -> torch.Tensor:
    """Plane p of every block, [B, T1, T2, H, D1, D2] (with f > 1: D2 merged into one wider element)."""
    pv = geo.planes[p]
    if f == 1:
        return torch.as_strided(layer, (geo.num_blocks, *pv.sizes), (geo.block_stride, *pv.strides),
                                layer.storage_offset() + pv.offset)
    base = layer.storage_offset() + pv.offset
    if base % f:
        return _plane(layer, geo, p, 1)
    wide = torch.empty(0, dtype=_WIDE[f * layer.element_size()], device=layer.device).set_(layer.untyped_storage())
    return torch.as_strided(wide, (geo.num_blocks, *pv.sizes[:-1]), (geo.block_stride // f,
                                                                     *(s // f for s in pv.strides[:-1])), base // f)


def _canonical(blocks: torch.Tensor, i: int, p: int, geo: PagedGeometry, f: int) -> torch.Tensor:
    """blocks[:, i, p] ([n, bs, H, D], D innermost) as the plane's [n, T1, T2, H, D1, D2] (or widened)."""
    pv = geo.planes[p]
    n = blocks.shape[0]
    if f == 1:
        return blocks[:, i, p].view(n, *pv.sizes)
    return blocks.view(_WIDE[f * blocks.element_size()])[:, i, p].view(n, *pv.sizes[:-1])


def _indexed(id_list: list[int]) -> bool:
    return len(runs(id_list)) > max(2, len(id_list) // _MAX_RUNS_FRACTION)


def _move(layers: list[torch.Tensor], ids: torch.Tensor, geo: PagedGeometry, blocks: torch.Tensor,
          into_pages: bool) -> None:
    """Pages <-> canonical blocks, plane by plane and layer by layer: one copy per run of consecutive ids."""
    id_list = ids.tolist()
    indexed = _indexed(id_list)
    spans = runs(id_list) if not indexed else []
    for p in range(len(geo.planes)):
        f = _widen(geo, p, layers[0].element_size())
        for i, layer in enumerate(layers):
            pages, canon = _plane(layer, geo, p, f), _canonical(blocks, i, p, geo, f)
            if indexed:
                if into_pages:
                    pages.index_copy_(0, ids, canon)
                else:
                    canon.copy_(pages.index_select(0, ids))
                continue
            for first, count, pos in spans:
                page_run, canon_run = pages.narrow(0, first, count), canon.narrow(0, pos, count)
                if into_pages:
                    page_run.copy_(canon_run)
                else:
                    canon_run.copy_(page_run)


def gather(layers: list[torch.Tensor], ids: torch.Tensor, geo: PagedGeometry, out: torch.Tensor) -> None:
    _move(layers, ids, geo, out, into_pages=False)


def scatter(blocks: torch.Tensor, layers: list[torch.Tensor], ids: torch.Tensor, geo: PagedGeometry) -> None:
    _move(layers, ids, geo, blocks, into_pages=True)
