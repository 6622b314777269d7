"""Restarts, other processes, corrupt frames, a full map: nothing lost, nothing wrong, nothing crashes."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from tiercache import CacheConfig, KVLayout, TierCache
from tiercache.tiers.disk import DiskTier
from tiercache.tools.inspect_store import main as inspect_main

from .conftest import make_kv, rewrite_frame, same_bytes, stored_frame

pytestmark = pytest.mark.usefixtures("frame_home")  # frames in LMDB, and in files

LAYOUT = dict(num_layers=2, num_kv_heads=2, head_dim=8, dtype="bfloat16", block_size=4)


def run_py(code: str) -> str:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          check=True, timeout=120).stdout


def test_restart_in_a_new_process_loads_bit_exact(tmp_path, layout):
    path = tmp_path / "store"
    # another process stores, then exits
    run_py(f"""
        import torch
        from tiercache import TierCache, CacheConfig, KVLayout
        from tests.conftest import make_kv
        lay = KVLayout(**{LAYOUT!r})
        with TierCache(CacheConfig(layout=lay, model_id="m", disk_path={str(path)!r})) as c:
            assert c.store(list(range(37)), make_kv(lay, 37, seed=7)) == 36
    """)
    with TierCache(CacheConfig(layout=layout, model_id="m", host_bytes="1MiB", disk_path=path)) as c:
        assert c.lookup(list(range(37))) == 36
        assert c.lookup_by_tier(list(range(37))) == {"host": 0, "disk": 36}
        assert same_bytes(c.load(list(range(37))), make_kv(layout, 37, seed=7)[:, :, :36])


def test_two_processes_share_one_store(tmp_path, layout):
    path = tmp_path / "store"
    script = f"""
        import sys
        from tiercache import TierCache, CacheConfig, KVLayout
        from tests.conftest import make_kv
        lay = KVLayout(**{LAYOUT!r})
        i = int(sys.argv[1])
        with TierCache(CacheConfig(layout=lay, model_id="m", host_bytes=0, disk_path={str(path)!r})) as c:
            for j in range(20):
                c.store(list(range(i * 10000 + j * 100, i * 10000 + j * 100 + 16)), make_kv(lay, 16, seed=i * 100 + j))
    """
    procs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(script), str(i)]) for i in range(2)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    with TierCache(CacheConfig(layout=layout, model_id="m", host_bytes=0, disk_path=path)) as c:
        for i in range(2):
            for j in range(20):
                t = list(range(i * 10000 + j * 100, i * 10000 + j * 100 + 16))
                assert same_bytes(c.load(t), make_kv(layout, 16, seed=i * 100 + j))
        assert c.stats()["blocks"]["disk"] == 2 * 20 * 4


def _store_and_damage(cfg, kv, block, damage):
    """Store kv's prompt, then rewrite the frame of `block` as damage(bytearray) returns it, on disk."""
    n = kv.shape[2]
    with TierCache(cfg) as c:
        c.store(list(range(n)), kv)
        victim = c.keys(list(range(n)))[block]
    rewrite_frame(cfg.disk_path, victim, damage)


def _flip(pos, mask):
    def damage(frame):
        frame[pos] ^= mask
        return frame
    return damage


@pytest.mark.parametrize("where", ["header", "table", "payload", "last", "truncate", "garbage"])
def test_corrupt_frames_become_misses(tmp_path, layout, where):
    path = tmp_path / "store"
    kv = make_kv(layout, 16)
    cfg = CacheConfig(layout=layout, model_id="m", host_bytes=0, disk_path=path)
    damage = {"header": _flip(12, 0xFF), "table": _flip(50, 0x01), "payload": lambda f: _flip(len(f) // 2, 0x10)(f),
              "last": _flip(-1, 0x01), "truncate": lambda f: f[: len(f) // 2],
              "garbage": lambda f: b"\x00garbage" * 10}[where]
    _store_and_damage(cfg, kv, 2, damage)                # corrupt the third block of the prefix
    with TierCache(cfg) as c:
        assert c.lookup(list(range(16))) == 16           # lookup does not read frames
        out = c.load(list(range(16)))
        assert out.shape[2] == 8                          # the prefix ends before the corrupt block
        assert same_bytes(out, kv[:, :, :8])
        s = c.stats()
        assert s["corrupt_blocks"]["disk"] == 1
        c.flush()                                         # the corrupt frame is deleted
        assert c.lookup(list(range(16))) == 8
        # storing again repairs the store
        assert c.store(list(range(16)), kv) == 16
        c.flush()
        assert same_bytes(c.load(list(range(16))), kv)


@pytest.mark.parametrize("per_layer", [True, False], ids=["segment-per-layer", "one-segment"])
def test_corrupt_layer_fails_a_layerwise_load_cleanly(tmp_path, per_layer):
    from tiercache.codec import MIN_SEGMENT_BYTES, frame_segments
    from tiercache.layerwise import KVUnavailable
    # big enough blocks get one segment per layer; small ones are a single segment
    lay = KVLayout(num_layers=2, num_kv_heads=4 if per_layer else 1, head_dim=256 if per_layer else 8,
                   dtype=torch.bfloat16, block_size=16)
    assert (lay.layer_block_bytes >= MIN_SEGMENT_BYTES) == per_layer
    path = tmp_path / "store"
    kv = make_kv(lay, 32)
    cfg = CacheConfig(layout=lay, model_id="m", host_bytes=0, disk_path=path)

    def damage(frame):
        assert frame_segments(frame) == (2 if per_layer else 1)
        frame[-3] ^= 0x40                                # inside the last layer's bytes
        return frame
    _store_and_damage(cfg, kv, 1, damage)
    with TierCache(cfg) as c:
        ll = c.load_layers(list(range(32)))
        assert ll.num_tokens == 32
        if per_layer:
            assert same_bytes(ll.wait_layer(0), kv[0])    # layer 0 is intact and verified on its own
        with pytest.raises(KVUnavailable):
            ll.wait_layer(1)
        assert c.stats()["corrupt_blocks"]["disk"] == 1
        assert same_bytes(c.load(list(range(32))), kv[:, :, :16])


def test_map_full_evicts_instead_of_failing(tmp_path, layout, frame_home):
    if frame_home == "files":
        pytest.skip("frames in files: the LMDB map holds only the index and does not fill here")
    big = KVLayout(num_layers=4, num_kv_heads=4, head_dim=64, dtype=torch.float32, block_size=16)
    cfg = CacheConfig(layout=big, model_id="m", host_bytes=0, disk_path=tmp_path / "s", disk_bytes="64MiB",
                      compression="none")
    with TierCache(cfg) as c:
        c.disk.env.set_mapsize(4 << 20)             # the map is far smaller than disk_bytes
        kvs = {}
        for i in range(40):                         # 40 x 128 KiB = 5 MiB > 4 MiB map
            kvs[i] = make_kv(big, 16, seed=i)
            c.store(list(range(i * 100, i * 100 + 16)), kvs[i])
            c.flush()
        s = c.stats()
        assert s["evictions"]["disk"] > 0
        assert c.lookup(list(range(39 * 100, 39 * 100 + 16))) == 16
        for i, kv in kvs.items():                   # whatever survived is exact
            out = c.load(list(range(i * 100, i * 100 + 16)))
            assert out.shape[2] in (0, 16)
            if out.shape[2]:
                assert same_bytes(out, kv)


def test_inspect_reports_the_store(tmp_path, layout):
    path = tmp_path / "store"
    with TierCache(CacheConfig(layout=layout, model_id="model-a", disk_path=path)) as c:
        c.store(list(range(16)), make_kv(layout, 16))
        c.store(list(range(8)), make_kv(layout, 8), salt="tenant")
    out = subprocess.run([sys.executable, "-m", "tiercache.cli", "inspect", str(path), "--json"],
                         capture_output=True, text=True, check=True).stdout
    s = json.loads(out)
    assert s["blocks"] == 6 and s["raw_bytes"] == 6 * layout.block_bytes
    assert s["layout"]["num_layers"] == 2 and s["layout"]["dtype"] == "bfloat16"
    assert sorted(n["blocks"] for n in s["namespaces"]) == [2, 4]
    assert {n["salted"] for n in s["namespaces"]} == {True, False}
    assert all(n["model_id"] == "model-a" for n in s["namespaces"])
    assert s["compression_ratio"] > 0 and s["oldest_access"] <= s["newest_access"]
    text = subprocess.run([sys.executable, "-m", "tiercache.cli", "inspect", str(path)],
                          capture_output=True, text=True, check=True).stdout
    assert "model-a" in text and "blocks" in text
    bad = subprocess.run([sys.executable, "-m", "tiercache.cli", "inspect", str(tmp_path / "nope")],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "no tiercache disk store" in bad.stderr


def test_disk_tier_direct_layout_guard(tmp_path, layout):
    DiskTier(str(tmp_path / "d"), layout, 1 << 20).close()
    other = KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, dtype=torch.float16, block_size=4)
    with pytest.raises(ValueError, match="layout"):
        DiskTier(str(tmp_path / "d"), other, 1 << 20)


# -- issue 11 item 12: `tiercache inspect` reads without writing, fails in one line ---------------------

def _inspect(path, *extra, shell_tail=""):
    cmd = [sys.executable, "-m", "tiercache.cli", "inspect", str(path), *extra]
    if shell_tail:
        import shlex
        return subprocess.run(" ".join(map(shlex.quote, cmd)) + shell_tail, shell=True, capture_output=True,
                              text=True, timeout=120)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def _small_store(path, layout):
    with TierCache(CacheConfig(layout=layout, model_id="model-a", host_bytes=0, disk_path=path)) as c:
        c.store(list(range(64)), make_kv(layout, 64))
        c.flush()


def test_inspect_writes_nothing_into_the_store(tmp_path, layout, capsys):
    path = tmp_path / "store"
    _small_store(path, layout)
    os.unlink(path / "lock.mdb")
    before = sorted(os.listdir(path))
    assert inspect_main([str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["blocks"] == 16
    assert sorted(os.listdir(path)) == before               # no lock.mdb created
    # and on a read-only mount of it
    ro = tmp_path / "ro"
    ro.mkdir()
    if subprocess.run(["mount", "--bind", str(path), str(ro)], capture_output=True).returncode:
        pytest.skip("bind mounts are not permitted here")
    try:
        if subprocess.run(["mount", "-o", "remount,ro,bind", str(ro)], capture_output=True).returncode:
            pytest.skip("read-only remounts are not permitted here")
        assert inspect_main([str(ro), "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["blocks"] == 16
    finally:
        subprocess.run(["umount", "-l", str(ro)], capture_output=True)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "interior", "not-lmdb-dir"])
def test_inspect_a_broken_store_is_one_line(tmp_path, layout, damage, capsys):
    path = tmp_path / "store"
    _small_store(path, layout)
    data = path / "data.mdb"
    size = os.path.getsize(data)
    with open(data, "r+b") as f:
        if damage == "truncated":
            f.truncate(size // 2)
        elif damage == "garbage":
            f.write(os.urandom(size))
        elif damage == "interior":
            for page in range(2, size // 4096):
                f.seek(page * 4096)
                f.write(b"\xa5" * 4096)
    if damage == "not-lmdb-dir":
        data.unlink()
        data.mkdir()
    assert inspect_main([str(path)]) == 2                   # in this process: an exception would fail the test
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tiercache inspect: ") and str(path) in lines[0], err


def test_inspect_into_a_closed_pipe(tmp_path, layout):
    path = tmp_path / "store"
    _small_store(path, layout)
    r = _inspect(path, shell_tail=" | true")                # the reader is gone before inspect prints
    assert "Traceback" not in r.stderr and "BrokenPipe" not in r.stderr, r.stderr


# -- issue 11 item 7: a frame is served only under the key it was written for ----------------------

def test_frame_of_another_block_under_a_key_is_a_miss(tmp_path, layout):
    path = tmp_path / "store"
    kv = make_kv(layout, 16)
    cfg = CacheConfig(layout=layout, model_id="m", host_bytes=0, disk_path=path)
    with TierCache(cfg) as c:
        c.store(list(range(16)), kv)
        c.flush()
        keys = c.keys(list(range(16)))
    frame0 = stored_frame(path, keys[0])
    rewrite_frame(path, keys[2], lambda _: frame0)          # block 0's valid frame stored as block 2
    with TierCache(cfg) as c:
        out = c.load(list(range(16)))
        assert out.shape[2] == 8 and same_bytes(out, kv[:, :, :8])
        assert c.stats()["corrupt_blocks"]["disk"] == 1
