"""`tiercache inspect PATH`: what a disk store holds, without changing it.

The store is opened read-only and without LMDB's lock file (nothing is written
into its directory, so a store on read-only media can be inspected); a store
that cannot be read is one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import lmdb

from tiercache.tiers.disk import open_existing


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def _fmt_time(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


def summarize(path: str) -> dict:
    """Blocks, namespaces, layout, raw vs on-disk bytes and access times of the store at `path`."""
    disk = open_existing(path)
    try:
        namespaces = disk.namespaces()
        per_ns: dict[bytes, dict] = {}
        total = {"blocks": 0, "raw_bytes": 0, "frame_bytes": 0, "charged_bytes": 0}
        oldest = newest = None
        for _, meta in disk.iter_meta():
            ns = per_ns.setdefault(meta["ns"], {"blocks": 0, "raw_bytes": 0, "frame_bytes": 0})
            for d in (ns, total):
                d["blocks"] += 1
                d["raw_bytes"] += meta["raw_len"]
                d["frame_bytes"] += meta["frame_len"]
            total["charged_bytes"] += meta["charged"]
            oldest = meta["atime"] if oldest is None else min(oldest, meta["atime"])
            newest = meta["atime"] if newest is None else max(newest, meta["atime"])
        used, blocks = disk.used()
        env_info = disk.env.info()
        stat = disk.env.stat()
        out = {
            "path": path,
            "layout": disk.stored_layout(),
            "blocks": total["blocks"],
            "raw_bytes": total["raw_bytes"],
            "disk_bytes": total["frame_bytes"],
            "charged_bytes": total["charged_bytes"],
            "compression_ratio": (total["raw_bytes"] / total["frame_bytes"]) if total["frame_bytes"] else 0.0,
            "recorded_used_bytes": used,
            "recorded_blocks": blocks,
            "map_size": env_info["map_size"],
            "file_pages_in_use": env_info["last_pgno"] + 1,
            "page_size": stat["psize"],
            "disk_codec": disk.recorded_codec(),
            "oldest_access": oldest,
            "newest_access": newest,
            "namespaces": [
                {"id": ns_id.hex(), **namespaces.get(ns_id, {"model_id": "unknown"}), **counts,
                 "compression_ratio": (counts["raw_bytes"] / counts["frame_bytes"]) if counts["frame_bytes"] else 0.0}
                for ns_id, counts in sorted(per_ns.items(), key=lambda kv: -kv[1]["blocks"])
            ],
        }
    finally:
        disk.close()
    return out


def _fmt_codec(c: dict | None) -> str:
    if not c:
        return "not measured (no cache with compression=\"auto\" has written here)"
    read = c.get("read_gbps")
    if "decode_gbps" in c:  # measured on the store's segment size, by as many threads as loads use
        decode = (f"decode {c['decode_gbps']:.2f} GB/s on {c['decode_threads']} thread(s) "
                  f"({c['decode_gbps_per_core']:.2f} on one; {c['segment_bytes'] >> 10} KiB segments), ")
    elif "decode_gbps_per_core" in c:  # recorded by an older version
        decode = f"decode {c['decode_gbps_per_core']:.2f} GB/s per core x {c.get('cores')} cores, "
    else:
        decode = None
    figures = (f"{decode}disk read {'?' if read is None else f'{read:.2f}'} GB/s, ratio {c['ratio']:.2f}x; "
               if decode else "")
    return f"{c['chosen']} ({figures}{c.get('why', '')})"


def render(s: dict) -> str:
    lay = s["layout"] or {}
    lines = [
        f"tiercache store {s['path']}",
        f"  layout       {lay.get('num_layers')} layers x {lay.get('planes')} planes x {lay.get('block_size')} tokens"
        f" x {lay.get('num_kv_heads')} heads x {lay.get('head_dim')} dims, {lay.get('dtype')}",
        f"  blocks       {s['blocks']}",
        f"  raw bytes    {_fmt_bytes(s['raw_bytes'])}",
        f"  on disk      {_fmt_bytes(s['disk_bytes'])} in frames ({_fmt_bytes(s['charged_bytes'])} charged "
        f"against capacity); ratio {s['compression_ratio']:.2f}x",
        f"  LMDB file    {_fmt_bytes(s['file_pages_in_use'] * s['page_size'])} in use of a "
        f"{_fmt_bytes(s['map_size'])} map",
        f"  auto codec   {_fmt_codec(s.get('disk_codec'))}",
        f"  accessed     oldest {_fmt_time(s['oldest_access'])}, newest {_fmt_time(s['newest_access'])}",
        "  namespaces:",
        f"    {'id':<18} {'model':<24} {'tp':>5} {'salted':>6} {'blocks':>8} {'raw':>11} {'disk':>11} {'ratio':>6}",
    ]
    for ns in s["namespaces"]:
        tp = f"{ns.get('tp_rank', '?')}/{ns.get('tp_size', '?')}"
        lines.append(f"    {ns['id']:<18} {str(ns.get('model_id'))[:24]:<24} {tp:>5} "
                     f"{'yes' if ns.get('salted') else 'no':>6} {ns['blocks']:>8} {_fmt_bytes(ns['raw_bytes']):>11} "
                     f"{_fmt_bytes(ns['frame_bytes']):>11} {ns['compression_ratio']:>5.2f}x")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="tiercache inspect", description=__doc__)
    ap.add_argument("path", help="the disk tier's directory (CacheConfig.disk_path)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = ap.parse_args(argv)
    try:
        s = summarize(args.path)
    except (ValueError, OSError, lmdb.Error) as e:  # one line, never a traceback
        print(f"tiercache inspect: {e}".replace("\n", " "), file=sys.stderr)
        return 2
    try:
        print(json.dumps(s) if args.json else render(s))
        sys.stdout.flush()
    except BrokenPipeError:  # `tiercache inspect PATH | head`: the reader left; nothing to report
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so the flush at exit does not fail again
        return 0
    return 0
