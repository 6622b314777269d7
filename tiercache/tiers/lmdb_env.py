"""One LMDB environment per store path per process, safe to resize, safe across fork().

LMDB's rules, and how they are kept here:

- An environment may be opened once per process: caches on the same path
  share one `SharedEnv` (reference counted).
- `set_mapsize` unmaps and remaps the file: a reader of this process inside
  the old map would fault (SIGSEGV/SIGBUS). Readers hold `rw.read()` for the
  life of their transaction, a resize holds `rw.exclusive()` (and the write
  lock), so the two never overlap.
- Another process may grow the file past this process's map: LMDB then
  refuses every transaction with MapResizedError until the map is adopted
  with `set_mapsize(0)`, done here under the same exclusive lock.
- An environment must not be used across fork(): a fork waits (up to 5 s)
  until no transaction of this process is open, the child closes what it
  inherited (it holds no reader slot then) or, if a transaction was open,
  abandons it unclosed; it reopens on first use (`generation()` changes).
- A full filesystem must be an error, not SIGBUS: the lock file (which LMDB
  maps and writes through memory) is allocated up front, and under writemap
  so is the data file.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import lmdb

MAX_READERS = 1024
LOCK_FILE_BYTES = 128 << 10  # >= LMDB's reader table for MAX_READERS readers (64 B each + header)
FILE_MODE = 0o600
DIR_MODE = 0o700


class RWLock:
    """Many readers or one exclusive holder; reentrant for readers of one thread.

    A waiting exclusive holder (a map resize: rare) holds new readers back for at most 50 ms, so
    it is not starved by a stream of reads, and a reader that waits on work which itself reads
    cannot deadlock behind it; readers wait without limit only while the exclusive lock is held.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._exclusive = False
        self._waiting = 0
        self._local = threading.local()

    def depth(self) -> int:
        return getattr(self._local, "d", 0)

    def acquire_read(self) -> None:
        d = getattr(self._local, "d", 0)
        if d:
            self._local.d = d + 1
            return
        with self._cond:
            if self._waiting and not self._exclusive:
                self._cond.wait_for(lambda: self._exclusive or not self._waiting, 0.05)
            while self._exclusive:
                self._cond.wait()
            self._readers += 1
        self._local.d = 1

    def release_read(self) -> None:
        d = self._local.d - 1
        self._local.d = d
        if d:
            return
        with self._cond:
            self._readers -= 1
            if not self._readers:
                self._cond.notify_all()

    def acquire_exclusive(self, timeout: float | None = None) -> bool:
        if self.depth():
            raise RuntimeError("a reader of this thread cannot take the exclusive lock")
        with self._cond:
            self._waiting += 1
            try:
                if not self._cond.wait_for(lambda: not (self._exclusive or self._readers), timeout):
                    return False
            finally:
                self._waiting -= 1
                if not self._waiting:
                    self._cond.notify_all()
            self._exclusive = True
            self._cond.notify_all()
        return True

    def release_exclusive(self) -> None:
        with self._cond:
            self._exclusive = False
            self._cond.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        self.acquire_exclusive()
        try:
            yield
        finally:
            self.release_exclusive()


class SharedEnv:
    """An open environment and the locks every user of it in this process shares."""

    def __init__(self, env: lmdb.Environment, real: str, readonly: bool, writemap: bool) -> None:
        self.env = env
        self.real = real
        self.readonly = readonly
        self.writemap = writemap
        self.refs = 1
        self.rw = RWLock()
        # one write transaction (or resize) at a time in this process; reentrant, because a fault met
        # inside a write may close the environment (which takes it again)
        self.wlock = threading.RLock()
        self.quiet = False  # held still for a fork() in progress

    def map_size(self) -> int:
        return self.env.info()["map_size"]

    def grow(self, map_size: int) -> None:
        """Grow the map to `map_size` (never shrink) with no reader or writer of this process inside it."""
        with self.wlock, self.rw.exclusive():
            if self.env.info()["map_size"] >= map_size:
                return
            if self.writemap:
                _preallocate(os.path.join(self.real, "data.mdb"), map_size)
            self.env.set_mapsize(map_size)

    def adopt(self) -> bool:
        """Adopt a map another process grew (after MapResizedError). False if this thread is inside a read."""
        if self.rw.depth():
            return False
        with self.wlock, self.rw.exclusive():
            self.env.set_mapsize(0)
        return True


_ENVS: dict[str, SharedEnv] = {}
_LOCK = threading.Lock()
_GENERATION = 0
_ABANDONED: list[lmdb.Environment] = []  # inherited across fork while busy: never used, never closed
_LOCK_HELD = False


def _quiesce(shared: SharedEnv) -> bool:
    """Before fork(): wait (briefly) until no transaction of this process is open in `shared`."""
    if shared.rw.depth() or not shared.wlock.acquire(timeout=5):
        return False
    if not shared.rw.acquire_exclusive(timeout=5):
        shared.wlock.release()
        return False
    return True


def _before_fork() -> None:
    global _LOCK_HELD
    _LOCK_HELD = _LOCK.acquire(timeout=5)
    for s in list(_ENVS.values()):
        s.quiet = _quiesce(s)


def _after_fork_in_parent() -> None:
    for s in list(_ENVS.values()):
        if s.quiet:
            s.rw.release_exclusive()
            s.wlock.release()
            s.quiet = False
    if _LOCK_HELD:
        _LOCK.release()


def _after_fork_in_child() -> None:
    """The child never uses what it inherited. An environment with no transaction open at fork time is
    closed (that frees it to be reopened here); one that was busy is abandoned (never closed: that
    would free reader slots that belong to the parent)."""
    global _GENERATION, _LOCK
    _GENERATION += 1
    _LOCK = threading.Lock()
    for s in list(_ENVS.values()):
        if s.quiet:
            try:
                s.env.close()
            except lmdb.Error:
                _ABANDONED.append(s.env)
        else:
            _ABANDONED.append(s.env)
    _ENVS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent,
                        after_in_child=_after_fork_in_child)


def generation() -> int:
    """Changes in a child after fork(): environments opened before it must be reopened."""
    return _GENERATION


def _preallocate(path: str, nbytes: int) -> None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, FILE_MODE)
    try:
        if os.fstat(fd).st_size < nbytes:
            os.posix_fallocate(fd, 0, nbytes)
    finally:
        os.close(fd)


def open_shared(path: str, map_size: int, readonly: bool, writemap: bool, lock: bool = True) -> SharedEnv:
    """Open (or share) the environment at `path`. Raises lmdb.Error / OSError; the caller words them."""
    real = os.path.realpath(path)
    with _LOCK:
        shared = _ENVS.get(real)
        if shared is not None:
            shared.refs += 1
    if shared is not None:
        if not readonly and not shared.readonly and map_size > shared.map_size():
            shared.grow(map_size)
        return shared
    writemap = writemap and not readonly
    if not readonly:
        lock_path = os.path.join(path, "lock.mdb")
        if not os.path.exists(lock_path):
            # LMDB sizes the lock file with ftruncate and writes it through a shared map: on a full
            # filesystem the first write into it is SIGBUS. Allocating it first makes that ENOSPC.
            _preallocate(lock_path, LOCK_FILE_BYTES)
        if writemap:
            data = os.path.join(path, "data.mdb")
            try:
                if not os.path.exists(data) or not os.path.getsize(data):
                    # a file of zeros is not an LMDB store (MDB_INVALID): let LMDB write its meta pages first
                    lmdb.open(path, map_size=map_size, max_dbs=8, subdir=True, lock=lock, max_readers=MAX_READERS,
                              mode=FILE_MODE).close()
                _preallocate(data, map_size)
            except OSError:
                writemap = False  # no room for the whole map: plain writes report a full disk as an error
    kw = dict(map_size=map_size, max_dbs=8, subdir=True, readonly=readonly, readahead=True, sync=False,
              metasync=False, max_readers=MAX_READERS, writemap=writemap, map_async=writemap, mode=FILE_MODE)
    try:
        env = lmdb.open(path, lock=lock, **kw)
    except lmdb.Error:
        if not readonly or not lock:
            raise
        env = lmdb.open(path, lock=False, **kw)  # a read-only medium without a usable lock file
    with _LOCK:
        other = _ENVS.get(real)
        if other is not None:  # another thread opened it meanwhile: use that one
            other.refs += 1
            env.close()
            return other
        shared = _ENVS[real] = SharedEnv(env, real, readonly, writemap)
    return shared


def release(shared: SharedEnv) -> None:
    with _LOCK:
        shared.refs -= 1
        if shared.refs > 0 or _ENVS.get(shared.real) is not shared:
            return
        del _ENVS[shared.real]
    with shared.wlock, shared.rw.exclusive():
        try:
            shared.env.sync(True)
        except lmdb.Error:
            pass  # read-only environments cannot sync
        shared.env.close()


def fs_free(path: str) -> int:
    """Bytes free for us on the filesystem holding `path` (a large number if it cannot be told)."""
    try:
        st = os.statvfs(path)
    except OSError:
        return 1 << 62
    return st.f_bavail * st.f_frsize


def describe_error(e: BaseException) -> tuple[str, str]:
    """(kind, text) of a storage error: kind is one of full, readonly, corrupt, io."""
    text = str(e)
    err = getattr(e, "errno", None)
    low = text.lower()
    if err == errno.ENOSPC or "no space left" in low or isinstance(e, lmdb.MapFullError):
        return "full", text
    if err in (errno.EROFS, errno.EACCES, errno.EPERM) or "read-only file system" in low \
            or "permission denied" in low or isinstance(e, lmdb.ReadonlyError):
        return "readonly", text
    if isinstance(e, (lmdb.CorruptedError, lmdb.PageNotFoundError, lmdb.InvalidError, lmdb.PanicError,
                      lmdb.VersionMismatchError, lmdb.BadValsizeError, lmdb.IncompatibleError,
                      lmdb.BadTxnError)):  # a transaction LMDB broke itself: it met damage it did not name
        return "corrupt", text
    return "io", text
