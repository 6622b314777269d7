"""P processes x T threads on one store, one process SIGKILLed halfway; every served block verified.

    python tests/stress/stress_procs.py --procs 4 --threads 4 --seconds 60
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

WORKER = """
import json, os, random, sys, threading, time
sys.path.insert(0, {here!r})
from common import LAYOUT, check, kv_of, prompt
from tiercache import CacheConfig, TierCache
cfg = CacheConfig(layout=LAYOUT, model_id="m", host_bytes=8 * LAYOUT.block_bytes, disk_path={path!r},
                  disk_bytes="8MiB")
c = TierCache(cfg)
tier_dropped = [0]                       # writes the disk tier itself could not take (vs queue backpressure)
_real = c.disk.write_batch
def _counted(*a, **k):
    r = _real(*a, **k)
    tier_dropped[0] += len(r[2])
    return r
c.disk.write_batch = _counted
stop = time.time() + {seconds}
out = {{"served": 0, "wrong": 0, "raised": 0, "ops": 0}}
lock = threading.Lock()
def work(t):
    rng = random.Random({proc} * 100 + t)
    while time.time() < stop:
        i = rng.randrange(400)
        try:
            if rng.random() < 0.5:
                c.store(prompt(i), kv_of(i))
            else:
                n = check(c.load(prompt(i)), i)
                with lock: out["served"] += n
        except AssertionError:
            with lock: out["wrong"] += 1
        except Exception as e:
            with lock: out["raised"] += 1
            print("raised", repr(e), file=sys.stderr)
        with lock: out["ops"] += 1
ts = [threading.Thread(target=work, args=(t,)) for t in range({threads})]
print("ready", flush=True)
for t in ts: t.start()
for t in ts: t.join()
s = c.stats()
c.close()
out["dropped_writes"] = s["dropped_writes"]["disk"]
out["tier_dropped"] = tier_dropped[0]
out["disk_errors"] = s["errors"]["disk"]
print(json.dumps(out), flush=True)
"""


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--procs", type=int, default=4)
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=60)
    args = ap.parse_args()
    here = os.path.dirname(os.path.abspath(__file__))
    path = os.path.join(tempfile.mkdtemp(prefix="tc-procs-"), "store")
    procs = []
    for p in range(args.procs):
        code = WORKER.format(here=here, path=path, seconds=args.seconds, proc=p, threads=args.threads)
        procs.append(subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True))
    for p in procs:
        p.stdout.readline()
    time.sleep(args.seconds / 2)
    procs[0].send_signal(signal.SIGKILL)                      # one dies halfway, mid-read or mid-write
    results = []
    for p in procs[1:]:
        out, _ = p.communicate(timeout=args.seconds * 4 + 120)
        results.append(json.loads(out.strip().splitlines()[-1]))
    procs[0].wait()
    names = ("ops", "served", "wrong", "raised", "dropped_writes", "tier_dropped")
    total = {k: sum(r[k] for r in results) for k in names}
    print(f"{args.procs} processes x {args.threads} threads, {args.seconds:.0f} s, one SIGKILLed at "
          f"{args.seconds / 2:.0f} s: survivors did {total['ops']} ops, served {total['served']} verified blocks, "
          f"{total['wrong']} wrong, {total['raised']} raised, {total['dropped_writes']} dropped disk writes "
          f"(of which {total['tier_dropped']} by the "
          f"disk tier, the rest queue backpressure); "
          f"disk errors {[r['disk_errors'] for r in results]}")
    return 1 if total["wrong"] or total["raised"] else 0


if __name__ == "__main__":
    sys.exit(main())
