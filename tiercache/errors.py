"""Exceptions, and logging a storage fault once instead of once per block."""

from __future__ import annotations

import logging
import threading

logger = logging.getLogger("tiercache")


class TierCacheError(Exception):
    """Base class of tiercache's own errors."""


class CorruptFrame(TierCacheError):
    """A stored frame failed validation; callers turn it into a miss."""


class LayoutMismatch(TierCacheError, ValueError):
    """A store was opened with a KV layout other than the one it holds."""


class ClosedError(TierCacheError, RuntimeError):
    """The cache was used after close()."""


class OnceLogger:
    """Logs each kind of fault the first time it happens; later ones are only counted."""

    def __init__(self) -> None:
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def warning(self, kind: str, msg: str, *args: object) -> None:
        with self._lock:
            if kind in self._seen:
                return
            self._seen.add(kind)
        logger.warning(msg + " (further %s faults are counted, not logged)", *args, kind)
