"""Issue 11: the disk tier against damaged, full, read-only and shared files (real LMDB, real filesystems).

Whatever happens to the files, a read is a miss or exact bytes, a write is done or dropped and counted,
nothing raises to the caller and nothing kills the process. Cases that could kill the process (SIGBUS,
SIGSEGV) run in a child process, and the test asserts the child exited normally.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import subprocess
import sys
import textwrap
import uuid

import lmdb
import numpy as np
import pytest
import torch

from tiercache import KVLayout
from tiercache.codec import BlockCodec
from tiercache.errors import OnceLogger
from tiercache.keys import BlockKey
from tiercache.stats import Recorder
from tiercache.tiers.disk import DiskTier

pytestmark = pytest.mark.usefixtures("frame_home")  # frames in LMDB, and in files

LAY = KVLayout(num_layers=2, num_kv_heads=2, head_dim=64, dtype=torch.bfloat16, block_size=16)  # 16 KiB blocks
CODEC = BlockCodec(LAY.fingerprint(), 2, 2, "none")
NS = b"ns-0001!"


def key(i: int) -> BlockKey:
    return BlockKey(i.to_bytes(8, "little") * 2)


def raw(i: int) -> np.ndarray:
    return np.random.default_rng(i).integers(0, 256, LAY.block_bytes, dtype=np.uint8)


def rows(ids, ns=NS):
    return [(key(i), CODEC.encode(raw(i), key(i)), ns, {"model_id": "m"}) for i in ids]


def read_ok(disk: DiskTier, i: int) -> bool | None:
    """True: exact bytes; None: a miss; raises if wrong bytes were served."""
    with disk.reader() as get:
        f = get(key(i))
        if f is None:
            return None
        assert np.array_equal(CODEC.decode(f, LAY.block_bytes, key=key(i)), raw(i)), "wrong bytes served"
        return True


def open_disk(path, cap=8 << 20, **kw):
    rec = Recorder(("disk",))
    return DiskTier(str(path), LAY, cap, log=OnceLogger(), recorder=rec, **kw), rec


def run_child(code: str, timeout: int = 120) -> subprocess.CompletedProcess:
    """Run code in a child python; the caller asserts on returncode (negative: killed by a signal)."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


CHILD_PRELUDE = """
    import os, sys, numpy as np
    sys.path.insert(0, os.getcwd())
    from tests.test_storage_disk import *
"""


def _log_lines(caplog, needle: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if needle in r.getMessage()]


# -- item 10: permissions ------------------------------------------------------------------------

def test_store_is_private(tmp_path):
    disk, _ = open_disk(tmp_path / "a" / "store")
    disk.write_batch(rows([1]))
    disk.close()
    st = os.stat(tmp_path / "a" / "store")
    assert stat.S_IMODE(st.st_mode) == 0o700
    for f in ("data.mdb", "lock.mdb"):
        assert stat.S_IMODE(os.stat(tmp_path / "a" / "store" / f).st_mode) == 0o600, f


# -- items 5, 12: unreadable stores turn the tier off (one log line), caller mistakes raise -----------

def _make_store(path, n=40):
    disk, _ = open_disk(path)
    assert disk.write_batch(rows(range(n)))[0]
    disk.close()
    return os.path.getsize(os.path.join(path, "data.mdb"))


DAMAGE = ["2 pages", "half", "90%", "garbage"]


def test_damaged_data_file_turns_the_tier_off(tmp_path):
    """Truncated (2 pages, half, 90%) or garbage data.mdb: SIGBUS / InvalidError before; now the tier is off."""
    paths = [tmp_path / f"store-{i}" for i in range(len(DAMAGE))]
    size = _make_store(paths[0])
    for p in paths[1:]:
        shutil.copytree(paths[0], p)
    r = run_child(CHILD_PRELUDE + f"""
    import logging
    logging.basicConfig(level=logging.WARNING)
    size = {size}
    for how, path in zip(DAMAGE, {[str(p) for p in paths]!r}):
        with open(os.path.join(path, "data.mdb"), "r+b") as f:
            if how == "garbage":
                f.write(np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8).tobytes())
            else:
                f.truncate({{"2 pages": 8192, "half": size // 2, "90%": size * 9 // 10}}[how])
        disk, rec = open_disk(path)
        assert not disk.available, how
        assert [read_ok(disk, i) for i in range(40)] == [None] * 40
        assert disk.count_each([key(1)]) == [False] and disk.count_prefix([key(1)]) == 0
        assert list(disk.keys()) == [] and disk.used() == (0, 0)
        assert disk.write_batch(rows([99]))[2] == [key(99)]
        assert rec.snapshot()["errors"]["disk"]["open"] == 1
        print("survived", how)
    """)
    assert r.returncode == 0, f"child died (rc {r.returncode}): {r.stderr[-2000:]}"
    assert r.stdout.count("survived") == len(DAMAGE)
    off = [ln for ln in r.stderr.splitlines() if "disk tier off" in ln]
    assert len(off) == len(DAMAGE), r.stderr                # one line per store, each naming its path
    for p, ln in zip(paths, off):
        assert f"disk_path={p}:" in ln
    assert "truncated" in off[0] and "not a readable LMDB store" in off[-1]


def test_garbage_interior_pages_are_misses_not_exceptions(tmp_path):
    path = tmp_path / "store"
    size = _make_store(path, n=120)
    r = run_child(CHILD_PRELUDE + f"""
    data = {str(path / "data.mdb")!r}
    rng = np.random.default_rng(1)
    with open(data, "r+b") as f:
        for page in range(3, {size} // 4096, 7):           # every 7th page after the meta pages
            f.seek(page * 4096)
            f.write(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    disk, rec = open_disk({str(path)!r})
    served = [read_ok(disk, i) for i in range(120)]         # raises if a wrong byte is served
    disk.count_each([key(i) for i in range(120)])
    disk.count_prefix([key(i) for i in range(120)])
    list(disk.keys())
    disk.write_batch(rows([500, 501]))
    print("served", sum(s is True for s in served), "errors", sum(rec.snapshot()["errors"]["disk"].values()))
    """)
    assert r.returncode == 0, f"child died (rc {r.returncode}): {r.stderr[-2000:]}"
    assert "served" in r.stdout


def test_disk_path_that_is_a_file_or_unusable(tmp_path, caplog):
    f = tmp_path / "a-file"
    f.write_bytes(b"not a directory")
    with caplog.at_level(logging.WARNING, logger="tiercache"):
        disk, rec = open_disk(f)
    assert not disk.available and disk.write_batch(rows([1]))[2] == [key(1)]
    assert read_ok(disk, 1) is None
    (line,) = _log_lines(caplog, "disk tier off")
    assert f"disk_path={f}" in line and "not a directory" in line
    assert rec.snapshot()["dropped_writes"]["disk"] == 1
    below = tmp_path / "a-file" / "store"                   # a path below a file cannot be created
    disk, _ = open_disk(below)
    assert not disk.available


def test_an_old_store_format_or_another_layout_is_a_clear_error(tmp_path):
    path = tmp_path / "store"
    _make_store(path, n=2)
    other = KVLayout(num_layers=2, num_kv_heads=2, head_dim=64, dtype=torch.float16, block_size=16)
    with pytest.raises(ValueError, match="layout.*disk_path"):
        DiskTier(str(path), other, 8 << 20)
    env = lmdb.open(str(path), max_dbs=8)
    with env.begin(write=True, db=env.open_db(b"info")) as txn:
        txn.put(b"format", b"tiercache-disk-1")
    env.close()
    with pytest.raises(ValueError, match=f"disk_path: {path} .*tiercache-disk-1"):
        DiskTier(str(path), LAY, 8 << 20)


# -- items 5, 11: full filesystems -----------------------------------------------------------------

def test_new_store_on_a_full_filesystem(tmpfs):
    mnt = tmpfs("1m")
    with open(mnt / "filler", "wb") as f:                   # fill it
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    r = run_child(CHILD_PRELUDE + f"""
    disk, rec = open_disk({str(mnt / "store")!r})
    assert not disk.available
    assert disk.write_batch(rows([1]))[2] == [key(1)]
    print("survived")
    """)
    assert r.returncode == 0, f"child died (rc {r.returncode}): {r.stderr[-2000:]}"
    assert "full" in r.stderr and f"disk_path={mnt / 'store'}" in r.stderr


def test_filesystem_fills_up_while_writing(tmpfs, caplog, frame_home):
    mnt = tmpfs("3m")
    path = mnt / "store"
    with caplog.at_level(logging.WARNING, logger="tiercache"):
        disk, rec = open_disk(path, cap=64 << 20)           # disk_bytes far above what the filesystem holds
        written = dropped = 0
        for b in range(40):                                 # 40 x 8 blocks of 16 KiB = 5 MiB into 3 MiB
            w, _, d = disk.write_batch(rows(range(b * 8, b * 8 + 8)))
            written += len(w)
            dropped += len(d)
    s = rec.snapshot()
    full = _log_lines(caplog, "is full")
    assert len(full) == 1 and f"disk_path={path}" in full[0] and "disk_bytes" in full[0]
    assert s["errors"]["disk"]["store"] >= 1
    assert s["dropped_writes"]["disk"] == dropped
    assert disk.available and not disk.readonly
    # 16 KiB frames pack densely in LMDB's pages; as files each takes whole pages of its own
    assert written > (200 if frame_home == "lmdb" else 100)
    assert len(disk.write_batch(rows([10_000]))[0]) == 1   # it keeps writing (evicting)
    assert read_ok(disk, 10_000) is True
    served = [read_ok(disk, i) for i in range(320)]
    assert served[-1] is True and served[0] is None         # the newest kept, the oldest evicted
    disk.close()


# -- item 6: read-only filesystems ------------------------------------------------------------------

@pytest.mark.parametrize("lock_file", [True, False], ids=["with-lock.mdb", "without-lock.mdb"])
def test_store_on_a_read_only_filesystem_is_served_read_only(tmpfs, caplog, lock_file):
    mnt = tmpfs("8m")
    path = mnt / "store"
    _make_store(path, n=10)
    if not lock_file:
        os.unlink(path / "lock.mdb")
    r = subprocess.run(["mount", "-o", "remount,ro", str(mnt)], capture_output=True)
    if r.returncode:
        pytest.skip(f"cannot remount read-only: {r.stderr.decode().strip()}")
    with caplog.at_level(logging.WARNING, logger="tiercache"):
        disk, rec = open_disk(path)
    assert disk.available and disk.readonly
    assert all(read_ok(disk, i) for i in range(10))
    assert disk.count_prefix([key(i) for i in range(12)]) == 10
    assert sorted(disk.keys()) == sorted(key(i) for i in range(10))
    assert disk.write_batch(rows([50]))[2] == [key(50)]
    (line,) = _log_lines(caplog, "read-only")
    assert f"disk_path={path}" in line
    assert rec.snapshot()["dropped_writes"]["disk"] == 1
    disk.close()
    assert os.path.exists(path / "lock.mdb") == lock_file


# -- item 9: disk_bytes bounds the file, namespaces are charged and go with their blocks ----------------

def test_disk_bytes_bounds_the_store(tmp_path):
    for cap in (2 << 20, 4 << 20):
        path = tmp_path / f"s{cap}"
        disk, rec = open_disk(path, cap=cap)
        evicted = 0
        for b in range(60):                                 # 60 x 8 x 16 KiB = 7.5 MiB written
            evicted += len(disk.write_batch(rows(range(b * 8, b * 8 + 8)))[1])
            with disk.reader() as get:                      # a reader between batches pins a snapshot
                get(key(b * 8))
        assert os.path.getsize(path / "data.mdb") <= cap
        assert disk.allocated_bytes() <= cap                # data.mdb and the frame files together
        used, blocks = disk.used()
        assert used <= cap and blocks > 0
        assert evicted > 0 and rec.snapshot()["dropped_writes"]["disk"] == 0
        assert read_ok(disk, 60 * 8 - 1) is True
        disk.close()


def test_namespace_rows_are_charged_and_deleted_with_their_blocks(tmp_path):
    disk, _ = open_disk(tmp_path / "s", cap=2 << 20)
    for i in range(600):                                    # 600 tenants, one block each, ~110 fit
        disk.write_batch(rows([i], ns=i.to_bytes(8, "little")))
    used, blocks = disk.used()
    with disk.env.begin() as txn:
        ns_rows = txn.stat(disk.env.open_db(b"ns"))["entries"]
    assert ns_rows == blocks < 600                          # a row per tenant that still has a block
    assert used >= blocks * (LAY.block_bytes + 512)         # rows are charged
    assert len(disk.namespaces()) == blocks
    disk.close()


# -- items 1-4: map growth under readers, other processes, stale readers, fork -------------------------

def test_map_growth_never_overlaps_a_reader(tmp_path):
    """Readers in threads while the map grows (a second cache on the path with a larger disk_bytes)."""
    path = tmp_path / "store"
    _make_store(path, n=30)
    r = run_child(CHILD_PRELUDE + f"""
    import threading
    path = {str(path)!r}
    first, _ = open_disk(path, cap=1 << 20)
    stop = threading.Event()
    reads = [0]
    def reader():
        while not stop.is_set():
            with first.reader() as get:
                for i in range(30):
                    f = get(key(i))
                    if f is not None:                       # touch every byte of the mapped frame
                        assert np.array_equal(CODEC.decode(f, LAY.block_bytes, key=key(i)), raw(i))
                        reads[0] += 1
    ts = [threading.Thread(target=reader) for _ in range(3)]
    for t in ts: t.start()
    others = []
    for step in range(40):                                  # 40 map growths under the readers
        d, _ = open_disk(path, cap=(2 + step) << 20)
        others.append(d)
        d.write_batch(rows([1000 + step]))
    stop.set()
    for t in ts: t.join()
    assert first.env.info()["map_size"] >= 41 << 20
    print("reads", reads[0])
    """)
    assert r.returncode == 0, f"child died (rc {r.returncode}): {r.stderr[-2000:]}"
    assert "reads" in r.stdout


def test_another_process_grows_the_map(tmp_path):
    path = tmp_path / "store"
    disk, rec = open_disk(path, cap=1 << 20)                # this process maps 1 MiB
    disk.write_batch(rows([1]))
    r = run_child(CHILD_PRELUDE + f"""
    d, _ = open_disk({str(path)!r}, cap=64 << 20)
    for b in range(10):                                     # 10 x 8 x 16 KiB: the file outgrows 1 MiB
        assert len(d.write_batch(rows(range(100 + b * 8, 108 + b * 8)))[0]) == 8
    d.close()
    """)
    assert r.returncode == 0, r.stderr[-2000:]
    assert read_ok(disk, 179) is True                       # adopted the larger map, no MapResizedError
    assert disk.count_each([key(100), key(179)]) == [True, True]
    assert disk.write_batch(rows([5000]))[0] == [key(5000)]
    assert disk.count_prefix([key(5000)]) == 1
    assert sum(rec.snapshot()["errors"]["disk"].values()) == 0
    disk.close()


def test_stale_reader_of_a_killed_process_is_cleared(tmp_path):
    path = tmp_path / "store"
    disk, rec = open_disk(path, cap=1 << 20)
    disk.write_batch(rows(range(20)))
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(CHILD_PRELUDE + f"""
    import time
    d, _ = open_disk({str(path)!r}, cap=1 << 20)
    with d.reader() as get:
        get(key(1))
        print("reading", flush=True)
        time.sleep(600)                                     # killed here, inside a read transaction
    """)], stdout=subprocess.PIPE, text=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert child.stdout.readline().strip() == "reading"
    child.kill()
    child.wait()
    assert str(child.pid) in disk.env.readers()             # its slot pins an old snapshot
    dropped = 0
    for b in range(40):                                     # churn 10x the map through the store
        dropped += len(disk.write_batch(rows(range(100 + b * 8, 108 + b * 8)))[2])
    assert str(child.pid) not in disk.env.readers()
    assert dropped == 0 and read_ok(disk, 100 + 39 * 8 + 7) is True
    disk.close()


def test_fork_child_reopens_and_writes(tmp_path):
    path = tmp_path / "store"
    r = run_child(CHILD_PRELUDE + f"""
    disk, _ = open_disk({str(path)!r})
    disk.write_batch(rows([1]))
    assert read_ok(disk, 1)
    pid = os.fork()
    if pid == 0:                                            # the child uses the object it inherited
        try:
            ok = read_ok(disk, 1) and disk.write_batch(rows([2]))[0] == [key(2)] and read_ok(disk, 2)
            disk.close()
        except BaseException:
            ok = False
        os._exit(0 if ok else 3)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, status
    assert read_ok(disk, 2) is True                         # the parent sees the child's write
    assert disk.write_batch(rows([3]))[0] == [key(3)]
    print("ok")
    """)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-2000:]


def test_keys_and_change_counter(tmp_path):
    disk, _ = open_disk(tmp_path / "s", cap=256 << 20)
    c0 = disk.change_counter()
    for b in range(3):
        disk.write_batch(rows(range(b * 3, b * 3 + 3)))
    assert disk.change_counter() > c0
    assert sorted(disk.keys()) == sorted(key(i) for i in range(9))
    # keys() is read in chunks: more than one chunk
    many = [(BlockKey(uuid.uuid4().bytes), b"x" * 64, NS, {}) for _ in range(9000)]
    disk.write_batch(many)
    assert len(set(disk.keys())) == 9009
    disk.close()


def test_copy_of_a_store_keeps_working(tmp_path):
    """A store copied elsewhere (files only) opens and serves the same bytes."""
    _make_store(tmp_path / "a", n=5)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    disk, _ = open_disk(tmp_path / "b")
    assert all(read_ok(disk, i) for i in range(5))
    disk.close()


def test_rwlock_a_waiting_resize_neither_starves_nor_deadlocks_readers():
    import threading

    from tiercache.tiers.lmdb_env import RWLock
    lock = RWLock()
    lock.acquire_read()                                     # this thread reads...
    got = threading.Event()
    resized = threading.Event()

    def resize():
        with lock.exclusive():
            resized.set()
    w = threading.Thread(target=resize)
    w.start()
    while not lock._waiting:                                # ...a resize waits for it...
        pass

    def nested_reader():                                    # ...and this read runs on another thread meanwhile
        lock.acquire_read()
        got.set()
        lock.release_read()
    r = threading.Thread(target=nested_reader)
    r.start()
    assert got.wait(10), "a reader deadlocked behind a waiting resize"
    assert not resized.is_set()                             # never while a read is open
    lock.release_read()
    assert resized.wait(10)
    w.join()
    r.join()
    with pytest.raises(RuntimeError):                       # a reader cannot take the exclusive lock
        lock.acquire_read()
        try:
            lock.acquire_exclusive()
        finally:
            lock.release_read()


def test_writemap_on_a_small_filesystem_is_not_sigbus(tmpfs):
    """disk_writemap writes through the map: a full filesystem used to be SIGBUS. The map is allocated
    up front, or writemap is turned off when the filesystem cannot hold it."""
    mnt = tmpfs("3m")
    r = run_child(CHILD_PRELUDE + f"""
    import logging
    logging.basicConfig(level=logging.WARNING)
    disk, rec = open_disk({str(mnt / "store")!r}, cap=64 << 20, writemap=True)
    assert not disk._shared.writemap
    for b in range(40):                                    # 5 MiB into 3 MiB
        disk.write_batch(rows(range(b * 8, b * 8 + 8)))
    assert disk.available and read_ok(disk, 319) is True
    print("survived")
    """)
    assert r.returncode == 0 and "survived" in r.stdout, f"child died (rc {r.returncode}): {r.stderr[-2000:]}"
    (line,) = [ln for ln in r.stderr.splitlines() if "disk_writemap not used" in ln]  # said once
    assert f"disk_path={mnt / 'store'}" in line


def test_writemap_on_a_new_store_preallocates_and_serves(tmp_path):
    """A new store under writemap: LMDB writes its meta pages before the map is allocated (a file of
    zeros is not an LMDB store: the tier used to turn itself off), then the whole map is allocated."""
    disk, rec = open_disk(tmp_path / "store", writemap=True)
    assert disk.available and disk._shared.writemap
    assert os.stat(tmp_path / "store" / "data.mdb").st_blocks * 512 >= 8 << 20  # the map is allocated
    disk.write_batch(rows(range(8)))
    assert all(read_ok(disk, i) for i in range(8))
    disk.close()
    disk, rec = open_disk(tmp_path / "store", writemap=True)
    assert disk.available and disk._shared.writemap and all(read_ok(disk, i) for i in range(8))
    disk.close()
    disk, rec = open_disk(tmp_path / "store")  # the same store without writemap
    assert disk.available and all(read_ok(disk, i) for i in range(8)) and not rec.snapshot()["errors_total"]
    disk.close()


def test_writemap_store_survives_its_filesystem_filling_up(tmpfs):
    """Preallocation succeeded, then something else fills the filesystem: writes through the map land
    in allocated pages, so the store keeps working inside its map (no SIGBUS)."""
    mnt = tmpfs("8m")
    r = run_child(CHILD_PRELUDE + f"""
    disk, rec = open_disk({str(mnt / "store")!r}, cap=4 << 20, writemap=True)
    assert disk.available and disk._shared.writemap
    with open({str(mnt / "filler")!r}, "wb") as f:      # the rest of the filesystem, taken by someone else
        try:
            while True:
                f.write(b"x" * 65536)
                f.flush()
        except OSError:
            pass
    for b in range(40):                                    # 5 MiB through a 4 MiB map
        disk.write_batch(rows(range(b * 8, b * 8 + 8)))
    assert disk.available and read_ok(disk, 319) is True
    print("survived")
    """)
    assert r.returncode == 0 and "survived" in r.stdout, f"child died (rc {r.returncode}): {r.stderr[-2000:]}"


def test_a_cache_on_an_unreadable_store_serves_from_memory(tmp_path, caplog):
    from tiercache import CacheConfig, TierCache

    from .conftest import make_kv, same_bytes
    lay = KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, dtype=torch.bfloat16, block_size=4)
    path = tmp_path / "store"
    path.mkdir()
    (path / "data.mdb").write_bytes(b"garbage!" * 4096)
    kv = make_kv(lay, 16)
    with caplog.at_level(logging.WARNING, logger="tiercache"):
        with TierCache(CacheConfig(layout=lay, model_id="m", host_bytes=8 * lay.block_bytes, disk_path=path)) as c:
            assert c.store(list(range(16)), kv) == 16
            c.flush()
            assert same_bytes(c.load(list(range(16))), kv)
    (line,) = _log_lines(caplog, "disk tier off")
    assert f"disk_path={path}" in line


def test_an_empty_disk_path_is_a_caller_mistake():
    from tiercache import CacheConfig
    lay = KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, dtype=torch.bfloat16, block_size=4)
    with pytest.raises(ValueError, match="disk_path"):
        CacheConfig(layout=lay, disk_path="")


def test_a_cache_on_a_read_only_filesystem_serves_the_store(tmpfs, caplog):
    from tiercache import CacheConfig, TierCache

    from .conftest import make_kv, same_bytes
    lay = KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, dtype=torch.bfloat16, block_size=4)
    mnt = tmpfs("8m")
    cfg = CacheConfig(layout=lay, model_id="m", host_bytes=0, disk_path=mnt / "store", disk_bytes="4MiB")
    kv = make_kv(lay, 16)
    with TierCache(cfg) as c:
        c.store(list(range(16)), kv)
        c.flush()
    if subprocess.run(["mount", "-o", "remount,ro", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot remount read-only")
    with caplog.at_level(logging.WARNING, logger="tiercache"):
        with TierCache(cfg.replace(host_bytes=8 * lay.block_bytes)) as c:
            assert same_bytes(c.load(list(range(16))), kv)          # served from the read-only store
            other = make_kv(lay, 8, seed=1)
            assert c.store(list(range(100, 108)), other) == 8       # kept in memory
            c.flush()
            assert same_bytes(c.load(list(range(100, 108))), other)
            assert c.stats()["dropped_writes"]["disk"] >= 1          # what could not go to disk is counted
    (line,) = _log_lines(caplog, "read-only")
    assert f"disk_path={mnt / 'store'}" in line


def test_corruption_met_by_a_write_turns_the_tier_off_without_hanging(tmp_path, frame_home):
    if frame_home == "files":
        pytest.skip("needs LMDB pages of frames to damage; frame files: test_damaged_or_missing_frame_files")
    path = tmp_path / "store"
    size = _make_store(path, n=120)
    r = run_child(CHILD_PRELUDE + f"""
    with open({str(path / "data.mdb")!r}, "r+b") as f:
        for page in range(2, {size} // 4096, 5):            # the store opens; a write meets the damage
            f.seek(page * 4096)
            f.write(b"\\xa5" * 4096)
    disk, rec = open_disk({str(path)!r})
    assert disk.available
    for b in range(5):                                      # writes first: the fault is met inside a write
        disk.write_batch(rows(range(1000 + b * 8, 1008 + b * 8)))
    assert not disk.available
    assert [read_ok(disk, i) for i in range(120)] == [None] * 120
    disk.close()
    print("survived")
    """, timeout=60)
    assert r.returncode == 0 and "survived" in r.stdout, f"rc {r.returncode}: {r.stderr[-2000:]}"
    assert "corrupt" in r.stderr and f"disk_path={path}" in r.stderr


def test_an_unwritable_directory_is_served_read_only_or_turned_off(tmp_path):
    """Permissions, not the filesystem: the store's directory cannot be written by this user."""
    path = tmp_path / "store"
    _make_store(path, n=5)
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    for p in (path, blocked):
        os.chmod(p, 0o500)
    os.chmod(path / "data.mdb", 0o400)
    os.chmod(path / "lock.mdb", 0o400)
    argv = [sys.executable]
    if os.geteuid() == 0:                                   # root ignores permission bits unless it drops this
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv to drop CAP_DAC_OVERRIDE")
        argv = ["setpriv", "--inh-caps=-dac_override,-dac_read_search",
                "--bounding-set=-dac_override,-dac_read_search", sys.executable]
    code = textwrap.dedent(CHILD_PRELUDE + f"""
    import logging
    logging.basicConfig(level=logging.WARNING)
    disk, rec = open_disk({str(path)!r})
    assert disk.available and disk.readonly
    assert all(read_ok(disk, i) for i in range(5))
    assert disk.write_batch(rows([9]))[2] == [key(9)]
    new, _ = open_disk({str(blocked / "store")!r})
    assert not new.available
    print("ok")
    """)
    r = subprocess.run(argv + ["-c", code], capture_output=True, text=True, timeout=120,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    for p in (path, blocked):
        os.chmod(p, 0o700)
    if r.returncode and "Operation not permitted" in r.stderr and "setpriv" in r.stderr:
        pytest.skip("setpriv is not permitted here")
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-2000:]
    ro = [ln for ln in r.stderr.splitlines() if "read-only" in ln]
    off = [ln for ln in r.stderr.splitlines() if "disk tier off" in ln]
    assert len(ro) == 1 and f"disk_path={path}" in ro[0]
    assert len(off) == 1 and f"disk_path={blocked / 'store'}" in off[0]


# -- compression="auto": measured once per store, recorded there, reported ------------------------

def test_auto_compression_rule_and_the_figures_it_is_decided_on(tmp_path, monkeypatch):
    """Byteplane while read / ratio < the decode rate of the load's threads on this store's segment size,
    else none; the figures are measured at that segment size and on that many threads together."""
    from tiercache.tiers import disk_probe
    small = KVLayout(num_layers=8, num_kv_heads=2, head_dim=64, dtype=torch.bfloat16, block_size=16)   # 64 KiB
    large = KVLayout(num_layers=4, num_kv_heads=8, head_dim=128, dtype=torch.bfloat16, block_size=64)  # 256 KiB
    assert disk_probe.segment_bytes_of(small) == small.block_bytes  # one segment: below MIN_SEGMENT_BYTES a layer
    assert disk_probe.segment_bytes_of(large) == large.block_bytes // 4
    got = disk_probe.measure_decode(64 << 10, threads=2)
    assert got["segment_bytes"] == 64 << 10 and got["decode_threads"] == min(2, disk_probe.cores())
    assert got["decode_gbps"] > 0 and got["decode_gbps_per_core"] > 0 and got["ratio"] > 1.0
    assert disk_probe.measure_decode(64 << 10, threads=2) is got  # measured once per process

    fig = {"decode_gbps_per_core": 1.0, "decode_gbps": 1.5, "decode_threads": 2, "segment_bytes": 64 << 10,
           "ratio": 1.5}
    monkeypatch.setattr(disk_probe, "measure_decode", lambda *_a: fig)
    for read, want in ((2.0, "byteplane"), (2.3, "none"), (None, "byteplane")):
        monkeypatch.setattr(disk_probe, "measure_read", lambda _d, r=read: r)
        d = disk_probe.decide(str(tmp_path), 64 << 10, 2)
        assert d["chosen"] == want and d["decode_gbps"] == 1.5 and d["read_gbps"] == read, d
        assert ("decode 1.50 GB/s (2 thread(s), 64 KiB segments)" in d["why"]) == (read is not None), d["why"]


def test_auto_compression_is_measured_once_recorded_and_reused(tmp_path, monkeypatch):
    from tiercache.tiers import disk_probe
    disk, _ = open_disk(tmp_path)
    assert disk.recorded_codec() is None
    chosen = disk.compression_for("auto")
    rec = disk.recorded_codec()
    assert chosen == rec["chosen"] in ("byteplane", "none") and disk.codec_choice["chosen"] == chosen
    assert rec["decode_gbps_per_core"] > 0 and rec["ratio"] > 1.0 and rec["cores"] >= 1
    assert rec["segment_bytes"] == disk_probe.segment_bytes_of(disk.layout) and rec["decode_threads"] == 1
    assert rec["read_gbps"] is None or rec["read_gbps"] > 0
    assert not os.path.exists(tmp_path / disk_probe.PROBE_FILE)  # the read probe's file is gone
    disk.close()

    def no_probe(*_a):
        raise AssertionError("a store that recorded its choice is not measured again")
    monkeypatch.setattr(disk_probe, "decide", no_probe)
    disk, _ = open_disk(tmp_path)
    assert disk.compression_for("auto") == chosen and disk.recorded_codec() == rec
    for explicit in ("none", "byteplane", "zstd"):  # an explicit setting wins over the record
        assert disk.compression_for(explicit) == explicit
        assert disk.codec_choice["chosen"] == explicit and disk.codec_choice["configured"] == explicit
    disk.close()
    from tiercache.tools.inspect_store import render, summarize
    s = summarize(str(tmp_path))
    assert s["disk_codec"] == rec and f"auto codec   {chosen}" in render(s)
    assert f"on 1 thread(s) ({rec['decode_gbps_per_core']:.2f} on one; {rec['segment_bytes'] >> 10} KiB" in render(s)
    old = {k: v for k, v in rec.items() if k not in ("decode_gbps", "decode_threads", "segment_bytes")}
    assert "per core x" in render({**s, "disk_codec": old})  # a record from before: still shown


def test_auto_probe_failing_on_a_decode_thread_keeps_compressing(tmp_path, monkeypatch):
    """A decode that raises on one of the probe's threads fails the probe (it is not a rate of 0): the
    store keeps the byte-plane codec and records why."""
    from tiercache.codec import BlockCodec
    from tiercache.tiers import disk_probe
    monkeypatch.setattr(disk_probe, "_decode_cache", {})
    monkeypatch.setattr(disk_probe, "cores", lambda: 2)
    real, calls = BlockCodec.decode_into, []

    def flaky(self, *a, **kw):
        calls.append(1)
        if len(calls) > 3:  # the single-thread measurement passes; the threads fail
            raise MemoryError("injected")
        return real(self, *a, **kw)
    monkeypatch.setattr(BlockCodec, "decode_into", flaky)
    with pytest.raises(MemoryError):
        disk_probe.measure_decode(64 << 10, threads=2, budget_s=0.0)
    disk, _ = open_disk(tmp_path)
    assert disk.compression_for("auto", threads=2) == "byteplane"
    rec = disk.recorded_codec()
    assert rec["chosen"] == "byteplane" and "probe failed" in rec["why"] and "injected" in rec["why"]
    disk.close()


def test_auto_compression_first_record_wins(tmp_path, monkeypatch):
    from tiercache.tiers import disk_probe
    a, _ = open_disk(tmp_path)
    b, _ = open_disk(tmp_path)  # another user of the store (same process: shared environment)
    monkeypatch.setattr(disk_probe, "decide", lambda *_a: {"chosen": "none", "why": "first"})
    assert a.compression_for("auto") == "none"
    b._record_codec({"chosen": "byteplane", "why": "second"})  # raced and lost
    assert b.compression_for("auto") == "none" and b.recorded_codec()["why"] == "first"
    a.close()
    b.close()


@pytest.mark.parametrize("first", ["none", "byteplane"])
def test_frames_of_both_codecs_in_one_store_load_bit_exact(tmp_path, monkeypatch, first):
    from tiercache import CacheConfig, TierCache
    from tiercache.tiers import disk_probe
    lay = KVLayout(num_layers=2, num_kv_heads=8, head_dim=64, dtype=torch.bfloat16, block_size=16)
    monkeypatch.setattr(disk_probe, "decide", lambda *_a: {"chosen": first, "why": "test"})
    second = "byteplane" if first == "none" else "none"

    def kv(i):
        return torch.randn(lay.kv_shape(32), generator=torch.Generator().manual_seed(i)).to(lay.dtype)

    def cfg(compression):
        return CacheConfig(layout=lay, host_bytes=0, disk_path=str(tmp_path), disk_bytes="16MiB",
                           compression=compression)
    with TierCache(cfg("auto")) as c:
        c.store(list(range(32)), kv(0))
        c.flush()
        assert c.stats()["disk_codec"]["chosen"] == first
    with TierCache(cfg(second)) as c:  # explicit: wins over the store's record
        assert c.stats()["disk_codec"]["chosen"] == second
        c.store(list(range(100, 132)), kv(1))
        c.flush()
    disk = DiskTier(str(tmp_path), lay, 16 << 20)
    from tiercache.codec import read_header
    with disk.reader() as get:
        kinds = {read_header(get(k))["codec"] for k in disk.keys()}
    disk.close()
    assert kinds == {"none", "byteplane"}
    with TierCache(cfg("auto")) as c:
        assert c.stats()["disk_codec"]["chosen"] == first  # the record, not a new measurement
        assert torch.equal(c.load(list(range(32))), kv(0))
        assert torch.equal(c.load(list(range(100, 132))), kv(1))
