"""Faults injected at every phase of load, prefetch, load_layers and store.

After each fault two invariants are checked: every later load is bit-identical
to what was stored (or a miss), and an idle cache holds nothing pinned or
reserved (`stats()["in_flight"]`). Faults are real exceptions (and
KeyboardInterrupt) raised from inside the byte layer: a codec decode, a slab
copy, an LMDB read, a Redis call.
"""

from __future__ import annotations

import random

import pytest
import torch

from tiercache import CacheConfig, KVLayout, TierCache
from tiercache.codec import CODEC_BYTEPLANE, CODEC_OFFSET, BlockCodec

from .conftest import rewrite_frame, stored_frame, takes_direct

pytestmark = pytest.mark.usefixtures("frame_home")  # frames in LMDB, and in files

L = KVLayout(num_layers=4, num_kv_heads=2, head_dim=16, dtype=torch.bfloat16, block_size=4)


def kv_for(tokens: list[int]) -> torch.Tensor:
    """KV as a pure function of the prefix, block by block (what a real model gives)."""
    B = L.block_size
    out = torch.empty(L.kv_shape(len(tokens)), dtype=L.dtype)
    for i in range(0, len(tokens), B):
        g = torch.Generator().manual_seed(hash(tuple(tokens[: i + B])) & 0x7FFFFFFF)
        out[:, :, i:i + B] = torch.randn(L.kv_shape(min(B, len(tokens) - i)), generator=g).to(L.dtype)
    return out


def prompts(n: int = 6, length: int = 24) -> list[list[int]]:
    rng = random.Random(7)
    shared = [rng.randrange(1000) for _ in range(8)]
    return [shared + [rng.randrange(1000) for _ in range(length - 8)] for _ in range(n)]


def assert_idle(cache: TierCache) -> None:
    cache.flush()
    for tier, f in cache.stats()["in_flight"].items():
        assert f == {"pinned": 0, "reserved": 0}, (tier, f)


def assert_every_load_exact(cache: TierCache, ps: list[list[int]]) -> None:
    for p in ps:
        for out in (cache.load(p), cache.load_layers(p).wait()):
            n = out.shape[2]
            assert torch.equal(out.view(torch.uint8), kv_for(p)[:, :, :n].view(torch.uint8))


class Boom(Exception):
    pass


def Trigger(fn, exc: BaseException, rng: random.Random, max_k: int = 6):
    """`fn`, except that its k-th call (k random) raises `exc`. A plain function, so it binds as a method."""
    k, calls = rng.randrange(1, max_k + 1), [0]

    def wrapper(*a, **kw):
        calls[0] += 1
        if calls[0] == k:
            raise exc
        return fn(*a, **kw)
    return wrapper


def make_cache(tmp_path, **over) -> TierCache:
    cfg = dict(layout=L, model_id="faults", host_bytes=5 * L.block_bytes, device_bytes=2 * L.block_bytes,
               disk_path=str(tmp_path / "store"), disk_bytes="64MiB", io_threads=2)
    cfg.update(over)
    return TierCache(CacheConfig(**cfg))


SITES = ["decode", "slab_gather", "slab_scatter", "disk_read", "stage_copy"]


def inject(monkeypatch, site: str, exc: BaseException, rng: random.Random) -> None:
    from tiercache.tiers import slab
    if site == "decode":
        monkeypatch.setattr(BlockCodec, "decode_into", Trigger(BlockCodec.decode_into, exc, rng))
    elif site == "slab_gather":
        monkeypatch.setattr(slab.MemorySlab, "gather", Trigger(slab.MemorySlab.gather, exc, rng))
    elif site == "slab_scatter":
        monkeypatch.setattr(slab.MemorySlab, "scatter", Trigger(slab.MemorySlab.scatter, exc, rng))
    elif site == "disk_read":
        from tiercache.tiers.disk import DiskTier
        real = DiskTier.reader

        def reader(self, *a, **kw):
            cm = real(self, *a, **kw)
            trig = Trigger(lambda: None, exc, rng, max_k=3)

            class Wrapped:
                def __enter__(s):
                    get = cm.__enter__()

                    def faulty(key):
                        trig()
                        return get(key)
                    return faulty

                def __exit__(s, *e):
                    return cm.__exit__(*e)
            return Wrapped()
        monkeypatch.setattr(DiskTier, "reader", reader)
    elif site == "stage_copy":  # every use of a staging buffer: as a tensor (get) or as numpy bytes (bytes)
        monkeypatch.setattr(slab.StagingArea, "_pair", Trigger(slab.StagingArea._pair, exc, rng))


@pytest.mark.parametrize("policy", ["write_through", "write_back"])
@pytest.mark.parametrize("exc", [Boom("injected"), KeyboardInterrupt(), MemoryError()], ids=["error", "kbint", "oom"])
@pytest.mark.parametrize("site", SITES)
def test_fault_at_every_phase_serves_nothing_wrong_and_pins_nothing(tmp_path, monkeypatch, site, exc, policy):
    rng = random.Random(hash((site, type(exc).__name__, policy)) & 0xFFFF)
    ps = prompts()
    cache = make_cache(tmp_path, write_policy=policy)
    try:
        for p in ps[:3]:
            cache.store(p, kv_for(p))
        cache.flush()
        with monkeypatch.context() as m:
            inject(m, site, exc, rng)
            ops = [lambda p: cache.load(p), lambda p: cache.load_layers(p).wait(),
                   lambda p: cache.prefetch(p).wait(), lambda p: cache.store(p, kv_for(p)),
                   lambda p: cache.load(p, out=torch.empty(L.kv_shape(len(p)), dtype=L.dtype))]
            for _ in range(12):
                op, p = rng.choice(ops), rng.choice(ps)
                try:
                    out = op(p)
                except (Boom, KeyboardInterrupt, MemoryError):
                    pass
                except Exception as e:  # a layer-wise load fails closed with KVUnavailable
                    assert type(e).__name__ == "KVUnavailable", repr(e)
                else:
                    if isinstance(out, torch.Tensor) and out.shape[2]:
                        want = kv_for(p)[:, :, :out.shape[2]]
                        assert torch.equal(out.view(torch.uint8), want.view(torch.uint8))
        assert_idle(cache)
        assert_every_load_exact(cache, ps)
        for p in ps:  # the cache still works: everything stored again is served exactly
            cache.store(p, kv_for(p))
        cache.flush()
        assert_every_load_exact(cache, ps)
        assert_idle(cache)
    finally:
        cache.close()
    with make_cache(tmp_path, write_policy=policy) as again:  # and what reached the disk is exact
        assert_every_load_exact(again, ps)


def test_decode_error_in_one_task_waits_for_siblings(tmp_path, monkeypatch):
    """A frame whose decode raises (not CorruptFrame) is a miss; its siblings finish before the call returns,
    and the intact blocks are not deleted as corrupt."""
    ps = prompts(2, 32)
    cache = make_cache(tmp_path, host_bytes=0, device_bytes=0, io_threads=4)
    try:
        for p in ps:
            cache.store(p, kv_for(p))
        cache.flush()
        real = BlockCodec.decode_into
        calls = {"n": 0}

        def flaky(self, frame, out, layers=None, *, key):
            calls["n"] += 1
            if calls["n"] == 2:
                raise ValueError("not a CorruptFrame")
            return real(self, frame, out, layers, key=key)
        monkeypatch.setattr(BlockCodec, "decode_into", flaky)
        out = cache.load(ps[0])
        assert out.shape[2] < len(ps[0]) // 4 * 4
        monkeypatch.setattr(BlockCodec, "decode_into", real)
        for _ in range(20):
            assert_every_load_exact(cache, ps)
        assert cache.stats()["corrupt_blocks"]["disk"] == 0
        assert cache.lookup(ps[0]) == 32
        assert_idle(cache)
    finally:
        cache.close()


@pytest.mark.parametrize("exc", [Boom("copy"), KeyboardInterrupt()], ids=["exception", "KeyboardInterrupt"])
def test_a_store_in_groups_interrupted_between_groups(tmp_path, monkeypatch, exc):
    """A store larger than STORE_GROUP_BYTES is copied and queued group by group (the write-behind writes the
    first groups while the next are copied). A fault in the third group's copy: the first two groups are
    cached and exact, the rest are not, nothing stays pinned; without a fault the whole store is exact."""
    from tiercache import manager
    from tiercache.mover import Mover
    monkeypatch.setattr(manager, "STORE_GROUP_BYTES", 2 * L.block_bytes)   # 2 blocks a group
    p = prompts(1, 40)[0]                                                   # 10 blocks: 5 groups
    with make_cache(tmp_path, host_bytes=0, device_bytes=0) as cache:
        calls = [0]
        write_blocks = Mover.write_blocks

        def failing(self, plan, kv6):
            calls[0] += 1
            if calls[0] == 3:
                raise exc
            return write_blocks(self, plan, kv6)
        monkeypatch.setattr(Mover, "write_blocks", failing)
        with pytest.raises(type(exc)):
            cache.store(p, kv_for(p))
        assert calls[0] == 3
        monkeypatch.setattr(Mover, "write_blocks", write_blocks)
        assert_idle(cache)
        assert cache.lookup(p) == 4 * L.block_size                          # groups 1 and 2
        assert_every_load_exact(cache, [p])
        assert cache.store(p, kv_for(p)) == len(p)                          # the rest, in groups again
        assert_idle(cache)
        out = cache.load(p)
        assert out.shape[2] == len(p) and torch.equal(out.view(torch.uint8), kv_for(p).view(torch.uint8))
        assert cache.stats()["blocks"]["disk"] == 10


def _loads(cache: TierCache, p: list[int]) -> list[torch.Tensor]:
    """The prefix of `p` through every whole-prefix read: token-major (allocated and into `out`), block-major
    (back to [L, planes, T, H, D] for comparison) and layer-wise."""
    keys = cache.keys(p)
    bm = cache.load_keys(keys, block_major=True)
    return [cache.load(p), cache.load(p, out=torch.empty(L.kv_shape(len(p)), dtype=L.dtype)),
            bm.permute(1, 2, 0, 3, 4, 5).flatten(2, 3), cache.load_layers(p).wait()]


@pytest.mark.parametrize("exc", [Boom("decode"), KeyboardInterrupt()], ids=["exception", "KeyboardInterrupt"])
def test_uncompressed_frames_decoded_by_the_caller_under_faults(tmp_path, monkeypatch, frame_home, exc):
    """Uncompressed frames held in memory (LMDB values) are decoded by the calling thread, not the pool
    (a memcpy and a checksum each: a pool hop costs more); frames in files still go to the pool. A fault
    in one of those decodes: nothing wrong is served, nothing stays pinned, later loads are exact."""
    import threading
    ps = prompts(3, 32)
    rng = random.Random(5)
    with make_cache(tmp_path, host_bytes=0, device_bytes=0, compression="none", io_threads=2) as cache:
        for p in ps:
            cache.store(p, kv_for(p))
        cache.flush()
        real, threads = BlockCodec.decode_into, set()

        def spy(self, frame, out, layers=None, *, key):
            threads.add(threading.get_ident())
            return real(self, frame, out, layers, key=key)
        monkeypatch.setattr(BlockCodec, "decode_into", spy)
        cache.load(ps[0])
        main = {threading.get_ident()}
        assert threads == main if frame_home == "lmdb" else not threads & main, threads
        for _ in range(8):
            with monkeypatch.context() as m:
                m.setattr(BlockCodec, "decode_into", Trigger(spy, exc, rng, max_k=8))
                p = rng.choice(ps)
                try:
                    outs = _loads(cache, p)
                except (Boom, KeyboardInterrupt):
                    continue
                except Exception as e:  # a layer-wise load fails closed
                    assert type(e).__name__ == "KVUnavailable", repr(e)
                    continue
                for out in outs:
                    assert torch.equal(out.view(torch.uint8), kv_for(p)[:, :, :out.shape[2]].view(torch.uint8))
        assert_idle(cache)
        for p in ps:
            for out in _loads(cache, p):
                assert torch.equal(out.view(torch.uint8), kv_for(p).view(torch.uint8))
        assert cache.stats()["corrupt_blocks"]["disk"] == 0


@pytest.mark.parametrize("damage", ["payload byte", "codec byte", "another block's frame"])
def test_damaged_uncompressed_frame_is_a_counted_miss_in_every_read(tmp_path, frame_home, damage):
    """A damaged uncompressed frame (decoded inline when in LMDB, by the pool when in a file) is caught by
    its checksums in token-major, block-major and layer-wise reads: the load stops before it, it is
    counted and deleted, and the blocks before it stay served exactly."""
    p = prompts(1, 32)[0]  # 8 blocks
    with make_cache(tmp_path, host_bytes=0, device_bytes=0, compression="none") as cache:
        cache.store(p, kv_for(p))
        cache.flush()
        keys = cache.keys(p)
    other = stored_frame(tmp_path / "store", bytes(keys[6]))

    def change(f: bytearray) -> bytearray:
        if damage == "payload byte":
            f[-5] ^= 0x10
        elif damage == "codec byte":
            f[CODEC_OFFSET] = CODEC_BYTEPLANE
        else:
            f[:] = other
        return f
    rewrite_frame(tmp_path / "store", bytes(keys[5]), change)
    for read in range(4):
        with make_cache(tmp_path, host_bytes=0, device_bytes=0, compression="none") as cache:
            out = [cache.load(p), cache.load(p, out=torch.empty(L.kv_shape(len(p)), dtype=L.dtype)),
                   cache.load_keys(keys, block_major=True).permute(1, 2, 0, 3, 4, 5).flatten(2, 3),
                   ][read] if read < 3 else cache.load_layers(p, num_tokens=20).wait()
            assert out.shape[2] == 20  # blocks 0-4 of 8
            assert torch.equal(out.view(torch.uint8), kv_for(p)[:, :, :20].view(torch.uint8))
            assert cache.stats()["corrupt_blocks"]["disk"] == (1 if read == 0 else 0)
            assert cache.lookup(p) == 20  # deleted as corrupt: a miss from then on
            assert_idle(cache)


def dropped_then_exact(cache: TierCache, p: list, dropped: int, restore, q: list, kv_q: torch.Tensor) -> None:
    """After a disk write that failed behind a store of p: p is served from nowhere, the drops are counted,
    nothing stays pinned; once `restore()` undoes the fault, a store of q comes back exact."""
    assert cache.lookup(p) == 0 and cache.load(p).shape[2] == 0
    assert cache.stats()["dropped_writes"].get("disk", 0) == dropped
    assert_idle(cache)
    restore()
    cache.store(q, kv_q)
    cache.flush()
    assert torch.equal(cache.load(q).view(torch.uint8), kv_q.view(torch.uint8))


@pytest.mark.parametrize("compression", ["none", "byteplane"], ids=["writer-thread", "pool"])
@pytest.mark.parametrize("exc", [Boom("encode"), MemoryError()], ids=["exception", "oom"])
def test_encode_fault_in_the_write_behind_drops_the_batch_and_serves_nothing_wrong(tmp_path, monkeypatch,
                                                                                 compression, exc):
    """The write-behind encodes raw or small blocks on its own thread and compresses 64 KiB+ blocks on the
    pool. An encode that raises on either path: that batch's blocks are dropped and counted, never served
    from disk, nothing stays pinned, the writer keeps running, and the next store is exact."""
    big = KVLayout(num_layers=2, num_kv_heads=8, head_dim=128, dtype=torch.bfloat16, block_size=16)  # 128 KiB
    p, q = list(range(64)), list(range(1000, 1064))
    g = torch.Generator().manual_seed(3)
    kv_p, kv_q = (torch.randn(big.kv_shape(64), generator=g).to(big.dtype) for _ in range(2))
    with make_cache(tmp_path, layout=big, host_bytes=0, device_bytes=0, compression=compression) as cache:
        threads, real = set(), BlockCodec.encode_parts

        def failing(self, block, key):
            import threading
            threads.add(threading.get_ident())
            raise exc
        monkeypatch.setattr(BlockCodec, "encode_parts", failing)
        assert cache.store(p, kv_p) == 64  # cached while staged; the disk write fails behind it
        cache.flush()
        writer = cache._writer._thread.ident
        assert (threads == {writer}) == (compression == "none"), threads  # where the encode ran
        dropped_then_exact(cache, p, 4, lambda: monkeypatch.setattr(BlockCodec, "encode_parts", real), q, kv_q)
    with make_cache(tmp_path, layout=big, host_bytes=0, device_bytes=0, compression=compression) as again:
        assert again.lookup(p) == 0 and again.lookup(q) == 64


@pytest.mark.parametrize("site", ["file_write", "direct_write", "gate"])
@pytest.mark.parametrize("exc", [Boom("injected"), KeyboardInterrupt()], ids=["exception", "interrupt"])
def test_fault_between_frame_files_and_commit_leaves_no_file_and_serves_nothing_wrong(tmp_path, monkeypatch,
                                                                                    site, exc):
    """Frame files are written before the writer takes the eviction gate for the commit. A fault there: in
    the third file write of the batch (`file_write`), in the device write of the third file after its
    bytes were copied into the aligned buffer (`direct_write`, O_DIRECT), or while the writer waits for
    the gate with all 8 files written (`gate`, as an interrupt delivered then). The files already written
    are removed (no row points to them), the batch is dropped and counted, nothing is served from disk or
    stays pinned, and the next store is exact."""
    from tiercache.tiers.frame_files import FrameFiles
    from tiercache.writebehind import EvictionGate

    p, q = list(range(32)), list(range(1000, 1032))
    g = torch.Generator().manual_seed(4)
    kv_p, kv_q = (torch.randn(L.kv_shape(32), generator=g).to(L.dtype) for _ in range(2))
    store = tmp_path / "store"

    def frame_files() -> list:
        return [f for f in store.rglob("*") if f.is_file() and f.parent != store]
    direct = site == "direct_write"
    if direct and not takes_direct(tmp_path):
        pytest.skip("this filesystem refuses O_DIRECT")
    with make_cache(tmp_path, host_bytes=0, device_bytes=0, compression="none", disk_file_bytes=0,
                    disk_direct_writes=direct) as cache:
        seen: list = []
        if site == "file_write":
            owner, name = FrameFiles, "write"

            def failing(self, key, frame, *a):
                seen.append(key)
                if len(seen) == 3:
                    raise exc
                return real(self, key, frame, *a)
        elif site == "direct_write":
            owner, name = FrameFiles, "_flush_direct"

            def failing(self, fd, *a):
                seen.append(fd)
                if len(seen) == 3:
                    raise exc
                return real(self, fd, *a)
        else:
            owner, name = EvictionGate, "exclusive"

            def failing(self):
                seen.append(len(frame_files()))
                raise exc
        real = getattr(owner, name)
        monkeypatch.setattr(owner, name, failing)
        assert cache.store(p, kv_p) == 32  # cached while staged; the disk write fails behind it
        cache.flush()
        assert (seen == [8]) if site == "gate" else (len(seen) == 3)  # where the fault came
        assert not frame_files(), "a frame file was left"
        dropped_then_exact(cache, p, 8, lambda: monkeypatch.setattr(owner, name, real), q, kv_q)
        assert len(frame_files()) == 8  # where files go
    with make_cache(tmp_path, host_bytes=0, device_bytes=0, compression="none", disk_file_bytes=0) as again:
        assert again.lookup(p) == 0 and again.lookup(q) == 32
        assert torch.equal(again.load(q).view(torch.uint8), kv_q.view(torch.uint8))
