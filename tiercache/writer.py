"""Asynchronous writes to the disk tier: a bounded queue, a writer thread, parallel encoding.

`offer()` never blocks the caller on disk I/O: it enqueues, or, when the queue
is full, drops the write and counts it (a cache may forget; it must not
stall). The writer thread takes what is queued in batches, encodes the blocks
on the I/O pool (zstd releases the GIL), and commits each batch in a single
LMDB write transaction. Every queued item carries a `release` callback, run
once the item is written or dropped, which unpins the memory it was read from.
`flush()` waits until everything queued before it is on disk.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import lmdb
import torch

from .codec import BlockCodec
from .errors import OnceLogger
from .keys import BlockKey
from .stats import Recorder
from .tiers.disk import DiskTier

_BATCH = 64


@dataclass
class WriteItem:
    key: BlockKey
    src: torch.Tensor  # the canonical block on the CPU (a host slot or a private copy)
    ns_id: bytes
    ns_desc: dict
    release: Callable[[], None] | None = None


class DiskWriter:
    def __init__(self, disk: DiskTier, codec: BlockCodec, recorder: Recorder, io: ThreadPoolExecutor,
                 max_queue: int, on_written: Callable[[list[BlockKey], list[BlockKey]], None],
                 log: OnceLogger) -> None:
        self.disk = disk
        self.codec = codec
        self.recorder = recorder
        self._io = io
        self._q: queue.Queue = queue.Queue(maxsize=max_queue)
        self._on_written = on_written
        self._log = log
        self._deletes: list[BlockKey] = []
        self._del_lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="tiercache-disk-writer", daemon=True)
        self._thread.start()

    # -- caller side ---------------------------------------------------------------------
    def offer(self, item: WriteItem, block: bool = False) -> bool:
        """Queue a block for the disk; False (and counted) if dropped under backpressure."""
        if self._closed:
            self._release(item)
            return False
        try:
            self._q.put(item, block=block)
            return True
        except queue.Full:
            self._release(item)
            self.recorder.dropped_write("disk")
            return False

    def delete_later(self, key: BlockKey) -> None:
        with self._del_lock:
            self._deletes.append(key)
        self._q.put(None)  # wake the writer (a None item carries no block)

    def flush(self) -> None:
        """Block until everything queued so far is written (or dropped)."""
        done = threading.Event()
        self._q.put(done)
        while not done.wait(0.5):
            if not self._thread.is_alive():
                return

    def pending(self) -> int:
        return self._q.qsize()

    def close(self) -> None:
        if self._closed:
            return
        self.flush()
        self._closed = True
        self._q.put(False)  # stop marker
        self._thread.join()

    # -- writer thread -------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            first = self._q.get()
            batch = [first]
            while len(batch) < _BATCH:
                try:
                    batch.append(self._q.get_nowait())
                except queue.Empty:
                    break
            items = [b for b in batch if isinstance(b, WriteItem)]
            try:
                self._write(items)
            except Exception as e:  # never let the writer die: count and go on
                self.recorder.error("disk", "store")
                self._log.warning("disk-write", "tiercache: disk write failed: %s", e)
            finally:
                for it in items:
                    self._release(it)
            for b in batch:
                if isinstance(b, threading.Event):
                    b.set()
            if any(b is False for b in batch):
                return

    def _encode(self, item: WriteItem) -> bytes:
        raw = item.src.reshape(-1).view(torch.uint8).numpy()
        return self.codec.encode(raw, item.key)

    def _write(self, items: list[WriteItem]) -> None:
        with self._del_lock:
            deletes, self._deletes = self._deletes, []
        if not items and not deletes:
            return
        t0 = time.perf_counter()
        frames = list(self._io.map(self._encode, items)) if len(items) > 1 else [self._encode(i) for i in items]
        rows = [(it.key, f, it.ns_id, it.ns_desc) for it, f in zip(items, frames)]
        for _attempt in range(4):
            try:
                written, evicted = self.disk.write_batch(rows, deletes)
                break
            except lmdb.MapFullError:
                # the map is fragmented or too small: free room, grow if allowed, retry
                need = sum(len(f) for f in frames) * 2 + (8 << 20)
                evicted_now = self.disk.evict_bytes(need)
                self.recorder.evicted("disk", len(evicted_now))
                self._on_written([], evicted_now)
                self.disk.grow_map()
                deletes = []
        else:
            self.recorder.error("disk", "store")
            self.recorder.dropped_write("disk", len(items))
            self._log.warning("disk-full", "tiercache: disk tier map full; %d writes dropped", len(items))
            return
        seconds = time.perf_counter() - t0
        by_key = {it.key: f for it, f in zip(items, frames)}
        block_bytes = self.disk.layout.block_bytes
        for k in written:
            self.recorder.stored("disk", block_bytes, seconds / max(len(written), 1))
            self.recorder.disk_written(block_bytes, len(by_key[k]))
        self.recorder.evicted("disk", len(evicted))
        self._on_written(written, evicted)

    @staticmethod
    def _release(item: WriteItem) -> None:
        if item.release is not None:
            rel, item.release = item.release, None
            rel()
