"""The KV shape of a model, read from a transformers `config.json` (or given as numbers).

KV bytes per token = layers x planes x kv_heads x head_dim x dtype bytes, where
planes = 2 (K and V) for ordinary attention and 1 for an MLA latent (DeepSeek-V2/V3,
whose one plane is kv_lora_rank + qk_rope_head_dim wide). Config keys are read as
the common architectures spell them: Llama / Qwen2 / Mistral (`num_hidden_layers`,
`num_attention_heads`, `num_key_value_heads`, `hidden_size`, `head_dim`,
`max_position_embeddings`) and GPT-2 (`n_layer`, `n_head`, `n_embd`, `n_positions`).
Multimodal configs are read through their `text_config`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

DTYPE_BYTES = {"float32": 4, "float": 4, "fp32": 4, "float16": 2, "fp16": 2, "half": 2, "bfloat16": 2, "bf16": 2,
               "float8_e4m3fn": 1, "float8_e5m2": 1, "fp8": 1, "int8": 1, "uint8": 1}


@dataclass(frozen=True)
class ModelShape:
    """What sizing needs to know about a model's KV cache."""

    name: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str = "bfloat16"
    planes: int = 2
    max_seq_len: int | None = None
    sliding_window: int | None = None  # set when the config declares sliding-window attention

    def __post_init__(self) -> None:
        for field in ("num_layers", "num_kv_heads", "head_dim"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{field}: expected a positive int, got {value!r}")
        if self.planes not in (1, 2):
            raise ValueError(f"planes: expected 1 (MLA latent) or 2 (K and V), got {self.planes!r}")
        if self.dtype not in DTYPE_BYTES:
            raise ValueError(f"dtype: expected one of {sorted(DTYPE_BYTES)}, got {self.dtype!r}")
        if self.max_seq_len is not None and (isinstance(self.max_seq_len, bool)
                                             or not isinstance(self.max_seq_len, int) or self.max_seq_len <= 0):
            raise ValueError(f"max_seq_len: expected a positive int or None, got {self.max_seq_len!r}")

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def bytes_per_token(self) -> int:
        return self.num_layers * self.planes * self.num_kv_heads * self.head_dim * self.dtype_bytes

    def block_bytes(self, block_size: int) -> int:
        return self.bytes_per_token * block_size

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "num_layers": self.num_layers, "num_kv_heads": self.num_kv_heads,
                "head_dim": self.head_dim, "dtype": self.dtype, "planes": self.planes,
                "max_seq_len": self.max_seq_len, "sliding_window": self.sliding_window,
                "kv_bytes_per_token": self.bytes_per_token}


def _first(cfg: dict, *names: str) -> Any:
    for name in names:
        if cfg.get(name) is not None:
            return cfg[name]
    return None


def _int_field(cfg: dict, source: str, *names: str, required: bool = True) -> int | None:
    value = _first(cfg, *names)
    if value is None:
        if required:
            raise ValueError(f"{source}: needs {' or '.join(names)} (an int), found none of them")
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{source}: {names[0]} must be a positive int, got {value!r}")
    return value


def shape_from_config(cfg: dict, name: str = "model", dtype: str | None = None, source: str = "config") -> ModelShape:
    """A ModelShape from a config dict as found in `config.json`; `dtype` overrides the config's own."""
    if not isinstance(cfg, dict):
        raise ValueError(f"{source}: expected a JSON object, got {type(cfg).__name__}")
    if isinstance(cfg.get("text_config"), dict):  # multimodal: the language model's part
        cfg = {**cfg, **cfg["text_config"]}
    layers = _int_field(cfg, source, "num_hidden_layers", "n_layer", "num_layers")
    heads = _int_field(cfg, source, "num_attention_heads", "n_head", "num_heads")
    max_len = _int_field(cfg, source, "max_position_embeddings", "n_positions", "max_seq_len",
                         "seq_length", required=False)
    window = cfg.get("sliding_window") if cfg.get("use_sliding_window", True) else None
    window = window if isinstance(window, int) and not isinstance(window, bool) and window > 0 else None
    want = dtype or _first(cfg, "torch_dtype", "dtype") or "bfloat16"
    want = str(want).removeprefix("torch.")
    if want not in DTYPE_BYTES:
        raise ValueError(f"{source}: dtype {want!r} is not one of {sorted(DTYPE_BYTES)}; pass --dtype")
    if cfg.get("kv_lora_rank"):  # MLA: one latent plane per token and layer
        rank = _int_field(cfg, source, "kv_lora_rank")
        rope = _int_field(cfg, source, "qk_rope_head_dim")
        return ModelShape(name, layers, 1, rank + rope, want, planes=1, max_seq_len=max_len)
    kv_heads = _int_field(cfg, source, "num_key_value_heads", "num_kv_heads", required=False) or heads
    head_dim = _int_field(cfg, source, "head_dim", required=False)
    if head_dim is None:
        hidden = _int_field(cfg, source, "hidden_size", "n_embd", "d_model")
        if hidden % heads:
            raise ValueError(f"{source}: hidden_size {hidden} is not a multiple of num_attention_heads {heads}; "
                             "the config needs head_dim")
        head_dim = hidden // heads
    return ModelShape(name, layers, kv_heads, head_dim, want, planes=2, max_seq_len=max_len, sliding_window=window)


def load_model_shape(path: str, dtype: str | None = None) -> ModelShape:
    """Read a `config.json` file, or the `config.json` of a transformers model directory."""
    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        where = f"{path} has no config.json" if os.path.isdir(path) else f"{path} does not exist"
        raise ValueError(f"--model: expected a config.json or a model directory holding one; {where}")
    try:
        with open(file) as f:
            cfg = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"--model: {file} is not valid JSON ({e})") from None
    name = os.path.basename(os.path.dirname(os.path.abspath(file))) or "model"
    if isinstance(cfg, dict) and cfg.get("_name_or_path"):
        name = str(cfg["_name_or_path"]).rstrip("/").split("/")[-1] or name
    return shape_from_config(cfg, name=name, dtype=dtype, source=file)
