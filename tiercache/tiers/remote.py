"""The remote tier: codec frames in a Redis-protocol server shared by many machines.

URLs: `redis://[:password@]host:port/db`, `rediss://...` (TLS; certificate
options as query arguments, e.g. `?ssl_ca_certs=/path/ca.crt`), `unix://`,
and `redis+cluster://host:port` / `rediss+cluster://` for a Redis Cluster
(any node; the client discovers the others).

The synchronous batch calls (`exists_many`, `get_many`, `put_many`, `delete`)
never raise: every fault becomes a miss or a refused write, counted and
logged once. A server that does not answer (refused, timed out, gone) opens a
short exponential back-off (50 ms doubling to 1 s) during which the tier is
skipped; the first call after it is the probe, so hits resume within a second
of the server coming back. A server that answers with an error (a SET refused
under `maxmemory` with `noeviction`, say) is alive: the write is dropped and
counted, reads go on.

`put_async` / `flush` keep the older write-behind path (a private thread) for
callers that have not moved to a shared write-behind.
"""

from __future__ import annotations

import inspect
import queue
import threading
import time
from typing import Any

from ..errors import OnceLogger
from ..keys import BlockKey

_PREFIX = b"tiercache:v2:"  # v2: codec frames bound to their key
BACKOFF_FIRST_S = 0.05
BACKOFF_MAX_S = 1.0


def _make_client(url: str, timeout_s: float) -> Any:
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry
    # no retries, and no CLIENT SETINFO round trips on connect: a call costs about one timeout, not four
    opts: dict = dict(socket_timeout=timeout_s, socket_connect_timeout=timeout_s, retry=Retry(NoBackoff(), 0))
    if "driver_info" in inspect.signature(redis.Redis.__init__).parameters:
        opts["driver_info"] = None            # redis-py >= 7: None turns SETINFO off
    else:
        opts.update(lib_name=None, lib_version=None)
    if url.startswith(("redis+cluster://", "rediss+cluster://")):
        from redis.cluster import RedisCluster
        return RedisCluster.from_url(url.replace("+cluster", "", 1), **opts)
    return redis.Redis.from_url(url, **opts)


class RemoteTier:
    def __init__(self, url: str, log: OnceLogger, codec: Any = None, recorder: Any = None,
                 timeout_s: float = 0.5, max_queue: int = 256, ttl_s: int | None = None) -> None:
        try:
            import redis
        except ImportError as e:  # pragma: no cover - depends on the extra
            raise ImportError("remote_url: the remote tier needs the 'redis' package "
                              "(pip install 'tiercache[redis]')") from e
        self._errors = (redis.RedisError, OSError)
        self._answered = (redis.ResponseError,)  # the server is up and said no
        self.url = url
        self.cluster = "+cluster://" in url
        self.timeout_s = timeout_s
        self.codec = codec
        self.recorder = recorder
        self._log = log
        self._ttl = ttl_s
        self._client: Any = None
        self._client_lock = threading.Lock()
        self._down_until = 0.0
        self.outages = 0
        self._backoff = 0.0
        self._q: queue.Queue = queue.Queue(maxsize=max_queue)
        self._thread: threading.Thread | None = None
        self._closed = False

    # -- health ----------------------------------------------------------------------------
    @property
    def client(self) -> Any:
        """The redis client, made on first use (a cluster client connects when made)."""
        c = self._client
        if c is None:
            with self._client_lock:
                if self._client is None:
                    self._client = _make_client(self.url, self.timeout_s)
                c = self._client
        return c

    def available(self) -> bool:
        """False while a back-off after a failed call runs; the first call after it probes the server."""
        return time.monotonic() >= self._down_until

    _available = available  # older name

    def _ok(self) -> None:
        self._backoff = 0.0

    def _count(self, op: str) -> None:
        if self.recorder is not None:
            self.recorder.error("remote", op)

    def _failed(self, op: str, err: BaseException) -> None:
        if isinstance(err, self._answered):
            self._count(op)
            self._log.warning("remote-refused-" + op, "tiercache: the remote server refused a %s (%s); "
                              "that block is skipped, the tier stays on (for refused writes: raise maxmemory "
                              "or set a maxmemory-policy that evicts)", op, err)
            return
        self._backoff = min(max(self._backoff * 2, BACKOFF_FIRST_S), BACKOFF_MAX_S)
        self._down_until = time.monotonic() + self._backoff
        self.outages += 1  # the server may come back empty: what we knew it held is no longer sure
        if self.cluster and self._client is not None:
            self._client = None  # rediscover the nodes when the cluster is back
        self._count(op)
        self._log.warning("remote-" + op, "tiercache: remote tier %s failed at %s (%s); serving from local tiers "
                          "and retrying after a back-off of at most %.1f s (remote_timeout_s=%s per call)",
                          op, _redact(self.url), err, BACKOFF_MAX_S, self.timeout_s)

    def _pipeline(self) -> Any:
        return self.client.pipeline(transaction=False)

    # -- reads -----------------------------------------------------------------------------
    def exists_many(self, keys: list[BlockKey]) -> list[bool]:
        if not keys or not self.available():
            return [False] * len(keys)
        try:
            pipe = self._pipeline()
            for k in keys:
                pipe.exists(_PREFIX + k)
            found = pipe.execute(raise_on_error=False)
        except self._errors as e:
            self._failed("lookup", e)
            return [False] * len(keys)
        self._ok()
        bad = next((f for f in found if isinstance(f, Exception)), None)
        if bad is not None:
            self._failed("lookup", bad)
        return [bool(f) and not isinstance(f, Exception) for f in found]

    def count_prefix(self, keys: list[BlockKey]) -> int:
        n = 0
        for f in self.exists_many(keys):
            if not f:
                break
            n += 1
        return n

    def get_many(self, keys: list[BlockKey], recorder: Any = None) -> list[bytes | None]:
        if not keys or not self.available():
            return [None] * len(keys)
        names = [_PREFIX + k for k in keys]
        try:
            if self.cluster:
                pipe = self._pipeline()
                for n in names:
                    pipe.get(n)
                got = pipe.execute(raise_on_error=False)
            else:
                got = self.client.mget(names)
        except self._errors as e:
            self._failed("load", e)
            return [None] * len(keys)
        self._ok()
        out: list[bytes | None] = []
        for g in got:
            if isinstance(g, Exception):
                self._failed("load", g)
                g = None
            out.append(g if isinstance(g, bytes) else None)
        return out

    def delete(self, key: BlockKey) -> None:
        if not self.available():
            return
        try:
            self.client.delete(_PREFIX + key)
        except self._errors as e:
            self._failed("delete", e)

    # -- writes ----------------------------------------------------------------------------
    def put_many(self, items: list[tuple[BlockKey, bytes]]) -> list[bool]:
        """SET NX each frame in one pipeline; True only where the server took the write."""
        if not items or not self.available():
            return [False] * len(items)
        try:
            pipe = self._pipeline()
            for k, frame in items:
                # NX: never replace a stored frame with different bytes
                pipe.set(_PREFIX + k, frame, nx=True, ex=self._ttl)
            res = pipe.execute(raise_on_error=False)
        except self._errors as e:
            self._failed("store", e)
            return [False] * len(items)
        self._ok()
        bad = next((r for r in res if isinstance(r, Exception)), None)
        if bad is not None:
            self._failed("store", bad)
        return [r is True for r in res]

    def put_async(self, key: BlockKey, block: Any) -> bool:
        """Queue a block (copied now, so the caller may reuse its tensor) for the server."""
        if self._closed or not self.available():
            if self.recorder is not None:
                self.recorder.dropped_write("remote")
            return False
        if self._thread is None:
            with self._client_lock:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name="tiercache-remote-writer", daemon=True)
                    self._thread.start()
        copy = block.detach().to("cpu", copy=True).contiguous()
        try:
            self._q.put_nowait((key, copy))
            return True
        except queue.Full:
            if self.recorder is not None:
                self.recorder.dropped_write("remote")
            return False

    def _run(self) -> None:
        import torch
        while True:
            item = self._q.get()
            if item is None:
                return
            if isinstance(item, threading.Event):
                item.set()
                continue
            key, block = item
            t0 = time.perf_counter()
            ok = False
            if self.available():
                try:
                    frame = self.codec.encode(block.reshape(-1).view(torch.uint8).numpy(), key)
                except Exception as e:  # never let the writer die
                    self._log.warning("remote-encode", "tiercache: encoding a block for the remote tier failed: %r", e)
                else:
                    ok = self.put_many([(key, frame)])[0]
            if self.recorder is not None:
                if ok:
                    self.recorder.stored("remote", block.numel() * block.element_size(), time.perf_counter() - t0)
                else:
                    self.recorder.dropped_write("remote")

    def flush(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            return
        done = threading.Event()
        self._q.put(done)
        while not done.wait(0.5):
            if not self._thread.is_alive():
                return

    def close(self) -> None:
        if self._closed:
            return
        self.flush()
        self._closed = True
        if self._thread is not None:
            self._q.put(None)
            self._thread.join()
        c, self._client = self._client, None
        if c is not None:
            try:
                c.close()
            except self._errors:
                pass


def _redact(url: str) -> str:
    """The URL without its password."""
    if "@" not in url:
        return url
    scheme, rest = url.split("://", 1)
    return f"{scheme}://***@{rest.split('@', 1)[1]}"
