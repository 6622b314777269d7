"""TierCache: the public object, composed of the decision layer and the byte layer.

    decisions  tiercache.core.BlockManager: slots, pins, eviction, admission, write policy
    bytes      tiercache.mover.Mover over the media (memory slabs, LMDB, Redis) and the
               write-behind that feeds the slow tiers

Every call is one plan: prepare (decide, pin, reserve) -> move bytes -> complete
with what arrived, in a `finally`. So an interrupted or failing call releases
exactly what it took and never leaves a slot readable whose bytes did not arrive.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from .codec import BlockCodec
from .config import CacheConfig
from .core import BlockManager, DiskIndex, RemoteIndex, WriteJob
from .errors import ClosedError, OnceLogger
from .keys import BlockKey, Keyer, Namespace, tokens_to_array
from .layerwise import LayerLoad, PrefetchHandle
from .mover import Mover
from .reads import ReadPath
from .stats import Recorder
from .tiers.slab import MemorySlab, StagingArea
from .transfer import TransferEngine
from .writebehind import EvictionGate, WriteBehind

# A store is copied and queued for the slow tiers in groups of about this many bytes (at least a block):
# the write-behind writes a group while the next one is copied.
STORE_GROUP_BYTES = 64 << 20


class TierCache:
    def __init__(self, cfg: CacheConfig, registry: Any = None, *, publish: bool = True,
                 external_tiers: tuple[str, ...] = ()) -> None:
        """`publish=False`: no Prometheus series at all (a read view whose owner publishes them).
        `external_tiers`: memory tiers the caller keeps itself (the vLLM worker's host slab, whose slots
        the scheduler decides) but records in this cache's stats and metrics (`recorder`)."""
        if not isinstance(cfg, CacheConfig):
            raise TypeError(f"cfg: expected a CacheConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        self.layout = layout = cfg.layout
        self._B = layout.block_size
        self._log = OnceLogger()
        self._closed = False
        self._keyer = Keyer(cfg)
        self._hasher = self._keyer.hasher
        for name, size in (("device_bytes", cfg.device_bytes), ("host_bytes", cfg.host_bytes)):
            if 0 < size < layout.block_bytes:
                raise ValueError(f"{name}: {size} bytes is smaller than one block ({layout.block_bytes} bytes "
                                 f"for {layout.fingerprint()}); use 0 to turn the tier off")
        slots = {"device": cfg.device_bytes // layout.block_bytes, "host": cfg.host_bytes // layout.block_bytes}
        self.disk = self.remote = None
        unknown = set(external_tiers) - {"device", "host"}
        if unknown:
            raise ValueError(f"external_tiers: expected memory tiers among ['device', 'host'], got {sorted(unknown)}")
        tiers = [t for t in ("device", "host") if slots[t] or t in external_tiers]
        if cfg.disk_enabled:
            tiers.append("disk")
        if cfg.remote_url:
            tiers.append("remote")
        self.metrics = None
        self._exporter = None
        if publish and (registry is not None or cfg.metrics_port is not None
                        or os.environ.get("PROMETHEUS_MULTIPROC_DIR")):
            from .metrics import PromMetrics, is_multiprocess
            if registry is None and cfg.metrics_port is not None and not is_multiprocess():
                from prometheus_client import CollectorRegistry
                registry = CollectorRegistry()  # private: what the exporter below serves
            self.metrics = PromMetrics(tuple(tiers), registry=registry)
        self.recorder = Recorder(tuple(tiers), self.metrics)
        if cfg.disk_enabled:
            from .tiers.disk import DiskTier
            self.disk = _open_disk(DiskTier, cfg, layout, self._log, self.recorder)
            over = self.disk.used()[0] - self.disk.capacity_bytes if self.disk is not None else 0
            if over > 0 and not getattr(self.disk, "readonly", False):  # reopened with a smaller disk_bytes
                self.recorder.evicted("disk", len(self.disk.evict_bytes(over)))
        if cfg.remote_url:
            from .tiers.remote import RemoteTier
            self.remote = _open_remote(RemoteTier, cfg, self._log, self.recorder)
        self.tiers = tuple(t for t in tiers if t not in ("disk", "remote") or getattr(self, t) is not None)
        self.codec = BlockCodec(layout.fingerprint(), layout.itemsize, layout.num_layers,
                                _disk_compression(self.disk, cfg.compression, cfg.io_threads), cfg.zstd_level)
        cuda = torch.cuda.is_available()
        self.slabs = {t: MemorySlab(t, layout, slots[t], cfg.device if t == "device" else torch.device("cpu"),
                                    pin=cuda and t == "host") for t in ("device", "host") if slots[t]}
        self.staging = StagingArea(layout)
        self.core = BlockManager(
            {t: s.num_slots for t, s in self.slabs.items()}, eviction=cfg.eviction, admission=cfg.admission,
            write_policy=cfg.write_policy, stage_limit=cfg.write_queue_blocks, events=self.recorder,
            disk=_disk_index(self.disk) if self.disk is not None else None,
            remote=RemoteIndex(self.remote.exists_many, epoch=lambda: getattr(self.remote, "outages", 0))
            if self.remote is not None else None,
            on_stage_free=self.staging.release)
        self._io = ThreadPoolExecutor(max_workers=cfg.io_threads, thread_name_prefix="tiercache-io")
        # CUDA: copies a worker thread issues go through the engine, ordered after the caller's stream
        self.engine = TransferEngine(cfg.device, cfg.io_threads) if cfg.device.type == "cuda" else None
        self.mover = Mover(layout, self.slabs, self.staging, disk=self.disk, remote=self.remote, codec=self.codec,
                           io=self._io, io_threads=cfg.io_threads, recorder=self.recorder, log=self._log,
                           on_corrupt=self._corrupt, on_missing=self.core.slow_removed)
        self._writer = None
        self._gate = EvictionGate()
        if self.disk is not None or self.remote is not None:
            self._writer = WriteBehind(disk=self.disk, remote=self.remote, codec=self.codec, recorder=self.recorder,
                                       io=self._io, max_queue=cfg.write_queue_blocks, source=self.mover.tensor_of_job,
                                       done=self.core.complete_write, disk_changed=self._disk_changed, log=self._log,
                                       gate=self._gate, source_bytes=self.mover.bytes_of_job)
        self.reads = ReadPath(layout=layout, device=cfg.device, core=self.core, mover=self.mover, disk=self.disk,
                              gate=self._gate, engine=self.engine, recorder=self.recorder, queue=self._queue)
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
        return self._keyer.namespace(salt)

    def keys(self, tokens: Any, salt: Any = None) -> list[BlockKey]:
        """Block keys of every full block of `tokens`."""
        return self._hasher.chain(tokens_to_array(tokens), self._B, self._keyer.start(salt))

    def _tag(self, salt: Any) -> tuple[bytes, dict]:
        return self._keyer.tag(salt)

    # -- lookup --------------------------------------------------------------------------
    def lookup(self, tokens: Any, salt: Any = None) -> int:
        """Tokens of the longest cached prefix (a multiple of block_size). Moves nothing; counts metrics."""
        self._check_open()
        arr = tokens_to_array(tokens)
        tiers = self.core.lookup(self._hasher.chain(arr, self._B, self._keyer.start(salt)))
        by_tier = {t: tiers.count(t) for t in self.tiers}  # the core serves from these only; a C scan each
        self.recorder.lookup(len(arr), {t: n * self._B for t, n in by_tier.items()}, by_tier)
        return len(tiers) * self._B

    def lookup_by_tier(self, tokens: Any, salt: Any = None) -> dict[str, int]:
        """Tokens of the cached prefix per serving tier, without counting a lookup."""
        self._check_open()
        out = {t: 0 for t in self.tiers}
        for t in self.core.lookup(self.keys(tokens, salt)):
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
        keys = self._hasher.chain(arr, self._B, self._keyer.start(salt))
        if not keys:
            return 0
        kv6 = kv.detach()[:, :, :len(keys) * self._B].unflatten(2, (len(keys), self._B))
        return self._store_keys(keys, kv6, salt)

    def store_keys(self, keys: list[BlockKey], blocks: torch.Tensor, salt: Any = None) -> int:
        """Store blocks under keys the caller derived itself (`keys()`, or `tiercache.keys.Keyer` in
        another process): `blocks` is [num_layers, planes, len(keys), block_size, num_kv_heads, head_dim].
        Returns how many of the blocks, from the first, are now cached. Integrations that hold a
        request's later blocks only (the vLLM connector) store them without the prefix's KV."""
        self._check_open()
        L = self.layout
        want = (L.num_layers, L.planes, len(keys), L.block_size, L.num_kv_heads, L.head_dim)
        if not isinstance(blocks, torch.Tensor) or blocks.dtype != L.dtype or tuple(blocks.shape) != want:
            got = f"{list(blocks.shape)} {blocks.dtype}" if isinstance(blocks, torch.Tensor) else type(blocks).__name__
            raise ValueError(f"blocks: expected {list(want)} {L.dtype}, got {got}")
        if not all(isinstance(k, BlockKey) for k in keys):
            raise TypeError("keys: expected BlockKey values (from TierCache.keys or Keyer.keys)")
        if not keys:
            return 0
        return self._store_keys(list(keys), blocks.detach(), salt) // self._B

    def _store_keys(self, keys: list[BlockKey], kv6: torch.Tensor, salt: Any) -> int:
        """Store in groups of about STORE_GROUP_BYTES: each group's blocks are copied, completed and queued
        for the slow tiers before the next group is copied, so the write-behind writes the first
        blocks while the caller's thread copies the rest (a 1 GiB store no longer copies everything
        before the first byte goes to disk)."""
        t0 = time.perf_counter()
        per = max(1, STORE_GROUP_BYTES // self.layout.block_bytes)
        cached: list[bool] = []
        new = 0
        per_tier: dict[str, int] = {}
        tag = self._tag(salt)
        for g in range(0, len(keys), per):
            got, fresh = self._store_group(keys[g:g + per], kv6[:, :, g:g + per] if per < len(keys) else kv6,
                                           tag, per_tier)
            cached += got
            new += fresh
        seconds = time.perf_counter() - t0
        for t, n in per_tier.items():
            self.recorder.stored(t, n * self.layout.block_bytes, seconds)
        self.recorder.stored_tokens(new * self._B)
        n = next((i for i, c in enumerate(cached) if not c), len(cached))
        return n * self._B

    def _store_group(self, keys: list[BlockKey], kv6: torch.Tensor, tag: Any,
                     per_tier: dict[str, int]) -> tuple[list[bool], int]:
        """One group of a store: (cached per block, blocks newly cached); counts slots per tier in per_tier."""
        plan = self.core.prepare_store(keys, tag)
        ok = [False] * len(keys)
        jobs: list[WriteJob] = []
        try:
            self.mover.run_spills(plan.spills, self.core.complete_spill, jobs)
            self.mover.write_blocks(plan, kv6)
            ok = [True] * len(keys)
        finally:
            cached, more = self.core.complete_store(plan, ok)
            jobs += more
            dropped = self._queue(jobs)
        for dsts in plan.dsts.values():
            for t, _ in dsts:
                if t != "stage":
                    per_tier[t] = per_tier.get(t, 0) + 1
        if dropped:  # a block whose only copy was a dropped write is not cached
            idx = [i for i, k in enumerate(keys) if k in dropped]
            for i, there in zip(idx, self.core.cached_locally([keys[i] for i in idx])):
                cached[i] = there
        return cached, sum(1 for i in range(len(keys)) if cached[i] and not plan.present[i])

    def _queue(self, jobs: list[WriteJob]) -> set:
        dropped = set()
        queued = self._writer.offer_many(jobs) if self._writer is not None and jobs else 0
        for j in jobs[queued:]:  # the queue is full: these are dropped, counted, and their sources released
            for d in j.dests:
                self.recorder.dropped_write(d)
            self.core.complete_write(j, {d: False for d in j.dests})
            dropped.add(j.key)
        return dropped

    # -- load ----------------------------------------------------------------------------
    def _check_out(self, out: Any) -> None:
        L = self.layout
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"out: expected a torch.Tensor, got {type(out).__name__}")
        if out.dtype != L.dtype:
            raise TypeError(f"out: expected dtype {L.dtype} (the layout's), got {out.dtype}")
        if out.dim() != 5 or (out.shape[0], out.shape[1], out.shape[3], out.shape[4]) != \
                (L.num_layers, L.planes, L.num_kv_heads, L.head_dim):
            raise ValueError(f"out: expected shape [{L.num_layers}, {L.planes}, T, {L.num_kv_heads}, "
                             f"{L.head_dim}], got {list(out.shape)}")

    def load(self, tokens: Any, out: torch.Tensor | None = None, salt: Any = None) -> torch.Tensor:
        """KV of the longest cached prefix, [L, planes, n, H, D] on cfg.device (n = 0 on a miss).

        With `out=`, the blocks are written into that preallocated tensor (its token
        axis bounds how many are loaded) and the filled view out[:, :, :n] is returned.
        """
        self._check_open()
        keys = self.keys(tokens_to_array(tokens), salt)
        if out is not None:
            self._check_out(out)
            keys = keys[: out.shape[2] // self._B]
        return self.reads.load(keys, out)

    def load_keys(self, keys: list[BlockKey], out: torch.Tensor | None = None,
                  block_major: bool = False) -> torch.Tensor:
        """`load` for keys the caller derived itself (see `store_keys`): the KV of the longest served
        run of `keys` from the first, [L, planes, n, H, D] (n = 0 on a miss); with `block_major`,
        as blocks [m, L, planes, block_size, H, D] (what a paged cache takes, without a reorder)."""
        self._check_open()
        if not all(isinstance(k, BlockKey) for k in keys):
            raise TypeError("keys: expected BlockKey values (from TierCache.keys or Keyer.keys)")
        if out is not None:
            if block_major:
                raise ValueError("out: not with block_major=True (the blocks come back as a new tensor)")
            self._check_out(out)
            keys = keys[: out.shape[2] // self._B]
        return self.reads.load(list(keys), out, block_major)

    def _corrupt(self, tier: str, key: BlockKey, err: Exception) -> None:
        self.recorder.corrupt(tier)
        self._log.warning(f"corrupt-{tier}", "tiercache: corrupt %s block %s (%s); treated as a miss and deleted",
                          tier, key.hex(), err)
        self.core.slow_removed(tier, [key])
        if tier == "disk" and self._writer is not None:
            self._writer.delete_later(key)
        elif tier == "remote" and self.remote is not None:
            self.remote.delete(key)

    def _disk_changed(self, written: list, removed: list, counter: int | None) -> None:
        index = self.core.disk
        if index is not None:
            if removed:
                self.core.slow_removed("disk", removed)
            if counter is not None:
                index.committed(counter)

    # -- prefetch and layer-wise ---------------------------------------------------------
    def prefetch(self, tokens: Any, salt: Any = None) -> PrefetchHandle:
        """Bring the cached prefix up into the memory tiers in the background."""
        self._check_open()
        return self.reads.prefetch(self.keys(tokens_to_array(tokens), salt))

    def load_layers(self, tokens: Any, salt: Any = None, num_tokens: int | None = None) -> LayerLoad:
        """Start a layer-by-layer load of the cached prefix; see tiercache.layerwise.LayerLoad."""
        self._check_open()
        keys = self.keys(tokens_to_array(tokens), salt)
        if num_tokens is not None:
            keys = keys[: num_tokens // self._B]
        return self.reads.load_layers(keys)

    # -- close ---------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError("TierCache is closed")

    def flush(self) -> None:
        """Wait until every queued slow-tier write is committed (no-op once closed)."""
        if self._closed:
            return
        if self._writer is not None:
            self._writer.flush()
        self._update_usage()

    def close(self) -> None:
        """Finish background work; under write-back, first write memory-only blocks to disk."""
        if self._closed:
            return
        try:
            self.reads.close()
            if self.core.policy.flush_on_close and self.disk is not None and self._writer is not None:
                self._write_back_all()
            if self._writer is not None:
                self._writer.close()
        finally:
            self._closed = True
            self._io.shutdown(wait=True)
            if self.engine is not None:
                self.engine.close()
            for slab in self.slabs.values():
                slab.close()
            if self.disk is not None:
                self.disk.close()
            if self.remote is not None:
                self.remote.close()
            if self._exporter is not None:
                from .metrics import stop_exporter
                stop_exporter(self._exporter[0], self._exporter[1])
            if self.metrics is not None:
                self.metrics.close()

    def _write_back_all(self) -> None:
        jobs, spills = self.core.prepare_write_back()
        self.mover.run_spills(spills, self.core.finish_write_back_spill, jobs)
        for j in jobs:
            if not self._writer.offer(j, block=True):
                self.core.complete_write(j, {d: False for d in j.dests})
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
        bb = self.layout.block_bytes
        for name, slab in self.slabs.items():
            held = self.core.held_by(name)
            self.recorder.usage(name, held * bb, slab.num_slots * bb, held)
        if self.disk is not None:
            used, blocks = self.disk.used()
            self.recorder.usage("disk", used, self.disk.capacity_bytes, blocks)

    def stats(self) -> dict:
        """Counters and gauges as a plain dict (see tiercache.stats.CacheStats.as_dict). On a GPU it first
        waits for the copies of loads already returned: their bytes and event timings count from then."""
        if not self._closed:
            self.reads.settle(block=True)
            self._update_usage()
        out = self.recorder.snapshot()
        if self.disk is not None and not out["disk_compressed_bytes"] and out["blocks"].get("disk"):
            # nothing written by this process yet (e.g. just reopened): the ratio the store itself holds,
            # raw block bytes over the bytes charged for them on disk
            out["disk_compression_ratio"] = out["blocks"]["disk"] * self.layout.block_bytes / \
                max(out["used_bytes"]["disk"], 1)
        out["pending_disk_writes"] = self._writer.pending() if self._writer is not None else 0
        out["in_flight"] = self.core.in_flight()
        out["disk_codec"] = getattr(self.disk, "codec_choice", None)  # compression="auto": choice and figures
        return out


def _disk_compression(disk: Any, configured: str, threads: int) -> str:
    """compression="auto" resolved by the disk tier (measured once per store, decoding on as many threads as
    loads do, and recorded there)."""
    return disk.compression_for(configured, threads) if hasattr(disk, "compression_for") else configured


def _open_disk(cls: Any, cfg: CacheConfig, layout: Any, log: OnceLogger, recorder: Recorder) -> Any:
    try:
        disk = cls(cfg.disk_path, layout, cfg.disk_bytes, writemap=cfg.disk_writemap, log=log, recorder=recorder,
                   file_min_bytes=cfg.disk_file_bytes, direct_writes=cfg.disk_direct_writes)
    except TypeError:  # a DiskTier without fault reporting hooks
        disk = cls(cfg.disk_path, layout, cfg.disk_bytes, writemap=cfg.disk_writemap)
    return disk if getattr(disk, "available", True) else None


def _open_remote(cls: Any, cfg: CacheConfig, log: OnceLogger, recorder: Recorder) -> Any:
    kwargs = {"timeout_s": cfg.remote_timeout_s} if hasattr(cfg, "remote_timeout_s") else {}
    return cls(cfg.remote_url, log=log, recorder=recorder, **kwargs)


def _disk_index(disk: Any) -> DiskIndex:
    keys = disk.keys() if hasattr(disk, "keys") else (k for k, _ in disk.iter_meta())
    counter = disk.change_counter if hasattr(disk, "change_counter") else (lambda: disk.env.info()["last_txnid"])
    return DiskIndex(keys, counter, disk.count_each)
