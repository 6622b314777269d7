"""What a disk store holds and how one write transaction changes it (no opening, locking or faults here).

Sub-databases:
    blocks  key(16)            -> codec frame, or a 20-byte pointer to the frame's file (frame_files)
    meta    key(16)            -> seq u64 | charged u64 | raw u32 | frame u32 | ns 8s | created f64 | atime f64
    atime   seq(8, BE) key(16) -> b""            (access index: oldest first, for LRU eviction)
    ns      ns id(8)           -> JSON describing the namespace (never the salt itself)
    nsref   ns id(8)           -> u64 blocks of that namespace (the row goes with its last block)
    info    b"layout" / b"format" / b"used" / b"seq" -> store-wide facts

Every block is charged against the byte budget: its frame's pages (or inline
size) plus its index entries; a namespace row is charged while a block of
that namespace is stored and deleted with the last one.
"""

from __future__ import annotations

import json
import struct
import time
from collections.abc import Iterator

import lmdb

from ..keys import KEY_BYTES, BlockKey
from .frame_files import parse_pointer

DBS = (b"blocks", b"meta", b"atime", b"ns", b"nsref", b"info")
_META = struct.Struct("<QQII8sdd")
_SEQ = struct.Struct(">Q")
_U64 = struct.Struct("<Q")
PAGE = 4096
ENTRY_OVERHEAD = 256  # b-tree entries for meta, atime and the key, per block (estimate)
NS_ROW_BYTES = 512    # what one namespace row costs against disk_bytes
INLINE_MAX = 2000  # LMDB keeps values up to about half a page inside the leaf page


def meta_charged(meta: bytes | memoryview) -> int:
    """The bytes a block's meta row says it is charged."""
    return _META.unpack(meta)[1]


def charged_bytes(frame_len: int) -> int:
    """What a frame costs against disk_bytes: its overflow pages (or inline size) plus index entries."""
    if frame_len <= INLINE_MAX:
        return frame_len + ENTRY_OVERHEAD
    return -(-frame_len // PAGE) * PAGE + ENTRY_OVERHEAD


class Schema:
    """The sub-databases of one open store, and the changes a write transaction makes to them."""

    def __init__(self, dbs: dict, block_bytes: int) -> None:
        self.dbs = dbs
        self.block_bytes = block_bytes
        # (key, file id) of frame files whose rows the current transaction deleted: the caller
        # unlinks them once the transaction has committed (and forgets them if it aborts)
        self.unlinked: list[tuple[bytes, int]] = []

    # -- counters ------------------------------------------------------------------------
    def counters(self, txn: lmdb.Transaction) -> tuple[int, int, int]:
        """(charged bytes, blocks, last access sequence number)."""
        info = self.dbs[b"info"]
        raw = txn.get(b"used", db=info)
        used, blocks = struct.unpack("<QQ", raw) if raw else (0, 0)
        raw = txn.get(b"seq", db=info)
        seq = _U64.unpack(raw)[0] if raw else 0
        return used, blocks, seq

    def set_counters(self, txn: lmdb.Transaction, used: int, blocks: int, seq: int) -> None:
        info = self.dbs[b"info"]
        txn.put(b"used", struct.pack("<QQ", max(used, 0), max(blocks, 0)), db=info)
        txn.put(b"seq", _U64.pack(seq), db=info)

    # -- one write transaction --------------------------------------------------------------
    def write(self, txn: lmdb.Transaction, items: list, deletes: list, touched: dict,
              budget: int) -> tuple[list[BlockKey], list[BlockKey]]:
        """Deletes, access times, then new frames (evicting the least recently used to stay in `budget`).

        items: (key, value, ns_id, ns_desc, frame_len): the value is the frame, or a pointer to its file;
        either way the block is charged for `frame_len` bytes."""
        written: list[BlockKey] = []
        evicted: list[BlockKey] = []
        meta_db, atime_db, blocks_db = self.dbs[b"meta"], self.dbs[b"atime"], self.dbs[b"blocks"]
        now = time.time()
        used, blocks, seq = self.counters(txn)
        for k in deletes:
            charged = self.delete(txn, k)
            if charged:
                used -= charged
                blocks -= 1
        for k, ts in touched.items():
            meta = txn.get(k, db=meta_db)
            if meta is None:
                continue
            old_seq, charged, raw_len, flen, ns, created, _ = _META.unpack(meta)
            txn.delete(_SEQ.pack(old_seq) + k, db=atime_db)
            seq += 1
            txn.put(_SEQ.pack(seq) + k, b"", db=atime_db)
            txn.put(k, _META.pack(seq, charged, raw_len, flen, ns, created, ts), db=meta_db)
        for k, frame, ns_id, ns_desc, flen in items:
            if txn.get(k, db=meta_db) is not None:
                continue  # already stored (by us or another process): keep the first copy
            charged = charged_bytes(flen)
            if charged > budget:
                continue
            ns_cost = self.ns_add(txn, ns_id, ns_desc)
            if used + charged + ns_cost > budget:
                freed, gone = self.evict(txn, used + charged + ns_cost - budget)
                used -= freed
                blocks -= len(gone)
                evicted += gone
            seq += 1
            txn.put(k, frame, db=blocks_db)
            txn.put(k, _META.pack(seq, charged, self.block_bytes, flen, ns_id, now, now), db=meta_db)
            txn.put(_SEQ.pack(seq) + k, b"", db=atime_db)
            used += charged + ns_cost
            blocks += 1
            written.append(k)
        self.set_counters(txn, used, blocks, seq)
        return written, evicted

    def evict_in(self, txn: lmdb.Transaction, need: int, max_victims: int = 1 << 62) -> list[BlockKey]:
        """Evict `need` bytes (at most `max_victims` blocks) and update the counters."""
        used, blocks, seq = self.counters(txn)
        freed, gone = self.evict(txn, need, max_victims)
        self.set_counters(txn, used - freed, blocks - len(gone), seq)
        return gone

    # -- pieces ------------------------------------------------------------------------------
    def ns_add(self, txn: lmdb.Transaction, ns_id: bytes, desc: dict) -> int:
        """Count one more block of namespace `ns_id`; returns the bytes a new row costs."""
        ref_db = self.dbs[b"nsref"]
        raw = txn.get(ns_id, db=ref_db)
        n = _U64.unpack(raw)[0] if raw else 0
        txn.put(ns_id, _U64.pack(n + 1), db=ref_db)
        if n:
            return 0
        txn.put(ns_id, json.dumps(desc, sort_keys=True).encode(), db=self.dbs[b"ns"])
        return NS_ROW_BYTES

    def ns_drop(self, txn: lmdb.Transaction, ns_id: bytes) -> int:
        """One block of `ns_id` is gone; returns the bytes freed if it was the namespace's last."""
        ref_db = self.dbs[b"nsref"]
        raw = txn.get(ns_id, db=ref_db)
        n = _U64.unpack(raw)[0] if raw else 0
        if n > 1:
            txn.put(ns_id, _U64.pack(n - 1), db=ref_db)
            return 0
        txn.delete(ns_id, db=ref_db)
        txn.delete(ns_id, db=self.dbs[b"ns"])
        return NS_ROW_BYTES if raw else 0

    def delete(self, txn: lmdb.Transaction, k: bytes) -> int:
        """Delete one block; returns the bytes it was charged (0 if it was not there)."""
        meta = txn.get(k, db=self.dbs[b"meta"])
        self._note_file(txn, k)
        if meta is None:
            txn.delete(k, db=self.dbs[b"blocks"])  # a frame without meta should not exist; be thorough
            return 0
        seq, charged, _, _, ns = _META.unpack(meta)[:5]
        txn.delete(k, db=self.dbs[b"blocks"])
        txn.delete(k, db=self.dbs[b"meta"])
        txn.delete(_SEQ.pack(seq) + k, db=self.dbs[b"atime"])
        return charged + self.ns_drop(txn, ns)

    def _note_file(self, txn: lmdb.Transaction, k: bytes) -> None:
        """Remember the file of a row about to be deleted (write transactions use buffers=True, so
        looking at an inline frame here copies nothing)."""
        v = txn.get(k, db=self.dbs[b"blocks"])
        ptr = parse_pointer(v) if v is not None else None
        if ptr is not None:
            self.unlinked.append((bytes(k), ptr[1]))

    def evict(self, txn: lmdb.Transaction, need: int, max_victims: int = 1 << 62) -> tuple[int, list[BlockKey]]:
        """Delete least recently used blocks until `need` bytes are freed (or `max_victims` are gone)."""
        if need <= 0:
            return 0, []
        meta_db = self.dbs[b"meta"]
        victims = []
        freed = 0
        cur = txn.cursor(db=self.dbs[b"atime"])
        if cur.first():
            for idx in cur.iternext(keys=True, values=False):
                victims.append(bytes(idx[8:]))
                meta = txn.get(victims[-1], db=meta_db)
                freed += meta_charged(meta) if meta else 0
                if freed >= need or len(victims) >= max_victims:
                    break
        freed = 0
        for k in victims:
            freed += self.delete(txn, k)
        return freed, [BlockKey(k) for k in victims]

    def iter_meta(self, txn: lmdb.Transaction) -> Iterator[tuple[BlockKey, dict]]:
        for k, v in txn.cursor(db=self.dbs[b"meta"]):
            seq, charged, raw_len, flen, ns, created, atime = _META.unpack(v)
            yield BlockKey(bytes(k[:KEY_BYTES])), {"seq": seq, "charged": charged, "raw_len": raw_len,
                                                  "frame_len": flen, "ns": ns, "created": created, "atime": atime}

