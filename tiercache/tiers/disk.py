"""The disk tier: one LMDB environment of codec frames, bounded by bytes, that survives its files.

What is stored, and how a write changes it, is `disk_schema`; opening, locking
and the process-wide environment registry are `lmdb_env`. This module is the
tier: reads that never raise, writes that never raise, and what to do when the
files misbehave. Several processes can share a path (LMDB: one writer at a
time, readers never blocked); a reader sees a snapshot, so a block being read
cannot be evicted from under it. Reads use `buffers=True` and decode straight
from the memory map.

Bounds: the map is `disk_bytes` (never less than 1 MiB), so data.mdb never
grows past it; frames and namespace rows are charged against a budget below
the map (room for LMDB's copy-on-write pages and old readers' snapshots:
15% of the map, up to half of small maps), and a full map or a full
filesystem evicts down and retries instead of failing.

Faults never raise from a read or a write and never kill the process: a read
that fails is a miss, a write that fails is dropped (returned and counted);
each cause is logged once with the setting to change. A store that cannot be
read (garbage or truncated data.mdb, a path that is a file, a full filesystem
before the store exists) turns the tier off (`available` False); a store on a
read-only filesystem or directory is served read-only (`readonly` True).
Caller mistakes (another layout, an old store format) raise ValueError.
"""

from __future__ import annotations

import errno
import json
import os
import struct
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import lmdb

from ..config import KVLayout
from ..errors import LayoutMismatch, OnceLogger
from ..keys import BlockKey
from . import frame_files, lmdb_env
from .disk_schema import DBS, Schema, charged_bytes, meta_charged
from .frame_files import FileFrame, FrameFiles, frame_len, joined, parse_pointer, pointer
from .lmdb_env import DIR_MODE, describe_error

FORMAT = b"tiercache-disk-3"  # 3: large frames in files (frame_files); 2: frames bound to their key (codec v2)
READABLE = (b"tiercache-disk-2", FORMAT)  # a format-2 store is opened and marked 3 by its first writable open
MIN_MAP = 1 << 20
_MAX_TOUCHED = 1 << 16


def _miss(_key: bytes) -> None:
    return None


class WrittenFiles:
    """What `DiskTier.write_files` and `write_batch` wrote of a batch before its transaction: the rows to
    commit, key -> frame file id, the keys handled (written, or left out for good), and the blocks
    evicted to make room on a full filesystem."""

    __slots__ = ("rows", "files", "seen", "made_room")

    def __init__(self) -> None:
        self.rows: list = []
        self.files: dict[bytes, int] = {}
        self.seen: set[bytes] = set()
        self.made_room: list[BlockKey] = []


class DiskTier:
    def __init__(self, path: str, layout: KVLayout, capacity_bytes: int, readonly: bool = False,
                 writemap: bool = False, log: OnceLogger | None = None, recorder: Any = None,
                 _strict: bool = False, _lock: bool = True,
                 file_min_bytes: int | None = frame_files.FILE_MIN_BYTES, direct_writes: bool = False) -> None:
        self.path = os.fspath(path)
        self._real_path = os.path.realpath(self.path)
        # frames of at least this many bytes are written to files of their own (None: all in LMDB)
        self.file_min_bytes = file_min_bytes
        # frame files written with O_DIRECT where the filesystem takes it (frame_files.FrameFiles.write)
        self.direct_writes = direct_writes
        self._stale: list[tuple[BlockKey, int]] = []  # rows whose file is gone: deleted by the next write
        self.layout = layout
        self.capacity_bytes = capacity_bytes
        self.readonly = readonly
        self.available = False
        self.log = log if log is not None else OnceLogger()
        self.recorder = recorder
        self._writemap = writemap
        self._strict = _strict  # inspect: raise ValueError instead of turning the tier off
        self._lock_file = _lock
        self._map_size = max(int(capacity_bytes), MIN_MAP)
        # charged bytes stay below the map: LMDB needs free pages for copy-on-write and old snapshots
        # pages freed by a write stay unusable while any reader (of any process) is older: the slack
        # needed is absolute (write rate x read time), so small maps keep up to half their size free
        slack = max(self._map_size * 15 // 100, min(self._map_size // 2, 32 << 20))
        self._budget = min(capacity_bytes, self._map_size - slack)
        self._initial_budget = self._budget
        self._max_frame = layout.block_bytes * 2 + (64 << 10)
        self._touch_lock = threading.Lock()
        self._touched: dict[BlockKey, float] = {}
        self._shared: lmdb_env.SharedEnv | None = None
        self._parked: lmdb_env.SharedEnv | None = None
        self._gen = lmdb_env.generation()
        self._batches = 0
        self.codec_choice: dict | None = None  # what compression="auto" chose here, and the figures (see disk_probe)
        try:
            self._open()
        except ValueError:
            raise
        except (lmdb.Error, OSError) as e:
            self._off("open", f"cannot open the store ({describe_error(e)[1]})")

    @property
    def _files(self) -> FrameFiles:
        """This process's FrameFiles of the store (shared by every DiskTier on the path; new after fork)."""
        return frame_files.shared(self._real_path, real=True)

    # -- open / state ----------------------------------------------------------------------
    def _open(self) -> None:
        path = self.path
        if os.path.exists(path) and not os.path.isdir(path):
            return self._off("open", "it is a file, not a directory")
        data = os.path.join(path, "data.mdb")
        exists = os.path.exists(data)
        if not exists and self.readonly:
            return self._off("open", "no store there to read (no data.mdb)")
        if not exists:
            try:
                os.makedirs(path, mode=DIR_MODE, exist_ok=True)
                if not os.listdir(path):
                    os.chmod(path, DIR_MODE)  # a store directory we create is private
            except OSError as e:
                return self._off("open", f"cannot create the directory ({e.strerror or e})")
        if not self.readonly and not os.access(path, os.W_OK):
            if not exists:
                return self._off("open", "the directory is not writable")
            self._go_readonly("the directory is not writable")
        if not self.readonly and exists and not os.access(data, os.W_OK):
            self._go_readonly("data.mdb is not writable")
        try:
            self._shared = lmdb_env.open_shared(path, self._map_size, self.readonly, self._writemap,
                                                lock=self._lock_file)
        except (lmdb.Error, OSError) as e:
            kind, text = describe_error(e)
            if kind == "readonly" and exists and not self.readonly:
                self._go_readonly(text)
                return self._open()
            if kind == "full":
                return self._off("open", f"the filesystem is full ({text}); free space or lower disk_bytes")
            if kind == "corrupt":
                return self._off("open", f"it is not a readable LMDB store ({text}); move it away")
            raise
        if self._writemap and not self.readonly and not self._shared.writemap:
            self.log.warning("disk-writemap", "tiercache: disk tier: disk_writemap not used at disk_path=%s: the "
                             "filesystem cannot allocate the whole map (disk_bytes=%d) up front, and writes through "
                             "an unallocated map would crash on a full disk; writing without it (slower puts)",
                             self.path, self.capacity_bytes)
        env = self._shared.env
        try:
            last = env.info()["last_pgno"]
            need = (last + 1) * env.stat()["psize"]
            have = os.path.getsize(data)
            if have < need:
                return self._off("open", f"data.mdb is truncated ({have} of {need} bytes); move it away")
            self._dbs = {b"info": env.open_db(b"info", create=not self.readonly)}
            self._check_layout()  # before anything else is created: an old store is refused untouched
            self._dbs.update({n: env.open_db(n, create=not self.readonly) for n in DBS})
            self._schema = Schema(self._dbs, self.layout.block_bytes)
        except lmdb.NotFoundError:
            return self._off("open", "it is an LMDB environment but not a tiercache store")
        except lmdb.Error as e:
            kind, text = describe_error(e)
            if kind == "readonly" and not self.readonly:
                lmdb_env.release(self._shared)
                self._shared = None
                self._go_readonly(text)
                return self._open()
            return self._off("open", f"the store cannot be read ({text}); move it away")
        if self._lock_file:
            try:
                env.reader_check()  # slots of processes that died inside a read
            except lmdb.Error:
                pass
        self.available = True
        if not self.readonly:
            self._collect_orphans()

    def _off(self, op: str, why: str) -> None:
        """Turn the tier off: one log line naming the cause and the setting, one counted error."""
        self.available = False
        if self._shared is not None:
            shared, self._shared = self._shared, None
            if shared.rw.depth():  # found inside a read of this thread: let go of it at close()
                self._parked = shared
            else:
                try:
                    lmdb_env.release(shared)
                except lmdb.Error:
                    pass
        if self._strict:
            raise ValueError(f"disk_path: {self.path}: {why}")
        self._count(op)
        self.log.warning("disk-off", "tiercache: disk tier off: disk_path=%s: %s; serving from memory "
                         "(set disk_path to a writable directory, or disk_path=None)", self.path, why)

    def _go_readonly(self, why: str) -> None:
        self.readonly = True
        self.log.warning("disk-readonly", "tiercache: disk tier read-only: disk_path=%s: %s; blocks are "
                         "served from it but no longer written (give disk_path a writable directory)",
                         self.path, why)

    def _count(self, op: str) -> None:
        if self.recorder is not None:
            self.recorder.error("disk", op)

    def _check_layout(self) -> None:
        want = json.dumps(self.layout.to_dict(), sort_keys=True).encode()
        info = self._dbs[b"info"]
        with self._shared.env.begin(write=not self.readonly) as txn:
            fmt = txn.get(b"format", db=info)
            have = txn.get(b"layout", db=info)
            if fmt is not None and fmt not in READABLE:
                self._release_quietly()
                raise LayoutMismatch(
                    f"disk_path: {self.path} holds a store of format {fmt.decode(errors='replace')} "
                    f"(an older tiercache), this one reads {FORMAT.decode()}; delete that directory or "
                    f"set another disk_path")
            if have is not None and have != want:
                self._release_quietly()
                raise LayoutMismatch(
                    f"layout: the store at disk_path={self.path} holds KV of layout {have.decode()}, "
                    f"but this cache was opened with {want.decode()}; use another disk_path for another layout")
            if have is None and not self.readonly:
                txn.put(b"layout", want, db=info)
            if fmt != FORMAT and not self.readonly:
                txn.put(b"format", FORMAT, db=info)  # from now on it may hold frame files

    def compression_for(self, configured: str, threads: int = 1) -> str:
        """The compression frames for this store are written with: `configured`, or under "auto" the choice
        recorded in the store (measured and recorded by the first writable open that asks; see disk_probe).

        Sets `codec_choice` (reported by TierCache.stats()["disk_codec"] and `tiercache inspect`).
        """
        record = self.recorded_codec()
        if configured == "auto" and record is None and self._state() is not None and not self.readonly:
            from . import disk_probe
            try:
                measured = disk_probe.decide(self.path, disk_probe.segment_bytes_of(self.layout), threads)
            except Exception as e:  # a probe that fails must not cost the tier: keep compressing
                measured = {"chosen": "byteplane", "why": f"the probe failed ({e}): disk space is kept"}
            record = self._record_codec(measured)
        if configured == "auto":
            chosen = record["chosen"] if record is not None else "byteplane"
        else:
            chosen = configured
        self.codec_choice = {**(record or {}), "configured": configured, "chosen": chosen}
        return chosen

    def recorded_codec(self) -> dict | None:
        """The choice and figures compression="auto" recorded in the store (None if none was)."""
        with self._read_txn(b"info", "stats") as txn:
            if txn is None:
                return None
            try:
                raw = txn.get(b"codec")
                return json.loads(bytes(raw)) if raw is not None else None
            except (lmdb.Error, ValueError):
                return None

    def _record_codec(self, measured: dict) -> dict:
        """Record `measured` unless another process recorded its own first: the first record wins."""
        shared = self._state()
        if shared is None:
            return measured
        try:
            with shared.wlock, shared.env.begin(write=True, db=self._dbs[b"info"]) as txn:
                if txn.put(b"codec", json.dumps(measured, sort_keys=True).encode(), overwrite=False):
                    return measured
                return json.loads(bytes(txn.get(b"codec")))
        except (lmdb.Error, ValueError):
            return measured  # not recorded (a full or damaged store): the next open measures again

    def _release_quietly(self) -> None:
        shared, self._shared = self._shared, None
        if shared is not None:
            lmdb_env.release(shared)

    def _state(self) -> lmdb_env.SharedEnv | None:
        """The environment, reopened first if this process is a fork() child of the one that opened it."""
        if self._gen != lmdb_env.generation():
            self._gen = lmdb_env.generation()
            self._touch_lock = threading.Lock()
            self._touched = {}
            self._shared = None  # the parent's: abandoned, never used here
            if self.available:
                self.available = False
                try:
                    self._open()
                except (ValueError, lmdb.Error, OSError) as e:
                    self._off("open", f"cannot reopen after fork ({e})")
        return self._shared if self.available else None

    def _fault(self, op: str, e: BaseException) -> None:
        """A read or write failed: count it, log it once, and turn off or go read-only where needed."""
        kind, text = describe_error(e)
        if kind == "corrupt":
            return self._off(op, f"the store is corrupt ({text}); delete it or set another disk_path")
        if kind == "readonly":
            if not self.readonly:
                self._go_readonly(text)
            return self._count(op)
        self._count(op)
        if isinstance(e, lmdb.MapFullError):
            self.log.warning("disk-map-full", "tiercache: disk tier: the store at disk_path=%s filled its map "
                             "(disk_bytes=%d) before its charged budget; evicting more to fit (%s)",
                             self.path, self.capacity_bytes, text)
        elif kind == "full":
            self.log.warning("disk-full", "tiercache: disk tier: the filesystem of disk_path=%s is full (%s); "
                             "evicting to fit the space there is (lower disk_bytes or free space)", self.path, text)
        else:
            self.log.warning("disk-io-" + op, "tiercache: disk tier %s failed at disk_path=%s: %s",
                             op, self.path, text)

    @contextmanager
    def _read_txn(self, db: bytes, op: str) -> Iterator[lmdb.Transaction | None]:
        """A read transaction inside the shared read lock; None when the tier cannot be read."""
        for _attempt in range(2):
            shared = self._state()
            if shared is None:
                yield None
                return
            shared.rw.acquire_read()
            try:
                txn = shared.env.begin(db=self._dbs[db], buffers=True)
            except lmdb.MapResizedError:
                shared.rw.release_read()
                if not shared.adopt():
                    yield None
                    return
                continue
            except lmdb.Error as e:
                shared.rw.release_read()
                self._fault(op, e)
                yield None
                return
            try:
                yield txn
            finally:
                try:
                    txn.abort()
                finally:
                    shared.rw.release_read()
            return
        yield None

    # -- reads -----------------------------------------------------------------------------
    def count_prefix(self, keys: list[BlockKey]) -> int:
        """How many of `keys`, from the first, are stored (0 on a fault)."""
        n = 0
        with self._read_txn(b"meta", "lookup") as txn:
            if txn is None:
                return 0
            try:
                for k in keys:
                    if txn.get(k) is None:
                        break
                    n += 1
            except lmdb.Error as e:
                self._fault("lookup", e)
                return 0
        return n

    def count_each(self, keys: list[BlockKey]) -> list[bool]:
        """Whether each key is stored, in one snapshot (all False on a fault)."""
        with self._read_txn(b"meta", "lookup") as txn:
            if txn is not None:
                try:
                    return [txn.get(k) is not None for k in keys]
                except lmdb.Error as e:
                    self._fault("lookup", e)
        return [False] * len(keys)

    @contextmanager
    def reader(self) -> Iterator[Callable[[BlockKey], memoryview | FileFrame | None]]:
        """A read snapshot: `get(key)` returns the frame, valid until the block exits: a memoryview of
        the map, or for a frame kept in a file, that file (a `codec.FrameSource`: decoded with
        positional reads, see frame_files). Files of blocks evicted by this process while the snapshot
        is open are unlinked only after it closes.

        `get` never raises for a storage fault: it returns None (counted, logged once).
        """
        files = self._files
        files.reader_started()  # before the snapshot: an eviction committed after it waits to unlink
        try:
            with self._read_txn(b"blocks", "load") as txn:
                if txn is None:
                    yield _miss
                    return
                yield self._getter(txn)
        finally:
            files.reader_done()

    def _getter(self, txn: lmdb.Transaction) -> Callable[[BlockKey], memoryview | FileFrame | None]:
        limit = self._max_frame

        def get(key: BlockKey) -> memoryview | FileFrame | None:
            try:
                v = txn.get(key)
            except lmdb.Error as e:
                self._fault("load", e)
                return None
            if v is None:
                return None
            ptr = parse_pointer(v) if len(v) == frame_files.PTR.size else None
            if ptr is not None:
                return self._open_file(key, ptr)
            if len(v) > limit:  # no frame of this layout is that long
                self._count("load")
                return None
            return v
        return get

    def _open_file(self, key: BlockKey, ptr: tuple[int, int]) -> FileFrame | None:
        flen, fid = ptr
        if flen > self._max_frame:
            self._count("load")
            return None
        try:
            f = self._files.open(key, flen, fid)
        except OSError as e:
            self._fault("load", e)
            return None
        if f is None:  # evicted by another process since this snapshot, or removed by hand: a miss
            with self._touch_lock:
                if len(self._stale) < _MAX_TOUCHED:
                    self._stale.append((BlockKey(bytes(key)), fid))
            return None
        return f

    def keys(self) -> Iterator[BlockKey]:
        """Every stored block key, read in chunks (no transaction is held between chunks)."""
        after = b""
        while True:
            chunk: list[BlockKey] = []
            with self._read_txn(b"meta", "keys") as txn:
                if txn is None:
                    return
                try:
                    cur = txn.cursor()
                    ok = cur.set_range(after) if after else cur.first()
                    for k in (cur.iternext(keys=True, values=False) if ok else ()):
                        k = bytes(k)
                        if k == after:
                            continue
                        chunk.append(BlockKey(k))
                        if len(chunk) >= 4096:
                            break
                except lmdb.Error as e:
                    self._fault("keys", e)
                    return
            yield from chunk
            if len(chunk) < 4096:
                return
            after = chunk[-1]

    def change_counter(self) -> int:
        """LMDB's last committed transaction id: it moves whenever any process writes."""
        shared = self._state()
        if shared is None:
            return 0
        try:
            return shared.env.info()["last_txnid"]
        except lmdb.Error:
            return 0

    def note_access(self, keys: Iterable[BlockKey]) -> None:
        now = time.time()
        with self._touch_lock:
            for k in keys:
                if len(self._touched) >= _MAX_TOUCHED:
                    break  # the writer is behind: recency of the rest is lost, memory stays bounded
                self._touched[k] = now

    def used(self) -> tuple[int, int]:
        """(charged bytes, blocks) as recorded by the last committed write."""
        with self._read_txn(b"info", "stats") as txn:
            if txn is None:
                return 0, 0
            try:
                raw = txn.get(b"used")
            except lmdb.Error as e:
                self._fault("stats", e)
                return 0, 0
            if raw is None:
                return 0, 0
            used, blocks = struct.unpack("<QQ", raw)
        return used, blocks

    # -- writes (called from the writer thread) --------------------------------------------
    def write_files(self, items: list[tuple[BlockKey, Any, bytes, dict]]) -> "WrittenFiles | None":
        """The first half of `write_batch`, which evicts nothing, so it needs no eviction gate: write the
        frames of at least `file_min_bytes` to their files. A frame that finds the filesystem full is left
        for `write_batch` (which evicts to make room). Pass the result to `write_batch(items, ...,
        written=)`, or to `discard_files`; until then the files belong to no row (a writer killed in
        between leaves orphans that the next writable open collects)."""
        shared = self._state()
        if shared is None or self.readonly:
            return None
        done = WrittenFiles()
        try:
            self._write_files(shared, items, done)
        except BaseException:  # interrupted: the files written so far belong to no row
            self.discard_files(done)
            raise
        return done

    def discard_files(self, written: "WrittenFiles") -> None:
        """Unlink what `write_files` wrote, for a batch that will not be committed."""
        self._files.unlink_now([self._files.path(k, fid) for k, fid in written.files.items()])
        written.files.clear()

    def write_batch(self, items: list[tuple[BlockKey, Any, bytes, dict]],
                    deletes: Iterable[BlockKey] = (), written: "WrittenFiles | None" = None,
                    ) -> tuple[list[BlockKey], list[BlockKey], list[BlockKey]]:
        """Put frames, evicting least recently used blocks to stay within the budget.

        items: (key, frame, ns_id, ns_description); a frame is bytes or a list of buffers
        (`BlockCodec.encode_parts`). Frames of at least `file_min_bytes` are written to files first
        (frame_files; `written` holds what `write_files` already wrote of these items), then every row
        is committed in one transaction. Returns (written, evicted, dropped): dropped are keys not
        written because of a fault or a read-only/off tier (counted as dropped writes here). Never
        raises for a storage fault: a full map or filesystem evicts more and retries.
        """
        deletes = list(deletes)
        with self._touch_lock:
            touched, self._touched = self._touched, {}
            stale, self._stale = self._stale, []
        shared = self._state()
        result: tuple[list[BlockKey], list[BlockKey]] | None = None
        done = written if written is not None else WrittenFiles()
        rows, files, made_room = done.rows, done.files, done.made_room
        if shared is not None and not self.readonly:
            with shared.wlock:
                self._write_files(shared, items, done, evict=True)
                result = self._write_with_retries(shared, rows, deletes, touched, stale)
        if result is None:
            self._files.unlink_now([self._files.path(k, fid) for k, fid in files.items()])
            dropped = [k for k, *_ in items]
            if dropped and self.recorder is not None:
                self.recorder.dropped_write("disk", len(dropped))
            return [], made_room, dropped
        written, evicted = result
        evicted = made_room + evicted
        kept = set(written)
        # files of rows not committed (already stored by another writer, or over the budget) are nobody's
        self._files.unlink_now([self._files.path(k, fid) for k, fid in files.items() if k not in kept])
        by_key = {r[0]: r for r in rows}
        dropped = [k for k, *_ in items if k not in kept and (k not in by_key or
                                                            charged_bytes(by_key[k][4]) > self._budget)]
        if dropped and self.recorder is not None:
            self.recorder.dropped_write("disk", len(dropped))
        return written, evicted, dropped

    def _write_files(self, shared: lmdb_env.SharedEnv, items: list, done: "WrittenFiles",
                     evict: bool = False) -> None:
        """Write the large frames of `items` not yet in `done` to their files, adding to `done` the rows
        for the transaction, key -> file id, and the blocks evicted to make room on a full filesystem.

        With `evict` (the caller holds the eviction gate), a full filesystem evicts (and unlinks) least
        recently used blocks and tries again; without, the frame is left for a call with `evict`. A frame
        that still does not fit, or any other write error, leaves that block out (dropped, nothing
        left behind).
        """
        rows, files, gone = done.rows, done.files, done.made_room
        fmin = self.file_min_bytes
        for k, frame, ns_id, ns_desc in items:
            kb = bytes(k)
            if kb in done.seen:
                continue  # the same key twice in one batch (or handled by write_files): the first counts
            flen = frame_len(frame)
            if fmin is None or flen < fmin:
                done.seen.add(kb)
                rows.append((k, joined(frame), ns_id, ns_desc, flen))
                continue
            if charged_bytes(flen) > self._budget:
                done.seen.add(kb)
                continue  # never fits: dropped, counted by the caller
            for attempt in range(3):
                try:
                    fid = self._files.write(k, frame, self.direct_writes)
                except OSError as e:
                    full = describe_error(e)[0] == "full"
                    if full and not evict:
                        break  # left for write_batch, which may evict to make room
                    done.seen.add(kb)
                    self._fault("store", e)  # counted, logged once; read-only media turn the tier read-only
                    if full and attempt < 2:
                        try:
                            gone += self._shrink(shared.env, [flen])
                        except lmdb.Error as e2:
                            self._fault("store", e2)
                            break
                        continue
                    break
                done.seen.add(kb)
                files[kb] = fid
                rows.append((k, pointer(flen, fid), ns_id, ns_desc, flen))
                break
        if self.direct_writes and self._files.direct_refused is not None:
            self.log.warning("disk-direct", "tiercache: disk tier: frame files at disk_path=%s are written through "
                             "the page cache: O_DIRECT was refused (%s); set disk_direct_writes=False to not "
                             "ask, or put disk_path on a filesystem that takes it", self.path,
                             self._files.direct_refused)

    def _write_with_retries(self, shared: lmdb_env.SharedEnv, items: list, deletes: list,
                            touched: dict, stale: list | None = None) -> tuple[list[BlockKey], list[BlockKey]] | None:
        evicted: list[BlockKey] = []
        self._batches += 1
        if self._batches % 256 == 0:
            self._reader_check(shared)
            self._budget = min(self._budget + self.capacity_bytes // 100, self._initial_budget)
        for attempt in range(4):
            self._schema.unlinked = []
            try:
                with shared.env.begin(write=True, buffers=True) as txn:
                    gone_stale = self._stale_rows(txn, stale or [])
                    written, gone = self._schema.write(txn, items, deletes + gone_stale, touched, self._budget)
                self._files.unlink([self._files.path(k, fid) for k, fid in self._schema.unlinked])
                return written, evicted + gone + gone_stale
            except lmdb.MapResizedError:
                try:
                    with shared.rw.exclusive():
                        shared.env.set_mapsize(0)  # another process grew the file: adopt its map
                except lmdb.Error as e:
                    self._fault("store", e)
                    return None
                continue
            except (lmdb.Error, OSError) as e:
                kind, text = describe_error(e)
                if kind == "io" and lmdb_env.fs_free(self.path) < 2 * sum(len(r[1]) for r in items) + (1 << 20):
                    # LMDB reports a write cut short by a full filesystem as EIO: name the real cause
                    kind, e = "full", OSError(errno.ENOSPC, f"no space left on device ({text})")
                if kind != "full":
                    self._fault("store", e)
                    self._reader_check(shared)
                    return None
                if not isinstance(e, lmdb.MapFullError):
                    self._fault("store", e)  # ENOSPC: logged once, naming disk_path and disk_bytes
                else:
                    self._count("store_map_full")
                self._reader_check(shared)
                try:
                    evicted += self._shrink(shared.env, [r[4] for r in items])
                except lmdb.MapFullError:
                    # old snapshots (readers of any process) pin every free page, so not even a delete
                    # fits: give the readers a moment to move on, then try again
                    time.sleep(0.01 * (attempt + 1))
                except lmdb.Error as e2:
                    self._fault("store", e2)
                    return None
        self._count("store_dropped")
        return None

    def _stale_rows(self, txn: lmdb.Transaction, stale: list) -> list[BlockKey]:
        """Rows found pointing at a file that is gone, still pointing at that same file: to delete."""
        out = []
        blocks = self._dbs[b"blocks"]
        for k, fid in stale:
            v = txn.get(k, db=blocks)
            ptr = parse_pointer(v) if v is not None else None
            if ptr is not None and ptr[1] == fid:
                out.append(k)
        return out

    def _shrink(self, env: lmdb.Environment, lengths: list[int]) -> list[BlockKey]:
        """After a full map or filesystem: lower the budget, evict down to it, let LMDB reclaim the pages.

        Deleting needs free pages too (copy-on-write), so a store with none left is evicted in
        small transactions first. The budget creeps back up while writes succeed. The files of
        evicted blocks are unlinked at once (the space is needed now; a reader of this process
        that finds one gone counts a miss).
        """
        need = sum(charged_bytes(n) for n in lengths)
        gone: list[BlockKey] = []
        chunk = 256
        lowered = False
        files_first = False
        while True:
            self._schema.unlinked = []
            try:
                with env.begin(write=True, buffers=True) as txn:
                    used = self._schema.counters(txn)[0]
                    if not lowered:
                        self._budget = min(self._budget, used * 9 // 10)
                        lowered = True
                    now = self._schema.evict_in(txn, used + need - self._budget, max_victims=chunk)
            except lmdb.MapFullError:
                if chunk == 1:
                    raise
                chunk = max(1, chunk // 8)
                continue
            except lmdb.Error as e:
                # the filesystem is too full for LMDB to commit even a delete: unlink the oldest blocks'
                # files first (their rows then point at nothing: misses), and commit the deletes after
                if files_first or describe_error(e)[0] != "full" or not self._unlink_oldest_files(env, need):
                    raise
                files_first = True
                continue
            self._files.unlink_now([self._files.path(k, fid) for k, fid in self._schema.unlinked])
            gone += now
            if len(now) < chunk or not now:
                break
        for _ in range(2):  # pages freed by a transaction are reusable once two more have committed
            with env.begin(write=True) as txn:
                txn.put(b"tick", b"", db=self._dbs[b"info"])
        return gone

    def _unlink_oldest_files(self, env: lmdb.Environment, need: int) -> bool:
        """Unlink the frame files of the least recently used blocks worth `need` bytes (at least one
        block) without touching their rows; whether any file was unlinked."""
        paths = []
        freed = 0
        blocks, meta = self._dbs[b"blocks"], self._dbs[b"meta"]
        with env.begin(buffers=True) as txn:
            cur = txn.cursor(db=self._dbs[b"atime"])
            for idx in (cur.iternext(keys=True, values=False) if cur.first() else ()):
                k = bytes(idx[8:])
                v = txn.get(k, db=blocks)
                ptr = parse_pointer(v) if v is not None else None
                if ptr is None:
                    continue
                paths.append(self._files.path(k, ptr[1]))
                m = txn.get(k, db=meta)
                freed += meta_charged(m) if m is not None else 0
                if freed >= need:
                    break
        self._files.unlink_now(paths)
        return bool(paths)

    def _reader_check(self, shared: lmdb_env.SharedEnv) -> None:
        if self._lock_file:
            try:
                shared.env.reader_check()
            except lmdb.Error:
                pass

    def evict_bytes(self, nbytes: int) -> list[BlockKey]:
        """Evict least recently used blocks worth `nbytes` (nothing on a fault)."""
        shared = self._state()
        if shared is None or self.readonly:
            return []
        try:
            with shared.wlock:
                self._schema.unlinked = []
                with shared.env.begin(write=True, buffers=True) as txn:
                    gone = self._schema.evict_in(txn, nbytes)
                self._files.unlink([self._files.path(k, fid) for k, fid in self._schema.unlinked])
        except lmdb.Error as e:
            self._fault("evict", e)
            return []
        return gone

    def _collect_orphans(self) -> None:
        """Unlink frame files no row points to (left by a crash between a file and its commit, or between
        a commit and its unlinks), once they are old enough not to be another writer's in flight."""
        if not os.path.isdir(self._files.root):
            return
        try:
            with self._read_txn(b"blocks", "open") as txn:
                if txn is None:
                    return
                referenced = set()
                for k, v in txn.cursor():
                    ptr = parse_pointer(v) if len(v) == frame_files.PTR.size else None
                    if ptr is not None:
                        referenced.add(frame_files.file_name(k, ptr[1]))
            self._files.unlink_now(self._files.orphans(referenced))
        except (lmdb.Error, OSError) as e:
            self.log.warning("disk-orphans", "tiercache: disk tier: cleaning frame files at disk_path=%s "
                             "failed (%s); left for the next open", self.path, e)

    def allocated_bytes(self) -> int:
        """Bytes the store takes on its filesystem: data.mdb and the frame files (allocated, not lengths)."""
        return frame_files.allocated_bytes(self.path)

    # -- inspection (may raise lmdb errors: `tiercache inspect` words them) --------------------
    @property
    def env(self) -> lmdb.Environment:
        shared = self._state()
        if shared is None:
            raise ValueError(f"disk_path: {self.path}: the disk tier is off")
        return shared.env

    def iter_meta(self) -> Iterator[tuple[BlockKey, dict]]:
        """Yield (key, meta dict) for every stored block."""
        with self.env.begin() as txn:
            yield from self._schema.iter_meta(txn)

    def namespaces(self) -> dict[bytes, dict]:
        with self.env.begin(db=self._dbs[b"ns"]) as txn:
            return {bytes(k): json.loads(v) for k, v in txn.cursor()}

    def stored_layout(self) -> dict | None:
        with self.env.begin(db=self._dbs[b"info"]) as txn:
            raw = txn.get(b"layout")
        return json.loads(raw) if raw else None

    def close(self) -> None:
        if self._gen != lmdb_env.generation():
            self._shared = None  # inherited across fork: abandoned, not closed
        shared, self._shared = self._shared, None
        self.available = False
        if shared is not None:
            lmdb_env.release(shared)
        parked, self._parked = self._parked, None
        if parked is not None and self._gen == lmdb_env.generation():
            lmdb_env.release(parked)


def open_existing(path: str, readonly: bool = True) -> DiskTier:
    """Open a store with the layout it records (for `tiercache inspect`); ValueError naming the cause.

    Read-only opens take no lock file (nothing is written to the store's directory).
    """
    path = os.fspath(path)
    data = os.path.join(path, "data.mdb")
    if not os.path.exists(data):
        raise ValueError(f"path: no tiercache disk store at {path} (no data.mdb)")
    try:
        env = lmdb.open(path, readonly=True, lock=False, max_dbs=8, subdir=True)
    except lmdb.Error as e:
        raise ValueError(f"path: {path} is not a readable LMDB store ({e})") from None
    try:
        need = (env.info()["last_pgno"] + 1) * env.stat()["psize"]
        if os.path.getsize(data) < need:
            raise ValueError(f"path: {path}: data.mdb is truncated ({os.path.getsize(data)} of {need} bytes)")
        with env.begin() as txn:
            if txn.get(b"info") is None:
                raise ValueError(f"path: {path} is an LMDB environment but not a tiercache store")
        info_db = env.open_db(b"info", create=False)
        with env.begin(db=info_db) as txn:
            raw, fmt = txn.get(b"layout"), txn.get(b"format")
    except lmdb.Error as e:
        raise ValueError(f"path: {path}: the store is corrupt ({e})") from None
    finally:
        env.close()
    if raw is None:
        raise ValueError(f"path: {path} holds no layout record; not a tiercache store")
    if fmt not in READABLE:
        raise ValueError(f"path: {path} holds a store of format {(fmt or b'?').decode(errors='replace')}, "
                         f"this tiercache reads {FORMAT.decode()}")
    layout = KVLayout(**json.loads(raw))
    return DiskTier(path, layout, capacity_bytes=0, readonly=readonly, _strict=True, _lock=not readonly)
