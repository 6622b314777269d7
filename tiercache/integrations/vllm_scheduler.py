"""Scheduler side of the vLLM connector: what to load and save, decided without KV bytes.

The decision layer lives here. A `BlockManager` (torch-free, `tiercache.core`) mirrors the host
tier of the workers: every worker holds one host slab of the same size, every tensor-parallel rank
executes the same plans (the same slot ids) over its own keys, so one manager decides for all. The
slow tiers are shared stores: their membership comes from the disk index (LMDB, shared by
processes) and the remote server, through one read view per rank; a block counts only when every
rank has it.

    lookup     host prefix from the manager, then the slow tiers for the blocks after it
    load       host blocks pinned (`prepare_load`); host slots reserved for the slow blocks it brings
               up (`prepare_store`): a disk hit is promoted to host memory for the next request
    save       new full blocks get host slots (`prepare_store`); the workers copy them in and write
               them through to the slow tiers (their own `TierCache`, which skips what is stored)

Each plan becomes a job with an id in `TierCacheMetadata`. Workers report every job with a per-block
ok list (`TierCacheWorkerMeta`, vLLM's worker->scheduler channel); when every rank has reported, the
plan is completed with the blocks all ranks got right (`complete_load`/`complete_store`): a slot a
worker failed to fill never becomes readable, and workers check each host slot's key before reading
it, so a divergence is a miss (recomputed), never another block's KV.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata, KVConnectorWorkerMetadata

from ..core import BlockManager
from ..core.plans import LoadPlan
from ..keys import Keyer
from ..manager import TierCache
from .vllm_metrics import TierCacheStats
from .vllm_settings import cache_config, host_slots


@dataclass
class LoadJob:
    """Load blocks [start_block, start_block + len(block_ids)) of `tokens` into vLLM's `block_ids`.

    Job block j < len(host_slots) is read from host slot host_slots[j]; the rest come from the slow
    tiers, and a slow block j in `promote` is also copied into that host slot."""

    job_id: int
    req_id: str
    keys: list[list[bytes]]    # per tensor-parallel rank, the keys of the job's blocks (no tokens shipped)
    salt: str | None
    start_block: int
    block_ids: list[int]
    host_slots: list[int] = field(default_factory=list)
    promote: dict[int, int] = field(default_factory=dict)
    is_async: bool = False     # loaded in the background; the request waits until a worker reports it


@dataclass
class SaveJob:
    """Save blocks [first_block, first_block + len(block_ids)) of `tokens`, held in vLLM's `block_ids`:
    job block j into host slot host_slots[j] (when it has one), and to the slow tiers when `write`."""

    job_id: int
    req_id: str
    keys: list[list[bytes]]    # per tensor-parallel rank, the keys of the job's blocks
    salt: str | None
    first_block: int
    block_ids: list[int]
    host_slots: dict[int, int] = field(default_factory=dict)
    write: bool = False


@dataclass
class TierCacheMetadata(KVConnectorMetadata):
    loads: list[LoadJob] = field(default_factory=list)
    saves: list[SaveJob] = field(default_factory=list)


@dataclass
class TierCacheWorkerMeta(KVConnectorWorkerMetadata):
    """Worker -> scheduler: job id -> (ranks that reported it, ok per job block, AND-ed over ranks)."""

    done: dict[int, tuple[int, list[bool]]] = field(default_factory=dict)

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVConnectorWorkerMetadata:
        out = dict(self.done)
        for jid, (n, ok) in getattr(other, "done", {}).items():
            if jid in out:
                m, mine = out[jid]
                out[jid] = (m + n, [a and b for a, b in zip(mine, ok)])
            else:
                out[jid] = (n, list(ok))
        return TierCacheWorkerMeta(out)


@dataclass
class _Req:
    req: Any                       # vLLM's Request (its token list grows as it decodes)
    keys: list = field(default_factory=list)   # rank 0's block keys, as far as they were needed
    rank_keys: dict[int, list] = field(default_factory=dict)  # the other ranks' keys, likewise
    block_ids: list[int] = field(default_factory=list)
    saved_blocks: int = 0          # full blocks the workers were asked to save (or that were cached)
    host_blocks: int = 0           # last lookup: blocks of the prefix in host memory ...
    tiers: list[str] = field(default_factory=list)  # ... and the serving tier of every cached block
    local_tokens: int = 0          # vLLM's own prefix-cache hit at that lookup
    lookup_tokens: int = 0         # tokens that lookup asked tiercache about
    is_async: bool = False         # that lookup answered: load in the background


@dataclass
class _Pending:
    req_id: str
    kind: str                      # "load" | "save"
    first_block: int               # the request's block index of job block 0
    plans: list[tuple[Any, int]]   # (plan, job block index of the plan's first key)
    n: int                         # job blocks
    tiers: list[str] = field(default_factory=list)  # load: serving tier per job block (for the hit counts)
    reports: int = 0
    ok: list[bool] | None = None


def salt_of(request: Any) -> str | None | bool:
    """tiercache's salt for a request, or False when its KV must not be shared (LoRA, images, embeddings)."""
    if getattr(request, "lora_request", None) is not None or getattr(request, "mm_features", None) \
            or getattr(request, "prompt_embeds", None) is not None:
        return False
    return request.cache_salt


class SchedulerSide:
    def __init__(self, vllm_config: Any, kv_cache_config: Any) -> None:
        self.tp_size = vllm_config.parallel_config.tensor_parallel_size
        self.cfg = cache_config(vllm_config, kv_cache_config)
        self.block_size = self.cfg.layout.block_size
        # every rank's keys are hashed here, once per block of a request (each rank has its own namespace)
        self.keyers = [Keyer(self.cfg)] + [Keyer(cache_config(vllm_config, kv_cache_config, tp_rank=r))
                                           for r in range(1, self.tp_size)]
        slots = host_slots(self.cfg)
        self.core = BlockManager({"host": slots}, eviction=self.cfg.eviction) if slots else None
        # One read view of the slow tiers per rank (each rank has its own namespace); no memory tier here.
        self.views: list[TierCache] = []
        if self.cfg.disk_enabled or self.cfg.remote_url:
            for rank in range(self.tp_size):
                # the workers publish the tiers' series; a view would count the disk's gauges twice
                self.views.append(TierCache(cache_config(vllm_config, kv_cache_config, tp_rank=rank, host_bytes=0,
                                                         metrics_port=None), publish=False))
        self.reqs: dict[str, _Req] = {}
        self.new_loads: list[LoadJob] = []   # planned since the last step's metadata
        self.pending: dict[int, _Pending] = {}
        self._next_job = 0
        self.stats = TierCacheStats()

    def close(self) -> None:
        for v in self.views:
            v.close()
        self.views = []

    def _state(self, request: Any) -> _Req:
        st = self.reqs.get(request.request_id)
        if st is None:
            st = self.reqs[request.request_id] = _Req(request)
        return st

    def _keys(self, st: _Req, n: int, salt: str | None, rank: int = 0) -> list:
        """A rank's keys of the request's first n blocks: each block hashed once, the chain extended from
        the last key as the request grows (dropped with the request)."""
        keys = st.keys if rank == 0 else st.rank_keys.setdefault(rank, [])
        have = len(keys)
        if have < n:
            B = self.block_size
            keys += self.keyers[rank].keys(list(st.req.all_token_ids[have * B:n * B]), salt,
                                           after=keys[-1] if have else None)
        return keys[:n]

    def _job_keys(self, st: _Req, first: int, end: int, salt: str | None) -> list[list[bytes]]:
        # plain bytes: what crosses to the worker processes is the metadata's pickle
        return [[bytes(k) for k in self._keys(st, end, salt, r)[first:end]] for r in range(self.tp_size)]

    def _job_id(self) -> int:
        self._next_job += 1
        return self._next_job

    # -- lookup ----------------------------------------------------------------------------------
    def _slow_tiers(self, st: _Req, n: int, salt: str | None, skip: int) -> list[str]:
        """Serving tier of each block after the first `skip` (of n) that every rank's slow tiers hold."""
        out: list[str] | None = None
        for rank, view in enumerate(self.views):
            tiers = view.core.lookup(self._keys(st, n, salt, rank)[skip:])
            out = tiers if out is None else out[:len(tiers)]
        return out or []

    def num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int, bool]:
        st = self._state(request)
        st.host_blocks, st.tiers, st.is_async = 0, [], False
        st.local_tokens, st.lookup_tokens = num_computed_tokens, 0
        salt = salt_of(request)
        if salt is False:
            return 0, False
        B = self.block_size
        # vLLM must compute at least the last token itself.
        limit = (request.num_tokens - 1) // B
        if limit * B <= num_computed_tokens:
            return 0, False
        keys = self._keys(st, limit, salt)
        host = self.core.lookup(keys) if self.core is not None else []
        slow = self._slow_tiers(st, limit, salt, len(host)) if self.views and len(host) < limit else []
        st.host_blocks, st.tiers = len(host), host + slow
        st.lookup_tokens = limit * B - num_computed_tokens
        new = max(0, len(st.tiers) * B - num_computed_tokens)
        # worth loading in the background: enough bytes to bring up from the slow tiers (host copies are fast)
        threshold = self.cfg.async_load_bytes
        slow_blocks = len(st.tiers) - max(len(host), num_computed_tokens // B)
        st.is_async = bool(new) and threshold is not None and slow_blocks > 0 and \
            slow_blocks * self.cfg.layout.block_bytes >= threshold   # per worker: each loads its own shard
        return new, st.is_async

    def hit_sources(self, request: Any, num_external_tokens: int) -> dict[str, int]:
        """Tokens of this admission's external hit by tier name (host, disk, remote)."""
        st = self.reqs.get(request.request_id)
        if st is None or num_external_tokens <= 0:
            return {}
        B = self.block_size
        start = st.local_tokens // B
        out: dict[str, int] = {}
        for tier in st.tiers[start:start + num_external_tokens // B]:
            out[tier] = out.get(tier, 0) + B
        return out

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        st = self._state(request)
        self.stats.count("lookup_tokens", st.lookup_tokens)  # once per admission, however often it was asked
        st.lookup_tokens = 0
        B = self.block_size
        # Blocks cached at the lookup and blocks vLLM's own cache held (offered to tiercache when they were
        # computed): saving them again would only repeat the copy.
        st.saved_blocks = max(st.saved_blocks, len(st.tiers), st.local_tokens // B)
        if num_external_tokens <= 0:
            return
        start, end = st.local_tokens // B, (st.local_tokens + num_external_tokens) // B
        keys = st.keys[start:end]
        block_ids = list(blocks.get_block_ids()[0])[start:end]
        plans: list[tuple[Any, int]] = []
        host_slots: list[int] = []
        h = max(0, min(st.host_blocks, end) - start)
        if h and self.core is not None:
            plan = self.core.prepare_load(keys[:h], promote=False)  # pinned until every worker reports
            plans.append((plan, 0))
            host_slots = [slot for _, slot in plan.srcs]
            h = len(plan)   # shorter when a block left host memory since the lookup: read from the slow tiers
        promote: dict[int, int] = {}
        if h < len(keys) and self.core is not None and self.views:
            plan = self.core.prepare_store(keys[h:])
            plans.append((plan, h))
            promote = {h + i: slot for i, dsts in plan.dsts.items() for t, slot in dsts if t == "host"}
        salt = salt_of(request)
        job = LoadJob(self._job_id(), request.request_id, self._job_keys(st, start, end, salt), salt, start,
                      block_ids, host_slots, promote, st.is_async)
        tiers = ["host"] * h + st.tiers[start + h:end]
        self.pending[job.job_id] = _Pending(request.request_id, "load", start, plans, len(keys), tiers)
        self.new_loads.append(job)

    # -- per step --------------------------------------------------------------------------------
    def build_meta(self, scheduler_output: Any) -> TierCacheMetadata:
        from vllm.distributed.kv_transfer.kv_connector.utils import yield_req_data

        meta = TierCacheMetadata(loads=self.new_loads)  # an asynchronous one's request is not scheduled yet
        self.new_loads = []
        for req_id, new_ids, resumed in yield_req_data(scheduler_output):
            st = self.reqs.get(req_id)
            if st is None:
                continue
            if resumed:
                st.block_ids = []
            if new_ids:
                st.block_ids.extend(new_ids[0])
        B = self.block_size
        spec = scheduler_output.scheduled_spec_decode_tokens or {}
        slow = bool(self.views)
        for req_id, n in scheduler_output.num_scheduled_tokens.items():
            st = self.reqs.get(req_id)
            if st is None:
                continue
            req = st.req
            salt = salt_of(req)
            if salt is False:
                continue
            # KV that exists once this step ran; draft tokens may be rejected, so they do not count.
            done = req.num_computed_tokens + n - len(spec.get(req_id, ()))
            full = min(done // B, len(st.block_ids))
            if full <= st.saved_blocks:
                continue
            first = st.saved_blocks
            st.saved_blocks = full
            keys = self._keys(st, full, salt)[first:full]
            slots: dict[int, int] = {}
            plans: list[tuple[Any, int]] = []
            if self.core is not None:
                plan = self.core.prepare_store(keys)
                plans.append((plan, 0))
                slots = {i: slot for i, dsts in plan.dsts.items() for t, slot in dsts if t == "host"}
            if not slots and not slow:
                for plan, _ in plans:  # nothing to copy anywhere
                    self.core.complete_store(plan, [True] * len(keys))
                continue
            job = SaveJob(self._job_id(), req_id, self._job_keys(st, first, full, salt), salt, first,
                          st.block_ids[first:full], slots, slow)
            self.pending[job.job_id] = _Pending(req_id, "save", first, plans, len(keys))
            meta.saves.append(job)
        return meta

    def update_connector_output(self, worker_meta: Any) -> None:
        """Complete the plans of the jobs every rank has reported."""
        for jid, (n, ok) in (getattr(worker_meta, "done", None) or {}).items():
            p = self.pending.get(jid)
            if p is None:
                continue
            p.reports += n
            p.ok = list(ok) if p.ok is None else [a and b for a, b in zip(p.ok, ok)]
            if p.reports < self.tp_size:
                continue
            del self.pending[jid]
            self._complete(p, p.ok + [False] * (p.n - len(p.ok)))

    def _complete(self, p: _Pending, ok: list[bool]) -> None:
        for plan, at in p.plans:
            part = ok[at:at + len(plan)]
            if isinstance(plan, LoadPlan):
                self.core.complete_load(plan, part)
            else:
                self.core.complete_store(plan, part)
        B = self.block_size
        if p.kind == "load":
            for tier, good in zip(p.tiers, ok):
                if good:
                    self.stats.count(f"hit_tokens.{tier}", B)
        else:
            self.stats.count("stored_tokens", ok.count(True) * B)
        bad = next((j for j, good in enumerate(ok) if not good), None)
        st = self.reqs.get(p.req_id)
        if bad is not None and st is not None:
            # vLLM recomputes that block and what follows: offer them to tiercache again when they are done
            st.saved_blocks = min(st.saved_blocks, p.first_block + bad)

    def request_finished(self, request: Any) -> None:
        self.reqs.pop(request.request_id, None)

    def describe(self) -> dict:
        """The decision layer's state (for tests and `stats`): host blocks held, jobs in flight."""
        return {"host_blocks": self.core.held_by("host") if self.core is not None else 0,
                "in_flight": self.core.in_flight() if self.core is not None else {},
                "pending_jobs": len(self.pending)}


__all__ = ["LoadJob", "SaveJob", "SchedulerSide", "TierCacheMetadata", "TierCacheWorkerMeta", "salt_of"]
