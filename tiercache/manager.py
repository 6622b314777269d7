"""TierCache: the public object, and the only place that knows several tiers.

Tiers, fastest first: device pool, host pool, disk (LMDB), remote (Redis).
A block is looked for from the top down; a hit is attributed to the fastest
tier that holds it.

store   new full blocks go into the memory tiers (write-through: every enabled
        one; write-back: the top one only, with evictions spilling down) and,
        under write-through, are queued for the disk. Never blocks on disk I/O.
load    the longest cached prefix, copied into one tensor; disk blocks are
        decoded into host slots (promotion) and, if there is a device tier,
        placed there too.
prefetch the same promotion on a background worker; `wait()` on the handle.

Concurrency: one lock guards the pools' maps. Bytes move outside the lock
while the slots involved are pinned (see tiers/pool.py), so a block being
read or written is never evicted or overwritten.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from .codec import BlockCodec
from .config import CacheConfig
from .errors import ClosedError, OnceLogger
from .keys import BlockKey, KeyHasher, Namespace, tokens_to_array
from .loading import LoadPath
from .policy import make_admission_policy, make_eviction_policy
from .stats import Recorder
from .tiers.disk import DiskTier
from .tiers.pool import BlockPool
from .transfer import TransferEngine
from .writer import DiskWriter, WriteItem

MEMORY_TIERS = ("device", "host")


class TierCache(LoadPath):
    def __init__(self, cfg: CacheConfig, registry: Any = None) -> None:
        if not isinstance(cfg, CacheConfig):
            raise TypeError(f"cfg: expected a CacheConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        self.layout = layout = cfg.layout
        self._B = layout.block_size
        self._log = OnceLogger()
        self._lock = threading.RLock()
        self._closed = False
        self._hasher = KeyHasher(cfg.hash_algo, cfg.hash_secret)
        for name, size in (("device_bytes", cfg.device_bytes), ("host_bytes", cfg.host_bytes)):
            if 0 < size < layout.block_bytes:
                raise ValueError(f"{name}: {size} bytes is smaller than one block ({layout.block_bytes} bytes "
                                 f"for {layout.fingerprint()}); use 0 to turn the tier off")
        cuda = torch.cuda.is_available()
        self.pools: dict[str, BlockPool] = {}
        if cfg.device_bytes:
            self.pools["device"] = BlockPool("device", layout, cfg.device_bytes, cfg.device,
                                             make_eviction_policy(cfg.eviction))
        if cfg.host_bytes:
            self.pools["host"] = BlockPool("host", layout, cfg.host_bytes, torch.device("cpu"),
                                           make_eviction_policy(cfg.eviction), pin_memory=cuda)
        self.disk: DiskTier | None = None
        if cfg.disk_enabled:
            self.disk = DiskTier(cfg.disk_path, layout, cfg.disk_bytes, writemap=cfg.disk_writemap)
        self.remote = None
        if cfg.remote_url:
            from .tiers.remote import RemoteTier
            self.remote = RemoteTier(cfg.remote_url, log=self._log)  # codec and recorder are set below
        self.tiers = tuple(t for t in ("device", "host", "disk", "remote")
                           if t in self.pools or (t == "disk" and self.disk) or (t == "remote" and self.remote))
        self.metrics = None
        self._exporter = None
        if registry is not None or cfg.metrics_port is not None or os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            from .metrics import PromMetrics, is_multiprocess
            if registry is None and cfg.metrics_port is not None and not is_multiprocess():
                from prometheus_client import CollectorRegistry
                registry = CollectorRegistry()  # private: what the exporter below serves
            self.metrics = PromMetrics(self.tiers, registry=registry)
        self.recorder = Recorder(self.tiers, self.metrics)
        self.codec = BlockCodec(layout.fingerprint(), layout.itemsize, layout.num_layers,
                                cfg.compression, cfg.zstd_level)
        if self.remote is not None:
            self.remote.codec, self.remote.recorder = self.codec, self.recorder
        self.engine = TransferEngine(cfg.device, cfg.io_threads)
        self._io = ThreadPoolExecutor(max_workers=cfg.io_threads, thread_name_prefix="tiercache-io")
        self._prefetcher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tiercache-prefetch")
        self._layer_worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tiercache-layers")
        self._prefetch_queued = 0
        self._ns_desc: dict[bytes, dict] = {}  # namespace id -> description, for blocks spilled to disk
        self._admission = make_admission_policy(cfg.admission)
        self._pending: dict[BlockKey, torch.Tensor] = {}  # queued for disk, held in a private copy
        self._on_disk_queued: set[BlockKey] = set()       # queued for disk from a host slot
        self._scratch: list[torch.Tensor] = []  # block buffers for slow reads that found no free slot
        self._scratch_max = max(4, 2 * cfg.io_threads)
        self._writer = None
        if self.disk is not None:
            self._writer = DiskWriter(self.disk, self.codec, self.recorder, self._io, cfg.write_queue_blocks,
                                      self._disk_written, self._log)
        self._update_usage()
        if cfg.metrics_port is not None:
            from .metrics import start_exporter
            self._exporter = start_exporter(cfg.metrics_port, registry=registry, addr=cfg.metrics_addr)

    @property
    def metrics_port(self) -> int | None:
        """The port the exporter is bound to (useful with metrics_port=0), or None."""
        return self._exporter[2] if self._exporter is not None else None

    # -- keys ----------------------------------------------------------------------------
    def _namespace(self, salt: Any) -> Namespace:
        if salt is not None and not isinstance(salt, (str, bytes)):
            raise TypeError(f"salt: expected None, str or bytes, got {type(salt).__name__}")
        cfg = self.cfg
        return Namespace(cfg.model_id, self.layout.fingerprint(), cfg.tp_rank, cfg.tp_size, salt,
                         cfg.weights_revision)

    def keys(self, tokens: Any, salt: Any = None) -> list[BlockKey]:
        """Block keys of every full block of `tokens`."""
        return self._hasher.block_keys(tokens, self._B, self._namespace(salt))

    # -- lookup --------------------------------------------------------------------------
    def _locate(self, keys: list[BlockKey]) -> list[str]:
        """The fastest tier of each key of the cached prefix (stops at the first miss)."""
        found: list[str] = []
        with self._lock:
            for k in keys:
                tier = next((t for t, p in self.pools.items() if k in p), None)
                if tier is None:
                    if k in self._pending:
                        tier = "disk"
                    else:
                        break
                found.append(tier)
        rest = keys[len(found):]
        if rest and self.disk is not None:
            n = self.disk.count_prefix(rest)
            found += ["disk"] * n
            rest = rest[n:]
        if rest and self.remote is not None:
            found += ["remote"] * self.remote.count_prefix(rest)
        return found

    def lookup(self, tokens: Any, salt: Any = None) -> int:
        """Tokens of the longest cached prefix (a multiple of block_size). Moves nothing; counts metrics."""
        self._check_open()
        arr = tokens_to_array(tokens)
        tiers = self._locate(self._hasher.block_keys(arr, self._B, self._namespace(salt)))
        by_tier: dict[str, int] = {t: 0 for t in self.tiers}
        for t in tiers:
            by_tier[t] += 1
        self.recorder.lookup(len(arr), {t: n * self._B for t, n in by_tier.items()}, by_tier)
        return len(tiers) * self._B

    def lookup_by_tier(self, tokens: Any, salt: Any = None) -> dict[str, int]:
        """Tokens of the cached prefix per serving tier, without counting a lookup."""
        self._check_open()
        out = {t: 0 for t in self.tiers}
        for t in self._locate(self.keys(tokens, salt)):
            out[t] += self._B
        return out

    # -- store ---------------------------------------------------------------------------
    def _check_kv(self, kv: Any, num_tokens: int, field: str = "kv") -> None:
        L = self.layout
        if not isinstance(kv, torch.Tensor):
            raise TypeError(f"{field}: expected a torch.Tensor, got {type(kv).__name__}")
        if kv.dtype != L.dtype:
            raise TypeError(f"{field}: expected dtype {L.dtype} (the layout's), got {kv.dtype}")
        want = L.kv_shape(num_tokens)
        if kv.dim() != 5 or tuple(kv.shape) != want:
            raise ValueError(f"{field}: expected shape [num_layers, planes, len(tokens), num_kv_heads, head_dim]"
                             f" = {list(want)}, got {list(kv.shape)}")

    def store(self, tokens: Any, kv: torch.Tensor, salt: Any = None) -> int:
        """Store the KV of every full block of `tokens`; returns the tokens now cached for this prefix."""
        self._check_open()
        arr = tokens_to_array(tokens)
        self._check_kv(kv, len(arr))
        ns = self._namespace(salt)
        keys = self._hasher.block_keys(arr, self._B, ns)
        if not keys:
            return 0
        ns_id = self._ns_id(ns)
        t0 = time.perf_counter()
        B = self._B
        write_back = self.cfg.write_policy == "write_back"
        order = [t for t in MEMORY_TIERS if t in self.pools]
        targets = order[:1] if write_back else order
        # What the disk already holds (one snapshot; outside the lock: LMDB readers never block)
        on_disk = self.disk.count_each(keys) if self.disk is not None else [False] * len(keys)
        copies: list[tuple[torch.Tensor, torch.Tensor]] = []
        spills: list[tuple[str, BlockKey, int, Any]] = []  # (tier, key, slot, tag) evicted under write-back
        reserved: list[tuple[str, BlockKey]] = []
        present = list(on_disk)   # block i is cached (or committed to be) after this call
        new: list[int] = []       # blocks no tier held before this call
        with self._lock:
            for i, k in enumerate(keys):
                have = [t for t, p in self.pools.items() if k in p]
                for t in have:
                    self.pools[t].touch(k)
                if have:
                    present[i] = True
                    continue
                if k in self._pending:
                    present[i] = True
                elif not on_disk[i]:
                    new.append(i)
                for t in targets:
                    r = self.pools[t].reserve(k, ns_id)
                    if r is None:
                        continue
                    slot, evicted = r
                    if write_back:
                        spills += [(t, *e) for e in evicted]
                    else:
                        self.recorder.evicted(t, len(evicted))
                    copies.append((self.pools[t].view(slot), kv[:, :, i * B:(i + 1) * B]))
                    reserved.append((t, k))
                    present[i] = True
        # Under write-back, victims move down before their slots are overwritten.
        for tier, vkey, slot, tag in spills:
            self._spill(tier, vkey, slot, tag)
        try:
            self.engine.copy(copies).wait()
        except BaseException:
            with self._lock:
                for t, k in reserved:
                    self.pools[t].abort(k)
            raise
        seconds = time.perf_counter() - t0
        per_tier: dict[str, int] = {}
        with self._lock:
            for t, k in reserved:
                self.pools[t].commit(k)
                per_tier[t] = per_tier.get(t, 0) + 1
        for t, n in per_tier.items():
            self.recorder.stored(t, n * self.layout.block_bytes, seconds)
        # New blocks go down: to the disk under write-through (under write-back only if no memory
        # tier took them), and always to the remote tier.
        reserved_keys = {k for _, k in reserved}
        for i in new:
            k, src = keys[i], kv[:, :, i * B:(i + 1) * B]
            if self._writer is not None and (not write_back or k not in reserved_keys):
                if self._offer_disk(k, src, ns_id):
                    present[i] = True
            if self.remote is not None:
                self.remote.put_async(k, src)
        self.recorder.stored_tokens(sum(1 for i in new if present[i]) * B)
        self._update_usage()
        n = 0
        while n < len(present) and present[n]:
            n += 1
        return n * B

    def _ns_id(self, ns: Namespace) -> bytes:
        ns_id = self._hasher.namespace_digest(ns)[:8]
        if ns_id not in self._ns_desc:
            self._ns_desc[ns_id] = ns.describe()
        return ns_id

    def _offer_disk(self, key: BlockKey, src: torch.Tensor | None, ns_id: bytes | None,
                    block: bool = False, admit: bool = True) -> bool:
        """Queue one block for the disk, reading it from its host slot if it has one.

        Without a host slot the block is copied (`src`), so the caller's tensor may be reused at once.
        """
        if self._writer is None or (admit and not self._admission.admit(key)):
            return False
        desc = self._ns_desc.get(ns_id, {"model_id": "unknown"}) if ns_id else {"model_id": "unknown"}
        ns_id = ns_id or b"\0" * 8
        with self._lock:
            if key in self._pending or key in self._on_disk_queued:
                return True
            host = self.pools.get("host")
            slot = host.get(key) if host is not None else None
            if slot is not None:
                host.pin(key)
                self._on_disk_queued.add(key)
                item = WriteItem(key, host.view(slot), ns_id, desc, release=lambda: self._release_host(key))
            elif src is not None:
                copy = src.detach().to("cpu", copy=True).contiguous()
                self._pending[key] = copy
                item = WriteItem(key, copy, ns_id, desc, release=lambda: self._release_pending(key))
            else:
                return False
        return self._writer.offer(item, block=block)

    def _offer_disk_from_pool(self, key: BlockKey, block: bool = False, admit: bool = True) -> bool:
        """Offer a block held in a memory tier to the disk (second-hit admission, write-back close)."""
        with self._lock:
            for pool in self.pools.values():
                slot = pool.get(key)
                if slot is not None:
                    tag = pool.tag(key)
                    pool.pin(key)
                    break
            else:
                return False
        try:
            src = pool.view(slot) if pool.name == "host" else pool.view(slot).to("cpu")
            return self._offer_disk(key, src, tag, block=block, admit=admit)
        finally:
            with self._lock:
                pool.unpin(key)

    def _release_host(self, key: BlockKey) -> None:
        with self._lock:
            self._on_disk_queued.discard(key)
            self.pools["host"].unpin(key)

    def _release_pending(self, key: BlockKey) -> None:
        with self._lock:
            self._pending.pop(key, None)

    def _spill(self, tier: str, key: BlockKey, slot: int, tag: Any) -> None:
        """Write-back: a block evicted from `tier` moves one tier down (host, then disk).

        Its old slot already belongs to the block that displaced it, which the
        caller writes only after this returns.
        """
        self.recorder.evicted(tier, 1)
        src = self.pools[tier].view(slot)
        if tier == "device" and "host" in self.pools:
            host = self.pools["host"]
            with self._lock:
                r = host.reserve(key, tag)
            if r is not None:
                hslot, evicted = r
                for vkey, vslot, vtag in evicted:
                    self._spill("host", vkey, vslot, vtag)
                host.view(hslot).copy_(src)
                with self._lock:
                    host.commit(key)
                return
        if self._writer is None or self.disk.count_each([key])[0]:
            return
        if not self._admission.admit(key):
            return
        copy = src.detach().to("cpu", copy=True).contiguous()
        with self._lock:
            self._pending[key] = copy
        desc = self._ns_desc.get(tag, {"model_id": "unknown"})
        # never wait on the disk in the caller's thread: under backpressure the spill is dropped and counted
        self._writer.offer(WriteItem(key, copy, tag or b"\0" * 8, desc, release=lambda: self._release_pending(key)))

    def _disk_written(self, written: list[BlockKey], evicted: list[BlockKey]) -> None:
        self._update_usage()

    # -- close ---------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError("TierCache is closed")

    def flush(self) -> None:
        """Wait until every queued disk write is committed."""
        if self._writer is not None:
            self._writer.flush()
        if self.remote is not None:
            self.remote.flush()
        self._update_usage()

    def close(self) -> None:
        """Finish background work; under write-back, first write memory-only blocks to disk."""
        if self._closed:
            return
        try:
            self._prefetcher.shutdown(wait=True)
            self._layer_worker.shutdown(wait=True)
            if self.cfg.write_policy == "write_back" and self._writer is not None:
                self._write_back_all()
            if self._writer is not None:
                self._writer.close()
            if self.remote is not None:
                self.remote.close()
        finally:
            self._closed = True
            self.engine.close()
            self._io.shutdown(wait=True)
            if self.disk is not None:
                self.disk.close()
            if self._exporter is not None:
                from .metrics import stop_exporter
                stop_exporter(self._exporter[0], self._exporter[1])
            if self.metrics is not None:
                self.metrics.close()

    def _write_back_all(self) -> None:
        with self._lock:
            held = list(dict.fromkeys(k for t in ("host", "device") if t in self.pools for k in self.pools[t].keys()))
        on_disk = self.disk.count_each(held) if held else []
        for k, there in zip(held, on_disk):
            if not there:
                self._offer_disk_from_pool(k, block=True, admit=False)
        self._writer.flush()

    def __enter__(self) -> "TierCache":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # best effort; close() is the contract
        try:
            if not self._closed:
                self.close()
        except Exception:
            pass

    # -- stats ---------------------------------------------------------------------------
    def _update_usage(self) -> None:
        for name, pool in self.pools.items():
            self.recorder.usage(name, pool.used_bytes, pool.capacity_bytes, len(pool))
        if self.disk is not None:
            used, blocks = self.disk.used()
            self.recorder.usage("disk", used, self.disk.capacity_bytes, blocks)

    def stats(self) -> dict:
        """Counters and gauges as a plain dict (see tiercache.stats.CacheStats.as_dict)."""
        if not self._closed:
            self._update_usage()
        out = self.recorder.snapshot()
        out["pending_disk_writes"] = self._writer.pending() if self._writer is not None else 0
        return out
