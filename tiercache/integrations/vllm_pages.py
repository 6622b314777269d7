"""vLLM's paged KV cache <-> tiercache's canonical blocks, for the page layouts vLLM 0.32 uses.

Blocks are stored canonical (`[L, 2, block_size, kv_heads, head_dim]`, K then V), not as vLLM's
pages: the CPU backend packs a page differently per ISA (`vec`: K transposed; `amx`: VNNI
pairs) and GPU FlashAttention interleaves K and V per token, so native pages would tie a store to
one machine kind. Canonical blocks are shared by every ISA, by GPU and CPU, and by the
transformers integration.

    layout = page_layout(layer_name, vllm_config)          # "cpu_vec" | "cpu_amx" | "flash"
    check_layout(layout, like_layer, isa)                  # a known pattern through vLLM's own op
    blocks = gather(layers, block_ids, layout)             # [n, L, 2, bs, H, D]
    scatter(blocks, layers, block_ids, layout)

`check_layout` writes a known pattern through the CPU backend's own cache-write op into a scratch
cache and reads it back: if vLLM ever changes how a page is packed, the connector refuses to start
instead of storing scrambled KV. Uses `tiercache_kernels` when it is installed (one launch for all
layers on CUDA), else the torch code below.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

LAYOUTS = ("flash", "cpu_vec", "cpu_amx")
_ISA_LAYOUT = {"vec": "cpu_vec", "vec16": "cpu_vec", "amx": "cpu_amx"}


def layout_for_isa(isa: str | None) -> str:
    """The page layout of the CPU backend for `isa`; ValueError for ISAs whose packing is not known here."""
    if isa not in _ISA_LAYOUT:
        raise ValueError(f"vLLM CPU attention ISA {isa!r}: tiercache knows the page layout of "
                         f"{sorted(_ISA_LAYOUT)} only; the connector cannot convert this one")
    return _ISA_LAYOUT[isa]


def _kernels():
    try:
        import tiercache_kernels
    except ImportError:
        return None
    return tiercache_kernels


def _dims(layer: torch.Tensor) -> tuple[int, int, int]:
    if layer.dim() != 4:
        raise ValueError(f"KV cache layer: expected [num_blocks, kv_heads, block_size, 2*head_dim], "
                         f"got shape {tuple(layer.shape)}")
    _, heads, bs, c = layer.shape
    return heads, bs, c // 2


def _page_to_canonical(x: torch.Tensor, layout: str, bs: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [n, H, bs, 2D] pages (contiguous). Returns K, V as [n, bs, H, D] views."""
    n, h = x.shape[0], x.shape[1]
    if layout == "flash":
        return x[..., :d].permute(0, 2, 1, 3), x[..., d:].permute(0, 2, 1, 3)
    halves = x.reshape(n, h, 2, bs * d)
    if layout == "cpu_vec":
        k = halves[:, :, 0].reshape(n, h, d, bs).permute(0, 3, 1, 2)
        v = halves[:, :, 1].reshape(n, h, bs, d).permute(0, 2, 1, 3)
    else:  # cpu_amx: K [bs/16, D/2, 16, 2], V [D/16, bs/2, 16, 2]
        k = halves[:, :, 0].reshape(n, h, bs // 16, d // 2, 16, 2).permute(0, 2, 4, 1, 3, 5).reshape(n, bs, h, d)
        v = halves[:, :, 1].reshape(n, h, d // 16, bs // 2, 16, 2).permute(0, 3, 5, 1, 2, 4).reshape(n, bs, h, d)
    return k, v


def _canonical_to_page(k: torch.Tensor, v: torch.Tensor, layout: str) -> torch.Tensor:
    """k, v: [n, bs, H, D]. Returns pages [n, H, bs, 2D] (contiguous)."""
    n, bs, h, d = k.shape
    if layout == "flash":
        return torch.cat((k.permute(0, 2, 1, 3), v.permute(0, 2, 1, 3)), dim=-1).contiguous()
    if layout == "cpu_vec":
        kp = k.permute(0, 2, 3, 1).reshape(n, h, bs * d)
        vp = v.permute(0, 2, 1, 3).reshape(n, h, bs * d)
    else:
        kp = k.reshape(n, bs // 16, 16, h, d // 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(n, h, bs * d)
        vp = v.reshape(n, bs // 2, 2, h, d // 16, 16).permute(0, 3, 4, 1, 5, 2).reshape(n, h, bs * d)
    return torch.stack((kp, vp), dim=2).reshape(n, h, bs, 2 * d)


def _ids(block_ids: Sequence[int] | torch.Tensor, device: torch.device) -> torch.Tensor:
    if isinstance(block_ids, torch.Tensor):
        return block_ids.to(device=device, dtype=torch.int64)
    return torch.tensor(list(block_ids), dtype=torch.int64, device=device)


def gather(layers: Sequence[torch.Tensor], block_ids: Sequence[int] | torch.Tensor, layout: str) -> torch.Tensor:
    """Blocks `block_ids` of every layer as canonical blocks `[n, L, 2, bs, H, D]` (a new tensor)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout: expected one of {list(LAYOUTS)}, got {layout!r}")
    kern = _kernels()
    if kern is not None:
        return kern.gather(list(layers), _ids(block_ids, layers[0].device), layout)
    return torch_gather(layers, block_ids, layout)


def scatter(blocks: torch.Tensor, layers: Sequence[torch.Tensor], block_ids: Sequence[int] | torch.Tensor,
            layout: str) -> None:
    """Write canonical blocks `[n, L, 2, bs, H, D]` into blocks `block_ids` of every layer."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout: expected one of {list(LAYOUTS)}, got {layout!r}")
    ids = _ids(block_ids, layers[0].device)
    if blocks.shape[0] != ids.numel() or blocks.shape[1] != len(layers):
        raise ValueError(f"blocks: expected [{ids.numel()}, {len(layers)}, 2, bs, H, D], got {tuple(blocks.shape)}")
    kern = _kernels()
    if kern is not None:
        kern.scatter(blocks.contiguous(), list(layers), ids, layout)
        return
    torch_scatter(blocks, layers, ids, layout)


def torch_gather(layers: Sequence[torch.Tensor], block_ids: Sequence[int] | torch.Tensor,
                 layout: str) -> torch.Tensor:
    """`gather` without tiercache_kernels: one index_select per layer."""
    heads, bs, d = _dims(layers[0])
    ids = _ids(block_ids, layers[0].device)
    out = torch.empty((ids.numel(), len(layers), 2, bs, heads, d), dtype=layers[0].dtype, device=layers[0].device)
    for i, layer in enumerate(layers):
        k, v = _page_to_canonical(layer.index_select(0, ids), layout, bs, d)
        out[:, i, 0].copy_(k)
        out[:, i, 1].copy_(v)
    return out


def torch_scatter(blocks: torch.Tensor, layers: Sequence[torch.Tensor], block_ids: Sequence[int] | torch.Tensor,
                  layout: str) -> None:
    """`scatter` without tiercache_kernels: one index_copy_ per layer."""
    ids = _ids(block_ids, layers[0].device)
    for i, layer in enumerate(layers):
        layer.index_copy_(0, ids, _canonical_to_page(blocks[:, i, 0], blocks[:, i, 1], layout))


def check_cpu_layout(layout: str, like: torch.Tensor, isa: str) -> None:
    """Write a known K/V pattern through vLLM's CPU cache-write op and read it back with `layout`.

    Raises RuntimeError when the pages do not hold what this module expects (vLLM changed the packing).
    """
    from vllm import _custom_ops as ops

    heads, bs, d = _dims(like)
    scratch = torch.zeros((3, heads, bs, 2 * d), dtype=like.dtype)
    g = torch.Generator().manual_seed(1234)
    key = torch.randn((2 * bs, heads, d), generator=g).to(like.dtype)
    value = torch.randn((2 * bs, heads, d), generator=g).to(like.dtype)
    slots = torch.arange(bs, 3 * bs, dtype=torch.int64)  # blocks 1 and 2, every token
    key_cache, value_cache = scratch.view(3, heads, 2 * bs, d).chunk(2, dim=2)
    ops.cpu_attn_reshape_and_cache(key, value, key_cache, value_cache, slots, isa)
    blocks = gather([scratch], [1, 2], layout)                      # [2, 1, 2, bs, H, D]
    want_k, want_v = key.view(2, bs, heads, d), value.view(2, bs, heads, d)
    if not (torch.equal(blocks[:, 0, 0], want_k) and torch.equal(blocks[:, 0, 1], want_v)):
        raise RuntimeError(f"vLLM's CPU KV pages (isa={isa!r}) are not packed as tiercache's {layout!r} layout "
                           "expects; refusing to store scrambled KV (update tiercache for this vLLM)")
    back = torch.zeros_like(scratch)
    scatter(blocks, [back], [1, 2], layout)
    if not torch.equal(back[1:].view(torch.uint8), scratch[1:].view(torch.uint8)):
        raise RuntimeError(f"tiercache's {layout!r} scatter does not reproduce vLLM's CPU pages (isa={isa!r})")
