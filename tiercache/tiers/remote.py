"""The remote tier: codec frames in a Redis-protocol server shared by many machines.

Always written through (sharing is its purpose), asynchronously: `put_async`
queues a private copy of the block and a background thread encodes and sends
it; a full queue drops and counts. Every failure of the server (refused,
timed out, gone) becomes a miss or a dropped write, is counted and logged
once, and opens a short back-off during which the tier is skipped, so a dead
Redis costs a request nothing but the local tiers.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Any

import torch

from ..errors import OnceLogger
from ..keys import BlockKey

_PREFIX = b"tiercache:v1:"
_BACKOFF_S = 5.0


class RemoteTier:
    def __init__(self, url: str, log: OnceLogger, codec: Any = None, recorder: Any = None,
                 timeout_s: float = 0.5, max_queue: int = 256, ttl_s: int | None = None) -> None:
        try:
            import redis
        except ImportError as e:  # pragma: no cover - depends on the extra
            raise ImportError("remote_url: the remote tier needs the 'redis' package "
                              "(pip install 'tiercache[redis]')") from e
        self._redis_errors = (redis.RedisError, OSError)
        self.client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        self.url = url
        self.codec = codec
        self.recorder = recorder
        self._log = log
        self._ttl = ttl_s
        self._down_until = 0.0
        self._q: queue.Queue = queue.Queue(maxsize=max_queue)
        self._thread = threading.Thread(target=self._run, name="tiercache-remote-writer", daemon=True)
        self._thread.start()

    # -- health ----------------------------------------------------------------------------
    def _available(self) -> bool:
        return time.monotonic() >= self._down_until

    def _failed(self, op: str, err: BaseException) -> None:
        self._down_until = time.monotonic() + _BACKOFF_S
        if self.recorder is not None:
            self.recorder.error("remote", op)
        self._log.warning("remote-" + op, "tiercache: remote tier %s failed (%s); serving from local tiers",
                          op, err)

    # -- reads -----------------------------------------------------------------------------
    def count_prefix(self, keys: list[BlockKey]) -> int:
        if not keys or not self._available():
            return 0
        try:
            pipe = self.client.pipeline(transaction=False)
            for k in keys:
                pipe.exists(_PREFIX + k)
            found = pipe.execute()
        except self._redis_errors as e:
            self._failed("lookup", e)
            return 0
        n = 0
        for f in found:
            if not f:
                break
            n += 1
        return n

    def get_many(self, keys: list[BlockKey], recorder: Any = None) -> list[bytes | None]:
        if not keys or not self._available():
            return [None] * len(keys)
        try:
            return self.client.mget([_PREFIX + k for k in keys])
        except self._redis_errors as e:
            self._failed("load", e)
            return [None] * len(keys)

    def delete(self, key: BlockKey) -> None:
        try:
            self.client.delete(_PREFIX + key)
        except self._redis_errors as e:
            self._failed("delete", e)

    # -- writes ----------------------------------------------------------------------------
    def put_async(self, key: BlockKey, block: torch.Tensor) -> bool:
        """Queue a block (copied now, so the caller may reuse its tensor) for the server."""
        if not self._available():
            if self.recorder is not None:
                self.recorder.dropped_write("remote")
            return False
        copy = block.detach().to("cpu", copy=True).contiguous()
        try:
            self._q.put_nowait((key, copy))
            return True
        except queue.Full:
            if self.recorder is not None:
                self.recorder.dropped_write("remote")
            return False

    def _run(self) -> None:
        while True:
            item = self._q.get()
            if item is None:
                return
            if isinstance(item, threading.Event):
                item.set()
                continue
            key, block = item
            if not self._available():
                if self.recorder is not None:
                    self.recorder.dropped_write("remote")
                continue
            t0 = time.perf_counter()
            try:
                frame = self.codec.encode(block.reshape(-1).view(torch.uint8).numpy(), key)
                # NX: never replace a stored frame with different bytes
                self.client.set(_PREFIX + key, frame, nx=True, ex=self._ttl)
            except self._redis_errors as e:
                self._failed("store", e)
                if self.recorder is not None:
                    self.recorder.dropped_write("remote")
                continue
            if self.recorder is not None:
                self.recorder.stored("remote", block.numel() * block.element_size(), time.perf_counter() - t0)

    def flush(self) -> None:
        done = threading.Event()
        self._q.put(done)
        done.wait()

    def close(self) -> None:
        self.flush()
        self._q.put(None)
        self._thread.join()
        try:
            self.client.close()
        except self._redis_errors:
            pass
