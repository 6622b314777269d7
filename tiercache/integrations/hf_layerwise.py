"""Layer-wise loading for transformers: a `DynamicCache` whose cached prefix arrives one layer at a time.

Protocol. The wrapper asks the store for a `LayerLoad` (`TierCache.load_layers`);
a background worker brings the prefix's layers up (disk -> decompress -> host ->
device) in layer order. The model's forward then runs as usual: the cache reports
the prefix length up front (`get_seq_length`, used for positions and masks), and
layer i's `update` is the first moment layer i's prefix KV is needed, so only that
call waits (`LayerLoad.wait_layer(i)`) while the worker keeps loading layers
i+1... Compute on layer i overlaps the load of the layers after it.

Time spent blocked in `wait_layer` is compute stalled on KV: `LayerLoad` reports
it to `tiercache_prefetch_wait_seconds`; this module also sums it per request (from the
load's own figures when it has them: CUDA events on a GPU, where host time reads ~0).

A layer held in host memory for a model on a GPU (a TierCache on the CPU) goes up in one
asynchronous copy from pinned memory (both planes at once), never a synchronous copy from
pageable memory per plane.
"""

from __future__ import annotations

import time
from typing import Any, Protocol

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer


class LayerSource(Protocol):
    """What `TierCache.load_layers` returns (`tiercache.layerwise.LayerLoad`; the core owns it)."""

    num_tokens: int

    def wait_layer(self, layer: int) -> torch.Tensor: ...  # [planes, num_tokens, H, D] on the cache's device


class LayerWaits:
    """Times each `wait_layer` call: the stall a request saw, per layer, in the order the model asked.

    A load that measures its own stalls (`stalls()`, `tiercache.layerwise.LayerLoad`: CUDA events on a
    GPU) is believed over host time, which misses a wait the device does."""

    def __init__(self, load: LayerSource) -> None:
        self.load = load
        self._host: dict[int, float] = {}
        self._order: list[int] = []

    def wait(self, layer: int) -> torch.Tensor:
        t0 = time.perf_counter()
        kv = self.load.wait_layer(layer)
        self._host[layer] = self._host.get(layer, 0.0) + time.perf_counter() - t0
        self._order.append(layer)
        return kv

    @property
    def per_layer(self) -> dict[int, float]:
        own = getattr(self.load, "stalls", None)
        return own() if callable(own) else dict(self._host)

    @property
    def seconds(self) -> float:
        return sum(self.per_layer.values())

    @property
    def order(self) -> list[int]:
        return list(dict.fromkeys(self._order))


def _to_device(kv: torch.Tensor, device: torch.device) -> torch.Tensor:
    """One layer's [planes, n, H, D] on `device`. Host -> GPU: through pinned memory, one async copy on the
    current stream (the pinned copy comes from the caching host allocator, which keeps it from reuse
    until the copy has run)."""
    if kv.device == device or not (kv.device.type == "cpu" and device.type == "cuda"):
        return kv.to(device)
    if not kv.is_pinned():
        kv = kv.pin_memory()
    return kv.to(device, non_blocking=True)


class PrefixLayer(DynamicLayer):
    """A full-attention `DynamicLayer` whose first `num_tokens` positions come from a `LayerLoad`.

    Until the model first touches the layer it holds no tensors, yet reports `num_tokens` as
    its length so positions and masks are right. `update` (and anything else that reads the
    tensors) first waits for this layer's KV, then behaves exactly like `DynamicLayer`.
    """

    def __init__(self, waits: LayerWaits, layer_idx: int, num_tokens: int, batch: int, device: torch.device) -> None:
        super().__init__()
        self._waits = waits
        self._layer_idx = layer_idx
        self._pending = num_tokens
        self._batch = batch
        self._device = device

    def _materialize(self) -> None:
        if not self._pending:
            return
        n, self._pending = self._pending, 0
        kv = _to_device(self._waits.wait(self._layer_idx)[:, :n], self._device)
        # block layout [planes, tokens, H, D] -> HF layout [batch, H, tokens, D]
        k = kv[0].permute(1, 0, 2).unsqueeze(0)
        v = kv[1].permute(1, 0, 2).unsqueeze(0)
        if self._batch > 1:
            k, v = k.expand(self._batch, -1, -1, -1), v.expand(self._batch, -1, -1, -1)
        super().update(k, v)  # copies into the layer's own storage; the block buffer can be reused

    @property
    def pending_tokens(self) -> int:
        return self._pending

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        self._materialize()
        return super().update(key_states, value_states, *args, **kwargs)

    def get_seq_length(self) -> int:
        return self._pending or super().get_seq_length()

    def crop(self, tokens_to_remove: int) -> None:
        self._materialize()
        super().crop(tokens_to_remove)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._materialize()
        super().reorder_cache(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._materialize()
        super().batch_repeat_interleave(repeats)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._materialize()
        super().batch_select_indices(indices)

    def offload(self) -> None:
        self._materialize()
        super().offload()

    def prefetch(self) -> None:
        self._materialize()
        super().prefetch()

    def reset(self) -> None:
        self._pending = 0
        super().reset()


class LayerwisePrefixCache(DynamicCache):
    """`DynamicCache(config=...)` whose full-attention layers fill themselves from a `LayerLoad` on first use."""

    def __init__(self, config: Any, load: LayerSource, num_tokens: int, *, batch: int = 1,
                 device: torch.device | str = "cpu") -> None:
        super().__init__(config=config)
        if not 0 <= num_tokens <= load.num_tokens:
            raise ValueError(f"num_tokens: expected 0..{load.num_tokens} (the tokens being loaded), got {num_tokens}")
        self.waits = LayerWaits(load)
        device = torch.device(device)
        for i, layer in enumerate(self.layers):
            if type(layer) is not DynamicLayer:
                raise ValueError(f"config: layer {i} is a {type(layer).__name__}; layer-wise loading needs "
                                 "full-attention layers (DynamicLayer) only")
            self.layers[i] = PrefixLayer(self.waits, i, num_tokens, batch, device)

    @property
    def kv_wait_seconds(self) -> float:
        """Seconds the forward pass spent blocked on this cache's prefix KV."""
        return self.waits.seconds

    def materialize(self) -> None:
        """Wait for every layer still pending (e.g. before reading the tensors outside a forward pass)."""
        for layer in self.layers:
            if isinstance(layer, PrefixLayer):
                layer._materialize()
