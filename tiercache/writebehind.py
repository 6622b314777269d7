"""Write-behind: one bounded queue and one thread that write blocks to the slow tiers (disk, remote).

`offer(job)` and `offer_many(jobs)` never block the caller: a full queue refuses, and the
caller counts the drop and completes the job as failed. A store's jobs are queued under one lock
with one wake-up of the thread (a put per block cost ~7 us at 512-byte blocks). The thread takes
what is queued in batches, encodes each block ONCE (on the I/O pool where compressing large
blocks pays: zstd releases the GIL), asks the remote which blocks it already has (one round trip)
and skips those, writes the batch's frame files, then commits its rows in one LMDB transaction
(only this commit holds the eviction gate) and sends the remote frames in one pipeline,
and then reports each job's outcome per tier. A job's source bytes (a pinned host
slot or a staging buffer) are released only after that report, so a block on its
way down is readable from memory until the slow tier has it: no gap in between.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import torch

from .codec import CODEC_NONE
from .core.plans import WriteJob
from .errors import OnceLogger
from .tiers.frame_files import frame_len, joined

_BATCH = 64
_PARALLEL_ENCODE_BYTES = 64 << 10  # blocks smaller than this are encoded by the writer thread itself


class _JobQueue(queue.Queue):
    """queue.Queue with puts and gets of many items under one lock (its documented subclass hooks)."""

    def put_many_nowait(self, items: list) -> int:
        """Queue items from the first while there is room; returns how many were queued."""
        with self.not_full:
            room = len(items) if self.maxsize <= 0 else max(0, min(len(items), self.maxsize - self._qsize()))
            for item in items[:room]:
                self._put(item)
            if room:
                self.unfinished_tasks += room
                self.not_empty.notify()
            return room

    def get_many_nowait(self, most: int) -> list:
        """Up to `most` queued items, without waiting."""
        with self.not_empty:
            got = [self._get() for _ in range(min(most, self._qsize()))]
            if got:
                self.not_full.notify(len(got))
            return got


class EvictionGate:
    """Keeps disk evictions out of the window between planning a load and opening its read snapshot.

    Loads hold it shared from `prepare_load` until their LMDB read transaction is open (from
    then on the snapshot keeps every frame they planned, whatever is committed later); the
    write-behind holds it exclusively while it commits a batch that may evict and updates the
    core's disk index. So a load never plans a block whose frame is already gone.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False

    @contextmanager
    def shared(self):
        with self._cond:
            while self._writer:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextmanager
    def exclusive(self):
        with self._cond:
            while self._writer or self._readers:
                self._cond.wait()
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


class WriteBehind:
    def __init__(self, *, disk: Any, remote: Any, codec: Any, recorder: Any, io: ThreadPoolExecutor,
                 max_queue: int, source: Callable[[WriteJob], torch.Tensor],
                 done: Callable[[WriteJob, dict[str, bool]], None],
                 disk_changed: Callable[[list, list, int | None], None], log: OnceLogger,
                 source_bytes: Callable[[WriteJob], Any], gate: EvictionGate | None = None) -> None:
        """`source`: a job's block as a tensor; `source_bytes`: the same bytes as a uint8 numpy array (what
        the encoder reads: cheaper per block than a view of the tensor)."""
        self.gate = gate or EvictionGate()
        self.disk, self.remote, self.codec, self.recorder = disk, remote, codec, recorder
        self._io = io
        self._source = source
        self._source_bytes = source_bytes
        self._done = done
        self._disk_changed = disk_changed
        self._log = log
        self._q = _JobQueue(maxsize=max_queue)
        self._deletes: list = []
        self._del_lock = threading.Lock()
        self._wake = threading.Event()
        self._idle = threading.Condition()
        self._busy = 0  # jobs taken off the queue and not yet reported
        self._paused = threading.Event()
        self._paused.set()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="tiercache-write-behind", daemon=True)
        self._thread.start()

    # -- caller side ---------------------------------------------------------------------
    def offer(self, job: WriteJob, block: bool = False) -> bool:
        """Queue a job; False when the queue is full (or closed): the caller completes it as failed."""
        if self._closed:
            return False
        try:
            self._q.put(job, block=block)
            return True
        except queue.Full:
            return False

    def offer_many(self, jobs: list[WriteJob]) -> int:
        """Queue jobs from the first while there is room, with one wake-up of the thread; returns how many
        were queued (the caller completes the rest as failed)."""
        if self._closed:
            return 0
        return self._q.put_many_nowait(jobs)

    def delete_later(self, key: Any) -> None:
        """Delete a (corrupt) block from the disk in the next batch; never blocks the caller."""
        with self._del_lock:
            self._deletes.append(key)
        try:
            self._q.put_nowait(None)  # wake the thread; if the queue is full it wakes anyway
        except queue.Full:
            pass

    def pending(self) -> int:
        return self._q.qsize() + self._busy

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every job queued so far is written (or failed). False on timeout."""
        if not self._thread.is_alive():
            return True
        done = threading.Event()
        self._q.put(done)
        deadline = None if timeout is None else time.monotonic() + timeout
        while not done.wait(0.2):
            if not self._thread.is_alive():
                return True
            if deadline is not None and time.monotonic() > deadline:
                return False
        return True

    def pause(self) -> None:
        """Hold the thread before its next batch (tests: a slow or stuck disk)."""
        self._paused.clear()

    def resume(self) -> None:
        self._paused.set()

    def close(self) -> None:
        if self._closed:
            return
        self.resume()
        self.flush()
        self._closed = True
        self._q.put(False)
        self._thread.join()

    # -- the thread ----------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            first = self._q.get()
            self._paused.wait()
            batch = [first, *self._q.get_many_nowait(_BATCH - 1)]
            jobs = [b for b in batch if isinstance(b, WriteJob)]
            self._busy = len(jobs)
            try:
                self._write(jobs)
            except BaseException as e:  # never let the thread die: every job still gets its report
                self._log.warning("write-behind", "tiercache: background write failed (%r); blocks dropped", e)
                for j in jobs:
                    self._report(j, {d: False for d in j.dests})
            finally:
                self._busy = 0
            for b in batch:
                if isinstance(b, threading.Event):
                    b.set()
            if any(b is False for b in batch):
                return

    def _report(self, job: WriteJob, results: dict[str, bool], counted: frozenset = frozenset()) -> None:
        """Hand a job's outcome to the core; drops are counted here unless the tier counted them itself."""
        if getattr(job, "_reported", False):
            return
        job._reported = True  # type: ignore[attr-defined]
        for d, ok in results.items():
            if not ok and d not in counted:
                self.recorder.dropped_write(d)
        self._done(job, results)

    def _parallel_encode(self, jobs: list[WriteJob]) -> bool:
        """Encode on the pool only where it pays: several blocks to compress, each big enough that zstd
        (which runs without the GIL) outlasts a pool hop. Raw frames are views, and small blocks cost
        less to encode than to hand over (512 B blocks, store + flush: 91 -> 75 us a block at 10^3 blocks stored)."""
        if len(jobs) < 2 or self.codec.codec == CODEC_NONE:
            return False
        src = self._source(jobs[0])
        return src.numel() * src.element_size() >= _PARALLEL_ENCODE_BYTES

    def _encode(self, job: WriteJob) -> list:
        """The job's frame as buffers (views of its source where a segment is stored raw): the disk tier
        writes them with one writev, without joining them first. The source stays valid until the
        job is reported."""
        return self.codec.encode_parts(self._source_bytes(job), job.key)

    def _write(self, jobs: list[WriteJob]) -> None:
        with self._del_lock:
            deletes, self._deletes = self._deletes, []
        if deletes and self.disk is not None:
            self._disk_write([], deletes)
        if not jobs:
            return
        results: dict[int, dict[str, bool]] = {id(j): {} for j in jobs}
        disk_dropped: set = set()
        remote_jobs = [j for j in jobs if "remote" in j.dests]
        if remote_jobs:  # blocks the server already has are neither encoded nor sent again
            have = self.remote.exists_many([j.key for j in remote_jobs])
            for j, there in zip(remote_jobs, have):
                if there:
                    results[id(j)]["remote"] = True
        todo = [j for j in jobs if any(d not in results[id(j)] for d in j.dests)]
        t0 = time.perf_counter()
        try:
            frames = list(self._io.map(self._encode, todo)) if self._parallel_encode(todo) \
                else [self._encode(j) for j in todo]
        except RuntimeError as e:  # the pool refuses work at interpreter exit: encode here, lose nothing
            if "shutdown" not in str(e):
                raise
            frames = [self._encode(j) for j in todo]
        encoded = time.perf_counter() - t0
        by_job = {id(j): f for j, f in zip(todo, frames)}
        disk_jobs = [j for j in todo if "disk" in j.dests]
        if disk_jobs:
            rows = [(j.key, by_job[id(j)], *(j.tag or (b"\0" * 8, {"model_id": "unknown"}))) for j in disk_jobs]
            t1 = time.perf_counter()
            written, disk_dropped = self._disk_write(rows, [])
            seconds = (time.perf_counter() - t1 + encoded) / max(len(disk_jobs), 1)
            block_bytes = self.disk.layout.block_bytes
            for j in disk_jobs:
                ok = j.key in written or self._disk_has(j.key)
                results[id(j)]["disk"] = ok
                if j.key in written:
                    self.recorder.stored("disk", block_bytes, seconds)
                    self.recorder.disk_written(block_bytes, frame_len(by_job[id(j)]))
        send = [j for j in todo if "remote" in j.dests and "remote" not in results[id(j)]]
        if send:
            t1 = time.perf_counter()
            took = self.remote.put_many([(j.key, joined(by_job[id(j)])) for j in send])
            seconds = (time.perf_counter() - t1 + encoded) / len(send)
            for j, ok in zip(send, took):
                results[id(j)]["remote"] = bool(ok)
                if ok:
                    src = self._source(j)
                    self.recorder.stored("remote", src.numel() * src.element_size(), seconds)
        for j in jobs:
            # the disk tier counts the writes it dropped itself
            self._report(j, results[id(j)], frozenset(("disk",)) if j.key in disk_dropped else frozenset())

    def _disk_has(self, key: Any) -> bool:
        return bool(self.disk.count_each([key])[0])

    def _disk_write(self, rows: list, deletes: list) -> tuple[set, set]:
        """Commit rows and deletes; (written and still there, dropped by the disk tier).

        Frame files are written first, outside the eviction gate (they evict nothing), so loads, even
        of blocks in memory, never wait for a batch's file writes; the gate is held for the commit (and
        any eviction it needs) and the index update only."""
        files = self.disk.write_files(rows) if rows and hasattr(self.disk, "write_files") else None
        committing = False
        try:
            with self.gate.exclusive():  # no load plans while blocks may vanish and the index catches up
                committing = True
                out = self.disk.write_batch(rows, deletes, written=files) if files is not None \
                    else self.disk.write_batch(rows, deletes)
                written, evicted = out[0], out[1]
                dropped = set(out[2]) if len(out) > 2 else set()
                counter = self.disk.change_counter() if hasattr(self.disk, "change_counter") else None
                self._disk_changed(list(written), list(evicted) + list(deletes), counter)
        finally:
            if files is not None and not committing:  # interrupted while waiting for the gate
                self.disk.discard_files(files)
        self.recorder.evicted("disk", len(evicted))
        return set(written) - set(evicted), dropped  # a batch can evict what it wrote earlier in it
