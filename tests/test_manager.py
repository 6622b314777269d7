"""Scenario tests with exact outcomes: which tier serves a hit, which block is evicted."""

import threading

import pytest
import torch

from tiercache import CacheConfig, KVLayout, LayoutMismatch, TierCache
from tiercache.errors import ClosedError

from .conftest import make_kv, same_bytes


def toks(n, start=0):
    return list(range(start, start + n))


def test_store_lookup_load_roundtrip(make_cache, layout):
    c = make_cache(host_blocks=8)
    kv = make_kv(layout, 18)
    assert c.store(toks(18), kv) == 16            # the trailing partial block is ignored
    assert c.lookup(toks(18)) == 16
    assert c.lookup(toks(10)) == 8                # a shorter prompt hits its own full blocks
    assert c.lookup(toks(18, start=1)) == 0
    out = c.load(toks(18))
    assert out.shape == layout.kv_shape(16) and same_bytes(out, kv[:, :, :16])
    s = c.stats()
    assert s["lookup_tokens"] == 18 + 10 + 18
    assert s["hit_tokens"]["host"] == 16 + 8 and s["hit_tokens"]["disk"] == 0
    assert s["stored_tokens"] == 16
    assert s["loaded_bytes"]["host"] == 4 * layout.block_bytes


def test_miss_returns_zero_tokens_not_none(make_cache, layout):
    c = make_cache()
    out = c.load(toks(12))
    assert out.shape == layout.kv_shape(0)
    assert c.lookup(toks(12)) == 0
    assert c.lookup([]) == 0 and c.store([], make_kv(layout, 0)) == 0


def test_containers_hit_the_same_blocks(make_cache, layout):
    import numpy as np
    c = make_cache()
    c.store(toks(8), make_kv(layout, 8))
    assert c.lookup(np.arange(8, dtype=np.int32)) == 8
    assert c.lookup(torch.arange(8)) == 8


def test_exact_tiers_and_lru_eviction(make_cache, layout):
    c = make_cache(host_blocks=3)
    kv = make_kv(layout, 20)
    assert c.store(toks(20), kv) == 20
    c.flush()
    # blocks 0-2 took the three host slots; 3-4 found no evictable slot and live on disk only
    c.flush()
    assert c.lookup_by_tier(toks(20)) == {"host": 12, "disk": 8}
    # a second prompt evicts least recently used host blocks, oldest first
    c.load(toks(4))                                 # block 0 becomes most recently used
    kv2 = make_kv(layout, 8, seed=1)
    c.store(toks(8, start=1000), kv2)
    assert c.stats()["evictions"]["host"] == 2
    assert c.lookup_by_tier(toks(4)) == {"host": 4, "disk": 0}            # survived: recently used
    assert c.lookup_by_tier(toks(12))["host"] == 4                          # blocks 1, 2 went to disk
    assert c.lookup_by_tier(toks(12))["disk"] == 8
    out = c.load(toks(20))
    assert same_bytes(out, kv)


def test_lookup_never_moves_data_and_load_promotes(make_cache, layout):
    c = make_cache(host_blocks=2)
    kv = make_kv(layout, 16)
    c.store(toks(16), kv)
    c.flush()
    before = c.lookup_by_tier(toks(16))
    assert before == {"host": 8, "disk": 8}
    for _ in range(3):
        c.lookup(toks(16))
    assert c.lookup_by_tier(toks(16)) == before
    assert c.stats()["loaded_bytes"] == {"host": 0, "disk": 0}
    # loading blocks 2-3 from disk promotes them into the host tier
    out = c.load(toks(16)[8:] and toks(16))
    assert same_bytes(out, kv)
    assert c.stats()["loaded_bytes"]["disk"] == 2 * layout.block_bytes


def test_burst_beyond_free_host_slots_goes_to_disk_queue(make_cache, layout, monkeypatch):
    """A disk that stalls in its frame-file writes holds up no load: the blocks still on their way down are
    served from memory, and so are the host's, while the writer is still stuck (loads wait for the
    eviction gate, which a batch holds only for its commit, never for its file writes)."""
    from tiercache.tiers.frame_files import FrameFiles

    c = make_cache(host_blocks=2, disk_file_bytes=0)  # every frame is a file
    stall, inside = threading.Event(), threading.Event()
    real = FrameFiles.write

    def stalled(self, *a, **k):
        inside.set()
        stall.wait(60)
        return real(self, *a, **k)
    monkeypatch.setattr(FrameFiles, "write", stalled)
    try:
        kv_a, kv_b = make_kv(layout, 8, seed=1), make_kv(layout, 8, seed=2)
        assert c.store(toks(8), kv_a) == 8
        assert inside.wait(10)                                # the writer is stuck in A's first file
        # A's host slots are pinned until its disk write lands, so B cannot evict them
        assert c.store(toks(8, start=500), kv_b) == 8
        assert c.lookup_by_tier(toks(8)) == {"host": 8, "disk": 0}
        assert c.lookup_by_tier(toks(8, start=500)) == {"host": 0, "disk": 8}
        got: list = []

        def loads() -> None:
            got.append(same_bytes(c.load(toks(8, start=500)), kv_b))   # served from the pending write
            got.append(same_bytes(c.load(toks(8)), kv_a))               # and from host
        t = threading.Thread(target=loads, daemon=True)
        t.start()
        t.join(30)  # liveness, not speed: before the fix they waited for the stalled writes (60 s each)
        assert got == [True, True], "a load waited for the write-behind's file writes"
        assert not stall.is_set() and c._writer.pending()     # all while the writer is still stuck
    finally:
        stall.set()
    c.flush()
    assert c.lookup_by_tier(toks(8)) == {"host": 8, "disk": 0}
    assert same_bytes(c.load(toks(8, start=500)), kv_b)


def test_promotion_from_disk_into_host(make_cache, layout):
    c = make_cache(host_blocks=2)
    kv_a, kv_b = make_kv(layout, 8, seed=1), make_kv(layout, 8, seed=2)
    c.store(toks(8), kv_a)
    c.flush()                                # host blocks queued for disk stay pinned until written
    c.store(toks(8, start=500), kv_b)        # evicts prompt A from host
    c.flush()
    assert c.lookup_by_tier(toks(8)) == {"host": 0, "disk": 8}
    assert same_bytes(c.load(toks(8)), kv_a)
    assert c.lookup_by_tier(toks(8)) == {"host": 8, "disk": 0}
    assert c.lookup_by_tier(toks(8, start=500)) == {"host": 0, "disk": 8}


def test_load_into_preallocated_out(make_cache, layout):
    c = make_cache()
    kv = make_kv(layout, 16)
    c.store(toks(16), kv)
    buf = torch.zeros(layout.kv_shape(40), dtype=layout.dtype)
    view = c.load(toks(16), out=buf)
    assert view.data_ptr() == buf.data_ptr() and view.shape == layout.kv_shape(16)
    assert same_bytes(buf[:, :, :16], kv)
    small = torch.zeros(layout.kv_shape(9), dtype=layout.dtype)   # room for two blocks
    assert same_bytes(c.load(toks(16), out=small), kv[:, :, :8])
    with pytest.raises(TypeError, match="out"):
        c.load(toks(16), out=torch.zeros(layout.kv_shape(16), dtype=torch.float32))
    with pytest.raises(ValueError, match="out"):
        c.load(toks(16), out=torch.zeros(2, 2, 16, 3, 8, dtype=layout.dtype))


def test_salt_isolates_tenants(make_cache, layout):
    c = make_cache()
    c.store(toks(8), make_kv(layout, 8), salt="tenant-a")
    assert c.lookup(toks(8)) == 0
    assert c.lookup(toks(8), salt="tenant-b") == 0
    assert c.lookup(toks(8), salt="tenant-a") == 8
    assert c.load(toks(8), salt="tenant-b").shape[2] == 0
    with pytest.raises(TypeError, match="salt"):
        c.lookup(toks(8), salt=42)


def test_device_tier_serves_first(make_cache, layout):
    c = make_cache(host_blocks=4, device_blocks=2)
    kv = make_kv(layout, 16)
    c.store(toks(16), kv)
    c.flush()
    assert c.lookup_by_tier(toks(16)) == {"device": 8, "host": 8, "disk": 0}
    assert same_bytes(c.load(toks(16)), kv)


def test_tiers_off(tmp_path, layout):
    cfg = CacheConfig(layout=layout, host_bytes=0, disk_path=tmp_path / "d", disk_bytes="8MiB")
    with TierCache(cfg) as c:
        assert c.tiers == ("disk",)
        kv = make_kv(layout, 12)
        assert c.store(toks(12), kv) == 12        # queued for disk counts as cached
        c.flush()
        assert same_bytes(c.load(toks(12)), kv)
        assert c.lookup_by_tier(toks(12)) == {"disk": 12}
    with TierCache(CacheConfig(layout=layout, host_bytes=layout.block_bytes * 2, disk_path=None)) as c:
        assert c.tiers == ("host",)
        assert c.store(toks(12), make_kv(layout, 12)) == 8  # only two blocks fit, nowhere else to go
    with pytest.raises(ValueError, match="host_bytes"):
        TierCache(CacheConfig(layout=layout, host_bytes=10))


def test_bad_input_raises_and_changes_nothing(make_cache, layout):
    c = make_cache()
    kv = make_kv(layout, 8)
    c.store(toks(8), kv)
    c.flush()                                   # the async disk write must not land mid-comparison
    before = c.stats()
    bad = [
        (toks(8), kv.to(torch.float16), TypeError, "dtype"),
        (toks(8), kv[:, :, :7], ValueError, "shape"),
        (toks(8), kv[:1], ValueError, "shape"),
        (toks(8), kv.numpy() if False else "kv", TypeError, "kv"),
        ([0.5] * 8, kv, TypeError, "tokens"),
        ("hello world", kv, TypeError, "tokens"),
        (toks(12, start=100), make_kv(layout, 8), ValueError, "shape"),
    ]
    for tokens, value, exc, word in bad:
        with pytest.raises(exc, match=word):
            c.store(tokens, value)
    after = c.stats()
    assert after["stored_tokens"] == before["stored_tokens"] and after["blocks"] == before["blocks"]
    assert same_bytes(c.load(toks(8)), kv)
    with pytest.raises(TypeError, match="tokens"):
        c.lookup([1.0, 2.0])


def test_store_does_not_alias_caller_tensor(make_cache, layout):
    c = make_cache(host_blocks=0 or 1)
    kv = make_kv(layout, 8)
    keep = kv.clone()
    c.store(toks(8), kv)
    kv.zero_()                                  # the caller reuses its buffer at once
    c.flush()
    assert same_bytes(c.load(toks(8)), keep)


def test_layout_mismatch_on_reopen(tmp_path, layout):
    path = tmp_path / "store"
    kv = make_kv(layout, 8)
    with TierCache(CacheConfig(layout=layout, disk_path=path)) as c:
        c.store(toks(8), kv)
    other = KVLayout(num_layers=3, num_kv_heads=2, head_dim=8, dtype=torch.bfloat16, block_size=4)
    with pytest.raises(LayoutMismatch, match="layout") as e:
        TierCache(CacheConfig(layout=other, disk_path=path))
    assert isinstance(e.value, ValueError)
    with TierCache(CacheConfig(layout=layout, host_bytes=0, disk_path=path)) as c:
        assert same_bytes(c.load(toks(8)), kv)     # nothing was lost


def test_close_drains_write_through(tmp_path, layout):
    path = tmp_path / "store"
    kv = make_kv(layout, 40)
    with TierCache(CacheConfig(layout=layout, disk_path=path)) as c:
        c.store(toks(40), kv)
    with TierCache(CacheConfig(layout=layout, host_bytes=0, disk_path=path)) as c:
        assert c.lookup_by_tier(toks(40)) == {"disk": 40}
        assert same_bytes(c.load(toks(40)), kv)


def test_write_back_spills_and_close_persists(tmp_path, layout):
    path = tmp_path / "store"
    cfg = CacheConfig(layout=layout, host_bytes=2 * layout.block_bytes, disk_path=path, write_policy="write_back")
    kv_a, kv_b = make_kv(layout, 8, seed=1), make_kv(layout, 8, seed=2)
    with TierCache(cfg) as c:
        c.store(toks(8), kv_a)
        c.flush()
        assert c.lookup_by_tier(toks(8)) == {"host": 8, "disk": 0}
        assert c.stats()["blocks"]["disk"] == 0      # write-back: nothing on disk yet
        c.store(toks(8, start=100), kv_b)            # evicts A: A spills to disk
        c.flush()
        assert c.lookup_by_tier(toks(8)) == {"host": 0, "disk": 8}
        assert c.lookup_by_tier(toks(8, start=100)) == {"host": 8, "disk": 0}
    # close wrote B (memory only) to disk: a graceful restart loses nothing
    with TierCache(cfg.replace(host_bytes=0)) as c:
        assert same_bytes(c.load(toks(8)), kv_a)
        assert same_bytes(c.load(toks(8, start=100)), kv_b)


def test_disk_capacity_is_never_exceeded(tmp_path, layout):
    from tiercache.tiers.disk import charged_bytes
    c = TierCache(CacheConfig(layout=layout, host_bytes=0, disk_path=tmp_path / "s", disk_bytes=16 << 10))
    frame_cost = None
    try:
        for i in range(60):
            c.store(toks(8, start=i * 1000), make_kv(layout, 8, seed=i))
            c.flush()
            s = c.stats()
            assert s["used_bytes"]["disk"] <= s["capacity_bytes"]["disk"]
        s = c.stats()
        frame_cost = charged_bytes(s["disk_compressed_bytes"] // (2 * 60))
        assert s["evictions"]["disk"] > 0
        # the oldest prompts were evicted, the newest are intact
        assert c.lookup(toks(8, start=0)) == 0
        assert same_bytes(c.load(toks(8, start=59 * 1000)), make_kv(layout, 8, seed=59))
    finally:
        c.close()
    assert frame_cost and frame_cost > 0


def test_backpressure_drops_and_counts(make_cache, layout):
    c = make_cache(host_blocks=64, write_queue_blocks=2)
    gate, busy = threading.Event(), threading.Event()
    real = c.disk.write_batch

    def stalled_write(*a, **k):
        busy.set()
        gate.wait(10)
        return real(*a, **k)

    c.disk.write_batch = stalled_write              # a stalled disk
    try:
        c.store(toks(4, start=9000), make_kv(layout, 4, seed=9))
        assert busy.wait(10)                        # the writer holds that block and is stuck
        kv = make_kv(layout, 64)
        assert c.store(toks(64), kv) == 64          # returns without waiting for the disk
        assert c.stats()["dropped_writes"]["disk"] == 16 - 2   # the queue holds 2; the rest are dropped
    finally:
        gate.set()
    c.flush()
    s = c.stats()
    assert s["blocks"]["disk"] == 1 + 2
    # dropped writes are only absent from disk; every block is still served from host, bit-exact
    assert same_bytes(c.load(toks(64)), kv)


def test_second_hit_admission(make_cache, layout):
    c = make_cache(host_blocks=8, admission="second_hit")
    kv = make_kv(layout, 8)
    c.store(toks(8), kv)
    c.flush()
    assert c.stats()["blocks"]["disk"] == 0         # seen once: not on disk
    c.load(toks(8))                                 # read again from memory: now admitted
    c.flush()
    assert c.stats()["blocks"]["disk"] == 2


def test_prefetch_brings_blocks_up(make_cache, layout):
    c = make_cache(host_blocks=2)
    kv_a = make_kv(layout, 8, seed=1)
    c.store(toks(8), kv_a)
    c.flush()
    c.store(toks(8, start=100), make_kv(layout, 8, seed=2))
    c.flush()
    assert c.lookup_by_tier(toks(8)) == {"host": 0, "disk": 8}
    h = c.prefetch(toks(8))
    assert h.wait() == 8
    assert c.lookup_by_tier(toks(8)) == {"host": 8, "disk": 0}
    p = c.stats()["prefetch"]
    assert p["ready"] + p["late"] == 1
    assert same_bytes(c.load(toks(8)), kv_a)


def test_layerwise_load(make_cache, layout):
    c = make_cache(host_blocks=1)
    kv = make_kv(layout, 12)
    c.store(toks(12), kv)
    c.flush()
    assert c.lookup_by_tier(toks(12)) == {"host": 4, "disk": 8}
    ll = c.load_layers(toks(12))
    assert ll.num_tokens == 12
    for i in range(layout.num_layers):
        assert same_bytes(ll.wait_layer(i), kv[i])
    assert same_bytes(ll.wait(), kv)
    assert c.stats()["loaded_bytes"] == {"host": layout.block_bytes, "disk": 2 * layout.block_bytes}
    miss = c.load_layers(toks(12, start=7))
    assert miss.num_tokens == 0 and miss.wait().shape == layout.kv_shape(0)


def test_closed_cache_refuses_calls(make_cache, layout):
    c = make_cache()
    c.close()
    c.close()                                         # idempotent
    with pytest.raises(ClosedError):
        c.lookup(toks(4))
    with pytest.raises(ClosedError):
        c.store(toks(4), make_kv(layout, 4))


def test_concurrent_store_and_load_stay_bit_exact(make_cache, layout):
    c = make_cache(host_blocks=6)
    prompts = {i: make_kv(layout, 16, seed=i) for i in range(8)}
    errors = []

    def worker(ids):
        try:
            for rep in range(6):
                for i in ids:
                    c.store(toks(16, start=i * 100), prompts[i])
                    out = c.load(toks(16, start=i * 100))
                    n = out.shape[2]
                    if not same_bytes(out, prompts[i][:, :, :n]):
                        errors.append((i, rep))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(ids,)) for ids in ([0, 1, 2, 3], [4, 5, 6, 7], [1, 5])]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    c.flush()
    for i, kv in prompts.items():
        assert same_bytes(c.load(toks(16, start=i * 100)), kv)


def test_keys_level_store_and_load_match_the_token_api(make_cache, layout):
    from tiercache.keys import Keyer

    c = make_cache(host_blocks=8)
    kv = make_kv(layout, 4 * layout.block_size)
    keys = Keyer(c.cfg).keys(toks(4 * layout.block_size))
    assert keys == c.keys(toks(4 * layout.block_size))        # the same keys in another process
    blocks = kv[:, :, 2 * layout.block_size:].unflatten(2, (2, layout.block_size))
    assert c.store_keys(keys[2:], blocks) == 2                # a request's later blocks, without its prefix
    assert c.lookup(toks(4 * layout.block_size)) == 0          # the prefix is not cached ...
    assert same_bytes(c.load_keys(keys[2:]), kv[:, :, 2 * layout.block_size:])   # ... its later blocks are
    got = c.load_keys(keys[2:], block_major=True)             # [n, L, planes, B, H, D], ready for pages
    assert same_bytes(got, blocks.permute(2, 0, 1, 3, 4, 5))
    assert c.load_keys(keys[:2], block_major=True).shape[0] == 0
    with pytest.raises(ValueError, match="blocks: expected"):
        c.store_keys(keys[:1], blocks)
    with pytest.raises(TypeError, match="keys: expected BlockKey"):
        c.load_keys([b"x" * 16])


def test_publish_false_registers_nothing_and_external_tiers_are_recorded(layout):
    from prometheus_client import CollectorRegistry

    reg = CollectorRegistry()
    cfg = CacheConfig(layout=layout, host_bytes=0)
    with TierCache(cfg, reg, publish=False) as c:
        assert c.metrics is None and not list(reg.collect())
    with TierCache(cfg, reg, external_tiers=("host",)) as c:
        c.recorder.loaded("host", layout.block_bytes, 0.001, layout.block_size)
        assert c.stats()["loaded_tokens"]["host"] == layout.block_size
        assert reg.get_sample_value("tiercache_loaded_bytes_total", {"tier": "host"}) == layout.block_bytes
    with pytest.raises(ValueError, match="external_tiers"):
        TierCache(cfg, external_tiers=("disk",))


def test_scratch_kept_between_loads_serves_each_load_its_own_blocks(make_cache, layout):
    """Disk blocks with no host slot are decoded into scratch kept between loads (its pages already in):
    loads from several threads at once, of prompts of different lengths, each get exactly their own KV,
    and no more than SCRATCH_KEEP buffers are kept."""
    from tiercache.mover import SCRATCH_KEEP
    c = make_cache(host_blocks=0)
    prompts = {i: make_kv(layout, 4 * (i + 2), seed=40 + i) for i in range(5)}
    for i, kv in prompts.items():
        c.store(toks(kv.shape[2], start=i * 1000), kv)
    c.flush()
    errors = []

    def worker(order):
        try:
            for _ in range(8):
                for i in order:
                    out = c.load(toks(prompts[i].shape[2], start=i * 1000))
                    if not same_bytes(out, prompts[i]):
                        errors.append(i)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(o,)) for o in ([0, 1, 2, 3, 4], [4, 3, 2, 1, 0], [2, 0, 4])]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert 0 < len(c.mover._scratch_free) <= SCRATCH_KEEP
    for tier, f in c.stats()["in_flight"].items():
        assert f == {"pinned": 0, "reserved": 0}, tier
