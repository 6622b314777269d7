"""Scheduler side of the vLLM connector: what to load and what to save, decided without KV bytes.

Lookups read the disk tier's index (LMDB is shared by processes); the host tier lives in the
worker, so a block held only there is not offered (a lost hit, never a wrong one). Loads are
synchronous (before the step's forward). Each step asks the workers to save every full block a
request will have computed by the end of the step (beyond what it already asked for).

What crosses to the workers is `TierCacheMetadata`: plain lists (token ids, block ids, salts).
A block that fails to load is reported by the worker and recomputed by vLLM
(`kv_load_failure_policy="recompute"`, set by the connector).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata

from ..manager import TierCache
from .vllm_metrics import TierCacheStats
from .vllm_settings import cache_config


@dataclass
class LoadJob:
    """Load blocks [start_block, start_block + len(block_ids)) of `tokens` into `block_ids`."""

    req_id: str
    tokens: list[int]          # the request's tokens up to the end of the last block to load
    salt: str | None
    start_block: int
    block_ids: list[int]


@dataclass
class SaveJob:
    """Save the first len(block_ids) full blocks of `tokens`, held in vLLM's blocks `block_ids`."""

    req_id: str
    tokens: list[int]
    salt: str | None
    block_ids: list[int]
    first_new_block: int = 0   # blocks before it were saved by an earlier job (for the stored-tokens count)


@dataclass
class TierCacheMetadata(KVConnectorMetadata):
    loads: list[LoadJob] = field(default_factory=list)
    saves: list[SaveJob] = field(default_factory=list)


@dataclass
class _Req:
    req: Any                       # vLLM's Request (its token list grows as it decodes)
    block_ids: list[int] = field(default_factory=list)
    saved_blocks: int = 0          # full blocks the workers were asked to save
    hit_tokens: int = 0            # last lookup: tokens of the cached prefix (block multiple)
    local_tokens: int = 0          # vLLM's own prefix-cache hit at that lookup
    lookup_tokens: int = 0         # tokens that lookup asked tiercache about
    pending_load: LoadJob | None = None


def salt_of(request: Any) -> str | None | bool:
    """tiercache's salt for a request, or False when its KV must not be shared (LoRA, images, embeddings)."""
    if getattr(request, "lora_request", None) is not None or getattr(request, "mm_features", None) \
            or getattr(request, "prompt_embeds", None) is not None:
        return False
    return request.cache_salt


class SchedulerSide:
    def __init__(self, vllm_config: Any, kv_cache_config: Any) -> None:
        tp_size = vllm_config.parallel_config.tensor_parallel_size
        # One disk view per tensor-parallel rank (each rank has its own namespace); no host memory here.
        self.views: list[TierCache] = []
        self.cfg = cache_config(vllm_config, kv_cache_config)
        self.block_size = self.cfg.layout.block_size
        if self.cfg.disk_enabled:
            for rank in range(tp_size):
                cfg = cache_config(vllm_config, kv_cache_config, tp_rank=rank, host_bytes=0, remote_url=None,
                                   metrics_port=None)
                self.views.append(TierCache(cfg))
        self.reqs: dict[str, _Req] = {}
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

    # -- lookup ----------------------------------------------------------------------------------
    def _cached_tokens(self, tokens: list[int], salt: str | None) -> int:
        if not self.views:
            return 0
        return min(sum(v.lookup_by_tier(tokens, salt=salt).values()) for v in self.views)

    def num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int, bool]:
        st = self._state(request)
        st.pending_load, st.hit_tokens, st.local_tokens, st.lookup_tokens = None, 0, num_computed_tokens, 0
        salt = salt_of(request)
        if salt is False:
            return 0, False
        B = self.block_size
        # vLLM must compute at least the last token itself.
        limit = (request.num_tokens - 1) // B * B
        if limit <= num_computed_tokens:
            return 0, False
        hit = min(self._cached_tokens(list(request.all_token_ids[:limit]), salt), limit)
        st.hit_tokens, st.lookup_tokens = hit, limit - num_computed_tokens
        return max(0, hit - num_computed_tokens), False

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        st = self._state(request)
        self.stats.count("lookup_tokens", st.lookup_tokens)  # once per admission, however often it was asked
        st.lookup_tokens = 0
        # Blocks tiercache held at the lookup, and blocks vLLM's own cache held (offered to tiercache when they
        # were computed): saving them again would only repeat the gather.
        st.saved_blocks = max(st.saved_blocks, st.hit_tokens // self.block_size, st.local_tokens // self.block_size)
        if num_external_tokens <= 0:
            return
        B = self.block_size
        start, end = st.local_tokens // B, (st.local_tokens + num_external_tokens) // B
        block_ids = list(blocks.get_block_ids()[0])
        st.pending_load = LoadJob(request.request_id, list(request.all_token_ids[:end * B]), salt_of(request),
                                  start, block_ids[start:end])

    # -- per step --------------------------------------------------------------------------------
    def build_meta(self, scheduler_output: Any) -> TierCacheMetadata:
        from vllm.distributed.kv_transfer.kv_connector.utils import yield_req_data

        meta = TierCacheMetadata()
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
        for req_id, n in scheduler_output.num_scheduled_tokens.items():
            st = self.reqs.get(req_id)
            if st is None:
                continue
            req = st.req
            if st.pending_load is not None:
                meta.loads.append(st.pending_load)
                st.pending_load = None
            salt = salt_of(req)
            if salt is False:
                continue
            # KV that exists once this step ran; draft tokens may be rejected, so they do not count.
            done = req.num_computed_tokens + n - len(spec.get(req_id, ()))
            full = min(done // B, len(st.block_ids))
            if full > st.saved_blocks:
                meta.saves.append(SaveJob(req_id, list(req.all_token_ids[:full * B]), salt, st.block_ids[:full],
                                          st.saved_blocks))
                st.saved_blocks = full
        return meta

    def request_finished(self, request: Any) -> None:
        self.reqs.pop(request.request_id, None)
