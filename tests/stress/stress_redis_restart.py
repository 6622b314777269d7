"""Redis killed and restarted N times under load: no call raises, the slowest call, hits after each restart.

    python tests/stress/stress_redis_restart.py --restarts 20
"""

from __future__ import annotations

import argparse
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

from common import LAYOUT, check, kv_of, prompt


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(port: int, d: str) -> subprocess.Popen:
    import redis
    p = subprocess.Popen([shutil.which("redis-server"), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                          "--appendonly", "no", "--dir", d], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    c = redis.Redis(port=port)
    while True:
        try:
            c.ping()
            return p
        except redis.ConnectionError:
            time.sleep(0.02)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--restarts", type=int, default=20)
    ap.add_argument("--threads", type=int, default=4)
    args = ap.parse_args()
    from tiercache import CacheConfig, TierCache
    port, d = free_port(), tempfile.mkdtemp(prefix="tc-redis-")
    server = start(port, d)
    cfg = CacheConfig(layout=LAYOUT, model_id="m", host_bytes=0, disk_path=None,
                      remote_url=f"redis://127.0.0.1:{port}/0", remote_timeout_s=0.5)
    cache = TierCache(cfg)
    tier_worst: dict[str, float] = {}                        # the remote tier's own calls, timed apart

    def timed(name: str, fn):
        def call(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                tier_worst[name] = max(tier_worst.get(name, 0.0), time.perf_counter() - t0)
        return call
    for name in ("exists_many", "get_many", "put_many"):
        setattr(cache.remote, name, timed(name, getattr(cache.remote, name)))
    stop = threading.Event()
    worst = {"store": 0.0, "load": 0.0, "lookup": 0.0}
    counts = {"calls": 0, "raised": 0, "wrong": 0, "served": 0}
    lock = threading.Lock()

    def work(t: int) -> None:
        rng = random.Random(t)
        while not stop.is_set():
            i = rng.randrange(200)
            op = rng.choice(["store", "load", "lookup"])
            t0 = time.perf_counter()
            try:
                if op == "store":
                    cache.store(prompt(i), kv_of(i))
                elif op == "load":
                    n = check(cache.load(prompt(i)), i)
                    with lock:
                        counts["served"] += n
                else:
                    cache.lookup(prompt(i))
            except AssertionError:
                with lock:
                    counts["wrong"] += 1
            except Exception as e:  # noqa: BLE001
                with lock:
                    counts["raised"] += 1
                print("raised", repr(e))
            dt = time.perf_counter() - t0
            with lock:
                counts["calls"] += 1
                worst[op] = max(worst[op], dt)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(args.threads)]
    for t in threads:
        t.start()
    resume = []
    for r in range(args.restarts):
        probe, pid = prompt(10_000 + r), 10_000 + r          # a new prompt: nothing about it is cached
        time.sleep(random.uniform(0.5, 1.5))
        server.kill()
        server.wait()
        time.sleep(random.uniform(0.2, 1.0))
        server = start(port, d)
        t0 = time.perf_counter()
        cache.store(probe, kv_of(pid))                        # may be dropped while the tier backs off
        while cache.lookup_by_tier(probe).get("remote", 0) == 0 and time.perf_counter() - t0 < 10:
            cache.store(probe, kv_of(pid))
            cache.flush()
            time.sleep(0.02)
        resume.append(time.perf_counter() - t0)
    stop.set()
    for t in threads:
        t.join()
    s = cache.stats()
    cache.close()
    server.kill()
    print(f"{args.restarts} restarts, {counts['calls']} calls from {args.threads} threads: {counts['raised']} raised, "
          f"{counts['wrong']} wrong, {counts['served']} blocks served; slowest call (s) "
          f"{ {k: round(v, 3) for k, v in worst.items()} }, of the remote tier's calls "
          f"{ {k: round(v, 3) for k, v in tier_worst.items()} }; remote hits back after a restart in "
          f"max {max(resume):.2f} s, median {sorted(resume)[len(resume) // 2]:.2f} s; remote errors "
          f"{dict(s['errors']['remote'])}")
    return 1 if counts["raised"] or counts["wrong"] else 0


if __name__ == "__main__":
    sys.exit(main())
