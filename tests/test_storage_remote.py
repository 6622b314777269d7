"""Issue 11 item 13 (and 7 through Redis): real redis-server processes on 127.0.0.1 — restarts, maxmemory,
AUTH, TLS and a three-node Redis Cluster started by the test. Skips cleanly without redis-server."""

from __future__ import annotations

import logging
import shutil
import subprocess
import time

import pytest

from tiercache import CacheConfig, TierCache
from tiercache.errors import OnceLogger
from tiercache.keys import BlockKey
from tiercache.stats import Recorder

from .conftest import free_port, make_kv, same_bytes

pytestmark = pytest.mark.redis
REDIS = shutil.which("redis-server")
REDIS_CLI = shutil.which("redis-cli")


class Server:
    """A redis-server on 127.0.0.1 with extra arguments; `url` for clients."""

    def __init__(self, tmp_path, *args: str, port: int | None = None, tls: dict | None = None,
                 password: str | None = None) -> None:
        self.port = port or free_port()
        self.args = list(args)
        self.tmp_path = tmp_path
        self.tls = tls
        self.password = password
        self.start()

    def start(self) -> None:
        import redis
        argv = [REDIS, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(self.tmp_path)]
        if self.tls:
            argv += ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", self.tls["cert"],
                     "--tls-key-file", self.tls["key"], "--tls-ca-cert-file", self.tls["ca"],
                     "--tls-auth-clients", "no"]
        else:
            argv += ["--port", str(self.port)]
        if self.password:
            argv += ["--requirepass", self.password]
        self.proc = subprocess.Popen(argv + self.args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        kw = dict(host="127.0.0.1", port=self.port, password=self.password, socket_timeout=2)
        if self.tls:
            kw.update(ssl=True, ssl_ca_certs=self.tls["ca"])
        self.client = redis.Redis(**kw)
        deadline = time.monotonic() + 10
        while True:
            try:
                self.client.ping()
                return
            except (redis.ConnectionError, redis.TimeoutError):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    pytest.skip(f"redis-server did not start with {self.args} (tls={bool(self.tls)})")
                time.sleep(0.05)

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        if self.tls:
            return f"rediss://{auth}127.0.0.1:{self.port}/0?ssl_ca_certs={self.tls['ca']}&ssl_cert_reqs=required"
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def servers(tmp_path):
    if REDIS is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    pytest.importorskip("redis")
    made = []

    def make(*args, **kw):
        d = tmp_path / f"redis-{len(made)}"
        d.mkdir()
        s = Server(d, *args, **kw)
        made.append(s)
        return s
    yield make
    for s in made:
        s.stop()


def tier(url, timeout_s=0.5):
    from tiercache.tiers.remote import RemoteTier
    rec = Recorder(("remote",))
    return RemoteTier(url, log=OnceLogger(), recorder=rec, timeout_s=timeout_s), rec


def k(i: int) -> BlockKey:
    return BlockKey(i.to_bytes(4, "little") * 4)


def test_remote_timeout_is_a_validated_setting(layout, servers):
    for bad in (0, -1, "1", float("nan"), True, 1e9):
        with pytest.raises(ValueError, match="remote_timeout_s"):
            CacheConfig(layout=layout, remote_url="redis://127.0.0.1:1/0", remote_timeout_s=bad)
    assert CacheConfig(layout=layout, remote_timeout_s=2).remote_timeout_s == 2
    s = servers()
    t, _ = tier(s.url, timeout_s=0.2)
    kw = t.client.connection_pool.connection_kwargs
    assert kw["socket_timeout"] == 0.2 and kw["socket_connect_timeout"] == 0.2
    t.close()


def test_batch_api_and_hits_resume_right_after_a_restart(servers, caplog):
    from tiercache.tiers.remote import BACKOFF_MAX_S
    s = servers()
    t, rec = tier(s.url)
    assert t.put_many([(k(i), b"frame-%d" % i) for i in range(4)]) == [True] * 4
    assert t.put_many([(k(0), b"other bytes")]) == [False]           # NX: never replaced
    assert t.exists_many([k(0), k(9), k(3)]) == [True, False, True]
    assert t.get_many([k(0), k(9)]) == [b"frame-0", None]
    assert t.count_prefix([k(0), k(1), k(9), k(2)]) == 2
    t.delete(k(3))
    assert t.exists_many([k(3)]) == [False]
    s.stop()
    with caplog.at_level(logging.WARNING, logger="tiercache"):
        for _ in range(8):                                           # failing calls grow the back-off to its cap
            assert t.exists_many([k(0)]) == [False] and t.get_many([k(0)]) == [None]
            assert t.put_many([(k(5), b"x")]) == [False]
            time.sleep(BACKOFF_MAX_S / 4)
    assert sum(rec.snapshot()["errors"]["remote"].values()) >= 1
    assert len([r for r in caplog.records if "remote tier lookup failed" in r.getMessage()]) == 1
    s.start()                                                        # back, empty (no persistence)
    s.client.set(b"tiercache:v2:" + k(7), b"frame-7")
    time.sleep(BACKOFF_MAX_S + 0.1)                                  # at most one back-off period later...
    assert t.available()
    assert t.get_many([k(7)]) == [b"frame-7"]                        # ...hits are back (they waited 5 s before)
    t.close()


def test_a_refused_write_does_not_blind_reads(servers, caplog):
    s = servers("--maxmemory", "3mb", "--maxmemory-policy", "noeviction")
    t, rec = tier(s.url)
    frame = b"\x5a" * (256 << 10)
    took = []
    with caplog.at_level(logging.WARNING, logger="tiercache"):
        for i in range(40):                                          # 10 MiB into 3 MiB: the server refuses
            took += t.put_many([(k(i), frame)])
    assert took[0] and not took[-1]
    assert t.available()
    assert t.exists_many([k(0)]) == [True] and t.get_many([k(0)]) == [frame]   # reads go on at once
    refused = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(refused) == 1 and "maxmemory" in refused[0]
    assert rec.snapshot()["errors"]["remote"]["store"] >= 1
    t.close()


def test_auth_in_the_url(servers, caplog):
    s = servers(password="s3cret-pw")
    t, _ = tier(s.url)
    assert t.put_many([(k(1), b"a")]) == [True] and t.get_many([k(1)]) == [b"a"]
    t.close()
    with caplog.at_level(logging.WARNING, logger="tiercache"):
        bad, rec = tier(s.url.replace("s3cret-pw", "wrong"))
        assert bad.get_many([k(1)]) == [None] and bad.put_many([(k(2), b"b")]) == [False]
    assert sum(rec.snapshot()["errors"]["remote"].values()) >= 1
    assert not any("wrong" in r.getMessage() for r in caplog.records)   # the password is never logged
    bad.close()


@pytest.fixture
def certs(tmp_path):
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    d = tmp_path / "tls"
    d.mkdir()

    def run(*cmd):
        subprocess.run(cmd, cwd=d, check=True, capture_output=True)
    run("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
        "-days", "1", "-subj", "/CN=tiercache-test-ca")
    run("openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
        "-subj", "/CN=127.0.0.1")
    (d / "ext").write_text("subjectAltName=IP:127.0.0.1\n")
    run("openssl", "x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "server.crt", "-days", "1", "-extfile", "ext")
    return {"ca": str(d / "ca.crt"), "cert": str(d / "server.crt"), "key": str(d / "server.key")}


def test_tls(servers, certs, layout):
    s = servers(tls=certs, password="pw")
    kv = make_kv(layout, 16)
    cfg = CacheConfig(layout=layout, model_id="m", host_bytes=0, disk_path=None, remote_url=s.url)
    with TierCache(cfg) as a:
        a.store(list(range(16)), kv)
        a.flush()
    with TierCache(cfg.replace(host_bytes=4 * layout.block_bytes)) as b:
        assert same_bytes(b.load(list(range(16))), kv)
    plain, _ = tier(f"redis://:pw@127.0.0.1:{s.port}/0", timeout_s=0.3)   # plain text to a TLS port: a miss
    assert plain.get_many([k(1)]) == [None]
    plain.close()


def _cluster_port() -> int:
    """A free port p below 55535 whose cluster bus port p + 10000 is free too."""
    import random
    import socket
    for _ in range(200):
        p = random.randint(20000, 30000)
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", p))
                b.bind(("127.0.0.1", p + 10000))
            return p
        except OSError:
            continue
    pytest.skip("no free port pair for a cluster node")


@pytest.fixture
def cluster(servers):
    if REDIS_CLI is None:
        pytest.skip("redis-cli is not installed")
    nodes = [servers("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                     "--cluster-node-timeout", "2000", port=_cluster_port()) for _ in range(3)]
    r = subprocess.run([REDIS_CLI, "--cluster", "create", *[f"127.0.0.1:{n.port}" for n in nodes],
                        "--cluster-replicas", "0", "--cluster-yes"], capture_output=True, text=True, timeout=60)
    if r.returncode:
        pytest.skip(f"cannot create a Redis Cluster: {r.stderr.strip() or r.stdout.strip()}")
    deadline = time.monotonic() + 20
    while not all("cluster_state:ok" in subprocess.run([REDIS_CLI, "-p", str(n.port), "cluster", "info"],
                                                       capture_output=True, text=True).stdout for n in nodes):
        if time.monotonic() > deadline:
            pytest.skip("the cluster did not converge")
        time.sleep(0.1)
    return nodes


def test_redis_cluster(cluster, layout):
    url = f"redis+cluster://127.0.0.1:{cluster[0].port}"
    t, rec = tier(url)
    keys = [k(i) for i in range(64)]
    assert t.put_many([(x, bytes(x)) for x in keys]) == [True] * 64
    assert t.exists_many(keys) == [True] * 64 and t.get_many(keys) == [bytes(x) for x in keys]
    spread = [n.client.dbsize() for n in cluster]
    assert all(spread), spread                                      # the keys live on all three nodes
    t.close()
    kv = make_kv(layout, 32)
    cfg = CacheConfig(layout=layout, model_id="m", host_bytes=0, disk_path=None, remote_url=url)
    with TierCache(cfg) as a:
        a.store(list(range(32)), kv)
        a.flush()
    with TierCache(cfg.replace(host_bytes=8 * layout.block_bytes)) as b:
        assert same_bytes(b.load(list(range(32))), kv)
    cluster[1].stop()                                               # a node dies: misses, never an exception
    t, rec = tier(url, timeout_s=0.3)
    got = t.get_many(keys)
    assert all(g is None or g == bytes(x) for g, x in zip(got, keys))
    t.put_many([(k(1000 + i), b"x") for i in range(8)])
    t.close()


def test_frame_of_another_block_through_redis_is_a_miss(servers, layout):
    s = servers()
    kv = make_kv(layout, 16)
    cfg = CacheConfig(layout=layout, model_id="m", host_bytes=0, disk_path=None, remote_url=s.url)
    with TierCache(cfg) as c:
        c.store(list(range(16)), kv)
        c.flush()
        keys = c.keys(list(range(16)))
    # anyone who can write to the server puts block 0's (valid) frame under block 2's key
    s.client.set(b"tiercache:v2:" + keys[2], s.client.get(b"tiercache:v2:" + keys[0]))
    with TierCache(cfg.replace(host_bytes=4 * layout.block_bytes)) as c:
        out = c.load(list(range(16)))
        assert out.shape[2] == 8 and same_bytes(out, kv[:, :, :8])
        assert c.stats()["corrupt_blocks"]["remote"] == 1
