"""Large frames as files next to the LMDB index: written with one writev (or through an aligned buffer with
O_DIRECT, `disk_direct_writes=True`), read with positional reads.

A frame of at least `file_min_bytes` (default 256 KiB: a 16-token block of an 8-layer model is
already above it) is not put into LMDB. It goes to its own file, and LMDB's `blocks` row for the
key holds a 20-byte pointer (magic, frame length, file id) instead of the frame. Why: LMDB copies a
value into its own pages and then writes them, and a read faults the value in page by page through
the map. A file is written from the source buffers in one `writev` (no copy in between) and read
with `pread` straight into the block's destination, so the disk tier moves bytes at the rate of a
raw file. Everything else (which blocks exist, budget, eviction, namespaces, atomic commits across
processes) stays in LMDB.

    <disk_path>/frames/<first two hex digits of the key>/<key hex>.<file id hex>

The file id is random and new for every write, so a name is never reused: a block evicted and
stored again gets a new file, and deleting the old one cannot hit the new one.

Order of operations, and what a crash at any point leaves:
- write: the file is written and closed, then the pointer is committed. A crash in between leaves
  a file no row points to (an orphan): removed by the next writable open once it is older than
  `ORPHAN_AGE_S` (younger ones may belong to another process's commit in flight).
- delete/evict: the row is deleted and committed, then the file is unlinked. A crash in between
  leaves an orphan, as above. In this process, unlinks wait while any read snapshot of this
  process is open (so a load that planned a block finds its file); a reader in another process
  that finds the file gone treats the block as a miss.
- read: the row is read in a snapshot, and the file is opened for each positional read (no
  descriptor is held between reads). A file unlinked by another process in between, a missing
  file, a file of the wrong length, or bytes that fail the frame's checksums are misses, never
  served.

The reader count that holds unlinks back is per store path and process (every DiskTier of this
process on one path shares one FrameFiles), as LMDB's environment is.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import struct
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any

import numpy as np

from ..errors import CorruptFrame
from .lmdb_env import DIR_MODE, FILE_MODE

FILE_MIN_BYTES = 256 << 10
PTR = struct.Struct("<4sQQ")  # magic, frame length, file id
PTR_MAGIC = b"TCFF"
ORPHAN_AGE_S = 600.0
MAX_DEFERRED = 4096  # unlinks held back for this process's readers; past this they go anyway (a miss at worst)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_O_DIRECT = getattr(os, "O_DIRECT", 0)
# O_DIRECT wants the buffer's address, the file offset and the length aligned to the device's logical
# block (512 B or 4 KiB): 4 KiB covers both. A frame is copied DIRECT_CHUNK bytes at a time into one of two
# page-aligned buffers (kept by each writing thread: 16 MiB), the last piece padded with zeros, and the
# file cut back to the frame's length afterwards.
DIRECT_ALIGN = 4096
DIRECT_CHUNK = 8 << 20


_IOV_MAX = 1024  # buffers per preadv/writev call


def _consume(views: list[memoryview], n: int) -> None:
    """Drop the first n bytes from a list of buffers (after a vectored read or write moved them); a
    buffer cut short keeps its rest."""
    done = 0
    while n and done < len(views):
        if n >= len(views[done]):
            n -= len(views[done])
            done += 1
        else:
            views[done] = views[done][n:]
            n = 0
    del views[:done]


def _write_all(fd: int, parts: list[memoryview], path: str) -> None:
    """Buffered: writev straight from the frame's buffers (no copy of ours)."""
    while parts:
        n = os.writev(fd, parts[:_IOV_MAX])
        if n <= 0:
            raise OSError(errno.EIO, f"writev wrote nothing to {path}")
        _consume(parts, n)


def pointer(frame_len: int, fid: int) -> bytes:
    return PTR.pack(PTR_MAGIC, frame_len, fid)


def parse_pointer(value: Any) -> tuple[int, int] | None:
    """(frame length, file id) if an LMDB value is a pointer to a frame file, else None (an inline frame)."""
    if len(value) != PTR.size or bytes(value[:4]) != PTR_MAGIC:
        return None
    _, flen, fid = PTR.unpack(bytes(value))
    return flen, fid


def frame_len(frame: Any) -> int:
    """Bytes of a frame given as one buffer or as a list of buffers (`BlockCodec.encode_parts`)."""
    n = getattr(frame, "nbytes", None)  # a codec.FrameParts, or a numpy array
    if n is not None:
        return n
    if isinstance(frame, list):
        return sum(memoryview(p).nbytes for p in frame)
    return memoryview(frame).nbytes


def joined(frame: Any) -> Any:
    return b"".join(frame) if isinstance(frame, list) else frame


class FileFrame:
    """One frame file (a `codec.FrameSource`): positional reads, from any thread.

    No descriptor is held between calls: each read opens the file, reads and closes it, so a load of
    thousands of blocks never holds thousands of descriptors, and concurrent readers of one frame
    (one thread per layer span) never share one. A file gone or cut short is an error (a miss)."""

    def __init__(self, path: str, size: int) -> None:
        self.path = path
        self.size = size
        self._head: memoryview | None = None

    def head(self, n: int) -> memoryview:
        n = min(n, self.size)
        got = self._head
        if got is None or len(got) < n:
            buf = memoryview(bytearray(n))
            self.readinto(buf, 0)
            self._head = got = buf
        return got[:n]

    def readinto(self, bufs: Any, offset: int) -> None:
        """Fill `bufs` (one buffer, or a list filled in order) from `offset`: one preadv per call."""
        views = [memoryview(b).cast("B") for b in (bufs if isinstance(bufs, list) else [bufs])]
        views = [v for v in views if len(v)]
        total = sum(len(v) for v in views)
        if offset + total > self.size:
            raise CorruptFrame(f"frame file {self.path}: read past its recorded length")
        fd = os.open(self.path, os.O_RDONLY | _O_CLOEXEC)
        try:
            while views:
                got = os.preadv(fd, views[:_IOV_MAX], offset)
                if got <= 0:
                    raise CorruptFrame(f"frame file {self.path} is shorter than its recorded length")
                offset += got
                _consume(views, got)
        finally:
            os.close(fd)

    def willneed(self, offset: int, length: int) -> None:
        """Ask the kernel to start reading [offset, offset + length) into the page cache now, in the
        background (a hint: errors are ignored; the reads that follow report them)."""
        try:
            fd = os.open(self.path, os.O_RDONLY | _O_CLOEXEC)
        except OSError:
            return
        try:
            os.posix_fadvise(fd, offset, length, os.POSIX_FADV_WILLNEED)
        except (OSError, AttributeError):
            pass
        finally:
            os.close(fd)

    def read_all(self) -> memoryview:
        out = memoryview(np.empty(self.size, dtype=np.uint8))
        self.readinto(out, 0)
        return out

    def __len__(self) -> int:
        return self.size


class FrameFiles:
    """The frames/ directory of one store: write, open, unlink (deferred for this process's readers)."""

    def __init__(self, root: str) -> None:
        self.root = os.path.join(root, "frames")
        self._lock = threading.Lock()
        self._readers = 0
        self._deferred: list[str] = []
        self._made: set[str] = set()
        # why O_DIRECT was refused on this store's filesystem (tmpfs, some FUSE and network file
        # systems), once seen: later writes go buffered without asking again
        self.direct_refused: str | None = None if _O_DIRECT else "this platform has no O_DIRECT"
        self._bounce = threading.local()

    def path(self, key: bytes, fid: int) -> str:
        name = file_name(key, fid)
        return os.path.join(self.root, name[:2], name)

    # -- writes ------------------------------------------------------------------------------
    def write(self, key: bytes, frame: Any, direct: bool = False) -> int:
        """Write one frame to a new file; returns its file id. Raises OSError (nothing left behind).

        direct: write with O_DIRECT (the bytes go from a private aligned buffer to the device, not
        through the page cache, whose writeback otherwise paces the writer); where the filesystem
        refuses O_DIRECT the write is buffered and `direct_refused` says why."""
        fid = int.from_bytes(os.urandom(8), "little") or 1
        path = self.path(key, fid)
        d = os.path.dirname(path)
        if d not in self._made:
            self._mkdirs(d)
        parts = [memoryview(p).cast("B") for p in (frame if isinstance(frame, list) else [frame])]
        parts = [p for p in parts if len(p)]
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_CLOEXEC
        try:
            fd = os.open(path, flags, FILE_MODE)
        except FileNotFoundError:  # the directory went away under us (removed by hand): make it again
            self._made.discard(d)
            self._mkdirs(d)
            fd = os.open(path, flags, FILE_MODE)
        try:
            if direct and self.direct_refused is None and self._set_direct(fd, True):
                self._write_direct(fd, parts, path)
            else:
                _write_all(fd, parts, path)
        except BaseException:
            os.close(fd)
            self._remove(path)
            raise
        os.close(fd)
        return fid

    def _set_direct(self, fd: int, on: bool) -> bool:
        """Turn O_DIRECT on or off for `fd` (fcntl: a filesystem without it says EINVAL and the
        descriptor stays as it was). Returns whether it is now as asked."""
        try:
            fl = fcntl.fcntl(fd, fcntl.F_GETFL)
            fcntl.fcntl(fd, fcntl.F_SETFL, (fl | _O_DIRECT) if on else (fl & ~_O_DIRECT))
        except OSError as e:
            if on:
                self.direct_refused = f"{os.strerror(e.errno) if e.errno else e} on {self.root}"
            return False
        return True

    def _write_direct(self, fd: int, parts: list[memoryview], path: str) -> None:
        """Write `parts` through this thread's two aligned buffers, a buffer's length at a time: one is
        filled while a helper thread writes the other (the copy and the device's transfer overlap). The
        last piece is padded to DIRECT_ALIGN and the file cut back to the frame's length."""
        local = self._bounce
        bufs = getattr(local, "bufs", None)
        if bufs is None:
            bufs = local.bufs = [np.frombuffer(mmap.mmap(-1, DIRECT_CHUNK), dtype=np.uint8) for _ in range(2)]
        chunk = len(bufs[0])
        buf, fill = bufs[0], 0
        pending: Future | None = None
        try:
            for p in parts:
                src = np.frombuffer(p, dtype=np.uint8)
                at = 0
                while at < len(src):
                    n = min(len(src) - at, chunk - fill)
                    buf[fill:fill + n] = src[at:at + n]  # numpy copies without the GIL
                    fill += n
                    at += n
                    if fill == chunk:
                        if pending is not None:
                            pending.result()  # writes stay in file order: one in flight
                        pool = getattr(local, "pool", None)
                        if pool is None:
                            pool = local.pool = ThreadPoolExecutor(1, thread_name_prefix="tiercache-direct-write")
                        pending = pool.submit(self._flush_direct, fd, buf, fill, path)
                        fill = 0
                        buf = bufs[1] if buf is bufs[0] else bufs[0]
            if pending is not None:
                pending.result()
                pending = None
            if fill:
                padded = -(-fill // DIRECT_ALIGN) * DIRECT_ALIGN
                buf[fill:padded] = 0
                self._flush_direct(fd, buf, padded, path)
                if padded != fill:
                    os.ftruncate(fd, sum(len(p) for p in parts))
        finally:
            if pending is not None:
                wait([pending])  # interrupted: the helper is done with fd before the caller closes it

    def _flush_direct(self, fd: int, buf: np.ndarray, n: int, path: str) -> None:
        """Write buf[:n] at the file's offset. A short direct write (a filesystem near full) leaves the
        offset unaligned: the rest goes buffered."""
        view = memoryview(buf)[:n]
        while len(view):
            got = os.write(fd, view)
            if got <= 0:
                raise OSError(errno.EIO, f"write wrote nothing to {path}")
            view = view[got:]
            if len(view) and got % DIRECT_ALIGN:
                self._set_direct(fd, False)

    def _mkdirs(self, d: str) -> None:
        for p in (self.root, d):  # both private (makedirs would give the parent the default mode)
            try:
                os.mkdir(p, DIR_MODE)
            except FileExistsError:
                pass
        self._made.add(d)

    def unlink_now(self, paths: list[str]) -> None:
        for p in paths:
            self._remove(p)

    def unlink(self, paths: list[str]) -> None:
        """Unlink files whose rows are committed gone: now, or when this process's readers are done."""
        if not paths:
            return
        with self._lock:
            if self._readers and len(self._deferred) < MAX_DEFERRED:
                self._deferred += paths
                return
        self.unlink_now(paths)

    @staticmethod
    def _remove(path: str) -> None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError:
            pass  # a read-only medium: the orphan is collected by a later writable open

    # -- reads -------------------------------------------------------------------------------
    def reader_started(self) -> None:
        with self._lock:
            self._readers += 1

    def reader_done(self) -> None:
        with self._lock:
            self._readers -= 1
            go, self._deferred = (self._deferred, []) if not self._readers else ([], self._deferred)
        self.unlink_now(go)

    def open(self, key: bytes, flen: int, fid: int) -> FileFrame | None:
        """The frame file of a row; None if it is gone."""
        path = self.path(key, fid)
        try:
            os.stat(path)
        except FileNotFoundError:
            return None
        return FileFrame(path, flen)

    # -- housekeeping ------------------------------------------------------------------------
    def orphans(self, referenced: set[str], min_age_s: float | None = None) -> list[str]:
        """Files no row points to, older than `min_age_s` (default ORPHAN_AGE_S; younger ones may be another
        writer's in flight)."""
        if min_age_s is None:
            min_age_s = ORPHAN_AGE_S
        now = time.time()
        out = []
        try:
            subdirs = os.listdir(self.root)
        except OSError:
            return out
        for sub in subdirs:
            d = os.path.join(self.root, sub)
            try:
                names = os.listdir(d)
            except OSError:
                continue
            for name in names:
                if name in referenced:
                    continue
                p = os.path.join(d, name)
                try:
                    if now - os.stat(p).st_mtime >= min_age_s:
                        out.append(p)
                except OSError:
                    continue
        return out


def file_name(key: bytes, fid: int) -> str:
    return f"{bytes(key).hex()}.{fid:016x}"


_SHARED: dict[str, FrameFiles] = {}
_SHARED_LOCK = threading.Lock()


def shared(path: str, real: bool = False) -> FrameFiles:
    """The FrameFiles of the store at `path` for this process (one per real path: the reader count that
    holds unlinks back must see every reader of the store in this process). `real`: `path` is already
    os.path.realpath'd (the disk tier resolves it once, not per block)."""
    real = path if real else os.path.realpath(path)
    with _SHARED_LOCK:
        got = _SHARED.get(real)
        if got is None:
            got = _SHARED[real] = FrameFiles(real)
        return got


def _forget_after_fork() -> None:  # a child has none of the parent's readers
    global _SHARED_LOCK
    _SHARED_LOCK = threading.Lock()
    _SHARED.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_after_fork)


def store_files(path: str) -> list[str]:
    """Every file of the disk store at `path` that holds data: data.mdb and the frame files (for page
    cache drops and footprints; lock.mdb holds none)."""
    out = [os.path.join(path, "data.mdb")]
    for dirpath, _dirs, files in os.walk(os.path.join(path, "frames")):
        out += [os.path.join(dirpath, f) for f in files]
    return out


def allocated_bytes(path: str) -> int:
    """Bytes the disk store at `path` takes on its filesystem (allocated blocks, not lengths)."""
    total = 0
    for p in store_files(path):
        try:
            total += os.stat(p).st_blocks * 512
        except OSError:
            pass
    return total
