"""The torch-free decision layer, scripted with exact slots; and the reported defects of issue 8, each
reproduced through the public API."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest
import torch

from tiercache import CacheConfig, KVLayout, TierCache
from tiercache.core import BlockManager

L = KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, dtype=torch.float16, block_size=4)


def K(i: int) -> bytes:
    return bytes([i]) * 16


def test_core_imports_no_torch():
    code = "import sys; sys.modules['torch'] = None; import tiercache.core, tiercache.policy; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "ok", out.stderr


def test_store_then_load_scenario_exact_slots():
    m = BlockManager({"host": 2})
    plan = m.prepare_store([K(1), K(2), K(3)])
    assert plan.dsts == {0: [("host", 0)], 1: [("host", 1)]}   # the third finds every slot in flight
    assert m.in_flight()["host"] == {"pinned": 0, "reserved": 2}
    cached, jobs = m.complete_store(plan, [True, True, True])
    assert cached == [True, True, False] and jobs == []
    assert m.lookup([K(1), K(2), K(3)]) == ["host", "host"]
    load = m.prepare_load([K(2)])
    assert load.srcs == [("host", 1)] and m.in_flight()["host"]["pinned"] == 1
    # a pinned block is never a victim: the only candidate is K(1)
    plan = m.prepare_store([K(4)])
    assert plan.dsts == {0: [("host", 0)]}
    m.complete_store(plan, [False])                     # the copy failed: slot 0 is free again, K(4) unreadable
    assert m.lookup([K(4)]) == [] and m.lookup([K(1)]) == []
    m.complete_load(load, [True])
    assert m.in_flight()["host"] == {"pinned": 0, "reserved": 0}


def test_failed_promotion_is_never_readable():
    m = BlockManager({"device": 1, "host": 2})
    p = m.prepare_store([K(1)])
    m.complete_store(p, [True])
    assert m.lookup([K(1)]) == ["device"]
    # evict it from the device, keep it in host, then promote it back and fail the copy
    p = m.prepare_store([K(2)])
    m.complete_store(p, [True])
    load = m.prepare_load([K(1)])
    assert load.promote == {0: [("device", 0)]}
    m.complete_load(load, [False])
    assert m.lookup([K(1)]) == ["host"]   # the device slot whose copy failed is not readable
    assert m.lookup([K(2)]) == ["host"]   # K(2) lost its device slot to the failed promotion
    assert m.in_flight()["device"] == {"pinned": 0, "reserved": 0}
    assert m.in_flight()["host"] == {"pinned": 0, "reserved": 0}


def test_write_back_spills_device_victims_to_host_then_disk_stage():
    m = BlockManager({"device": 1, "host": 1}, write_policy="write_back", disk=_FakeDisk(), stage_limit=4)
    for i in (1, 2, 3):
        p = m.prepare_store([K(i)])
        for s in p.spills:
            m.complete_spill(s, True)
        m.complete_store(p, [True])
    # K(3) in device, K(2) spilled to host, K(1) spilled from host to a staging buffer on its way to disk
    assert m.lookup([K(3)]) == ["device"] and m.lookup([K(2)]) == ["host"] and m.lookup([K(1)]) == ["disk"]


class _FakeDisk:
    """A disk index without a store: enough for the core's decisions (membership only)."""

    name = "disk"

    def __init__(self) -> None:
        self.keys: set = set()

    def known(self, k):
        return k in self.keys

    def may_hold_unknown(self):
        return False

    def contains_many(self, keys):
        return [k in self.keys for k in keys]

    def added(self, keys):
        self.keys.update(keys)

    def removed(self, keys):
        self.keys.difference_update(keys)


# -- issue 8's findings through the public API -------------------------------------------------

def kv(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(L.kv_shape(n), generator=torch.Generator().manual_seed(seed)).to(L.dtype)


def test_item3_write_back_promotion_victims_survive_a_reopen(tmp_path):
    cfg = CacheConfig(layout=L, device_bytes=2 * L.block_bytes, host_bytes=2 * L.block_bytes,
                      disk_path=str(tmp_path), disk_bytes="16MiB", write_policy="write_back")
    prompts = [[100 * p + t for t in range(8)] for p in range(4)]
    with TierCache(cfg) as c:
        for i, p in enumerate(prompts):
            c.store(p, kv(8, i))
        for p in prompts:        # promotions into the device evict device blocks: they must move down
            c.load(p)
    with TierCache(cfg) as c:
        for i, p in enumerate(prompts):
            assert c.lookup(p) == 8, i
            assert torch.equal(c.load(p), kv(8, i))


def test_item5_str_and_bytes_salts_are_distinct():
    with TierCache(CacheConfig(layout=L, host_bytes="1MiB")) as c:
        c.store(list(range(8)), kv(8), salt=b"a")
        assert c.lookup(list(range(8)), salt="61") == 0
        assert c.lookup(list(range(8)), salt="a") == 0
        assert c.lookup(list(range(8)), salt=b"a") == 8


def test_item7_corrupt_block_never_waits_for_the_disk_queue(tmp_path):
    cfg = CacheConfig(layout=L, host_bytes=0, disk_path=str(tmp_path), disk_bytes="16MiB", write_queue_blocks=2)
    with TierCache(cfg) as c:
        c.store(list(range(8)), kv(8))
        c.flush()
        key = c.keys(list(range(8)))[0]
        c.close()
    import lmdb
    env = lmdb.open(str(tmp_path), max_dbs=8, subdir=True)
    with env.begin(write=True, db=env.open_db(b"blocks")) as txn:  # flip the first block's last byte
        frame = bytearray(txn.get(key))
        frame[-1] ^= 0xFF
        txn.put(key, bytes(frame))
    env.close()
    with TierCache(cfg) as c:
        c._writer.pause()                 # the write-behind is stuck: its queue fills up
        for i in range(6):
            c.store([1000 + 8 * i + t for t in range(8)], kv(8, i + 1))
        t0 = time.monotonic()
        out = c.load(list(range(8)))       # meets the corrupt block
        waited = time.monotonic() - t0
        assert out.shape[2] == 0 and c.stats()["corrupt_blocks"]["disk"] == 1
        c._writer.resume()
    assert waited < 2.0, waited  # it used to block until the queue drained (3 s measured)


@pytest.fixture
def redis_url(redis_server):
    return redis_server.url


def test_item8_remote_only_store_counts_and_does_not_resend(redis_url):
    cfg = CacheConfig(layout=L, host_bytes=0, remote_url=redis_url)
    with TierCache(cfg) as c:
        assert c.store(list(range(8)), kv(8)) == 8
        c.flush()
        sent = c.stats()["stored_bytes"]["remote"]
        assert sent == 2 * L.block_bytes
        assert c.store(list(range(8)), kv(8)) == 8
        c.flush()
        assert c.stats()["stored_bytes"]["remote"] == sent  # nothing re-encoded or re-sent
    with TierCache(cfg) as c:  # a fresh process-like cache: the server says it has them
        assert c.store(list(range(8)), kv(8)) == 8
        c.flush()
        assert c.stats()["stored_bytes"]["remote"] == 0
        assert torch.equal(c.load(list(range(8))), kv(8))


def test_item9_flush_after_close_returns(redis_url, tmp_path):
    c = TierCache(CacheConfig(layout=L, remote_url=redis_url, disk_path=str(tmp_path), disk_bytes="8MiB"))
    c.close()
    t = threading.Thread(target=c.flush)
    t.start()
    t.join(5)
    assert not t.is_alive()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only machine")
def test_item9_cuda_without_cuda_fails_validation():
    with pytest.raises(ValueError, match="device"):
        CacheConfig(layout=L, device="cuda")


def test_item10_kv_with_requires_grad(tmp_path):
    cfg = CacheConfig(layout=L, host_bytes="1MiB", device_bytes="1MiB", disk_path=str(tmp_path), disk_bytes="8MiB")
    with TierCache(cfg) as c:
        x = kv(8).requires_grad_(True)
        assert c.store(list(range(8)), x) == 8
        for _ in range(3):
            out = c.load(list(range(8)))
            assert not out.requires_grad and torch.equal(out, x.detach())


def test_item11_stored_blocks_stay_visible_while_the_writer_is_held(tmp_path):
    """After n = store(t, kv), lookup(t) >= n and load(t) serves them, while blocks wait for the disk."""
    cfg = CacheConfig(layout=L, host_bytes=9 * L.block_bytes, disk_path=str(tmp_path), disk_bytes="16MiB")
    base = list(range(12))
    prompts = [base + [500 + 10 * p + t for t in range(8)] for p in range(3)]  # 5 blocks each, 3 shared
    with TierCache(cfg) as c:
        c._writer.pause()
        stored = [c.store(p, kv(20, 0)) for p in prompts]
        for p, n in zip(prompts, stored):
            assert c.lookup(p) >= n
            assert c.load(p).shape[2] >= n
        c._writer.resume()
        c.flush()
        for p, n in zip(prompts, stored):
            assert c.lookup(p) >= n


def test_disk_only_lookup_walks_the_disk_index_and_staged_blocks(tmp_path):
    """A disk-only cache: with nothing staged the prefix is walked in the disk index alone (one call);
    with blocks on their way down the staged ones count too; a block missing in the middle ends the
    prefix in both walks, and what lookup reports is what load serves."""
    cfg = CacheConfig(layout=L, host_bytes=0, disk_path=str(tmp_path), disk_bytes="16MiB")
    a = list(range(20))                          # 5 blocks
    b = a[:8] + [900 + t for t in range(12)]     # shares 2 blocks with a
    with TierCache(cfg) as c:
        assert c.lookup(a) == 0
        c.store(a, kv(20, 0))
        c.flush()
        assert not c.core._stage and c.lookup(a) == 20 and c.lookup(a + [7] * 4) == 20
        c._writer.pause()                        # b's new blocks wait, staged, in front of the disk
        c.store(b, kv(20, 1))
        assert c.core._stage and c.lookup(b) == 20 and c.load(b).shape[2] == 20
        c._writer.resume()
        c.flush()
        assert not c.core._stage and c.lookup(b) == 20
        c.core.disk.removed([c.keys(a)[2]])      # forgotten in the middle (as if evicted elsewhere)
        assert c.lookup(a) == 8 and c.load(a).shape[2] == 8
        assert c.core.disk.run_known(c.keys(a)) == 2 and c.core.disk.run_known([]) == 0


def test_reopened_store_reports_its_compression_ratio(tmp_path):
    big = KVLayout(num_layers=2, num_kv_heads=8, head_dim=128, dtype=torch.float16, block_size=4)
    cfg = CacheConfig(layout=big, host_bytes=0, disk_path=str(tmp_path), disk_bytes="16MiB",
                      compression="byteplane")  # "auto" may choose no compression on a fast disk
    zeros = torch.zeros(big.kv_shape(64), dtype=big.dtype)  # compresses well
    with TierCache(cfg) as c:
        c.store(list(range(64)), zeros)
        c.flush()
        written = c.stats()["disk_compression_ratio"]
    with TierCache(cfg) as c:
        s = c.stats()
        assert s["blocks"]["disk"] == 16 and s["disk_compressed_bytes"] == 0
        assert s["disk_compression_ratio"] > 1.0 and written > 1.0


def test_load_only_users_see_served_tokens(tmp_path):
    with TierCache(CacheConfig(layout=L, host_bytes="1MiB")) as c:
        c.store(list(range(16)), kv(16))
        c.load(list(range(16)))
        s = c.stats()
        assert s["loaded_tokens"]["host"] == 16 and s["lookup_tokens"] == 0


def test_remote_restarted_empty_gets_blocks_again(redis_server):
    """The core remembers what the server holds; a server that comes back empty must be refilled."""
    server = redis_server
    try:
        cfg = CacheConfig(layout=L, host_bytes=0, remote_url=server.url)
        with TierCache(cfg) as c:
            c.store(list(range(8)), kv(8))
            c.flush()
            assert c.stats()["stored_bytes"]["remote"] == 2 * L.block_bytes
            server.client.flushall()                     # the server lost everything
            assert c.load(list(range(8))).shape[2] == 0  # a miss, and the core forgets those blocks
            assert c.store(list(range(8)), kv(8)) == 8
            c.flush()
            assert c.stats()["stored_bytes"]["remote"] == 4 * L.block_bytes  # sent again
        with TierCache(cfg) as c:
            assert torch.equal(c.load(list(range(8))), kv(8))
    finally:
        server.stop()  # (the fixture stops it too; stopping twice is harmless)


def test_write_queue_takes_and_gives_many_under_one_lock():
    """The write-behind queue: puts of many jobs stop at the bound (the caller drops the rest), gets of many
    return what is there without waiting, and a blocked getter wakes on a put of many."""
    from tiercache.writebehind import _JobQueue

    q = _JobQueue(maxsize=3)
    assert q.put_many_nowait([1, 2]) == 2
    assert q.put_many_nowait([3, 4, 5]) == 1          # room for one: 4 and 5 are refused
    assert q.put_many_nowait([6]) == 0 and q.qsize() == 3
    assert q.get_many_nowait(2) == [1, 2]
    assert q.get_many_nowait(5) == [3] and q.get_many_nowait(5) == []
    got = []
    t = threading.Thread(target=lambda: got.append(q.get()))
    t.start()
    assert q.put_many_nowait([7, 8]) == 2
    t.join(10)
    assert got == [7] and q.get_many_nowait(9) == [8]
    assert _JobQueue().put_many_nowait(list(range(1000))) == 1000   # unbounded
