"""transformers integration: `generate` that reuses cached prefix KV from a TierCache.

Per call (`TierCachedLM.generate`, batch size 1):
1. `lookup` the prompt: the longest cached prefix, n tokens (a multiple of the block size).
2. Fill a `DynamicCache` with that prefix: all at once (`TierCache.load`), or layer by
   layer while the forward runs (`TierCache.load_layers`, see `hf_layerwise.py`).
3. `model.generate` with that cache: transformers prefills only the tokens after it.
   A fully cached prompt still prefills its last token, so there are logits.
4. `store` the prompt's full blocks (the prompt's KV only, never generated tokens:
   those are sampled, so another request rarely shares them).

HF keeps KV per layer as [batch, kv_heads, seq, head_dim]; a block is
[layers, planes, tokens, kv_heads, head_dim] (planes 0 = K, 1 = V).

Cost note: with a non-empty cache, transformers' SDPA path attends with an explicit
mask (query length != key length), which on CPU cannot skip the masked half. A
short cached prefix before a long uncached remainder can therefore prefill slower
than no reuse at all (measured: 512 cached + 3000 new tokens 0.50 s vs 0.35 s cold
for 3512 tokens); long cached prefixes, the RAG case, win by 4-10x.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from transformers import LogitsProcessor, LogitsProcessorList
from transformers.cache_utils import DynamicCache, DynamicLayer

from ..config import KVLayout
from ..layerwise import KVUnavailable
from .hf_layerwise import LayerwisePrefixCache

_UNSUPPORTED_KWARGS = ("cache", "past_key_values", "cache_params", "inputs_embeds", "cache_implementation",
                       "prefill_chunk_size")


def _generate_cache_kwarg() -> str:
    """The keyword `model.generate` takes a prebuilt KV cache under, in the installed transformers.

    transformers 5.x renamed `past_key_values` to `cache` (the old name still works until 6.0 but
    warns on every call); older releases only know `past_key_values`. The generation module lists
    the names it accepts in `ALL_CACHE_NAMES` from the release that introduced `cache`.
    """
    from transformers.generation import utils as generation_utils

    return "cache" if "cache" in getattr(generation_utils, "ALL_CACHE_NAMES", ()) else "past_key_values"


CACHE_KWARG = _generate_cache_kwarg()


def cache_kwargs(cache: Any) -> dict[str, Any]:
    """`generate` kwargs that hand it `cache` (a transformers Cache) under the installed release's name."""
    return {CACHE_KWARG: cache}


def _text_config(model: Any) -> Any:
    config = getattr(model, "config", None)
    if config is None:
        raise TypeError(f"model: expected a transformers PreTrainedModel with a .config, got {type(model).__name__}")
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def layout_for_model(model: Any, block_size: int = 16, dtype: Any = None) -> KVLayout:
    """KVLayout of a decoder-only transformers model: layers, KV heads, head dim and dtype from its config."""
    cfg = _text_config(model)
    num_layers = getattr(cfg, "num_hidden_layers", None)
    heads = getattr(cfg, "num_attention_heads", None)
    if not isinstance(num_layers, int) or not isinstance(heads, int):
        raise ValueError("model: config needs integer num_hidden_layers and num_attention_heads, got "
                         f"{num_layers!r} and {heads!r}")
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None)
    if not head_dim:
        hidden = getattr(cfg, "hidden_size", None)
        if not isinstance(hidden, int) or hidden % heads:
            raise ValueError(f"model: cannot derive head_dim: hidden_size {hidden!r} is not a multiple of "
                             f"num_attention_heads {heads}")
        head_dim = hidden // heads
    if dtype is None:
        dtype = getattr(model, "dtype", None) or torch.float32
    return KVLayout(num_layers=num_layers, num_kv_heads=kv_heads, head_dim=head_dim, dtype=dtype,
                    block_size=block_size, planes=2)


class FirstTokenClock(LogitsProcessor):
    """Records when the first next-token logits exist (prefill done); returns the scores untouched."""

    def __init__(self, start: float | None = None) -> None:
        self.start = time.perf_counter() if start is None else start
        self.first: float | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.first is None:
            self.first = time.perf_counter()
        return scores

    @property
    def seconds(self) -> float | None:
        """Seconds from `start` to the first logits, or None if generation never reached them."""
        return None if self.first is None else self.first - self.start


def with_clock(kwargs: dict[str, Any], clock: FirstTokenClock) -> dict[str, Any]:
    """`generate` kwargs with `clock` appended to any user logits processors."""
    kwargs = dict(kwargs)
    kwargs["logits_processor"] = LogitsProcessorList([*(kwargs.get("logits_processor") or []), clock])
    return kwargs


def _prompt_ids(input_ids: Any) -> torch.Tensor:
    """The prompt as a [1, T] LongTensor; accepts [1, T] / [T] tensors or a list of ints."""
    if isinstance(input_ids, torch.Tensor):
        ids = input_ids
    elif isinstance(input_ids, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool)
                                                      for t in input_ids):
        ids = torch.tensor(input_ids, dtype=torch.long)
    else:
        raise TypeError(f"input_ids: expected a LongTensor [1, T] or a list of ints, got {type(input_ids).__name__}")
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise TypeError(f"input_ids: expected an integer tensor, got dtype {ids.dtype}")
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    if ids.dim() != 2:
        raise ValueError(f"input_ids: expected shape [1, T], got {tuple(ids.shape)}")
    if ids.shape[0] != 1:
        raise ValueError(f"input_ids: batch size 1 required (one prompt per call), got shape {tuple(ids.shape)}")
    if ids.shape[1] == 0:
        raise ValueError("input_ids: expected at least one token, got an empty prompt")
    return ids


class TierCachedLM:
    """`model.generate` that serves the prompt's cached prefix from `cache` and stores the prompt's new blocks.

    One prompt per call (batch size 1, no padding): the cached prefix is looked up per prompt, and
    a batch of prompts would share one KV cache object in `generate`. Beam search and
    `num_return_sequences` work (the prefix is expanded to the beams). Decoder-only models whose
    every layer is full attention (Llama, Qwen2, Mistral, GPT-2 style); sliding-window and hybrid
    caches are refused with a ValueError.

    `layerwise` (default: on for a model on a CUDA device) overlaps loading layer i+1.. with
    computing layer i; otherwise the whole prefix is loaded before the forward pass.
    `store=False` only reads the cache. `salt` isolates tenants (passed to every cache call).

    After each call: `last_reused_tokens` (prompt tokens whose KV came from the cache and was
    used), `last_reused_by_tier` (cached prefix tokens by the tier that held them, as `lookup`
    counts them; it sums to `last_loaded_tokens`, which exceeds `last_reused_tokens` by one
    when the whole prompt was cached and its last token was recomputed for logits),
    `last_kv_wait_seconds` and `last_layer_waits` (compute stalled on KV, in total and per layer in
    the order the forward asked, layer-wise mode), `last_ttft_seconds`
    (call start to first logits, lookup and load included) and `last_timings`.
    """

    def __init__(self, model: Any, cache: Any, *, layerwise: bool | None = None, store: bool = True,
                 salt: str | bytes | None = None) -> None:
        if not all(hasattr(cache, name) for name in ("layout", "lookup", "lookup_by_tier", "load", "store")):
            raise TypeError(f"cache: expected a TierCache, got {type(cache).__name__}")
        if salt is not None and not isinstance(salt, (str, bytes)):
            raise TypeError(f"salt: expected None, str or bytes, got {type(salt).__name__}")
        self.model = model
        self.cache = cache
        self.store_prompts = bool(store)
        self.salt = salt
        self._config = _text_config(model)
        layout = cache.layout
        expected = layout_for_model(model, block_size=layout.block_size)
        for name in ("num_layers", "num_kv_heads", "head_dim", "dtype", "planes"):
            if getattr(layout, name) != getattr(expected, name):
                raise ValueError(f"cache: layout.{name} is {getattr(layout, name)!r} but the model needs "
                                 f"{getattr(expected, name)!r} (build it with layout_for_model(model))")
        self.layout = layout
        probe = DynamicCache(config=self._config)
        bad = [f"{i}:{type(layer).__name__}" for i, layer in enumerate(probe.layers) if type(layer) is not DynamicLayer]
        if len(probe.layers) != layout.num_layers or bad:
            raise ValueError("model: prefix reuse needs a full-attention KV cache in every layer "
                             f"(DynamicLayer x {layout.num_layers}); got {bad or len(probe.layers)}")
        if layerwise is None:
            # Layer-wise loading overlaps copies on a CUDA stream with compute. On a CPU the loader
            # thread competes with the forward for the same cores: whole-prefix loading measured
            # 43 ms against 55 ms TTFT from the host tier (bench e2e, 2-core VM), so it is the default.
            layerwise = hasattr(cache, "load_layers") and torch.device(getattr(model, "device", "cpu")).type == "cuda"
        self.layerwise = bool(layerwise)
        self.last_reused_tokens = 0
        self.last_loaded_tokens = 0
        self.last_reused_by_tier: dict[str, int] = {}
        self.last_kv_wait_seconds = 0.0
        self.last_layer_waits: dict[int, float] = {}
        self.last_ttft_seconds: float | None = None
        self.last_stored_tokens = 0
        self.last_timings: dict[str, float] = {}

    def _salted(self) -> dict[str, Any]:
        return {} if self.salt is None else {"salt": self.salt}

    def _expand_size(self, kwargs: dict[str, Any]) -> int:
        gc = kwargs.get("generation_config") or getattr(self.model, "generation_config", None)
        beams = kwargs.get("num_beams", getattr(gc, "num_beams", 1)) or 1
        seqs = kwargs.get("num_return_sequences", getattr(gc, "num_return_sequences", 1)) or 1
        return max(int(beams), int(seqs))

    def _prefix_cache(self, tokens: torch.Tensor, batch: int) -> tuple[DynamicCache, int, int]:
        """A cache holding the longest usable cached prefix: (cache, tokens it will hold, tokens loaded)."""
        salt = self._salted()
        self.last_reused_by_tier = dict(self.cache.lookup_by_tier(tokens, **salt))
        n = self.cache.lookup(tokens, **salt)
        device = self.model.device
        if n == 0:
            return DynamicCache(config=self._config), 0, 0
        usable = min(n, len(tokens) - 1)  # the last prompt token is always recomputed: it makes the logits
        if self.layerwise:
            load = self.cache.load_layers(tokens[:n], num_tokens=n, **salt)
            loaded = int(load.num_tokens)
            usable = min(usable, loaded)
            return LayerwisePrefixCache(self._config, load, usable, batch=batch, device=device), usable, loaded
        kv = self.cache.load(tokens[:n], **salt)
        loaded = int(kv.shape[2])
        usable = min(usable, loaded)
        pkv = DynamicCache(config=self._config)
        for i, layer in enumerate(pkv.layers):
            k = kv[i, 0, :usable].to(device).permute(1, 0, 2).unsqueeze(0)  # [tokens, H, D] -> [1, H, tokens, D]
            v = kv[i, 1, :usable].to(device).permute(1, 0, 2).unsqueeze(0)
            if batch > 1:
                k, v = k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1)
            layer.update(k, v)
        return pkv, usable, loaded

    def prompt_kv(self, past_key_values: DynamicCache, num_tokens: int) -> torch.Tensor:
        """The first `num_tokens` positions of batch row 0 as one block tensor [L, 2, num_tokens, H, D]."""
        lay = self.layout
        first = past_key_values.layers[0].keys
        kv = torch.empty(lay.kv_shape(num_tokens), dtype=lay.dtype, device=first.device)
        for i, layer in enumerate(past_key_values.layers):
            keys, values = layer.keys, layer.values
            if keys is None or keys.shape[1:] != (lay.num_kv_heads, keys.shape[2], lay.head_dim) \
                    or values.shape != keys.shape or keys.shape[2] < num_tokens:
                raise ValueError(f"model: layer {i} KV has shape {None if keys is None else tuple(keys.shape)}, "
                                 f"expected [batch, {lay.num_kv_heads}, >={num_tokens}, {lay.head_dim}] for both "
                                 "K and V; this architecture's cache is not supported")
            kv[i, 0].copy_(keys[0, :, :num_tokens].transpose(0, 1))
            kv[i, 1].copy_(values[0, :, :num_tokens].transpose(0, 1))
        return kv

    def generate(self, input_ids: Any, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> Any:
        """Same arguments and result as `model.generate` (batch size 1, no padding)."""
        t0 = time.perf_counter()
        ids = _prompt_ids(input_ids)
        for name in _UNSUPPORTED_KWARGS:
            if kwargs.get(name) is not None:
                raise ValueError(f"{name}: not supported by TierCachedLM.generate (it builds the KV cache itself)")
        if kwargs.get("use_cache") is False:
            raise ValueError("use_cache: TierCachedLM.generate needs use_cache=True (it reuses and stores KV)")
        if attention_mask is not None:
            if tuple(attention_mask.shape) != tuple(ids.shape) or not bool((attention_mask == 1).all()):
                raise ValueError(f"attention_mask: expected all ones of shape {tuple(ids.shape)} (no padding), "
                                 f"got shape {tuple(attention_mask.shape)}")
        else:
            attention_mask = torch.ones_like(ids)
        tokens = ids[0].cpu()
        batch = self._expand_size(kwargs)
        self.last_kv_wait_seconds = 0.0
        self.last_layer_waits = {}
        pkv, usable, loaded = self._prefix_cache(tokens, batch)
        t_loaded = time.perf_counter()
        self.last_reused_tokens, self.last_loaded_tokens = usable, loaded
        clock = FirstTokenClock(start=t0)
        model_ids, model_mask = ids.to(self.model.device), attention_mask.to(self.model.device)
        try:
            out = self.model.generate(model_ids, attention_mask=model_mask, **cache_kwargs(pkv),
                                      **with_clock(kwargs, clock))
        except KVUnavailable:
            # a block went corrupt or vanished mid-load: recompute the whole prompt (prefill samples nothing,
            # so a retry consumes the same random numbers)
            if not isinstance(pkv, LayerwisePrefixCache):
                raise
            self.last_kv_wait_seconds = pkv.kv_wait_seconds
            pkv, self.last_reused_tokens, loaded = DynamicCache(config=self._config), 0, 0
            self.last_loaded_tokens, self.last_reused_by_tier = 0, {}
            out = self.model.generate(model_ids, attention_mask=model_mask, **cache_kwargs(pkv),
                                      **with_clock(kwargs, clock))
        t_generated = time.perf_counter()
        self.last_ttft_seconds = clock.seconds
        if isinstance(pkv, LayerwisePrefixCache):
            pkv.materialize()
            self.last_kv_wait_seconds = pkv.kv_wait_seconds
            self.last_layer_waits = dict(pkv.waits.per_layer)
        self.last_stored_tokens = 0
        full = (len(tokens) // self.layout.block_size) * self.layout.block_size
        if self.store_prompts and full > loaded:
            self.last_stored_tokens = int(self.cache.store(tokens[:full], self.prompt_kv(pkv, full),
                                                           **self._salted()))
        t_end = time.perf_counter()
        self.last_timings = {"prepare_s": t_loaded - t0, "generate_s": t_generated - t_loaded,
                             "store_s": t_end - t_generated, "total_s": t_end - t0}
        return out

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.generate(*args, **kwargs)
