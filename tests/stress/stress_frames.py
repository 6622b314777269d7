"""Mutated and crafted codec frames: each decodes to exactly the stored bytes or raises CorruptFrame.

    python tests/stress/stress_frames.py --frames 10000
"""

from __future__ import annotations

import argparse
import random
import struct
import sys

import numpy as np
import xxhash
from common import peak_rss_mib

from tiercache.codec import _HEAD, BlockCodec
from tiercache.errors import CorruptFrame


def rehead(frame: bytearray, idx: int, value) -> None:
    vals = list(_HEAD.unpack_from(frame, 0))
    vals[idx] = value
    head = _HEAD.pack(*vals)
    frame[:_HEAD.size] = head[:-4] + struct.pack("<I", xxhash.xxh32_intdigest(head[:-4]))


def zstd_declaring(size: int, body: bytes) -> bytes:
    block = struct.pack("<I", 1 | len(body) << 3)[:3]       # last block, raw
    return struct.pack("<IB", 0xFD2FB528, 0xE0) + struct.pack("<Q", size) + block + body


def mutate(rng: random.Random, frame: bytes, other: bytes) -> bytearray:
    f = bytearray(frame)
    kind = rng.randrange(9)
    if kind == 0:
        for _ in range(rng.randint(1, 8)):
            f[rng.randrange(len(f))] ^= 1 << rng.randrange(8)
    elif kind == 1:
        f = f[: rng.randrange(len(f))]
    elif kind == 2:
        f += bytes(rng.randrange(1, 64))
    elif kind == 3:
        cut = rng.randrange(len(f))
        f = f[:cut] + bytearray(other[cut:])                  # splice in another block's frame
    elif kind == 4:
        f = bytearray(other)                                  # another block's valid frame
    elif kind == 5:
        rehead(f, rng.choice([1, 2, 3, 5, 6, 7, 9]), rng.getrandbits(8))   # a header field, valid header CRC
    elif kind == 6:
        pos = rng.randrange(64, len(f))
        f[pos:pos + 16] = bytes(rng.getrandbits(8) for _ in range(16))
    elif kind == 7:
        body = zstd_declaring(rng.choice([1 << 40, 256 << 20, 1 << 30, 7]), bytes(64))
        pos = rng.randrange(64, max(65, len(f) - len(body)))
        f[pos:pos + len(body)] = body                         # a crafted zstd plane inside
    else:
        f = bytearray(rng.getrandbits(8) for _ in range(rng.randrange(1, 4096)))
    return f


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=10000)
    args = ap.parse_args()
    rng = random.Random(0)
    codecs = [BlockCodec(f"L{n}", 2, n, comp) for n in (1, 2, 4) for comp in ("auto", "zstd", "none")]
    wrong = other_exc = corrupt = exact = 0
    for i in range(args.frames):
        c = rng.choice(codecs)
        size = c.num_segments * 2 * rng.choice([512, 4096, 40000])
        raw = (np.random.default_rng(i).standard_normal(size // 2).astype(np.float32).view(np.uint32) >> 16)
        raw = raw.astype("<u2").view(np.uint8)
        key, key2 = rng.randbytes(16), rng.randbytes(16)
        frame = c.encode(raw, key)
        bad = mutate(rng, frame, c.encode(raw[::-1].copy(), key2))
        try:
            out = c.decode(bytes(bad), len(raw), key=key)
            if np.array_equal(out, raw):
                exact += 1
            else:
                wrong += 1
        except CorruptFrame:
            corrupt += 1
        except Exception as e:  # noqa: BLE001
            other_exc += 1
            print("unexpected", type(e).__name__, e)
    print(f"{args.frames} frames: {corrupt} CorruptFrame, {exact} decoded exactly (harmless mutation), "
          f"{wrong} WRONG, {other_exc} other exceptions; peak RSS {peak_rss_mib():.0f} MiB")
    return 1 if wrong or other_exc else 0


if __name__ == "__main__":
    sys.exit(main())
