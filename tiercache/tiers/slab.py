"""Memory media: a preallocated slab of block slots, and staging buffers. Bytes only, no decisions.

A slab is one tensor [num_slots, L, planes, block_size, H, D]; slot s is one
contiguous canonical block. The decision layer hands out slot ids; this module
moves bytes for a whole plan at once: one index_select / index_copy_ per
medium and plan, never one copy per block. A copy between the host and a CUDA
device goes through pinned staging buffers (`tiercache.pinned.host_to_device` /
`device_to_host`): an async copy from pageable memory is silently synchronous,
and one into a fresh pinned tensor is read by the host before it has landed.
"""

from __future__ import annotations

import threading

import numpy as np
import torch

from .. import pinned
from ..config import KVLayout

STAGING_BYTES = 16 << 20  # a staging buffer (at least one block): big enough for full-speed DMA


def _host_tensor(shape: tuple[int, ...], dtype: torch.dtype, pin: bool) -> tuple[torch.Tensor, object]:
    """A host tensor, pinned once at its exact size when asked (and CUDA is there)."""
    if pin and torch.cuda.is_available():
        try:
            from ..pinned import HostBuffer
        except ImportError:  # pragma: no cover - the pinned allocator ships with tiercache
            return torch.empty(shape, dtype=dtype, pin_memory=True), None
        buf = HostBuffer((shape, dtype), pin=True)
        return buf.tensor, buf
    t = torch.empty(shape, dtype=dtype)
    t.view(-1).view(torch.uint8)[::4096].zero_()  # fault the pages in now, not on the first store
    return t, None


def staging_pool(layout: KVLayout, count: int = 4, pin: bool = True) -> pinned.StagingPool:
    """The pool of pinned buffers device<->host copies go through (pinned only when CUDA is there)."""
    return pinned.StagingPool(max(STAGING_BYTES, layout.block_bytes), count=count, pin=pin)


class MemorySlab:
    """`staging`: the pinned pool its host<->device copies go through (shared with the other movers of
    the cache); without one, a pool of its own is made on the first such copy and closed with the slab."""

    def __init__(self, name: str, layout: KVLayout, num_slots: int, device: torch.device, pin: bool = False,
                 staging: pinned.StagingPool | None = None) -> None:
        self.name = name
        self._staging = staging
        self._own_staging: pinned.StagingPool | None = None
        self._staging_lock = threading.Lock()  # the pool is made once, whichever thread copies first
        self.layout = layout
        self.num_slots = num_slots
        self.device = device
        shape = (num_slots, *layout.block_shape)
        if device.type == "cpu":
            self.tensor, self._owner = _host_tensor(shape, layout.dtype, pin)
        else:
            self.tensor, self._owner = torch.empty(shape, dtype=layout.dtype, device=device), None
        # [L, planes, slots, B, H, D]: the token axis of a prefix is (slot, B) in this view
        self._by_layer = self.tensor.permute(1, 2, 0, 3, 4, 5)
        # CUDA slab: the event after each stream's latest read. A read is enqueued, not done, when its plan
        # releases the slots; a write from another stream waits for these first (never overwrite a slot a
        # queued read of another stream has yet to copy).
        self._reads: dict[int, torch.cuda.Event] = {}
        self._reads_lock = threading.Lock()
        self._rows: np.ndarray | None = None  # row_bytes' view

    @property
    def pinned(self) -> bool:
        return self.device.type == "cpu" and self.tensor.is_pinned()

    @property
    def staging(self) -> pinned.StagingPool:
        with self._staging_lock:
            if self._staging is None:
                self._own_staging = self._staging = staging_pool(self.layout)
            return self._staging

    def view(self, slot: int) -> torch.Tensor:
        return self.tensor[slot]

    def row_bytes(self, slot: int) -> np.ndarray:
        """A host slot's bytes as a uint8 numpy row (one view of the whole slab, made once)."""
        rows = self._rows
        if rows is None:
            if self.device.type != "cpu":
                raise ValueError(f"row_bytes: the {self.name} slab is on {self.device}, not in host memory")
            rows = self._rows = self.tensor.view(self.num_slots, -1).view(torch.uint8).numpy()
        return rows[slot]

    def note_read(self) -> None:
        """After enqueueing a read of this (CUDA) slab on the current stream: later writes from other streams
        are ordered after it."""
        if self.device.type != "cuda":
            return
        stream = torch.cuda.current_stream(self.device)
        ev = torch.cuda.Event()
        ev.record(stream)
        with self._reads_lock:
            self._reads[stream.cuda_stream] = ev

    def before_write(self) -> None:
        """Before enqueueing a write into this (CUDA) slab: the current stream waits for every other
        stream's latest read."""
        if self.device.type != "cuda":
            return
        stream = torch.cuda.current_stream(self.device)
        with self._reads_lock:
            pending = [ev for sid, ev in self._reads.items() if sid != stream.cuda_stream]
        for ev in pending:
            stream.wait_event(ev)

    def index(self, slots: list[int]) -> torch.Tensor:
        return torch.tensor(slots, dtype=torch.long, device=self.device)

    def gather(self, slots: list[int] | torch.Tensor, out6: torch.Tensor, layer: int | None = None) -> None:
        """out6[..., j, :, :, :] = block slots[j]; out6 is [L, planes, n, B, H, D] (or one layer's)."""
        src = self._by_layer if layer is None else self._by_layer[layer]
        dim = 2 if layer is None else 1
        idx = slots if isinstance(slots, torch.Tensor) else self.index(slots)
        if pinned.crosses(self.device, out6.device):
            if self.device.type == "cpu":  # host slab -> device: staged, async on the current stream
                pinned.host_to_device(self.staging, src, dim, idx, out6)
            else:  # device slab -> host: gathered on the device, then staged down
                pinned.device_to_host(self.staging, torch.index_select(src, dim, idx.to(self.device)), dim, out6)
        elif out6.device == self.device and out6.is_contiguous():
            torch.index_select(src, dim, idx, out=out6)
        else:
            out6.copy_(torch.index_select(src, dim, idx.to(self.device)), non_blocking=True)
        self.note_read()

    def scatter(self, slots: list[int], blocks6: torch.Tensor) -> None:
        """block slots[j] = blocks6[:, :, j]; blocks6 is [L, planes, n, B, H, D]."""
        self.before_write()
        if pinned.crosses(blocks6.device, self.device):
            idx = torch.tensor(slots, dtype=torch.long, device=self.device)
            if self.device.type == "cpu":  # returns once the bytes are in the slot (the host reads them next)
                pinned.device_to_host(self.staging, blocks6, 2, self._by_layer, pos=idx)
            else:
                pinned.host_to_device(self.staging, blocks6, 2, None, self._by_layer, pos=idx)
            return
        if blocks6.device != self.device:
            blocks6 = blocks6.to(self.device, non_blocking=True)
        runs = _runs(slots)
        if len(runs) <= max(1, len(slots) // 8) or self.layout.block_bytes >= (1 << 20):
            # one strided copy_ per run of consecutive slots: copy_ runs on every torch thread, index_copy_
            # on one (a 1 GiB store of 32 MiB blocks: 4.2 GB/s against 9.3 for two threads' memcpy)
            for pos, first, n in runs:
                self._by_layer.narrow(2, first, n).copy_(blocks6.narrow(2, pos, n), non_blocking=True)
        else:  # many short runs: one index tensor (made only here: on a GPU slab it is a host-to-device copy)
            self._by_layer.index_copy_(2, torch.tensor(slots, dtype=torch.long, device=self.device), blocks6)

    def close(self) -> None:
        owner, self._owner = self._owner, None
        pool, self._own_staging = self._own_staging, None
        if pool is not None:
            pool.close()
        if owner is not None:
            owner.close()


class StagingArea:
    """Host buffers for blocks on their way to a slow tier, by staging id (ids come from the core)."""

    def __init__(self, layout: KVLayout, keep: int = 64) -> None:
        self.layout = layout
        self._bufs: dict[int, tuple[torch.Tensor, np.ndarray]] = {}  # sid -> (buffer, its bytes as numpy)
        self._spare: list[tuple[torch.Tensor, np.ndarray]] = []
        self._keep = keep

    def _pair(self, sid: int) -> tuple[torch.Tensor, np.ndarray]:
        pair = self._bufs.get(sid)
        if pair is None:
            if self._spare:
                pair = self._spare.pop()
            else:
                buf = torch.empty(self.layout.block_shape, dtype=self.layout.dtype)
                pair = (buf, buf.view(-1).view(torch.uint8).numpy())
            self._bufs[sid] = pair
        return pair

    def get(self, sid: int) -> torch.Tensor:
        return self._pair(sid)[0]

    def bytes(self, sid: int) -> np.ndarray:
        """The buffer of `sid` as uint8 numpy bytes (made with the buffer: no torch call per block)."""
        return self._pair(sid)[1]

    def release(self, sid: int) -> None:
        pair = self._bufs.pop(sid, None)
        if pair is not None and len(self._spare) < self._keep:
            self._spare.append(pair)

    def __len__(self) -> int:
        return len(self._bufs)


def _runs(slots: list[int]) -> list[tuple[int, int, int]]:
    """(position, first slot, length) of each run of consecutive ascending slots, in order."""
    out: list[tuple[int, int, int]] = []
    start = 0
    for j in range(1, len(slots) + 1):
        if j == len(slots) or slots[j] != slots[j - 1] + 1:
            out.append((start, slots[start], j - start))
            start = j
    return out
