"""The remote tier against a real redis-server on 127.0.0.1 (Debian's package, installed by .ci/run)."""


import pytest

from tiercache import CacheConfig, TierCache

from .conftest import make_kv, same_bytes

pytestmark = pytest.mark.redis


def toks(n, start=0):
    return list(range(start, start + n))


def test_blocks_are_shared_through_the_server(redis_server, layout, tmp_path):
    kv = make_kv(layout, 16)
    cfg = CacheConfig(layout=layout, model_id="m", host_bytes=0, disk_path=None, remote_url=redis_server.url)
    with TierCache(cfg) as a:                       # machine A
        assert a.tiers == ("remote",)
        a.store(toks(16), kv)
        a.flush()
        assert a.stats()["stored_bytes"]["remote"] == 4 * layout.block_bytes
    b_cfg = cfg.replace(host_bytes=4 * layout.block_bytes)
    with TierCache(b_cfg) as b:                     # machine B, empty local tiers
        assert b.lookup_by_tier(toks(16)) == {"host": 0, "remote": 16}
        assert same_bytes(b.load(toks(16)), kv)
        assert b.lookup_by_tier(toks(16)) == {"host": 16, "remote": 0}    # promoted
        assert b.stats()["loaded_bytes"]["remote"] == 4 * layout.block_bytes


def test_dead_server_degrades_to_local_tiers(redis_server, layout, tmp_path):
    kv = make_kv(layout, 16)
    cfg = CacheConfig(layout=layout, model_id="m", host_bytes=8 * layout.block_bytes,
                      disk_path=tmp_path / "d", remote_url=redis_server.url)
    with TierCache(cfg) as c:
        c.store(toks(16), kv)
        c.flush()
        redis_server.stop()                         # the server dies
        kv2 = make_kv(layout, 16, seed=3)
        assert c.store(toks(16, start=100), kv2) == 16      # never fails the caller
        c.flush()
        assert c.lookup(toks(16, start=500)) == 0           # miss checks the remote: an error, not a crash
        assert same_bytes(c.load(toks(16)), kv)
        assert same_bytes(c.load(toks(16, start=100)), kv2)
        s = c.stats()
        assert sum(s["errors"]["remote"].values()) >= 1
    # a remote_url that never answered: the cache still works on its local tiers
    dead = cfg.replace(remote_url=f"redis://127.0.0.1:{redis_server.port}/0", disk_path=tmp_path / "d2")
    with TierCache(dead) as c:
        assert c.store(toks(8), kv[:, :, :8]) == 8
        assert same_bytes(c.load(toks(8)), kv[:, :, :8])


def test_corrupt_remote_frame_is_a_miss(redis_server, layout):
    kv = make_kv(layout, 8)
    cfg = CacheConfig(layout=layout, model_id="m", host_bytes=0, disk_path=None, remote_url=redis_server.url)
    with TierCache(cfg) as c:
        c.store(toks(8), kv)
        c.flush()
        key = c.keys(toks(8))[1]
        rkey = b"tiercache:v2:" + key
        frame = bytearray(redis_server.client.get(rkey))
        frame[-5] ^= 0x22
        redis_server.client.set(rkey, bytes(frame))
        out = c.load(toks(8))
        assert same_bytes(out, kv[:, :, :4])
        assert c.stats()["corrupt_blocks"]["remote"] == 1
        assert redis_server.client.exists(rkey) == 0     # deleted
