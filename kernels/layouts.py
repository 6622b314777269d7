"""Where vLLM keeps each element of a block: one strided description per layout and plane.

A canonical block is `[num_layers, planes, block_size, num_kv_heads, head_dim]` (plane 0 = K, 1 = V).
Every supported paged layout places element `(token t, head h, dim d)` of plane p of block b at

    b * stride_b + offset_p + t1 * s1_p + t2 * s2_p + h * sh_p + d1 * s4_p + d2 * s5_p

(in elements, from the layer tensor's first element), where the token index splits as
`t = t1 * T2 + t2` and the dim index as `d = d1 * D2 + d2`. So the six-dimensional strided view
`[B, T1, T2, H, D1, D2]` of a layer's storage lists plane p of every block in canonical order, and
both engines (the torch reference and the Triton kernel) work from that one description.

Layouts (vLLM 0.32, read from its source):
- `flash`: the per-layer tensor vLLM hands a connector (`register_kv_caches`), logical shape
  `[num_blocks, kv_heads, block_size, 2 * head_dim]` with K in `[..., :D]` and V in `[..., D:]`,
  any strides: LBNHC (FlashAttention's default, physically `[bs, H, 2D]` per block), LBHNC, and the
  cross-layer BLNHC/BLHNC views all work. A 5-D `[2, num_blocks, block_size, kv_heads, head_dim]`
  tensor (the per-layer shape of vLLM before 0.12) is accepted too.
- `cpu_vec`: the CPU backend with the `vec`/`vec16` ISAs. Per layer `[num_blocks, kv_heads, bs, 2D]`
  (LBHNC); inside each (block, head) page the first `bs*D` elements are K stored transposed
  (`[D, bs]`, element `d*bs + t`) and the last `bs*D` are V (`[bs, D]`).
- `cpu_amx`: the CPU backend with the `amx` ISA (bf16, bs a multiple of 32): the page as above, but K
  is VNNI-packed `[bs/16, D/2, 16, 2]` (pairs of dims per token, 16-token groups) and V is
  `[D/16, bs/2, 16, 2]` (pairs of tokens per dim, 16-dim groups).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

LAYOUTS = ("flash", "cpu_vec", "cpu_amx")
PLANES = 2


@dataclass(frozen=True)
class PlaneView:
    """Plane p of every block as a strided `[B, T1, T2, H, D1, D2]` view (offsets in elements)."""

    offset: int
    sizes: tuple[int, int, int, int, int]    # T1, T2, H, D1, D2
    strides: tuple[int, int, int, int, int]  # s1, s2, sh, s4, s5


@dataclass(frozen=True)
class PagedGeometry:
    """What the layer tensors say about the cache: the same for every layer."""

    layout: str
    num_blocks: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    block_stride: int
    planes: tuple[PlaneView, PlaneView]

    @property
    def block_shape(self) -> tuple[int, int, int, int]:
        """One layer of one canonical block: `[planes, block_size, num_kv_heads, head_dim]`."""
        return (PLANES, self.block_size, self.num_kv_heads, self.head_dim)


def describe(layer: torch.Tensor, layout: str) -> PagedGeometry:
    """The strided description of `layer` (one layer's KV cache) in `layout`; ValueError if it cannot be."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {list(LAYOUTS)}, got {layout!r}")
    if layout == "flash":
        return _flash(layer)
    if layer.dim() != 4:
        raise ValueError(f"layers: a {layout} layer is [num_blocks, kv_heads, block_size, 2*head_dim], "
                         f"got shape {tuple(layer.shape)}")
    num_blocks, heads, bs, c = layer.shape
    if c % 2:
        raise ValueError(f"layers: the last dimension (2*head_dim) must be even, got {c}")
    d = c // 2
    s_b, s_h, s_n, s_c = layer.stride()
    if s_c != 1 or s_n != c:
        raise ValueError(f"layers: a {layout} (block, head) page must be contiguous (strides [..., {c}, 1]), "
                         f"got strides {tuple(layer.stride())}")
    if layout == "cpu_vec":
        k = PlaneView(0, (bs, 1, heads, d, 1), (1, 0, s_h, bs, 0))
        v = PlaneView(bs * d, (bs, 1, heads, d, 1), (d, 0, s_h, 1, 0))
    else:
        if layer.element_size() != 2:
            raise ValueError(f"layers: cpu_amx packs 2-byte elements (bf16), got dtype {layer.dtype}")
        if bs % 16 or d % 16:
            raise ValueError(f"layers: cpu_amx needs block_size and head_dim multiples of 16, got {bs} and {d}")
        # K: token group (16 tokens), dim pair, token in group, dim in pair.
        k = PlaneView(0, (bs // 16, 16, heads, d // 2, 2), (16 * d, 2, s_h, 32, 1))
        # V: dim group (16 dims), token pair, dim in group, token in pair.
        v = PlaneView(bs * d, (bs // 2, 2, heads, d // 16, 16), (32, 1, s_h, 16 * bs, 2))
    return PagedGeometry(layout, num_blocks, bs, heads, d, s_b, (k, v))


def _flash(layer: torch.Tensor) -> PagedGeometry:
    if layer.dim() == 5:
        two, num_blocks, bs, heads, d = layer.shape
        if two != 2:
            raise ValueError(f"layers: a 5-D flash layer is [2, num_blocks, block_size, kv_heads, head_dim], "
                             f"got shape {tuple(layer.shape)}")
        s_p, s_b, s_n, s_h, s_d = layer.stride()
        plane_offsets = (0, s_p)
    elif layer.dim() == 4:
        num_blocks, heads, bs, c = layer.shape
        if c % 2:
            raise ValueError(f"layers: the last dimension (2*head_dim) must be even, got {c}")
        d = c // 2
        s_b, s_h, s_n, s_d = layer.stride()
        plane_offsets = (0, d * s_d)
    else:
        raise ValueError(f"layers: a flash layer is [num_blocks, kv_heads, block_size, 2*head_dim] "
                         f"(or [2, num_blocks, block_size, kv_heads, head_dim]), got shape {tuple(layer.shape)}")
    planes = tuple(PlaneView(off, (bs, 1, heads, d, 1), (s_n, 0, s_h, s_d, 0)) for off in plane_offsets)
    return PagedGeometry("flash", num_blocks, bs, heads, d, s_b, planes)  # type: ignore[arg-type]
