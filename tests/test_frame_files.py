"""Frames in files of their own (tiercache.tiers.frame_files): missing, damaged, half-written, unlinked
under a reader, on a full or read-only filesystem, next to inline frames and in an old-format store.

Real LMDB, real files, real mounts and real child processes throughout. Whatever happens to a frame
file, a load serves exact bytes or a miss, never other bytes.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
import threading
import time
from contextlib import contextmanager

import lmdb
import numpy as np
import pytest
import torch

from tiercache import CacheConfig, KVLayout, TierCache
from tiercache.codec import BlockCodec
from tiercache.errors import CorruptFrame, OnceLogger
from tiercache.keys import BlockKey
from tiercache.stats import Recorder
from tiercache.tiers import frame_files
from tiercache.tiers.disk import DiskTier, open_existing
from tiercache.tiers.frame_files import FileFrame, file_name, parse_pointer

from .conftest import make_kv, rewrite_frame, same_bytes, stored_frame, takes_direct

# DiskTier-level tests: 16 KiB blocks (one segment each), frames stored raw
LAY = KVLayout(num_layers=2, num_kv_heads=2, head_dim=64, dtype=torch.bfloat16, block_size=16)
CODEC = BlockCodec(LAY.fingerprint(), 2, 2, "none")
NS = b"ns-0001!"
# TierCache-level tests: the conftest layout (512-byte blocks of 4 tokens, 2 layers: one segment; a
# token-major load decodes them into scratch), and blocks whose rows are long enough for a token-major
# load to decode them straight into its result (mover._MIN_IN_PLACE_ROW), one segment per layer
SMALL = dict(num_layers=2, num_kv_heads=2, head_dim=8, dtype="bfloat16", block_size=4)
ROWS = dict(num_layers=2, num_kv_heads=8, head_dim=128, dtype="bfloat16", block_size=16)


@pytest.fixture(params=["small", "in-place-rows"])
def any_layout(request, layout):
    """The conftest layout, and one whose blocks a token-major load decodes in place, per-layer segments."""
    if request.param == "small":
        return layout
    from tiercache.codec import MIN_SEGMENT_BYTES
    from tiercache.mover import _MIN_IN_PLACE_ROW
    lay = KVLayout(**ROWS)
    assert lay.block_bytes // (lay.num_layers * lay.planes) >= _MIN_IN_PLACE_ROW
    assert lay.block_bytes // lay.num_layers >= MIN_SEGMENT_BYTES
    return lay


def key(i: int) -> BlockKey:
    return BlockKey(i.to_bytes(8, "little") * 2)


def raw(i: int) -> np.ndarray:
    return np.random.default_rng(i).integers(0, 256, LAY.block_bytes, dtype=np.uint8)


def rows(ids, content=None):
    """Write-batch items; `content` maps an id to the id whose bytes are stored under its key."""
    content = content or {}
    out = []
    for i in ids:
        out.append((key(i), CODEC.encode_parts(raw(content.get(i, i)), key(i)), NS, {"model_id": "m"}))
    return out


def open_disk(path, cap=8 << 20, **kw):
    rec = Recorder(("disk",))
    return DiskTier(str(path), LAY, cap, log=OnceLogger(), recorder=rec, **kw), rec


def read_ok(disk: DiskTier, i: int, content: int | None = None) -> bool | None:
    """True: exact bytes; None: a miss (no row, no file, or a frame that fails its checks). Wrong bytes fail."""
    with disk.reader() as get:
        f = get(key(i))
        if f is None:
            return None
        try:
            got = CODEC.decode(f, LAY.block_bytes, key=key(i))
        except (CorruptFrame, OSError):
            return None
        assert np.array_equal(got, raw(i if content is None else content)), f"wrong bytes served for {i}"
        return True


def pointers(disk: DiskTier) -> dict[bytes, tuple[int, int] | None]:
    """Every row of the `blocks` sub-db: key -> (frame length, file id), or None for an inline frame."""
    with disk.env.begin(db=disk._dbs[b"blocks"]) as txn:
        return {bytes(k): parse_pointer(v) for k, v in txn.cursor()}


def stored_pointers(path) -> dict[bytes, tuple[int, int] | None]:
    """`pointers` of a store not open in this process (read-only, no lock file touched)."""
    disk = open_existing(str(path))
    try:
        return pointers(disk)
    finally:
        disk.close()


def files_on_disk(path) -> dict[str, str]:
    """name -> full path of every file under <path>/frames."""
    out = {}
    for d, _dirs, names in os.walk(os.path.join(str(path), "frames")):
        for n in names:
            out[n] = os.path.join(d, n)
    return out


def referenced(ptrs: dict) -> set[str]:
    return {file_name(k, p[1]) for k, p in ptrs.items() if p is not None}


def file_of(path, k: bytes, ptr: tuple[int, int]) -> str:
    return frame_files.FrameFiles(str(path)).path(k, ptr[1])


def small_cfg(layout, path, **kw) -> CacheConfig:
    kw.setdefault("compression", "none")
    kw.setdefault("disk_file_bytes", 0)
    return CacheConfig(layout=layout, model_id="m", host_bytes=0, disk_path=path, disk_bytes="16MiB", **kw)


def block_major(layout, kv: torch.Tensor) -> torch.Tensor:
    n = kv.shape[2] // layout.block_size
    return kv.unflatten(2, (n, layout.block_size)).permute(2, 0, 1, 3, 4, 5)


CHILD_PRELUDE = """
import os, sys, signal, numpy as np
sys.path.insert(0, os.getcwd())
from tests.test_frame_files import *
"""


def run_child(body: str, timeout: int = 120) -> subprocess.CompletedProcess:
    """Run `body` (any indentation) in a child python after CHILD_PRELUDE; the caller checks returncode
    (negative: killed by that signal)."""
    return subprocess.run([sys.executable, "-c", CHILD_PRELUDE + textwrap.dedent(body)], capture_output=True,
                          text=True, timeout=timeout,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _log_lines(caplog, needle: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if needle in r.getMessage()]


# -- where a frame goes ------------------------------------------------------------------------------

def test_file_min_bytes_is_the_threshold(tmp_path):
    flen = len(CODEC.encode(raw(0), key(0)))
    for fmin, in_file in ((flen, True), (flen + 1, False), (None, False), (0, True)):
        path = tmp_path / f"s-{fmin}"
        disk, _ = open_disk(path, file_min_bytes=fmin)
        assert disk.write_batch(rows([0]))[0] == [key(0)]
        ptr = pointers(disk)[key(0)]
        assert (ptr is not None) == in_file, fmin
        if in_file:
            assert ptr[0] == flen
            assert list(files_on_disk(path)) == [file_name(key(0), ptr[1])]
            with open(file_of(path, key(0), ptr), "rb") as f:
                assert f.read() == CODEC.encode(raw(0), key(0))     # the file is the frame, byte for byte
        else:
            assert files_on_disk(path) == {}
        assert read_ok(disk, 0) is True
        disk.close()


def test_config_disk_file_bytes_reaches_the_tier(tmp_path, layout):
    kv = make_kv(layout, 8)
    for fb, in_file in ((0, True), (None, False), ("256KiB", False)):
        path = tmp_path / f"s-{fb}"
        with TierCache(small_cfg(layout, path, disk_file_bytes=fb)) as c:
            c.store(list(range(8)), kv)
            c.flush()
            ptrs = pointers(c.disk)
            assert len(ptrs) == 2 and all((p is not None) == in_file for p in ptrs.values()), fb
            assert len(files_on_disk(path)) == (2 if in_file else 0)
            assert same_bytes(c.load(list(range(8))), kv)


# -- 2. a frame file deleted by hand ----------------------------------------------------------------

def test_missing_frame_file_is_a_miss_until_stored_again(tmp_path, any_layout):
    lay = any_layout
    B = lay.block_size
    path = tmp_path / "store"
    kv = make_kv(lay, 4 * B)
    toks = list(range(4 * B))
    with TierCache(small_cfg(lay, path)) as c:
        assert c.store(toks, kv) == 4 * B
        c.flush()
        keys = c.keys(toks)
        ptrs = pointers(c.disk)
        assert set(ptrs) == set(keys) and all(p is not None for p in ptrs.values())
        old = ptrs[keys[2]]
        os.unlink(file_of(path, keys[2], old))
        s0 = c.stats()
        out = c.load(toks)
        assert out.shape[2] == 2 * B and same_bytes(out, kv[:, :, :2 * B])  # the prefix stops before it
        s1 = c.stats()
        assert s1["loaded_tokens"]["disk"] - s0["loaded_tokens"]["disk"] == 2 * B  # served: blocks 0, 1 only
        assert s1["loaded_bytes"]["disk"] - s0["loaded_bytes"]["disk"] == 2 * lay.block_bytes
        assert s1["corrupt_blocks"]["disk"] == 0 and s1["errors_total"] == 0  # a miss, not a fault
        assert c.lookup(toks) == 2 * B                                   # forgotten by the index at once
        assert c.disk.count_each(keys) == [True] * 4                      # its row: until the next write
        out = c.load_keys(keys, block_major=True)
        assert out.shape[0] == 2 and same_bytes(out, block_major(lay, kv)[:2])
        c.store(list(range(10_000, 10_000 + B)), make_kv(lay, B, seed=1))  # the next write batch
        c.flush()
        assert c.disk.count_each(keys) == [True, True, False, True]      # the row is gone
        assert keys[2] not in pointers(c.disk)
        assert c.stats()["loaded_tokens"]["disk"] == s1["loaded_tokens"]["disk"] + 2 * B
    with TierCache(small_cfg(lay, path)) as c:                           # a new process sees the same
        assert c.lookup(toks) == 2 * B
        assert c.store(toks, kv) == 4 * B                                # storing again repairs it
        c.flush()
        new = pointers(c.disk)[keys[2]]
        assert new is not None and new[1] != old[1]                      # a new file, never the old name
        assert os.path.exists(file_of(path, keys[2], new))
        assert same_bytes(c.load(toks), kv)
        assert same_bytes(c.load_keys(keys, block_major=True), block_major(lay, kv))
        assert c.stats()["corrupt_blocks"]["disk"] == 0
        assert referenced(pointers(c.disk)) == set(files_on_disk(path))  # no file left over


def test_missing_frame_file_repaired_in_the_same_batch_that_drops_its_row(tmp_path, layout):
    """The stale row and the new frame meet in one write transaction: the row is deleted, then written."""
    path = tmp_path / "store"
    kv = make_kv(layout, 16)
    toks = list(range(16))
    with TierCache(small_cfg(layout, path)) as c:
        c.store(toks, kv)
        c.flush()
        keys = c.keys(toks)
        old = pointers(c.disk)[keys[1]]
        os.unlink(file_of(path, keys[1], old))
        assert c.load(toks).shape[2] == 4
        assert c.store(toks, kv) == 16                                   # no other write in between
        c.flush()
        new = pointers(c.disk)[keys[1]]
        assert new is not None and new[1] != old[1]
        assert same_bytes(c.load(toks), kv)
        assert referenced(pointers(c.disk)) == set(files_on_disk(path))  # no file left over


# -- 3. a damaged frame file --------------------------------------------------------------------------

@pytest.mark.parametrize("read", ["token-major", "block-major"])
@pytest.mark.parametrize("damage", ["truncated", "other-block", "flipped", "missing"])
@pytest.mark.parametrize("compression", ["none", "byteplane"])
def test_damaged_or_missing_frame_files(tmp_path, any_layout, compression, damage, read):
    lay = any_layout
    B = lay.block_size
    path = tmp_path / "store"
    kv = make_kv(lay, 4 * B)
    toks = list(range(4 * B))
    cfg = small_cfg(lay, path, compression=compression)
    with TierCache(cfg) as c:
        c.store(toks, kv)
        c.flush()
        keys = c.keys(toks)
    old = stored_pointers(path)[keys[2]]
    victim = file_of(path, keys[2], old)
    if damage == "truncated":
        rewrite_frame(path, keys[2], lambda f: f[:len(f) // 2])
        assert os.path.getsize(victim) < old[0]
    elif damage == "other-block":
        frame0 = stored_frame(path, keys[0])                             # a valid frame, of block 0
        rewrite_frame(path, keys[2], lambda _: frame0)
    elif damage == "flipped":                                            # in the last layer's bytes
        rewrite_frame(path, keys[2], lambda f: f[:-5] + bytes([f[-5] ^ 0x08]) + f[-4:])
    else:
        os.unlink(victim)

    def load(c):
        if read == "token-major":
            out = c.load(toks)
            return out.shape[2] // B, same_bytes(out, kv[:, :, :out.shape[2]])
        out = c.load_keys(keys, block_major=True)
        return out.shape[0], same_bytes(out, block_major(lay, kv)[:out.shape[0]])

    with TierCache(cfg) as c:
        assert c.lookup(toks) == 4 * B                                   # lookup does not read frames
        assert load(c) == (2, True)                                      # exact, up to the damaged block
        s = c.stats()
        assert s["corrupt_blocks"]["disk"] == (0 if damage == "missing" else 1)
        assert s["loaded_tokens"]["disk"] == 2 * B
        if damage == "missing":                                          # the row goes with the next write
            c.store(list(range(10_000, 10_000 + B)), make_kv(lay, B, seed=1))
        c.flush()                                                        # a corrupt block: deleted here
        assert c.disk.count_each([keys[2]]) == [False]
        assert not os.path.exists(victim)
        assert not any(n.startswith(bytes(keys[2]).hex()) for n in files_on_disk(path))
        assert c.lookup(toks) == 2 * B
        assert load(c) == (2, True)
        assert c.store(toks, kv) == 4 * B                                # storing again repairs it
        c.flush()
        assert load(c) == (4, True)
        new = pointers(c.disk)[keys[2]]
        assert new[1] != old[1] and os.path.exists(file_of(path, keys[2], new))
        assert c.stats()["corrupt_blocks"]["disk"] == (0 if damage == "missing" else 1)
        assert referenced(pointers(c.disk)) == set(files_on_disk(path))


def test_layerwise_load_of_a_damaged_frame_file_fails_closed(tmp_path, any_layout):
    from tiercache.codec import frame_segments
    from tiercache.layerwise import KVUnavailable
    lay = any_layout
    B = lay.block_size
    path = tmp_path / "store"
    kv = make_kv(lay, 4 * B)
    toks = list(range(4 * B))
    cfg = small_cfg(lay, path)
    with TierCache(cfg) as c:
        c.store(toks, kv)
        c.flush()
        keys = c.keys(toks)
    per_layer = frame_segments(stored_frame(path, keys[3])) == lay.num_layers
    rewrite_frame(path, keys[3], lambda f: f[:-1])                       # the last layer's bytes cut short
    with TierCache(cfg) as c:
        ll = c.load_layers(toks)
        if per_layer:
            assert same_bytes(ll.wait_layer(0), kv[0])                   # layer 0 is whole and verified
        with pytest.raises(KVUnavailable):
            ll.wait_layer(lay.num_layers - 1)
        assert c.stats()["corrupt_blocks"]["disk"] == 1
        assert same_bytes(c.load(toks), kv[:, :, :3 * B])


# -- 4. a process killed in the middle of writing a frame file, or between a commit and its unlinks ------

def _orphans(path) -> set[str]:
    return set(files_on_disk(path)) - referenced(stored_pointers(path))


def _age(paths, seconds: float) -> None:
    t = time.time() - seconds
    for p in paths:
        os.utime(p, (t, t))


def _loads_exact_or_miss(layout, path, prompts: dict[int, torch.Tensor]) -> dict[int, int]:
    """Load every prompt: tokens served per prompt; fails if a served token differs from what was stored."""
    served = {}
    with TierCache(small_cfg(layout, path)) as c:
        for j, kv in prompts.items():
            toks = list(range(j * 1000, j * 1000 + kv.shape[2]))
            out = c.load(toks)
            assert same_bytes(out, kv[:, :, :out.shape[2]]), f"wrong bytes served for prompt {j}"
            served[j] = out.shape[2]
            blocks = c.load_keys(c.keys(toks), block_major=True)
            assert same_bytes(blocks, block_major(layout, kv)[:blocks.shape[0]])
    return served


def _killed_mid_write(path, kill_at: int, direct: bool) -> subprocess.CompletedProcess:
    """A child stores 4 prompts, then dies in the middle of its `kill_at`-th frame-file write: a buffered
    writev (half the frame's bytes written), or an O_DIRECT write (the aligned half of its buffer)."""
    return run_child(f"""
    from tiercache import TierCache, KVLayout
    from tests.conftest import make_kv
    lay = KVLayout(**{SMALL!r})
    c = TierCache(small_cfg(lay, {str(path)!r}, disk_direct_writes={direct!r}))
    for j in range(4):                                  # 4 prompts of 8 blocks, committed
        c.store(list(range(j * 1000, j * 1000 + 32)), make_kv(lay, 32, seed=j))
        c.flush()
    c._writer.pause()                                   # the next prompt's 8 blocks: one write batch
    name = "write" if {direct!r} else "writev"
    real, write, calls = getattr(os, name), os.write, [0]
    def dying(fd, bufs):
        calls[0] += 1
        if calls[0] == {kill_at}:                       # half of this frame's bytes, then the process dies
            data = bytes(bufs) if name == "write" else b"".join(bytes(b) for b in bufs)
            half = len(data) // 2 // 4096 * 4096 if name == "write" else len(data) // 2
            if half:
                write(fd, data[:half])
            os.kill(os.getpid(), signal.SIGKILL)
        return real(fd, bufs)
    setattr(os, name, dying)
    c.store(list(range(4000, 4032)), make_kv(lay, 32, seed=4))
    c._writer.resume()
    c.flush()
    print("not killed")
    """)


@pytest.mark.parametrize("direct", [False, True], ids=["buffered", "direct"])
def test_killed_while_writing_frame_files(tmp_path, layout, direct):
    path = tmp_path / "store"
    if direct and not takes_direct(tmp_path):
        pytest.skip("this filesystem refuses O_DIRECT")
    r = _killed_mid_write(path, 5, direct)
    assert r.returncode == -9, f"rc {r.returncode}: {r.stdout} {r.stderr[-2000:]}"
    prompts = {j: make_kv(layout, 32, seed=j) for j in range(5)}
    ptrs = stored_pointers(path)
    assert len(ptrs) == 32 and all(p is not None for p in ptrs.values())   # the 5th prompt: nothing committed
    orphans = _orphans(path)
    assert len(orphans) == 5                                 # 4 whole files of the killed batch, and a cut one
    files = files_on_disk(path)
    sizes = sorted(os.path.getsize(files[n]) for n in orphans)
    flen = next(iter(ptrs.values()))[0]
    # a direct write of a frame this small is one padded 4 KiB piece: killed before it, the file is empty
    assert sizes == [0 if direct else flen // 2] + [flen] * 4
    # a young orphan may be another process's write in flight: an open keeps it
    assert _loads_exact_or_miss(layout, path, prompts) == {0: 32, 1: 32, 2: 32, 3: 32, 4: 0}
    assert _orphans(path) == orphans
    # once older than ORPHAN_AGE_S, the next writable open removes them, and only them
    _age([files[n] for n in orphans], frame_files.ORPHAN_AGE_S + 60)
    kept = files[sorted(referenced(ptrs))[0]]
    _age([kept], frame_files.ORPHAN_AGE_S + 60)              # an old file that a row points to stays
    assert _loads_exact_or_miss(layout, path, prompts) == {0: 32, 1: 32, 2: 32, 3: 32, 4: 0}
    assert _orphans(path) == set()
    assert set(files_on_disk(path)) == referenced(stored_pointers(path)) and os.path.exists(kept)
    # the killed prompt, stored again, is whole
    with TierCache(small_cfg(layout, path)) as c:
        c.store(list(range(4000, 4032)), prompts[4])
        c.flush()
    assert _loads_exact_or_miss(layout, path, prompts) == {j: 32 for j in range(5)}


def test_orphan_age_setting_is_honoured_at_open(tmp_path, layout, monkeypatch):
    path = tmp_path / "store"
    r = _killed_mid_write(path, 3, direct=takes_direct(tmp_path))
    assert r.returncode == -9, r.stderr[-2000:]
    assert len(_orphans(path)) == 3
    monkeypatch.setattr(frame_files, "ORPHAN_AGE_S", 0.0)
    TierCache(small_cfg(layout, path)).close()              # a writable open
    assert _orphans(path) == set()


def test_killed_between_a_commit_and_its_unlinks(tmp_path):
    path = tmp_path / "store"
    disk, _ = open_disk(path, file_min_bytes=0)
    disk.write_batch(rows(range(20)))
    before = set(files_on_disk(path))
    disk.close()
    r = run_child(f"""
    disk, _ = open_disk({str(path)!r}, file_min_bytes=0)
    real = os.unlink
    def dying_unlink(p, *a, **kw):
        if "frames" in str(p):                          # the rows' deletion is committed; no file unlinked yet
            os.kill(os.getpid(), signal.SIGKILL)
        return real(p, *a, **kw)
    os.unlink = dying_unlink
    gone = disk.evict_bytes(5 * {LAY.block_bytes})
    print("not killed", len(gone))
    """)
    assert r.returncode == -9, f"rc {r.returncode}: {r.stdout} {r.stderr[-2000:]}"
    ptrs = stored_pointers(path)
    assert 0 < len(ptrs) < 20                                 # the eviction is committed
    assert set(files_on_disk(path)) == before                 # ...and every file is still there
    orphans = _orphans(path)
    assert len(orphans) == 20 - len(ptrs)
    disk, _ = open_disk(path, file_min_bytes=0)
    served = [read_ok(disk, i) for i in range(20)]            # evicted: misses; the rest exact
    assert served == [True if key(i) in ptrs else None for i in range(20)]
    disk.close()
    assert _orphans(path) == orphans                          # young: kept
    _age([files_on_disk(path)[n] for n in orphans], frame_files.ORPHAN_AGE_S + 1)
    disk, _ = open_disk(path, file_min_bytes=0)
    assert set(files_on_disk(path)) == referenced(ptrs)
    assert [read_ok(disk, i) for i in range(20)] == served
    disk.close()


# -- 5. unlinks wait for this process's readers ---------------------------------------------------------

def test_unlinks_wait_for_this_process_readers(tmp_path):
    path = tmp_path / "store"
    disk, _ = open_disk(path, file_min_bytes=0)
    disk.write_batch(rows(range(10)))
    ptrs = pointers(disk)
    paths = {i: file_of(path, key(i), ptrs[key(i)]) for i in range(10)}
    gone: list = []

    def other_thread(fn):
        t = threading.Thread(target=lambda: gone.extend(fn()))
        t.start()
        t.join()

    with disk.reader() as get:
        early = get(key(0))                                   # a file frame taken before the evictions
        assert isinstance(early, FileFrame)
        # deletes in a write batch (with new blocks), then an eviction of everything, from another thread
        other_thread(lambda: disk.write_batch(rows([100, 101]), deletes=[key(i) for i in range(5)])[0])
        assert gone == [key(100), key(101)]
        other_thread(lambda: disk.evict_bytes(1 << 40))
        assert set(gone[2:]) == {key(i) for i in range(5, 10)} | {key(100), key(101)}
        assert pointers(disk) == {}                           # every row is gone...
        assert all(os.path.exists(p) for p in paths.values())  # ...but every file stays while this snapshot is open
        assert len(files_on_disk(path)) == 12
        for i in range(10):                                   # the snapshot still serves them, exact
            f = get(key(i))
            assert isinstance(f, FileFrame)
            assert np.array_equal(CODEC.decode(f, LAY.block_bytes, key=key(i)), raw(i))
        assert np.array_equal(CODEC.decode(early, LAY.block_bytes, key=key(0)), raw(0))
        assert get(key(100)) is None                          # written after the snapshot: not in it
    assert files_on_disk(path) == {}                          # the reader is done: all unlinked
    assert disk.used() == (0, 0)
    assert [read_ok(disk, i) for i in range(10)] == [None] * 10
    disk.close()


def test_unlinks_past_max_deferred_go_at_once_and_are_misses(tmp_path, monkeypatch):
    monkeypatch.setattr(frame_files, "MAX_DEFERRED", 3)
    path = tmp_path / "store"
    disk, rec = open_disk(path, file_min_bytes=0)
    disk.write_batch(rows(range(10)))
    ptrs = pointers(disk)
    with disk.reader() as get:
        t = threading.Thread(target=lambda: disk.write_batch([], deletes=[key(i) for i in range(5)]))
        t.start()
        t.join()
        t = threading.Thread(target=lambda: disk.write_batch([], deletes=[key(i) for i in range(5, 10)]))
        t.start()
        t.join()
        for i in range(5):                                    # deferred: still there, exact
            assert os.path.exists(file_of(path, key(i), ptrs[key(i)]))
            assert np.array_equal(CODEC.decode(get(key(i)), LAY.block_bytes, key=key(i)), raw(i))
        for i in range(5, 10):                                # over the limit: unlinked now, a miss
            assert not os.path.exists(file_of(path, key(i), ptrs[key(i)]))
            assert get(key(i)) is None
    assert files_on_disk(path) == {}
    assert rec.snapshot()["errors"].get("disk", {}) == {}
    disk.close()


def test_unlinks_wait_for_readers_of_another_tier_on_the_same_path(tmp_path):
    path = tmp_path / "store"
    first, _ = open_disk(path, file_min_bytes=0)
    first.write_batch(rows(range(4)))
    second, _ = open_disk(path, file_min_bytes=0)            # same path, same process: one LMDB environment
    try:
        with first.reader() as get:
            taken = get(key(0))
            assert sorted(second.evict_bytes(1 << 40)) == sorted(key(i) for i in range(4))
            assert len(files_on_disk(path)) == 4                  # "unlinks wait while any read snapshot of
            assert np.array_equal(CODEC.decode(taken, LAY.block_bytes, key=key(0)), raw(0))  # this process
            assert read_ok_in(get, 1) is True                     # is open" (frame_files)
        assert files_on_disk(path) == {}
    finally:
        second.close()
        first.close()


def read_ok_in(get, i: int) -> bool | None:
    f = get(key(i))
    if f is None:
        return None
    assert np.array_equal(CODEC.decode(f, LAY.block_bytes, key=key(i)), raw(i)), f"wrong bytes served for {i}"
    return True


def test_a_key_twice_in_one_batch_leaves_no_file_behind(tmp_path):
    path = tmp_path / "store"
    disk, rec = open_disk(path, file_min_bytes=0)
    written, _, dropped = disk.write_batch(rows([1, 1, 2]))
    assert written == [key(1), key(2)] and dropped == []
    assert read_ok(disk, 1) is True and read_ok(disk, 2) is True
    try:
        assert set(files_on_disk(path)) == referenced(pointers(disk))
    finally:
        disk.close()


# -- 6. another process evicts and unlinks under this process's snapshot ------------------------------------

def test_another_process_unlinks_under_an_open_snapshot(tmp_path):
    path = tmp_path / "store"
    disk, _ = open_disk(path, file_min_bytes=0)
    disk.write_batch(rows(range(10)))
    old = pointers(disk)
    with disk.reader() as get:
        early = get(key(0))                                   # stat()ed, not read yet
        assert isinstance(early, FileFrame)
        r = run_child(f"""
        disk, _ = open_disk({str(path)!r}, file_min_bytes=0)
        print("evicted", len(disk.evict_bytes(1 << 40)))
        print("rewritten", len(disk.write_batch(rows([3], content={{3: 1003}}))[0]))  # key 3, other bytes
        disk.close()
        """)
        assert r.returncode == 0, r.stderr[-2000:]
        assert "evicted 10" in r.stdout and "rewritten 1" in r.stdout
        (left,) = files_on_disk(path)                         # B's new file of key 3 only
        assert left.startswith(bytes(key(3)).hex()) and left != file_name(key(3), old[key(3)][1])
        for i in range(1, 10):                                # rows still in this snapshot, files gone: misses
            assert get(key(i)) is None, i
        with pytest.raises(OSError):                          # the frame taken before: gone when read
            CODEC.decode(early, LAY.block_bytes, key=key(0))
    # a later snapshot sees B's commit: key 3 is B's frame, the others are gone
    assert read_ok(disk, 3, content=1003) is True
    assert [read_ok(disk, i) for i in range(10) if i != 3] == [None] * 9
    # key 3 was noted stale with its old file id: the next write leaves the row of B's new file alone
    assert disk.write_batch(rows([50]))[0] == [key(50)]
    assert read_ok(disk, 3, content=1003) is True and read_ok(disk, 50) is True
    assert pointers(disk)[key(3)][1] != old[key(3)][1]
    disk.close()


def test_another_process_unlinks_during_a_cache_load(tmp_path, any_layout, monkeypatch):
    """Process A's load has its snapshot open and block 0's file found; then process B evicts everything.
    A serves nothing (block 0's file is gone when decoded, the rest are found missing), never wrong bytes."""
    lay = any_layout
    B = lay.block_size
    path = tmp_path / "store"
    kv = make_kv(lay, 4 * B)
    toks = list(range(4 * B))
    cfg = small_cfg(lay, path)
    with TierCache(cfg) as c:
        c.store(toks, kv)
        c.flush()
        real_reader = c.disk.reader
        ran = []

        @contextmanager
        def reader_with_b_in_between():
            # the real snapshot; B runs right after A's first get (a timing hook, the storage is real)
            with real_reader() as get:
                def get_then_b(k):
                    f = get(k)
                    if not ran:
                        ran.append(run_child(f"""
                        from tiercache import TierCache, KVLayout
                        lay = KVLayout(**{lay.to_dict()!r})
                        c = TierCache(small_cfg(lay, {str(path)!r}))
                        print("evicted", len(c.disk.evict_bytes(1 << 40)))
                        c.close()
                        """))
                    return f
                yield get_then_b

        for read in ("token-major", "block-major"):
            monkeypatch.setattr(c.disk, "reader", reader_with_b_in_between)
            s0 = c.stats()
            out = c.load(toks) if read == "token-major" else c.load_keys(c.keys(toks), block_major=True)
            (r,) = ran
            assert r.returncode == 0 and "evicted 4" in r.stdout, r.stderr[-2000:]
            assert out.shape[2 if read == "token-major" else 0] == 0, read
            assert files_on_disk(path) == {}
            s = c.stats()
            assert s["loaded_tokens"]["disk"] == s0["loaded_tokens"]["disk"]   # nothing served
            # block 0: its file gone when read (an error or a corrupt frame, counted once); the rest: misses
            assert s["errors_total"] + s["corrupt_blocks"]["disk"] == \
                s0["errors_total"] + s0["corrupt_blocks"]["disk"] + 1
            monkeypatch.undo()
            assert c.load(toks).shape[2] == 0                  # block 0's row is gone too: a miss
            assert c.lookup(toks) == 0
            assert c.store(toks, kv) == 4 * B
            c.flush()
            assert same_bytes(c.load(toks), kv)
            ran.clear()


@pytest.mark.parametrize("read", ["token-major", "block-major", "layer-wise"])
def test_compressed_frame_file_gone_between_its_pieces(tmp_path, monkeypatch, read):
    """A compressed frame file larger than codec._OVERLAP_READ_BYTES is hinted to the kernel whole, then
    read in pieces as its segments decode. Removed from under the load after its first piece (by hand,
    or by anything outside tiercache): that block is a counted error and a miss, the blocks before it are
    served exactly, nothing after it is served, nothing stays pinned, and storing it again repairs it."""
    from tiercache import codec
    lay = KVLayout(**ROWS)  # 2 layers of 64 KiB: one segment per layer
    B = lay.block_size
    path = tmp_path / "store"
    kv = make_kv(lay, 4 * B)
    toks = list(range(4 * B))
    with TierCache(small_cfg(lay, path, compression="byteplane")) as c:
        c.store(toks, kv)
        c.flush()
        victim = c.keys(toks)[2]
        monkeypatch.setattr(codec, "_OVERLAP_READ_BYTES", 4096)
        real, hinted, pieces = FileFrame.readinto, [], []

        def hint(self, offset, length):
            hinted.append(self.path)
        monkeypatch.setattr(FileFrame, "willneed", hint)

        def readinto(self, bufs, offset):
            real(self, bufs, offset)
            if self.path in hinted and os.path.basename(self.path).startswith(bytes(victim).hex()):
                pieces.append(offset)
                if len(pieces) == 1:
                    os.unlink(self.path)  # gone after its first piece
        monkeypatch.setattr(FileFrame, "readinto", readinto)
        s0 = c.stats()
        if read == "token-major":
            out = c.load(toks)
        elif read == "block-major":
            out = block_major_back(c.load_keys(c.keys(toks), block_major=True))
        else:
            with pytest.raises(Exception) as e:  # a layer-wise load fails closed past what it promised
                c.load_layers(toks).wait()
            assert type(e.value).__name__ == "KVUnavailable"
            out = None
        assert len(hinted) >= 3 and len(pieces) == 1       # blocks 0-2 hinted; the victim read one piece
        if out is not None:
            assert out.shape[2] == 2 * B and same_bytes(out, kv[:, :, :2 * B])
        s = c.stats()
        failed = s["errors_total"] + s["corrupt_blocks"]["disk"] - s0["errors_total"] - s0["corrupt_blocks"]["disk"]
        # a whole-prefix read fails on the missing piece (counted once); a layer-wise read looks the block
        # up again for its next layer and finds the file gone: a plain miss
        assert failed == (1 if read != "layer-wise" else 0), failed
        for t, f in s["in_flight"].items():
            assert f == {"pinned": 0, "reserved": 0}, (t, f)
        monkeypatch.undo()
        assert same_bytes(c.load(toks), kv[:, :, :2 * B])   # a miss from then on
        c.store(toks, kv)
        c.flush()
        assert same_bytes(c.load(toks), kv)


def block_major_back(bm: torch.Tensor) -> torch.Tensor:
    """[n, L, planes, B, H, D] -> [L, planes, n * B, H, D]."""
    return bm.permute(1, 2, 0, 3, 4, 5).flatten(2, 3)


# -- 7. a full filesystem ---------------------------------------------------------------------------------

def test_frame_files_fill_the_filesystem(tmpfs, caplog):
    mnt = tmpfs("3m")
    path = mnt / "store"
    limit = 3 << 20
    with caplog.at_level(logging.WARNING, logger="tiercache"):
        disk, rec = open_disk(path, cap=64 << 20, file_min_bytes=0)   # disk_bytes far above the filesystem
        written = dropped = 0
        for b in range(40):                                           # 40 x 8 x 16 KiB = 5 MiB into 3 MiB
            w, _, d = disk.write_batch(rows(range(b * 8, b * 8 + 8)))
            written += len(w)
            dropped += len(d)
            assert disk.allocated_bytes() <= limit
            st = os.statvfs(mnt)
            assert disk.allocated_bytes() <= (st.f_blocks - st.f_bfree) * st.f_frsize
    s = rec.snapshot()
    full = _log_lines(caplog, "is full")
    assert len(full) == 1 and f"disk_path={path}" in full[0], full
    assert s["errors"]["disk"]["store"] >= 1
    assert s["dropped_writes"]["disk"] == dropped
    assert disk.available and not disk.readonly
    assert written > 100
    assert disk.write_batch(rows([10_000]))[0] == [key(10_000)]         # it keeps writing (evicting)
    assert read_ok(disk, 10_000) is True
    served = [read_ok(disk, i) for i in range(320)]                     # raises on a wrong byte
    assert served[-8:] == [True] * 8 and served[0] is None              # newest kept, oldest evicted
    ptrs = pointers(disk)
    assert set(files_on_disk(path)) <= referenced(ptrs)                 # no file left behind by a failed write
    assert disk.allocated_bytes() <= limit
    disk.close()


@pytest.mark.parametrize("direct", [False, True], ids=["buffered", "direct"])
def test_a_cache_with_frame_files_on_a_full_filesystem(tmpfs, layout, caplog, direct):
    """Frame files written buffered and with O_DIRECT (disk_direct_writes=True) onto a real 2 MiB tmpfs: a
    write that finds it full evicts and retries, every load is exact or a miss, nothing is left behind."""
    mnt = tmpfs("2m")
    if direct and not takes_direct(mnt):
        pytest.skip("this tmpfs refuses O_DIRECT")
    lay = KVLayout(num_layers=2, num_kv_heads=2, head_dim=64, dtype=torch.bfloat16, block_size=16)
    cfg = CacheConfig(layout=lay, model_id="m", host_bytes=0, disk_path=mnt / "store", disk_bytes="64MiB",
                      compression="none", disk_file_bytes=0, disk_direct_writes=direct)
    kvs = {}
    with caplog.at_level(logging.WARNING, logger="tiercache"), TierCache(cfg) as c:
        for j in range(40):                                             # 40 x 4 x 16 KiB = 2.5 MiB into 2
            kvs[j] = make_kv(lay, 64, seed=j)
            c.store(list(range(j * 1000, j * 1000 + 64)), kvs[j])
            c.flush()
            assert c.disk.allocated_bytes() <= 2 << 20
        for j in range(40):
            toks = list(range(j * 1000, j * 1000 + 64))
            out = c.load(toks)
            assert same_bytes(out, kvs[j][:, :, :out.shape[2]])
        assert same_bytes(c.load(list(range(39000, 39064))), kvs[39])   # the newest: all of it
        s = c.stats()
        assert s["evictions"]["disk"] > 0 and s["errors"]["disk"].get("store", 0) >= 1
        assert set(files_on_disk(mnt / "store")) <= referenced(pointers(c.disk))  # no file of a failed write
        assert c.disk._files.direct_refused is None
    assert len(_log_lines(caplog, "is full")) == 1


# -- 8. a read-only filesystem ------------------------------------------------------------------------------

def test_frame_files_on_a_read_only_filesystem(tmpfs, layout, caplog):
    mnt = tmpfs("8m")
    path = mnt / "store"
    cfg = small_cfg(layout, path)
    kv = make_kv(layout, 16)
    with TierCache(cfg) as c:
        c.store(list(range(16)), kv)
        c.flush()
    stray = os.path.join(str(path), "frames", "00", "00" * 16 + ".0000000000000001")  # an old orphan
    os.makedirs(os.path.dirname(stray), exist_ok=True)
    with open(stray, "wb") as f:
        f.write(b"x" * 100)
    _age([stray], frame_files.ORPHAN_AGE_S + 60)
    before = files_on_disk(path)
    if subprocess.run(["mount", "-o", "remount,ro", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot remount read-only")
    with caplog.at_level(logging.WARNING, logger="tiercache"):
        with TierCache(cfg) as c:
            assert c.disk.readonly
            assert same_bytes(c.load(list(range(16))), kv)               # served from the files
            keys = c.keys(list(range(16)))
            assert same_bytes(c.load_keys(keys, block_major=True), block_major(layout, kv))
            other = make_kv(layout, 8, seed=1)
            c.store(list(range(100, 108)), other)                        # queued; no host tier to keep it
            c.flush()
            assert c.lookup(list(range(100, 108))) == 0
            s = c.stats()
            assert s["dropped_writes"]["disk"] == 2                      # both blocks, counted
            assert c.load(list(range(100, 108))).shape[2] == 0
            assert s["loaded_tokens"]["disk"] == 32
    assert files_on_disk(path) == before                                 # nothing written, nothing collected
    (line,) = _log_lines(caplog, "read-only")
    assert f"disk_path={path}" in line


# -- 9. a format-2 store ------------------------------------------------------------------------------------

def _format(path, disk: DiskTier | None = None) -> bytes:
    if disk is not None:                                                 # open here: through its environment
        with disk.env.begin(db=disk._dbs[b"info"]) as txn:
            return bytes(txn.get(b"format"))
    env = lmdb.open(str(path), max_dbs=8, subdir=True, readonly=True, lock=False)
    try:
        with env.begin(db=env.open_db(b"info", create=False)) as txn:
            return bytes(txn.get(b"format"))
    finally:
        env.close()


def test_a_format_2_store_is_served_and_marked_3_by_a_writable_open(tmp_path):
    path = tmp_path / "store"
    disk, _ = open_disk(path, file_min_bytes=None)                       # frames inline only, as format 2 had
    disk.write_batch(rows(range(6)))
    disk.close()
    env = lmdb.open(str(path), max_dbs=8, subdir=True)
    with env.begin(write=True, db=env.open_db(b"info")) as txn:
        assert txn.get(b"format") == b"tiercache-disk-3"
        txn.put(b"format", b"tiercache-disk-2")
    env.close()
    assert _format(path) == b"tiercache-disk-2"
    ro = open_existing(str(path))                                        # read-only: served, left at 2
    assert [read_ok(ro, i) for i in range(6)] == [True] * 6
    ro.close()
    disk, _ = open_disk(path, readonly=True)
    assert disk.available and [read_ok(disk, i) for i in range(6)] == [True] * 6
    disk.close()
    assert _format(path) == b"tiercache-disk-2"
    assert not os.path.exists(path / "frames")
    disk, _ = open_disk(path, file_min_bytes=0)                          # writable: marked 3
    assert _format(path, disk) == b"tiercache-disk-3"
    assert [read_ok(disk, i) for i in range(6)] == [True] * 6
    disk.write_batch(rows(range(6, 9)))                                  # now it may hold frame files
    assert len(files_on_disk(path)) == 3
    assert [read_ok(disk, i) for i in range(9)] == [True] * 9
    disk.close()
    assert _format(path) == b"tiercache-disk-3"


# -- 10. inline frames and frame files in one store ------------------------------------------------------------

def test_inline_frames_and_frame_files_in_one_store(tmp_path, layout):
    path = tmp_path / "store"
    kv_a, kv_b = make_kv(layout, 16, seed=1), make_kv(layout, 16, seed=2)
    a, b = list(range(16)), list(range(100, 116))
    with TierCache(small_cfg(layout, path, disk_file_bytes=None)) as c:
        c.store(a, kv_a)
        c.flush()
        assert all(p is None for p in pointers(c.disk).values()) and files_on_disk(path) == {}
    with TierCache(small_cfg(layout, path, disk_file_bytes=0)) as c:
        assert same_bytes(c.load(a), kv_a)                               # inline frames, read as before
        c.store(b, kv_b)
        c.flush()
        ptrs = pointers(c.disk)
        keys_a, keys_b = c.keys(a), c.keys(b)
        assert [ptrs[k] is None for k in keys_a + keys_b] == [True] * 4 + [False] * 4
        files = files_on_disk(path)
        assert set(files) == referenced(ptrs) and len(files) == 4
        on_disk = sum(os.stat(p).st_blocks * 512 for p in files.values())
        assert on_disk > 0
        mdb = os.stat(path / "data.mdb").st_blocks * 512
        assert c.disk.allocated_bytes() == mdb + on_disk                 # the files are counted
        assert same_bytes(c.load(a), kv_a) and same_bytes(c.load(b), kv_b)
        assert same_bytes(c.load_keys(keys_a + keys_b, block_major=True),
                          torch.cat([block_major(layout, kv_a), block_major(layout, kv_b)]))
    with TierCache(small_cfg(layout, path, disk_file_bytes=None)) as c:  # and back: files still read
        assert same_bytes(c.load(b), kv_b) and same_bytes(c.load(a), kv_a)
        gone = c.disk.evict_bytes(1 << 40)                               # eviction frees both kinds
        assert sorted(gone) == sorted(keys_a + keys_b)
        assert pointers(c.disk) == {} and c.disk.used() == (0, 0)
        assert files_on_disk(path) == {}
        assert c.disk.allocated_bytes() == os.stat(path / "data.mdb").st_blocks * 512


def test_budget_eviction_unlinks_frame_files(tmp_path):
    """A write over the budget evicts older blocks of both kinds; their files go with their rows."""
    path = tmp_path / "store"
    cap = 2 << 20
    disk, rec = open_disk(path, cap=cap, file_min_bytes=None)
    disk.write_batch(rows(range(20)))                                    # inline
    disk.close()
    disk, rec = open_disk(path, cap=cap, file_min_bytes=0)
    evicted = []
    for b in range(20):
        evicted += disk.write_batch(rows(range(100 + b * 8, 108 + b * 8)))[1]
        ptrs = pointers(disk)
        assert set(files_on_disk(path)) == referenced(ptrs)             # no file without a row, no row without
        assert disk.used()[0] <= cap
    assert set(range(20)) <= {int.from_bytes(bytes(k)[:8], "little") for k in evicted}
    assert any(int.from_bytes(bytes(k)[:8], "little") >= 100 for k in evicted)   # files evicted too
    assert read_ok(disk, 100 + 19 * 8 + 7) is True
    assert [read_ok(disk, i) for i in range(20)] == [None] * 20
    assert rec.snapshot()["errors"].get("disk", {}) == {}
    disk.close()


def test_a_store_removed_and_made_again_in_this_process_writes_files(tmp_path):
    """The per-path FrameFiles outlives a store's directory: removed (after close) and opened again at the
    same path, its frame files are written into new directories, not into ones remembered as made."""
    import shutil
    path = tmp_path / "store"
    for attempt in range(2):
        disk, rec = open_disk(path, file_min_bytes=0)
        w, _, dropped = disk.write_batch(rows(range(4)))
        assert len(w) == 4 and not dropped, attempt
        assert all(read_ok(disk, i) for i in range(4))
        assert len(files_on_disk(path)) == 4 and not rec.snapshot()["errors"].get("disk")
        disk.close()
        shutil.rmtree(path)


def test_consume_drops_what_a_vectored_call_moved():
    """After a short preadv/writev, the buffers still to move are exactly the unmoved bytes, in order."""
    data = [bytes(range(i, i + 5)) for i in (0, 10, 20)]
    for n in range(16):
        views = [memoryview(d) for d in data]
        frame_files._consume(views, n)
        assert b"".join(bytes(v) for v in views) == b"".join(data)[n:], n


# -- 9. O_DIRECT writes -------------------------------------------------------------------------------------

DIRECT_LENGTHS = (1, 4095, 4096, 4097, 3 * 4096 + 5, 64 << 10, (64 << 10) + 1, 3 * (64 << 10) + 4095)


def _frame(n: int, seed: int, split: bool) -> tuple[object, bytes]:
    """A frame of n bytes as one buffer, or as the codec hands it over: a short header, then arrays."""
    data = np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)
    if not split or n < 40:
        return data, data.tobytes()
    cut = n // 3
    return [data[:37].tobytes(), data[37:cut], data[cut:]], data.tobytes()


def _direct_flags(monkeypatch) -> list[bool]:
    """Record, for every write the frame files make, whether its descriptor had O_DIRECT set."""
    import fcntl
    seen: list[bool] = []
    real = os.write

    def spy(fd, data):
        seen.append(bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT))
        return real(fd, data)
    monkeypatch.setattr(frame_files.os, "write", spy)
    return seen


@pytest.mark.parametrize("split", [False, True], ids=["one-buffer", "parts"])
def test_direct_writes_are_exact_at_every_length(tmp_path, monkeypatch, split):
    """A frame written with O_DIRECT goes through an aligned buffer in DIRECT_CHUNK pieces (64 KiB here, so
    the lengths cross piece and alignment boundaries), the last piece padded: the file is exactly the frame,
    length included, and every write was a direct one."""
    if not takes_direct(tmp_path):
        pytest.skip("this filesystem refuses O_DIRECT")
    monkeypatch.setattr(frame_files, "DIRECT_CHUNK", 64 << 10)
    flags = _direct_flags(monkeypatch)
    files = frame_files.FrameFiles(str(tmp_path))
    for i, n in enumerate(DIRECT_LENGTHS):
        frame, want = _frame(n, i, split)
        fid = files.write(key(i), frame, direct=True)
        path = files.path(key(i), fid)
        assert os.path.getsize(path) == n
        with open(path, "rb") as f:
            assert f.read() == want, n
    assert files.direct_refused is None
    assert len(flags) >= sum(-(-n // (64 << 10)) for n in DIRECT_LENGTHS) and all(flags), flags


def test_buffered_writes_when_not_asked(tmp_path, monkeypatch):
    flags = _direct_flags(monkeypatch)
    writev = os.writev
    monkeypatch.setattr(frame_files.os, "writev", lambda fd, parts: flags.append("writev") or writev(fd, parts))
    files = frame_files.FrameFiles(str(tmp_path))
    frame, want = _frame(5000, 1, True)
    with open(files.path(key(1), files.write(key(1), frame)), "rb") as f:
        assert f.read() == want
    assert flags == ["writev"]


def test_direct_writes_fall_back_where_the_filesystem_refuses(tmp_path, monkeypatch, caplog):
    """A filesystem that refuses O_DIRECT (EINVAL from fcntl, as tmpfs on older kernels and some network file
    systems say): the frames are written buffered, exact, the refusal is logged once with the setting, and
    O_DIRECT is not asked for again."""
    import fcntl
    asked: list[int] = []
    real = fcntl.fcntl

    def refusing(fd, cmd, arg=0):
        if cmd == fcntl.F_SETFL and arg & os.O_DIRECT:
            asked.append(fd)
            raise OSError(22, "Invalid argument")
        return real(fd, cmd, arg)
    monkeypatch.setattr(fcntl, "fcntl", refusing)
    lay = KVLayout(**ROWS)
    cfg = CacheConfig(layout=lay, model_id="m", host_bytes=0, disk_path=tmp_path / "store", disk_bytes="64MiB",
                      compression="none", disk_file_bytes=0, disk_direct_writes=True)
    with caplog.at_level(logging.WARNING, logger="tiercache"), TierCache(cfg) as c:
        kvs = [make_kv(lay, 32, seed=j) for j in range(2)]
        for j, kv in enumerate(kvs):
            c.store(list(range(j * 100, j * 100 + 32)), kv)
            c.flush()
        for j, kv in enumerate(kvs):
            assert same_bytes(c.load(list(range(j * 100, j * 100 + 32))), kv)
        assert c.stats()["dropped_writes"].get("disk", 0) == 0
    assert len(asked) == 1, asked
    (line,) = _log_lines(caplog, "O_DIRECT was refused")
    assert "disk_direct_writes=False" in line and "Invalid argument" in line


@pytest.mark.parametrize("short", [8192, 5000], ids=["aligned", "unaligned"])
def test_a_short_direct_write_is_finished(tmp_path, monkeypatch, short):
    """The device takes less than asked (a filesystem near full): the rest is written after it, direct while
    the offset stays aligned, buffered once it is not; the file is exact either way."""
    import fcntl
    if not takes_direct(tmp_path):
        pytest.skip("this filesystem refuses O_DIRECT")
    monkeypatch.setattr(frame_files, "DIRECT_CHUNK", 64 << 10)
    calls: list[bool] = []
    real = os.write

    def short_once(fd, data):
        direct = bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT)
        calls.append(direct)
        if len(calls) > 1 or short % 4096 == 0:
            return real(fd, data[:short] if len(calls) == 1 else data)
        fl = fcntl.fcntl(fd, fcntl.F_GETFL)  # the kernel can stop at any byte: do it without O_DIRECT
        fcntl.fcntl(fd, fcntl.F_SETFL, fl & ~os.O_DIRECT)
        try:
            return real(fd, data[:short])
        finally:
            fcntl.fcntl(fd, fcntl.F_SETFL, fl)
    monkeypatch.setattr(frame_files.os, "write", short_once)
    files = frame_files.FrameFiles(str(tmp_path))
    frame, want = _frame(3 * (64 << 10) + 11, 7, True)
    path = files.path(key(1), files.write(key(1), frame, direct=True))
    with open(path, "rb") as f:
        assert f.read() == want
    assert calls[0] and calls[1] == (short % 4096 == 0), calls  # after an unaligned stop: buffered


@pytest.mark.parametrize("exc", [OSError(28, "No space left on device"), KeyboardInterrupt()],
                         ids=["enospc", "interrupt"])
@pytest.mark.parametrize("piece", [1, 3], ids=["on-the-helper", "last-piece"])
def test_a_direct_write_that_fails_leaves_nothing(tmp_path, monkeypatch, exc, piece):
    """A piece's device write fails: the second of four (written by the helper thread while the writer fills
    the other buffer) or the last (written by the writer itself). The error reaches the caller, no file and
    no descriptor are left, and the next write of the same thread is exact."""
    if not takes_direct(tmp_path):
        pytest.skip("this filesystem refuses O_DIRECT")
    monkeypatch.setattr(frame_files, "DIRECT_CHUNK", 64 << 10)
    files = frame_files.FrameFiles(str(tmp_path))
    real = frame_files.FrameFiles._flush_direct
    n_calls: list[int] = []

    def failing(self, fd, buf, n, path):
        n_calls.append(n)
        if len(n_calls) == piece + 1:
            raise exc
        return real(self, fd, buf, n, path)
    monkeypatch.setattr(frame_files.FrameFiles, "_flush_direct", failing)
    fds = len(os.listdir("/proc/self/fd"))
    frame, want = _frame(3 * (64 << 10) + 11, 3, True)
    with pytest.raises(type(exc)):
        files.write(key(1), frame, direct=True)
    assert not list(tmp_path.rglob("*.*")), list(tmp_path.rglob("*"))
    assert len(os.listdir("/proc/self/fd")) == fds
    with open(files.path(key(2), files.write(key(2), frame, direct=True)), "rb") as f:
        assert f.read() == want
