"""tiercache: tiered KV-cache offload for LLM inference.

    from tiercache import TierCache, CacheConfig, KVLayout
"""

from .config import CacheConfig, KVLayout, parse_size
from .errors import CorruptFrame, LayoutMismatch, TierCacheError
from .keys import BlockKey

__all__ = ["TierCache", "CacheConfig", "KVLayout", "BlockKey", "parse_size",
           "TierCacheError", "CorruptFrame", "LayoutMismatch", "__version__"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # The manager imports the tiers (lmdb, the transfer engine); load it on first use.
    if name == "TierCache":
        from .manager import TierCache
        return TierCache
    raise AttributeError(f"module 'tiercache' has no attribute {name!r}")
