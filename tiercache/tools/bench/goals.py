"""The benchmark's goals, each a ratio measured in the same run: PASS, MISS (and by how much), or not measured."""

from __future__ import annotations

from dataclasses import dataclass

LMCACHE_DISK_MODES = ("LMCache LocalDiskBackend (buffered)", "LMCache LocalDiskBackend (O_DIRECT)")


@dataclass(frozen=True)
class Goal:
    name: str
    cmp: str        # ">=" or "<="
    target: float


GOALS = (
    Goal("host store >= 0.9x memcpy", ">=", 0.9),
    Goal("host load >= 0.9x memcpy", ">=", 0.9),
    Goal("disk store >= LMCache's best disk mode", ">=", 1.0),
    Goal("disk load, cold >= LMCache's best disk mode", ">=", 1.0),
    Goal("disk load, warm >= LMCache's best disk mode", ">=", 1.0),
    Goal("disk load, cold, byteplane >= 0.9x min(raw read x ratio, cores x decode)", ">=", 0.9),
    Goal("disk load, warm, byteplane >= 0.9x min(raw read x ratio, cores x decode)", ">=", 0.9),
    Goal("disk footprint <= 0.7x raw (realistic bf16)", "<=", 0.7),
    Goal("lookup >= 5x faster than LMCache's", ">=", 5.0),
    Goal("warm TTFT <= 1.2x ideal: host", "<=", 1.2),
    Goal("warm TTFT <= 1.5x ideal: disk, page cache dropped", "<=", 1.5),
    Goal("warm TTFT <= 1.2x ideal: disk, page cache warm", "<=", 1.2),
    Goal("lookup and store flat as the store grows (largest <= 1.2x the 10^3 cost)", "<=", 1.2),
)


def _disk_vs_lmcache(result: dict, op: str) -> tuple[float, str] | None:
    """op: "store", "load, cold" or "load, warm" (tiercache's rows with compression none)."""
    rows = {r["row"]: r for r in result["throughput"]}
    ours = rows[f"disk {op}"]
    theirs = [r for r in result["peer_rows"] if r.get("status") == "ok"
              and r["row"] in {f"{m} {op}" for m in LMCACHE_DISK_MODES}]
    if not theirs:
        return None
    best = max(theirs, key=lambda r: r["median"])
    # also the ratio of each side's ratio to its own same-round raw-file bound (cancels the drift between processes)
    bound_ratio = ours["ratio"] / best["ratio"]
    text = (f"{ours['median']:.2f} vs {best['median']:.2f} GB/s ({best['row'].removeprefix('LMCache ')}); "
            f"{bound_ratio:.2f}x on ratios to the raw-file bound")
    direct, raw_direct = rows.get("disk store, O_DIRECT"), rows.get("raw file write, O_DIRECT")
    if op == "store" and direct is not None and raw_direct is not None:
        text += (f"; with disk_direct_writes=True {direct['median']:.2f} GB/s "
                 f"({direct['median'] / best['median']:.2f}x; a raw O_DIRECT write {raw_direct['median']:.2f} GB/s)")
    return ours["median"] / best["median"], text


def _decode_bound(result: dict, rows: dict, temp: str) -> tuple[float, str] | None:
    """Compressed loads against what they could reach here: reading the frames (a raw read of that many
    compressed bytes delivers ratio times the raw bytes) or decoding them on every core, whichever is less."""
    ours, raw = rows.get(f"disk load, {temp}, byteplane"), rows.get(f"raw file read, {temp}")
    fp = rows.get("footprint realistic bf16")
    if ours is None or raw is None or fp is None or not fp.get("decode_gbps_per_core"):
        return None
    ratio = 1 / fp["frame_ratio"]
    cores = result.get("machine", {}).get("cores") or 1
    read_bound = raw["median"] * ratio
    decode_bound = cores * fp["decode_gbps_per_core"]
    bound = min(read_bound, decode_bound)
    which = "reading" if read_bound <= decode_bound else "decoding"
    together = (f"; measured on {fp['decode_threads']} threads at once: {fp['decode_gbps_threads']:.2f}"
                if fp.get("decode_gbps_threads") else "")
    return ours["median"] / bound, (f"{ours['median']:.2f} vs {bound:.2f} GB/s ({which} bound: raw read "
                                    f"{raw['median']:.2f} GB/s x ratio {ratio:.2f} = {read_bound:.2f}; {cores} "
                                    f"cores x decode {fp['decode_gbps_per_core']:.2f} GB/s per core = "
                                    f"{decode_bound:.2f}{together})")


def _lookup_vs_lmcache(result: dict) -> tuple[float, str] | None:
    ours = {r["row"]: r for r in result["lookup"]}
    pairs = [(r, ours[r["compare_to"]]) for r in result.get("peer_lookup", [])
             if r.get("peer") == "lmcache" and r.get("compare_to") in ours and "repeated" not in r["row"]]
    if not pairs:
        return None
    worst = min(pairs, key=lambda p: p[0]["median"] / p[1]["median"])
    theirs, own = worst
    return theirs["median"] / own["median"], (f"{theirs['median']:.1f} vs {own['median']:.1f} µs/chunk "
                                              f"({theirs['row'].removeprefix('LMCache ')} vs {own['row']}; "
                                              "the least favourable pair, first calls)")


def _ttft(result: dict, tier: str) -> tuple[float, str] | None:
    e2e = result.get("e2e")
    if not e2e:
        return None
    row = next(r for r in e2e["rows"] if r.get("tier") == tier and r.get("default"))
    where = (f"{row['ttft_ms']['median']:.1f} ms vs ideal {e2e['rows'][1]['ttft_ms']['median']:.1f} ms "
             f"({row['mode']}, the default)")
    if tier.startswith("disk, page cache"):  # the default codec is judged; the uncompressed store shown beside it
        plain = next((r for r in e2e["rows"] if r.get("tier") == tier.replace("disk", "disk, compression none", 1)
                      and r.get("default")), None)
        if plain is not None:
            where += (f"; compression=\"auto\" chose {e2e.get('disk_codec') or '?'}, with compression=\"none\": "
                      f"{plain['ratio']['median']:.2f}x")
    return row["ratio"]["median"], where


def _scale(result: dict) -> tuple[float, str] | None:
    if not result["scale"]:
        return None
    # first lookups of random stored sequences and stores; repeated lookups are a diagnostic
    ours = [r for r in result["scale"] if r["op"] in ("store", "lookup") and r["tier"] != "bound"]
    worst = max(ours, key=lambda r: r["ratio"])
    where = f"{worst['tier']} {worst['op']} at {worst['blocks']:,} blocks"
    bound = next((r for r in result["scale"] if r["tier"] == "bound" and r["op"] == worst["op"]
                  and r["blocks"] == worst["blocks"]), None)
    if bound is not None:  # what the medium itself does at that size, measured the same way
        first = next(r for r in ours if r["tier"] == worst["tier"] and r["op"] == worst["op"])
        base = next(r for r in result["scale"] if r["tier"] == "bound" and r["op"] == worst["op"])
        where += (f" (+{worst['median'] - first['median']:.2f} µs a block); {bound['bound']}: "
                  f"{bound['ratio']:.2f}x (+{bound['median'] - base['median']:.2f} µs a block)")
    return worst["ratio"], where


def _value(goal: Goal, result: dict) -> tuple[float, str] | None:
    rows = {r["row"]: r for r in result["throughput"] + result["footprint"]}
    name = goal.name
    if name.startswith(("host store", "host load")):
        row = name.split(" >=")[0]
        return rows[row]["ratio"], f"{rows[row]['median']:.2f} vs {rows[BOUND[row]]['median']:.2f} GB/s, same rounds"
    if "byteplane" in name:
        return _decode_bound(result, rows, "cold" if "cold" in name else "warm")
    if name.startswith("disk store"):
        return _disk_vs_lmcache(result, "store")
    if name.startswith("disk load"):
        return _disk_vs_lmcache(result, "load, cold" if "cold" in name else "load, warm")
    if name.startswith("disk footprint"):
        return rows["footprint realistic bf16"]["ratio"], "store allocated bytes (data.mdb and frame files) / raw bytes"
    if name.startswith("lookup >="):
        return _lookup_vs_lmcache(result)
    if name.startswith("warm TTFT"):
        return _ttft(result, name.split("ideal: ")[1])
    return _scale(result)


BOUND = {"host store": "memcpy store", "host load": "memcpy load"}
NOT_MEASURED = {"disk load": "needs --peers and the lmcache venv", "disk store": "needs --peers and the lmcache venv",
                "lookup >=": "needs --peers and the lmcache venv",
                "warm TTFT": "end to end was off (--e2e off)", "lookup and": "scale test was off"}


def judge(result: dict) -> list[dict]:
    out = []
    for goal in GOALS:
        got = _value(goal, result)
        entry = {"goal": goal.name, "target": f"{goal.cmp} {goal.target:g}", "value": None, "pass": None}
        if got is None:
            why = next(v for k, v in NOT_MEASURED.items() if goal.name.startswith(k))
            out.append({**entry, "status": "not measured", "measured_on": why, "miss_by": ""})
            continue
        value, where = got
        ok = value >= goal.target if goal.cmp == ">=" else value <= goal.target
        if ok:
            miss = ""
        elif goal.cmp == ">=":
            miss = f"{(1 - value / goal.target) * 100:.1f}% short ({value:.2f}x of the {goal.target:g}x needed)"
        else:
            miss = f"{(value / goal.target - 1) * 100:.1f}% over ({value:.2f}x against at most {goal.target:g}x)"
        out.append({**entry, "value": value, "pass": ok, "status": "PASS" if ok else "MISS", "measured_on": where,
                    "miss_by": miss})
    return out
