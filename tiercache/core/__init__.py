"""The decision layer: which tier holds which block. Imports no torch and holds no KV bytes,
so it can run where there are none (vLLM's scheduler process decides; its workers move bytes).

    from tiercache.core import BlockManager
    mgr = BlockManager({"host": 1024}, eviction="lru", admission="all",
                       write_policy="write_through", disk=DiskIndex(...), remote=None)

    tiers = mgr.lookup(keys)                   # serving tier per block of the cached prefix
    plan = mgr.prepare_load(keys)              # sources pinned, promotion slots reserved
    ... move bytes: plan.srcs[i] -> out, and into plan.promote[i]; spills first ...
    jobs = mgr.complete_load(plan, ok)         # ok[i]: block i's bytes arrived everywhere
    plan = mgr.prepare_store(keys, tag)        # plan.dsts[i]: slots to copy block i into
    cached, jobs = mgr.complete_store(plan, ok)
    ... the write-behind writes each job's bytes, then mgr.complete_write(job, {tier: ok}) ...

Protocol: every prepare_* is followed by exactly one complete_* on every path
(a `finally` that knows which bytes arrived). A reserved slot becomes readable
only through complete_*(ok=True) for its block; with ok=False it is freed and
its bytes are never served. Write-back victims (`plan.spills`) are copied before
the slots they leave are written, each reported with complete_spill.
"""

from .index import SlotIndex
from .manager import MEMORY_TIERS, BlockManager
from .plans import LoadPlan, Spill, StorePlan, WriteJob
from .strategies import WRITE_POLICIES, DiskIndex, RemoteIndex, WritePolicy, make_write_policy

__all__ = ["BlockManager", "SlotIndex", "LoadPlan", "StorePlan", "Spill", "WriteJob", "DiskIndex",
           "RemoteIndex", "WritePolicy", "WRITE_POLICIES", "make_write_policy", "MEMORY_TIERS"]
