"""A writer process SIGKILLed at random points, >= 200 times; every block served afterwards is verified.

    python tests/stress/stress_sigkill.py --kills 200 [--path DIR]
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time

from common import LAYOUT, check, prompt

WRITER = """
import os, random, sys
sys.path.insert(0, {here!r})
from common import LAYOUT, kv_of, prompt
from tiercache import CacheConfig, TierCache
rng = random.Random({seed})
cfg = CacheConfig(layout=LAYOUT, model_id="m", host_bytes=4 * LAYOUT.block_bytes, disk_path={path!r},
                  disk_bytes="4MiB")
c = TierCache(cfg)
print("ready", flush=True)
while True:
    i = rng.randrange({prompts})
    c.store(prompt(i), kv_of(i))
    if rng.random() < 0.3:
        c.load(prompt(rng.randrange({prompts})))
"""


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kills", type=int, default=200)
    ap.add_argument("--prompts", type=int, default=300)
    ap.add_argument("--path", default=None)
    args = ap.parse_args()
    from tiercache import CacheConfig, TierCache
    path = args.path or os.path.join(tempfile.mkdtemp(prefix="tc-sigkill-"), "store")
    here = os.path.dirname(os.path.abspath(__file__))
    rng = random.Random(0)
    served = wrong = errors = 0
    t0 = time.time()
    for kill in range(args.kills):
        code = WRITER.format(here=here, seed=kill, path=path, prompts=args.prompts)
        p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                             text=True)
        p.stdout.readline()                                   # the cache is open
        time.sleep(rng.uniform(0.0, 0.8))                     # then die at a random point
        p.send_signal(signal.SIGKILL)
        p.wait()
        if kill % 10 == 9 or kill == args.kills - 1:          # verify everything the store serves
            cfg = CacheConfig(layout=LAYOUT, model_id="m", host_bytes=0, disk_path=path, disk_bytes="4MiB")
            with TierCache(cfg) as c:
                for i in range(args.prompts):
                    try:
                        served += check(c.load(prompt(i)), i)
                    except AssertionError:
                        wrong += 1
                    except Exception as e:  # noqa: BLE001 - counted: a call must never raise
                        errors += 1
                        print("raised:", repr(e))
            print(f"{kill + 1} kills, {served} blocks served and verified, {wrong} wrong, {errors} raised, "
                  f"{time.time() - t0:.0f} s", flush=True)
    return 1 if wrong or errors else 0


if __name__ == "__main__":
    sys.exit(main())
