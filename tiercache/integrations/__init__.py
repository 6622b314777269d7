"""Adapters between serving frameworks and TierCache (token ids + KV tensors in, nothing else).

`hf`: transformers `generate` with prefix reuse (`TierCachedLM`, `layout_for_model`).
`hf_layerwise`: a `DynamicCache` filled layer by layer while the forward runs.
Names are imported lazily so `import tiercache` never pulls in transformers.
"""

from __future__ import annotations

from typing import Any

_LAZY = {
    "TierCachedLM": "hf",
    "layout_for_model": "hf",
    "FirstTokenClock": "hf",
    "LayerwisePrefixCache": "hf_layerwise",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
