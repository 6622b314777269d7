"""The Triton engine: every layer, plane and block of a gather (or scatter) in one launch.

Program (i, l*P + p, c) copies chunk c of plane p of layer l of the i-th requested block. The
layers are separate tensors, so their base addresses travel in an int64 table on the device (one
small copy per new set of layers, cached). Elements move as same-width integers: bit-exact for
every float format, NaN payloads included. Imported only when the Triton path is used.
"""

from __future__ import annotations

import threading

import torch
import triton
import triton.language as tl

from .layouts import PLANES, PagedGeometry

_INT_OF_WIDTH = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_MAX_CHUNK = 4096
_GRID_YZ_LIMIT = 65535


@triton.jit
def _move_blocks(table_ptr, ids_ptr, blocks_ptr, num_layers, block_stride,
                 k_off, k_s1, k_s2, k_sh, k_s4, k_s5,
                 v_off, v_s1, v_s2, v_sh, v_s4, v_s5,
                 H: tl.constexpr, D: tl.constexpr, E: tl.constexpr,
                 K_T2: tl.constexpr, K_D2: tl.constexpr, V_T2: tl.constexpr, V_D2: tl.constexpr,
                 P: tl.constexpr, CHUNK: tl.constexpr, TO_LAYERS: tl.constexpr):
    i = tl.program_id(0)
    lp = tl.program_id(1)
    c = tl.program_id(2)
    layer = lp // P
    p = lp % P
    base = tl.load(table_ptr + layer).to(tl.pointer_type(blocks_ptr.dtype.element_ty))
    block = tl.load(ids_ptr + i).to(tl.int64)

    # canonical element e of one block plane = (t * H + h) * D + d
    e = c * CHUNK + tl.arange(0, CHUNK)
    mask = e < E
    d = e % D
    h = (e // D) % H
    t = e // (H * D)
    # the paged position: token t = t1 * T2 + t2 and dim d = d1 * D2 + d2, with per-plane T2, D2
    k_inner = ((t // K_T2).to(tl.int64) * k_s1 + (t % K_T2).to(tl.int64) * k_s2 + h.to(tl.int64) * k_sh
               + (d // K_D2).to(tl.int64) * k_s4 + (d % K_D2).to(tl.int64) * k_s5 + k_off)
    v_inner = ((t // V_T2).to(tl.int64) * v_s1 + (t % V_T2).to(tl.int64) * v_s2 + h.to(tl.int64) * v_sh
               + (d // V_D2).to(tl.int64) * v_s4 + (d % V_D2).to(tl.int64) * v_s5 + v_off)
    paged = base + block * block_stride + tl.where(p == 0, k_inner, v_inner)
    canonical = blocks_ptr + ((i.to(tl.int64) * num_layers + layer) * P + p) * E + e
    if TO_LAYERS:
        tl.store(paged, tl.load(canonical, mask=mask), mask=mask)
    else:
        tl.store(canonical, tl.load(paged, mask=mask), mask=mask)


class _PointerTables:
    """Device int64 tables of layer base addresses, keyed by the addresses (a few live sets at most)."""

    def __init__(self, capacity: int = 8) -> None:
        self._tables: dict[tuple, torch.Tensor] = {}
        self._capacity = capacity
        self._lock = threading.Lock()

    def get(self, layers: list[torch.Tensor]) -> torch.Tensor:
        key = (layers[0].device, *(t.data_ptr() for t in layers))
        with self._lock:
            table = self._tables.get(key)
            if table is None:
                if len(self._tables) >= self._capacity:
                    self._tables.pop(next(iter(self._tables)))
                table = torch.tensor(key[1:], dtype=torch.int64).to(layers[0].device)
                self._tables[key] = table
        return table


_TABLES = _PointerTables()


def _as_int(t: torch.Tensor) -> torch.Tensor:
    return t.view(_INT_OF_WIDTH[t.element_size()])


def _launch(layers: list[torch.Tensor], ids: torch.Tensor, geo: PagedGeometry, blocks: torch.Tensor,
            to_layers: bool) -> None:
    n = ids.numel()
    if n == 0:
        return
    k, v = geo.planes
    e = geo.block_size * geo.num_kv_heads * geo.head_dim
    chunk = min(triton.next_power_of_2(e), _MAX_CHUNK)
    grid = (n, len(layers) * PLANES, triton.cdiv(e, chunk))
    if grid[1] > _GRID_YZ_LIMIT or grid[2] > _GRID_YZ_LIMIT:
        raise ValueError(f"layers: {len(layers)} layers of {e}-element block planes do not fit one launch")
    _move_blocks[grid](
        _TABLES.get(layers), ids, _as_int(blocks), len(layers), geo.block_stride,
        k.offset, *k.strides, v.offset, *v.strides,
        H=geo.num_kv_heads, D=geo.head_dim, E=e,
        K_T2=k.sizes[1], K_D2=k.sizes[4], V_T2=v.sizes[1], V_D2=v.sizes[4],
        P=PLANES, CHUNK=chunk, TO_LAYERS=to_layers,
    )


def gather(layers: list[torch.Tensor], ids: torch.Tensor, geo: PagedGeometry, out: torch.Tensor) -> None:
    _launch(layers, ids, geo, out, to_layers=False)


def scatter(blocks: torch.Tensor, layers: list[torch.Tensor], ids: torch.Tensor, geo: PagedGeometry) -> None:
    _launch(layers, ids, geo, blocks, to_layers=True)
