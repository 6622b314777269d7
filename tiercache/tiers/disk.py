"""The disk tier: one LMDB environment of codec frames, bounded by bytes.

Sub-databases:
    blocks  key(16)            -> codec frame
    meta    key(16)            -> seq u64 | charged u64 | raw u32 | frame u32 | ns 8s | created f64 | atime f64
    atime   seq(8, BE) key(16) -> b""            (access index: oldest first, for LRU eviction)
    ns      ns id(8)           -> JSON describing the namespace (never the salt itself)
    info    b"layout" / b"format" / b"used" / b"seq" -> store-wide facts

Every change happens in one write transaction, so several processes can share
a path (LMDB: one writer at a time, readers never blocked). Readers see a
snapshot, so a block being read cannot be evicted from under them. Reads
use `buffers=True` and decode straight from the memory map. Access times are
not written on read (that would need a write transaction per hit): readers
call `note_access` and the writer thread applies them in its next batch.
"""

from __future__ import annotations

import json
import os
import struct
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import lmdb

from ..config import KVLayout
from ..errors import LayoutMismatch
from ..keys import KEY_BYTES, BlockKey

FORMAT = b"tiercache-disk-1"
_META = struct.Struct("<QQII8sdd")
_SEQ = struct.Struct(">Q")
_U64 = struct.Struct("<Q")
PAGE = 4096
ENTRY_OVERHEAD = 256  # b-tree entries for meta, atime and the key, per block (estimate)


INLINE_MAX = 2000  # LMDB keeps values up to about half a page inside the leaf page


def charged_bytes(frame_len: int) -> int:
    """What a frame costs against disk_bytes: its overflow pages (or inline size) plus index entries."""
    if frame_len <= INLINE_MAX:
        return frame_len + ENTRY_OVERHEAD
    return -(-frame_len // PAGE) * PAGE + ENTRY_OVERHEAD


class DiskTier:
    def __init__(self, path: str, layout: KVLayout, capacity_bytes: int, readonly: bool = False,
                 writemap: bool = False) -> None:
        self.path = path
        self.layout = layout
        self.capacity_bytes = capacity_bytes
        os.makedirs(path, exist_ok=True)
        # Room for MVCC copies and free-list fragmentation above the byte bound.
        map_size = max(int(capacity_bytes * 1.25) + (64 << 20), 64 << 20)
        self.env = _open_env(path, map_size, readonly, writemap)
        try:
            self._open_dbs(readonly)
        except BaseException:
            _release_env(self.env)
            raise

    def _open_dbs(self, readonly: bool) -> None:
        self._blocks = self.env.open_db(b"blocks", create=not readonly)
        self._meta = self.env.open_db(b"meta", create=not readonly)
        self._atime = self.env.open_db(b"atime", create=not readonly)
        self._ns = self.env.open_db(b"ns", create=not readonly)
        self._info = self.env.open_db(b"info", create=not readonly)
        self._touch_lock = threading.Lock()
        self._touched: dict[BlockKey, float] = {}
        self._known_ns: set[bytes] = set()
        self._check_layout(readonly)

    def _check_layout(self, readonly: bool) -> None:
        want = json.dumps(self.layout.to_dict(), sort_keys=True).encode()
        with self.env.begin(write=not readonly) as txn:
            fmt = txn.get(b"format", db=self._info)
            have = txn.get(b"layout", db=self._info)
            if fmt is not None and fmt != FORMAT:
                raise LayoutMismatch(f"disk_path: {self.path} holds format {fmt.decode(errors='replace')}, "
                                     f"expected {FORMAT.decode()}")
            if have is not None and have != want:
                raise LayoutMismatch(
                    f"layout: the store at disk_path={self.path} holds KV of layout {have.decode()}, "
                    f"but this cache was opened with {want.decode()}; use another disk_path for another layout")
            if have is None and not readonly:
                txn.put(b"format", FORMAT, db=self._info)
                txn.put(b"layout", want, db=self._info)

    # -- reads ---------------------------------------------------------------------------
    def count_prefix(self, keys: list[BlockKey]) -> int:
        """How many of `keys`, from the first, are stored."""
        n = 0
        # membership through the small meta records: a get on a multi-MiB frame costs far more
        with self.env.begin(db=self._meta, buffers=True) as txn:
            for k in keys:
                if txn.get(k) is None:
                    break
                n += 1
        return n

    def count_each(self, keys: list[BlockKey]) -> list[bool]:
        """Whether each key is stored (one snapshot)."""
        with self.env.begin(db=self._meta, buffers=True) as txn:
            return [txn.get(k) is not None for k in keys]

    @contextmanager
    def reader(self) -> Iterator[Callable[[BlockKey], memoryview | None]]:
        """A read snapshot: `get(key)` returns the frame as a memoryview valid until the block exits."""
        with self.env.begin(db=self._blocks, buffers=True) as txn:
            yield txn.get

    def note_access(self, keys: Iterable[BlockKey]) -> None:
        now = time.time()
        with self._touch_lock:
            for k in keys:
                self._touched[k] = now

    def used(self) -> tuple[int, int]:
        """(charged bytes, blocks) as recorded by the last committed write."""
        with self.env.begin(db=self._info) as txn:
            raw = txn.get(b"used")
        if raw is None:
            return 0, 0
        used, blocks = struct.unpack("<QQ", raw)
        return used, blocks

    # -- writes (called from the writer thread) --------------------------------------------
    def write_batch(self, items: list[tuple[BlockKey, bytes, bytes, dict]],
                    deletes: Iterable[BlockKey] = ()) -> tuple[list[BlockKey], list[BlockKey]]:
        """Put frames, evicting least recently used blocks to stay within capacity.

        items: (key, frame, ns_id, ns_description). Returns (written, evicted).
        Raises lmdb.MapFullError if the map cannot take the batch; the caller
        evicts more (`evict_bytes`) and retries.
        """
        written: list[BlockKey] = []
        evicted: list[BlockKey] = []
        with self._touch_lock:
            touched, self._touched = self._touched, {}
        now = time.time()
        with self.env.begin(write=True) as txn:
            used, blocks, seq = self._load_counters(txn)
            for k in deletes:
                charged = self._delete(txn, k)
                if charged:
                    used -= charged
                    blocks -= 1
            for k, ts in touched.items():
                meta = txn.get(k, db=self._meta)
                if meta is None:
                    continue
                old_seq, charged, raw_len, flen, ns, created, _ = _META.unpack(meta)
                txn.delete(_SEQ.pack(old_seq) + k, db=self._atime)
                seq += 1
                txn.put(_SEQ.pack(seq) + k, b"", db=self._atime)
                txn.put(k, _META.pack(seq, charged, raw_len, flen, ns, created, ts), db=self._meta)
            for k, frame, ns_id, ns_desc in items:
                if txn.get(k, db=self._meta) is not None:
                    continue  # already stored (by us or another process): keep the first copy
                charged = charged_bytes(len(frame))
                if charged > self.capacity_bytes:
                    continue
                if used + charged > self.capacity_bytes:
                    freed, gone = self._evict(txn, used + charged - self.capacity_bytes)
                    used -= freed
                    blocks -= len(gone)
                    evicted += gone
                seq += 1
                txn.put(k, frame, db=self._blocks)
                txn.put(k, _META.pack(seq, charged, self.layout.block_bytes, len(frame), ns_id, now, now),
                        db=self._meta)
                txn.put(_SEQ.pack(seq) + k, b"", db=self._atime)
                if ns_id not in self._known_ns:
                    txn.put(ns_id, json.dumps(ns_desc, sort_keys=True).encode(), db=self._ns)
                    self._known_ns.add(ns_id)
                used += charged
                blocks += 1
                written.append(k)
            self._store_counters(txn, used, blocks, seq)
        return written, evicted

    def evict_bytes(self, nbytes: int) -> list[BlockKey]:
        with self.env.begin(write=True) as txn:
            used, blocks, seq = self._load_counters(txn)
            freed, gone = self._evict(txn, nbytes)
            self._store_counters(txn, used - freed, blocks - len(gone), seq)
        return gone

    def grow_map(self, factor: float = 1.25, limit_bytes: int | None = None) -> bool:
        cur = self.env.info()["map_size"]
        new = int(cur * factor)
        limit = limit_bytes or (self.capacity_bytes * 2 + (128 << 20))
        if new > limit:
            return False
        self.env.set_mapsize(new)
        return True

    def _load_counters(self, txn: lmdb.Transaction) -> tuple[int, int, int]:
        raw = txn.get(b"used", db=self._info)
        used, blocks = struct.unpack("<QQ", raw) if raw else (0, 0)
        raw = txn.get(b"seq", db=self._info)
        seq = _U64.unpack(raw)[0] if raw else 0
        return used, blocks, seq

    def _store_counters(self, txn: lmdb.Transaction, used: int, blocks: int, seq: int) -> None:
        txn.put(b"used", struct.pack("<QQ", max(used, 0), max(blocks, 0)), db=self._info)
        txn.put(b"seq", _U64.pack(seq), db=self._info)

    def _delete(self, txn: lmdb.Transaction, k: bytes) -> int:
        meta = txn.get(k, db=self._meta)
        if meta is None:
            txn.delete(k, db=self._blocks)  # a frame without meta should not exist; be thorough
            return 0
        seq, charged = _META.unpack(meta)[:2]
        txn.delete(k, db=self._blocks)
        txn.delete(k, db=self._meta)
        txn.delete(_SEQ.pack(seq) + k, db=self._atime)
        return charged

    def _evict(self, txn: lmdb.Transaction, need: int) -> tuple[int, list[BlockKey]]:
        """Delete least recently used blocks until `need` bytes are freed."""
        freed = 0
        gone: list[BlockKey] = []
        cur = txn.cursor(db=self._atime)
        victims = []
        if cur.first():
            for idx in cur.iternext(keys=True, values=False):
                victims.append(bytes(idx[8:]))
                meta = txn.get(victims[-1], db=self._meta)
                freed += _META.unpack(meta)[1] if meta else 0
                if freed >= need:
                    break
        freed = 0
        for k in victims:
            freed += self._delete(txn, k)
            gone.append(BlockKey(k))
        return freed, gone

    # -- inspection ------------------------------------------------------------------------
    def iter_meta(self):
        """Yield (key, meta dict) for every stored block."""
        with self.env.begin(db=self._meta) as txn:
            for k, v in txn.cursor():
                seq, charged, raw_len, flen, ns, created, atime = _META.unpack(v)
                yield BlockKey(bytes(k[:KEY_BYTES])), {"seq": seq, "charged": charged, "raw_len": raw_len,
                                                      "frame_len": flen, "ns": ns, "created": created,
                                                      "atime": atime}

    def namespaces(self) -> dict[bytes, dict]:
        with self.env.begin(db=self._ns) as txn:
            return {bytes(k): json.loads(v) for k, v in txn.cursor()}

    def stored_layout(self) -> dict | None:
        with self.env.begin(db=self._info) as txn:
            raw = txn.get(b"layout")
        return json.loads(raw) if raw else None

    def close(self) -> None:
        _release_env(self.env)


# LMDB forbids opening one environment twice in a process; caches on the same path share it.
_ENVS: dict[str, list] = {}  # realpath -> [env, refcount]
_ENVS_LOCK = threading.Lock()


def _open_env(path: str, map_size: int, readonly: bool, writemap: bool = False) -> lmdb.Environment:
    real = os.path.realpath(path)
    with _ENVS_LOCK:
        entry = _ENVS.get(real)
        if entry is not None:
            entry[1] += 1
            env = entry[0]
            if not readonly and env.info()["map_size"] < map_size:
                env.set_mapsize(map_size)
            return env
        # writemap writes frames straight into the shared map: measured 5-10x faster puts of
        # multi-MiB values than LMDB's malloc'd dirty pages + write(). But the file is then sparse,
        # and a full filesystem turns a write into SIGBUS instead of an error, so it is opt-in.
        writemap = writemap and not readonly
        env = lmdb.open(path, map_size=map_size, max_dbs=8, subdir=True, readonly=readonly,
                        readahead=True, sync=False, metasync=False, lock=True, max_readers=1024,
                        writemap=writemap, map_async=writemap)
        _ENVS[real] = [env, 1]
        return env


def _release_env(env: lmdb.Environment) -> None:
    with _ENVS_LOCK:
        for real, entry in list(_ENVS.items()):
            if entry[0] is env:
                entry[1] -= 1
                if entry[1] == 0:
                    del _ENVS[real]
                    try:
                        env.sync(True)
                    except lmdb.Error:
                        pass  # read-only environments cannot sync
                    env.close()
                return


def open_existing(path: str, readonly: bool = True) -> DiskTier:
    """Open a store with the layout it records (for `tiercache inspect`); ValueError if none is there."""
    if not os.path.exists(os.path.join(path, "data.mdb")):
        raise ValueError(f"path: no tiercache disk store at {path} (no data.mdb)")
    env = _open_env(path, 0, readonly=True)
    try:
        with env.begin() as txn:
            if txn.get(b"info") is None:
                raise ValueError(f"path: {path} is an LMDB environment but not a tiercache store")
        info_db = env.open_db(b"info", create=False)
        with env.begin(db=info_db) as txn:
            raw = txn.get(b"layout")
    finally:
        _release_env(env)
    if raw is None:
        raise ValueError(f"path: {path} holds no layout record; not a tiercache store")
    layout = KVLayout(**json.loads(raw))
    return DiskTier(path, layout, capacity_bytes=0, readonly=readonly)
