"""Shared fixtures: small layouts, LMDB stores under tmp_path, the cuda marker."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time

import pytest
import torch

from tiercache import CacheConfig, KVLayout, TierCache


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def layout() -> KVLayout:
    return KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, dtype=torch.bfloat16, block_size=4)


def make_kv(layout: KVLayout, num_tokens: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if layout.dtype.is_floating_point and layout.itemsize > 1:
        return torch.randn(layout.kv_shape(num_tokens), generator=g).to(layout.dtype)
    raw = torch.randint(0, 256, (*layout.kv_shape(num_tokens), layout.itemsize), generator=g, dtype=torch.uint8)
    return raw.view(layout.dtype).reshape(layout.kv_shape(num_tokens))


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-identical (NaN payloads included), not merely equal."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


@pytest.fixture
def make_cache(tmp_path, layout):
    """Factory: make_cache(host_blocks=3, disk=True, **cfg) -> TierCache, closed at teardown."""
    made = []

    def factory(host_blocks: int | None = 4, device_blocks: int = 0, disk: bool = True, lay: KVLayout | None = None,
                **kw):
        lay = lay or layout
        cfg = CacheConfig(layout=lay, model_id=kw.pop("model_id", "test-model"),
                          host_bytes=(host_blocks or 0) * lay.block_bytes,
                          device_bytes=device_blocks * lay.block_bytes,
                          disk_path=kw.pop("disk_path", str(tmp_path / "store")) if disk else None,
                          disk_bytes=kw.pop("disk_bytes", "64MiB"), **kw)
        c = TierCache(cfg)
        made.append(c)
        return c

    yield factory
    for c in made:
        c.close()


# -- a real redis-server on 127.0.0.1, started and stopped by the tests -------------------------------
REDIS = shutil.which("redis-server")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    def __init__(self, tmp_path):
        self.port = free_port()
        self.proc = subprocess.Popen([REDIS, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--dir", str(tmp_path)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        import redis
        client = redis.Redis(port=self.port)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.05)
        self.client = client
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


@pytest.fixture
def redis_server(tmp_path):
    if REDIS is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    pytest.importorskip("redis")
    server = RedisServer(tmp_path)
    yield server
    server.stop()


@pytest.fixture(params=["lmdb", "files"])
def frame_home(request, monkeypatch):
    """Run a disk test twice: frames inside LMDB (the test layouts are small), and every frame in a file
    of its own (`disk_file_bytes=0`, what large blocks get by default). In this process only: a test's
    child processes keep the default."""
    if request.param == "files":
        from tiercache.tiers.disk import DiskTier
        init = DiskTier.__init__

        def files_init(self, *a, **kw):
            from tiercache.tiers.frame_files import FILE_MIN_BYTES
            if kw.get("file_min_bytes", FILE_MIN_BYTES) == FILE_MIN_BYTES:  # not chosen by the test itself
                kw["file_min_bytes"] = 0
            init(self, *a, **kw)
        monkeypatch.setattr(DiskTier, "__init__", files_init)
    return request.param


def rewrite_frame(path, key: bytes, change) -> None:
    """Replace the stored frame of `key` with change(bytearray of it), wherever it lives: inside LMDB,
    or in its file (the pointer row is left as it is, so a frame of another length is a damaged file)."""
    import lmdb

    from tiercache.tiers.frame_files import FrameFiles, parse_pointer
    env = lmdb.open(str(path), max_dbs=8, subdir=True)
    try:
        db = env.open_db(b"blocks")
        with env.begin(write=True, db=db) as txn:
            value = bytes(txn.get(key))
            ptr = parse_pointer(value)
            if ptr is None:
                txn.put(key, bytes(change(bytearray(value))))
                return
        file = FrameFiles(str(path)).path(key, ptr[1])
        with open(file, "rb") as f:
            data = bytearray(f.read())
        with open(file, "wb") as f:
            f.write(bytes(change(data)))
    finally:
        env.close()


def stored_frame(path, key: bytes) -> bytes:
    """The stored frame of `key`, wherever it lives."""
    got: list[bytes] = []
    rewrite_frame(path, key, lambda f: got.append(bytes(f)) or f)
    return got[0]


def takes_direct(path) -> bool:
    """Whether the filesystem of `path` takes O_DIRECT (what disk_direct_writes=True asks of it)."""
    import fcntl
    probe = os.path.join(str(path), ".direct-probe")
    fd = os.open(probe, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | getattr(os, "O_DIRECT", 0))
        return hasattr(os, "O_DIRECT")
    except OSError:
        return False
    finally:
        os.close(fd)
        os.unlink(probe)


@pytest.fixture
def tmpfs(tmp_path):
    """A small real tmpfs mount, or skip where mounting is not permitted."""
    made = []

    def mount(size: str):
        d = tmp_path / f"mnt-{len(made)}"
        d.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(d)], capture_output=True)
        if r.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
        made.append(d)
        return d
    yield mount
    for d in reversed(made):
        subprocess.run(["umount", "-l", str(d)], capture_output=True)
