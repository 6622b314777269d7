"""Random damage to data.mdb pages (after the meta pages): the process never dies, nothing wrong is served.

    python tests/stress/stress_pages.py --trials 200
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CHILD = """
import sys
sys.path.insert(0, {root!r})
from tests.test_storage_disk import *
from tiercache.errors import CorruptFrame
def rd(i):
    try:
        return read_ok(disk, i)              # raises AssertionError on a wrong byte
    except CorruptFrame:
        return None                          # what the cache turns into a miss
disk, rec = open_disk(sys.argv[1])
served = sum(bool(rd(i)) for i in range(120))
disk.count_each([key(i) for i in range(120)]); list(disk.keys())
disk.write_batch(rows(range(1000, 1016)))
served += sum(bool(rd(i)) for i in range(1000, 1016))
print("ok", served)
"""


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=200)
    args = ap.parse_args()
    sys.path.insert(0, ROOT)
    from tests.test_storage_disk import _make_store
    base = os.path.join(tempfile.mkdtemp(prefix="tc-pages-"), "s")
    size = _make_store(base, n=120)
    rng = random.Random(0)
    outcomes: dict[str, int] = {}
    served = 0
    for _ in range(args.trials):
        d = tempfile.mkdtemp(prefix="tc-pages-")
        p = os.path.join(d, "s")
        shutil.copytree(base, p)
        with open(os.path.join(p, "data.mdb"), "r+b") as f:
            for _ in range(rng.randint(1, 6)):
                f.seek(rng.randrange(2, size // 4096) * 4096 + rng.randrange(4000))
                f.write(os.urandom(rng.randint(1, 4096)))
        r = subprocess.run([sys.executable, "-c", CHILD.format(root=ROOT), p], capture_output=True, text=True,
                           timeout=120)
        if r.returncode < 0:
            kind = f"killed by signal {-r.returncode}"
        elif r.returncode:
            kind = "wrong bytes" if "wrong bytes" in r.stderr else "raised"
            print(r.stderr[-800:])
        else:
            kind = "ok"
            served += int(r.stdout.split()[-1])
        outcomes[kind] = outcomes.get(kind, 0) + 1
        shutil.rmtree(d)
    print(f"{args.trials} damaged stores: {outcomes}; {served} blocks served and verified")
    return 0 if outcomes.get("ok") == args.trials else 1


if __name__ == "__main__":
    sys.exit(main())
