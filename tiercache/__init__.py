"""tiercache: tiered KV-cache offload for LLM inference.

    from tiercache import TierCache, CacheConfig, KVLayout

Names are imported on first use, so `import tiercache.core` (the torch-free
decision layer) never imports torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.2.0"

_LAZY = {
    "TierCache": ".manager",
    "CacheConfig": ".config",
    "KVLayout": ".config",
    "parse_size": ".config",
    "BlockKey": ".keys",
    "TierCacheError": ".errors",
    "CorruptFrame": ".errors",
    "LayoutMismatch": ".errors",
}

__all__ = [*_LAZY, "__version__"]


def __getattr__(name: str) -> Any:
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'tiercache' has no attribute {name!r}")
    value = getattr(importlib.import_module(mod, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
