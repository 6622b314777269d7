"""The connector's scheduler and workers without an engine: plans, reports, faults, tensor parallelism.

The real `SchedulerSide` and `WorkerSide` (real host slabs, real LMDB) are driven the way vLLM drives
them, step by step, with requests and scheduler outputs built here. A fake forward pass writes KV that
is a function of each block's prefix, so a block loaded from tiercache can be checked bit for bit
against what recomputing it would give. After every scenario nothing may stay pinned or reserved.
"""

from __future__ import annotations

import hashlib
import time
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("vllm")

from tiercache.integrations import vllm_pages, vllm_worker  # noqa: E402
from tiercache.integrations.vllm_scheduler import SchedulerSide  # noqa: E402
from tiercache.integrations.vllm_worker import WorkerSide  # noqa: E402

B, H, D, L = 16, 2, 8, 2
BLOCK_BYTES = L * 2 * B * H * D * 2
NUM_PAGES = 64


class FullAttentionSpec(SimpleNamespace):
    """Stands in for vLLM's spec of the same name (the settings read its fields and its type name)."""


def configs(extra: dict, tp: int = 1):
    spec = FullAttentionSpec(block_size=B, num_kv_heads=H, head_size=D, head_size_v=D, dtype=torch.bfloat16)
    vllm_config = SimpleNamespace(
        kv_transfer_config=SimpleNamespace(kv_connector_extra_config=extra),
        model_config=SimpleNamespace(model="/models/tiny", revision=None),
        parallel_config=SimpleNamespace(tensor_parallel_size=tp))
    kv = SimpleNamespace(kv_cache_groups=[SimpleNamespace(layer_names=[f"layers.{i}.attn" for i in range(L)],
                                                          kv_cache_spec=spec)])
    return vllm_config, kv


def block_kv(tokens: list[int], i: int, rank: int) -> torch.Tensor:
    """What the model computes for block i: a function of its whole prefix (and the rank's heads)."""
    seed = int.from_bytes(hashlib.blake2b(repr((tokens[:(i + 1) * B], rank)).encode(), digest_size=8).digest(),
                          "little") >> 1
    g = torch.Generator().manual_seed(seed)
    return torch.randn((L, 2, B, H, D), generator=g).to(torch.bfloat16)


class Engine:
    """One scheduler, `tp` workers; requests run to the end of their prompt in one step each."""

    def __init__(self, extra: dict, tp: int = 1, monkeypatch=None) -> None:
        self.cfgs = configs(extra, tp)
        self.sched = SchedulerSide(*self.cfgs)
        self.workers = []
        for rank in range(tp):
            if monkeypatch is not None:
                monkeypatch.setattr(vllm_worker, "_tp_rank", lambda r=rank: r)
            w = WorkerSide(*self.cfgs)
            w.layers = [torch.zeros((NUM_PAGES, H, B, 2 * D), dtype=torch.bfloat16) for _ in range(L)]
            w.page_layout = "flash"
            self.workers.append(w)
        self.free = list(range(1, NUM_PAGES))
        self.n = 0

    def close(self) -> None:
        for w in self.workers:
            w.close()
        self.sched.close()

    def request(self, tokens: list[int]) -> SimpleNamespace:
        self.n += 1
        return SimpleNamespace(request_id=f"r{self.n}", all_token_ids=list(tokens), num_tokens=len(tokens),
                               num_computed_tokens=0, cache_salt=None, lora_request=None, mm_features=None,
                               prompt_embeds=None)

    def run(self, req: SimpleNamespace, between=None) -> dict:
        """Admit and prefill `req`; returns what happened. `between(engine)` runs after the lookup."""
        s = self.sched
        hit, is_async = s.num_new_matched_tokens(req, 0)
        assert not is_async
        if between is not None:
            between(self)
        nblocks = -(-req.num_tokens // B)
        pages = [self.free.pop(0) for _ in range(nblocks)]
        s.update_state_after_alloc(req, SimpleNamespace(get_block_ids=lambda: (pages,)), hit)
        req.num_computed_tokens = hit
        out = SimpleNamespace(
            scheduled_new_reqs=[SimpleNamespace(req_id=req.request_id, block_ids=(pages,))],
            scheduled_cached_reqs=SimpleNamespace(req_ids=[], new_block_ids=[], resumed_req_ids=set()),
            num_scheduled_tokens={req.request_id: req.num_tokens - hit}, scheduled_spec_decode_tokens={})
        meta = s.build_meta(out)
        loaded, failed = [], set()
        report = None
        for rank, w in enumerate(self.workers):
            w.start_load(meta)
            failed |= w.failed_blocks()
            # the forward pass: vLLM computes every block it did not get (failed ones included)
            good_upto = hit // B
            for j, page in enumerate(pages[:good_upto]):
                if page in failed:
                    good_upto = j
                    break
            for i in range(good_upto, req.num_tokens // B):
                self._write_page(w, pages[i], block_kv(req.all_token_ids, i, rank))
            loaded.append([torch.equal(self._read_page(w, pages[i]), block_kv(req.all_token_ids, i, rank))
                           for i in range(hit // B) if pages[i] not in failed])
            w.save(meta)
            part = w.take_report()
            report = part if report is None else report.aggregate(part) if part is not None else report
        s.update_connector_output(report)
        req.num_computed_tokens = req.num_tokens
        s.request_finished(req)
        self.free.extend(pages)
        return {"hit_blocks": hit // B, "failed": failed, "loaded_exact": loaded, "meta": meta}

    @staticmethod
    def _write_page(w: WorkerSide, page: int, kv: torch.Tensor) -> None:
        vllm_pages.torch_scatter(kv.unsqueeze(0).to(w.layers[0].device), w.layers, [page], "flash")  # not patched

    @staticmethod
    def _read_page(w: WorkerSide, page: int) -> torch.Tensor:
        return vllm_pages.torch_gather(w.layers, [page], "flash")[0].cpu()

    def idle(self) -> bool:
        d = self.sched.describe()
        return d["pending_jobs"] == 0 and all(v == 0 for t in d["in_flight"].values() for v in t.values())


def doc(n_blocks: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 30000, (n_blocks * B + 5,), generator=g).tolist()


@pytest.fixture
def engine(tmp_path, monkeypatch):
    made = []

    def make(extra: dict | None = None, tp: int = 1) -> Engine:
        e = Engine(extra if extra is not None else {"host_bytes": 64 * BLOCK_BYTES}, tp, monkeypatch)
        made.append(e)
        return e

    yield make
    for e in made:
        e.close()


def on_disk(engine, tmp_path, toks: list[int], **extra) -> tuple[dict, Engine]:
    """Store `toks` through one engine, close it, and return a second one over the same disk (a new process:
    empty host memory)."""
    cfg = {"host_bytes": 64 * BLOCK_BYTES, "disk_path": str(tmp_path / "store"), "disk_bytes": "64MiB", **extra}
    a = engine(cfg)
    a.run(a.request(toks))
    a.workers[0].flush()
    a.close()
    return cfg, engine(cfg)


def test_host_hits_are_offered_by_the_scheduler_and_served_bit_exact(engine):
    e = engine()
    toks = doc(6, 1)
    first = e.run(e.request(toks))
    assert first["hit_blocks"] == 0 and e.sched.describe()["host_blocks"] == 6
    second = e.run(e.request(toks))
    assert second["hit_blocks"] == 6 and not second["failed"]
    assert second["loaded_exact"] == [[True] * 6]
    assert e.sched.stats.data.get("hit_tokens.host") == 6 * B
    st = e.workers[0].cache.stats()          # the worker's own stats (and exporter) count its host slab
    assert st["loaded_tokens"]["host"] == 6 * B and st["blocks"]["host"] == 6
    assert st["stored_bytes"]["host"] == 6 * BLOCK_BYTES and st["capacity_bytes"]["host"] == 64 * BLOCK_BYTES
    assert e.idle()


def test_disk_hits_are_promoted_to_host_memory(engine, tmp_path):
    toks = doc(5, 2)
    _, b = on_disk(engine, tmp_path, toks)
    r = b.run(b.request(toks))
    assert r["hit_blocks"] == 5 and r["loaded_exact"] == [[True] * 5]
    assert b.sched.stats.take().data["hit_tokens.disk"] == 5 * B
    assert b.sched.describe()["host_blocks"] == 5          # promoted on the way up ...
    r = b.run(b.request(toks))
    assert r["loaded_exact"] == [[True] * 5]
    assert b.sched.stats.take().data["hit_tokens.host"] == 5 * B   # ... and served from there next time
    assert b.idle()


def test_blocks_evicted_between_lookup_and_load_are_recomputed_never_wrong(engine):
    e = engine({"host_bytes": 4 * BLOCK_BYTES})             # room for 4 blocks
    toks = doc(4, 3)
    e.run(e.request(toks))
    # after the lookup offered 4 host blocks, another request's save takes every slot
    r = e.run(e.request(toks), between=lambda eng: eng.run(eng.request(doc(4, 4))))
    assert r["hit_blocks"] == 4
    assert len(r["failed"]) == 4 and r["loaded_exact"] == [[]]
    assert e.idle()
    assert e.run(e.request(toks))["hit_blocks"] == 0        # recomputed (and saved: this load succeeds)
    again = e.run(e.request(toks))
    assert again["hit_blocks"] == 4 and again["loaded_exact"] == [[True] * 4]


def test_a_slot_holding_another_block_is_a_miss(engine):
    e = engine()
    toks = doc(3, 5)
    e.run(e.request(toks))
    w = e.workers[0]
    slot = next(i for i, k in enumerate(w.slot_keys) if k is not None)
    w.slot_keys[slot] = b"\x00" * 16                        # the worker's slot no longer holds that block
    r = e.run(e.request(toks))
    assert r["hit_blocks"] == 3 and len(r["failed"]) == 1
    assert all(r["loaded_exact"][0])                        # the other two are served, exact
    assert e.idle()


@pytest.mark.parametrize("fault", [RuntimeError("scatter failed"), KeyboardInterrupt()])
def test_a_load_that_raises_releases_its_plan(engine, monkeypatch, tmp_path, fault):
    toks = doc(4, 6)
    _, b = on_disk(engine, tmp_path, toks)
    real = vllm_pages.scatter

    def broken(*args, **kw):
        raise fault

    monkeypatch.setattr(vllm_pages, "scatter", broken)
    if isinstance(fault, KeyboardInterrupt):
        with pytest.raises(KeyboardInterrupt):
            b.run(b.request(toks))
        b.sched.update_connector_output(b.workers[0].take_report())   # what the interrupted step reported
    else:
        r = b.run(b.request(toks))
        assert len(r["failed"]) == 4
    assert b.sched.describe()["host_blocks"] == 0            # no promotion was committed
    assert b.idle()
    monkeypatch.setattr(vllm_pages, "scatter", real)
    r = b.run(b.request(toks))
    assert r["hit_blocks"] == 4 and r["loaded_exact"] == [[True] * 4]


def test_a_save_that_raises_makes_nothing_readable(engine, monkeypatch):
    e = engine()
    toks = doc(3, 7)

    def broken(*args, **kw):
        raise OSError("gather failed")

    monkeypatch.setattr(vllm_pages, "gather", broken)
    e.run(e.request(toks))
    monkeypatch.undo()
    assert e.sched.describe()["host_blocks"] == 0 and e.idle()
    assert e.run(e.request(toks))["hit_blocks"] == 0


def test_tensor_parallel_ranks_must_all_succeed(engine, monkeypatch):
    e = engine({"host_bytes": 64 * BLOCK_BYTES}, tp=2)
    toks = doc(3, 8)
    real = vllm_pages.gather
    calls = {"n": 0}

    def rank1_fails(layers, ids, layout):
        calls["n"] += 1
        if layers is e.workers[1].layers:
            raise OSError("rank 1 cannot save")
        return real(layers, ids, layout)

    monkeypatch.setattr(vllm_pages, "gather", rank1_fails)
    e.run(e.request(toks))
    assert e.sched.describe()["host_blocks"] == 0 and e.idle()   # rank 0 alone having them is not a hit
    monkeypatch.setattr(vllm_pages, "gather", real)
    e.run(e.request(toks))
    r = e.run(e.request(toks))
    assert r["hit_blocks"] == 3 and r["loaded_exact"] == [[True] * 3, [True] * 3]   # each rank its own KV
    assert e.workers[0].slot_keys != e.workers[1].slot_keys   # the ranks' namespaces differ
    assert e.idle()


def test_asynchronous_load_reports_the_request_when_its_blocks_are_in(engine, tmp_path):
    toks = doc(5, 9)
    _, b = on_disk(engine, tmp_path, toks, async_load_bytes=0)   # every slow-tier load in the background
    s, w = b.sched, b.workers[0]
    req = b.request(toks)
    hit, is_async = s.num_new_matched_tokens(req, 0)
    assert (hit, is_async) == (5 * B, True)
    pages = [b.free.pop(0) for _ in range(6)]
    s.update_state_after_alloc(req, SimpleNamespace(get_block_ids=lambda: (pages,)), hit)
    idle_step = SimpleNamespace(scheduled_new_reqs=[], num_scheduled_tokens={}, scheduled_spec_decode_tokens={},
                                scheduled_cached_reqs=SimpleNamespace(req_ids=[], new_block_ids=[],
                                                                      resumed_req_ids=set()))
    meta = s.build_meta(idle_step)          # the request is not scheduled while it waits for its KV
    assert [j.is_async for j in meta.loads] == [True]
    w.start_load(meta)
    deadline = time.monotonic() + 30
    done: set[str] = set()
    while req.request_id not in done and time.monotonic() < deadline:
        done |= w.finished_loads()
        time.sleep(0.01)
    assert req.request_id in done and not w.failed_blocks()
    s.update_connector_output(w.take_report())
    for i in range(5):
        assert torch.equal(Engine._read_page(w, pages[i]), block_kv(toks, i, 0))
    assert s.describe()["host_blocks"] == 5 and b.idle()   # promoted, nothing left pinned
    # a small load from host memory stays synchronous
    assert s.num_new_matched_tokens(b.request(toks), 0) == (5 * B, False)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_loads_layer_by_layer_on_a_side_stream(engine):
    """Host hit into GPU pages: one scatter per layer on the load stream; the compute stream waits per layer."""
    e = engine()
    w = e.workers[0]
    w.layers = [torch.zeros((NUM_PAGES, H, B, 2 * D), dtype=torch.bfloat16, device="cuda") for _ in range(L)]
    toks = doc(4, 10)
    e.run(e.request(toks))
    req = e.request(toks)
    hit, _ = e.sched.num_new_matched_tokens(req, 0)
    pages = [e.free.pop(0) for _ in range(5)]
    e.sched.update_state_after_alloc(req, SimpleNamespace(get_block_ids=lambda: (pages,)), hit)
    out = SimpleNamespace(
        scheduled_new_reqs=[SimpleNamespace(req_id=req.request_id, block_ids=(pages,))],
        scheduled_cached_reqs=SimpleNamespace(req_ids=[], new_block_ids=[], resumed_req_ids=set()),
        num_scheduled_tokens={req.request_id: req.num_tokens - hit}, scheduled_spec_decode_tokens={})
    meta = e.sched.build_meta(out)
    torch.cuda._sleep(50_000_000)              # the compute stream is busy: the loads must not wait for the host
    w.start_load(meta)
    assert sorted(w._layer_events) == list(range(L))
    for name in w.layer_names:
        w.wait_for_layer(name)
    assert not w._layer_events
    assert all(torch.equal(Engine._read_page(w, pages[i]), block_kv(toks, i, 0)) for i in range(4))
