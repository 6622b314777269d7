"""`tiercache plan`: the command line, and the plan as a dict (`make_plan`) and as text (`render`)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from tiercache.config import parse_size
from tiercache.tools.plan.model import DTYPE_BYTES, ModelShape, load_model_shape
from tiercache.tools.plan.replay import TIERS, TierReplay, read_trace, unbounded_hit_rate
from tiercache.tools.plan.sizing import disk_block_cost, free_space, size_tiers

TIER_LABEL = {"device": "GPU KV", "host": "host", "disk": "disk"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tiercache plan",
        description="Size KV-cache tiers for a model: per tier the bytes per token and per block, the tokens and "
                    "full-length sequences that fit, this machine's bandwidth, and the time to bring a prefix back "
                    "against the time to recompute it. With --trace, the hit rate each tier would serve.")
    m = p.add_argument_group("model (a config.json / model directory, or the numbers)")
    m.add_argument("--model", metavar="PATH", help="a transformers config.json, or a model directory holding one")
    m.add_argument("--layers", type=int, help="decoder layers")
    m.add_argument("--kv-heads", type=int, help="KV heads (after grouped-query sharing)")
    m.add_argument("--head-dim", type=int, help="dimension of one head")
    m.add_argument("--planes", type=int, default=None, help="2 for K and V (default), 1 for an MLA latent")
    m.add_argument("--dtype", choices=sorted(DTYPE_BYTES), help="KV dtype (default: the config's, else bfloat16)")
    m.add_argument("--max-seq-len", type=int, help="a full-length sequence (default: the config's max positions)")
    b = p.add_argument_group("budgets (bytes: 1073741824, 64GiB, 500GB)")
    b.add_argument("--gpu-kv", default="0", help="GPU memory for KV blocks (the engine's KV cache or the device tier)")
    b.add_argument("--host", default="0", help="host memory tier (host_bytes)")
    b.add_argument("--disk", default="0", help="disk tier bound (disk_bytes): the most its blocks may occupy")
    b.add_argument("--disk-path", help="where the disk tier would live: checks the filesystem's free space")
    b.add_argument("--block-size", type=int, default=16, help="tokens per block (default 16)")
    t = p.add_argument_group("time to bring back vs recompute")
    t.add_argument("--prefix", type=int, help="prefix length in tokens (default: the max seq len, else 8192)")
    t.add_argument("--prefill-rate", type=float, metavar="TOKENS_PER_S", help="your measured prefill rate for a "
                   "prompt of --prefix tokens")
    t.add_argument("--measure-prefill", action="store_true", help="measure the prefill rate of --model here (its "
                   "weights if the directory has them, else random weights; needs transformers; slow for big models)")
    t.add_argument("--device", default="cpu", help="device for --measure-prefill (default cpu)")
    t.add_argument("--bandwidth-from", metavar="FILE", help="tier bandwidths from `tiercache bench --json` or "
                   "`tiercache plan --json` output instead of probing")
    t.add_argument("--no-probe", action="store_true", help="no bandwidth probe (sizes only)")
    t.add_argument("--probe-bytes", default="64MiB", help="KV bytes the probe moves per tier (default 64MiB)")
    t.add_argument("--disk-ratio", type=float, help="compression ratio (raw / stored) to size the disk tier with "
                   "(default: the probe's, on synthetic bf16 KV; 1.0 without a probe)")
    r = p.add_argument_group("trace replay")
    r.add_argument("--trace", metavar="FILE", help="JSONL, one request per line: a list of token ids or an object "
                   "with token_ids (python -m tiercache.workload --out FILE writes one)")
    r.add_argument("--eviction", default="lru", help="memory tiers' eviction policy (lru, fifo, s3fifo)")
    r.add_argument("--write-policy", default="write_through", choices=("write_through", "write_back"))
    r.add_argument("--admission", default="all", help="disk admission policy (all, second_hit)")
    r.add_argument("--no-load", action="store_true", help="replay lookup + store per request (a client that "
                   "never loads); default: lookup, load of the cached prefix, store, as TierCachedLM does")
    p.add_argument("--json", action="store_true", help="print the plan as one JSON object")
    return p


def _positive(parser: argparse.ArgumentParser, name: str, value: Any, kind: type = int) -> None:
    if value is not None and not value > 0:
        parser.error(f"--{name}: expected a positive {kind.__name__}, got {value}")


def model_shape(args: argparse.Namespace, parser: argparse.ArgumentParser) -> ModelShape:
    explicit = {"layers": args.layers, "kv-heads": args.kv_heads, "head-dim": args.head_dim}
    if args.model:
        shape = load_model_shape(args.model, dtype=args.dtype)
        changes = {k: v for k, v in (("num_layers", args.layers), ("num_kv_heads", args.kv_heads),
                                     ("head_dim", args.head_dim), ("planes", args.planes),
                                     ("max_seq_len", args.max_seq_len)) if v is not None}
        return ModelShape(**{**shape.__dict__, **changes}) if changes else shape
    missing = [f"--{k}" for k, v in explicit.items() if v is None]
    if missing:
        parser.error("expected --model PATH, or all of --layers, --kv-heads and --head-dim "
                     f"(missing {', '.join(missing)})")
    return ModelShape(f"L{args.layers}-H{args.kv_heads}-D{args.head_dim}", args.layers, args.kv_heads, args.head_dim,
                      args.dtype or "bfloat16", planes=args.planes or 2, max_seq_len=args.max_seq_len)


def make_plan(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict:
    for name in ("layers", "kv_heads", "head_dim", "max_seq_len", "block_size", "prefix"):
        _positive(parser, name.replace("_", "-"), getattr(args, name))
    for name in ("prefill_rate", "disk_ratio"):
        _positive(parser, name.replace("_", "-"), getattr(args, name), float)
    if args.measure_prefill and args.prefill_rate:
        parser.error("--measure-prefill and --prefill-rate: choose one")
    if args.measure_prefill and not args.model:
        parser.error("--measure-prefill: needs --model (a model directory or its config.json)")
    if args.measure_prefill:
        from tiercache.tools.demo import device_problem
        problem = device_problem(args.device)
        if problem:
            raise ValueError(f"--device {args.device}: {problem}")
    shape = model_shape(args, parser)
    budgets = {"device": parse_size(args.gpu_kv, "--gpu-kv"), "host": parse_size(args.host, "--host"),
               "disk": parse_size(args.disk, "--disk")}
    if not any(budgets.values()):
        parser.error("give at least one budget: --gpu-kv, --host or --disk")
    B = args.block_size
    prefix = args.prefix or shape.max_seq_len or 8192

    if args.bandwidth_from:
        from tiercache.tools.plan.probe import bandwidth_from_results
        bandwidth = bandwidth_from_results(args.bandwidth_from)
    elif args.no_probe:
        bandwidth = {"source": "none (--no-probe)"}
    else:
        from tiercache.tools.plan.probe import run_probe
        bandwidth = run_probe(shape, B, parse_size(args.probe_bytes, "--probe-bytes"))
    ratio = args.disk_ratio or bandwidth.get("disk_ratio") or 1.0
    ratio_source = "given" if args.disk_ratio else ("measured" if bandwidth.get("disk_ratio") else "assumed")

    prefill = None
    if args.prefill_rate:
        prefill = {"tokens_per_s": args.prefill_rate, "source": "given"}
    elif args.measure_prefill:
        from tiercache.tools.plan.probe import measure_prefill
        prefill = {"tokens_per_s": measure_prefill(args.model, prefix, args.device, args.dtype),
                   "source": f"measured on {args.device}, {prefix}-token prompt"}
    recompute_s = prefix / prefill["tokens_per_s"] if prefill else None

    prefix_bytes = prefix * shape.bytes_per_token
    tiers = []
    for t in size_tiers(shape, B, budgets, ratio, args.max_seq_len):
        row = t.to_dict()
        gbs = bandwidth.get(t.tier)
        row["gb_per_s"] = gbs
        if t.tier == "device":
            row["load_prefix_s"] = 0.0  # already in GPU memory: prefix caching, nothing to move
        else:
            row["load_prefix_s"] = prefix_bytes / (gbs * 1e9) if gbs else None
        row["prefix_fits"] = t.tokens >= prefix
        row["recompute_prefix_s"] = recompute_s
        row["load_vs_recompute"] = (recompute_s / row["load_prefix_s"]
                                    if recompute_s and row["load_prefix_s"] else None)
        tiers.append(row)
    plan: dict[str, Any] = {
        "model": shape.to_dict(), "block_size": B, "block_bytes": shape.block_bytes(B), "budgets": budgets,
        "prefix_tokens": prefix, "prefix_bytes": prefix_bytes, "disk_ratio": ratio, "disk_ratio_source": ratio_source,
        "disk_block_cost": disk_block_cost(shape, B, ratio) if budgets["disk"] else None,
        "bandwidth": bandwidth, "prefill": prefill, "tiers": tiers,
        "total_tokens": sum(r["tokens"] for r in tiers),
    }
    if args.disk_path and budgets["disk"]:
        fs = free_space(args.disk_path)
        plan["disk_free"] = None if fs is None else {"checked": fs[0], "free_bytes": fs[1],
                                                     "enough": fs[1] >= budgets["disk"]}
    if args.trace:
        plan["replay"] = replay(args, shape, tiers)
    return plan


def replay(args: argparse.Namespace, shape: ModelShape, tiers: list[dict]) -> dict:
    trace = read_trace(args.trace)
    blocks = {r["tier"]: r["blocks"] for r in tiers}
    sim = TierReplay(args.block_size, device_blocks=blocks.get("device", 0), host_blocks=blocks.get("host", 0),
                     disk_blocks=blocks.get("disk", 0), eviction=args.eviction, write_policy=args.write_policy,
                     admission=args.admission, load=not args.no_load)
    result = sim.run(trace)
    return {"trace": args.trace, "eviction": args.eviction, "write_policy": args.write_policy,
            "admission": args.admission, "calls": "lookup+store" if args.no_load else "lookup+load+store",
            "blocks": blocks, **result.to_dict(),
            "unbounded_hit_rate": unbounded_hit_rate(trace, args.block_size)}


# -- text ------------------------------------------------------------------------------------
def _b(n: float | None) -> str:
    if n is None:
        return "—"
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


def _s(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    return f"{seconds * 1e3:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def render(plan: dict) -> str:
    m, bw = plan["model"], plan["bandwidth"]
    planes = "K+V" if m["planes"] == 2 else "MLA latent"
    lines = [f"tiercache plan  {m['name']}: {m['num_layers']} layers x {m['num_kv_heads']} KV heads x "
             f"{m['head_dim']} head dim, {m['dtype']}, {planes} -> {_b(m['kv_bytes_per_token'])} per token, "
             f"{_b(plan['block_bytes'])} per {plan['block_size']}-token block"
             + (f"; max seq len {m['max_seq_len']}" if m["max_seq_len"] else "")]
    if bw.get("source") == "probe":
        from tiercache.tools.demo import machine_line
        lines.append(f"bandwidth: probe on {machine_line()}, {_b(bw['probe_bytes'])} of synthetic KV per tier in "
                     f"{bw['seconds']:.1f} s (load into {bw['into']} memory; disk cold, decompression included)")
    else:
        lines.append(f"bandwidth: {bw.get('source')}")
    if m.get("sliding_window"):
        lines.append(f"note: the config declares sliding-window attention ({m['sliding_window']} tokens): these "
                     "sizes assume full attention in every layer, and TierCachedLM refuses such models")
    chose = f", compression=\"auto\" chose {bw['disk_codec']}" if bw.get("disk_codec") and \
        plan["disk_ratio_source"] == "measured" else ""
    lines.append(f"disk blocks sized at {plan['disk_ratio']:.2f}x compression ({plan['disk_ratio_source']}{chose})"
                 + (f", {_b(plan['disk_block_cost'])} per block with frame and index overhead"
                    if plan["disk_block_cost"] else ""))
    P = plan["prefix_tokens"]
    lines += ["", f"{'tier':<7} {'budget':>10} {'bytes/token':>11} {'bytes/block':>11} {'blocks':>10} "
                  f"{'tokens':>12} {'full seqs':>9} {'GB/s':>7} {f'load {P} tok':>15} {'recompute':>10}"]
    for r in plan["tiers"]:
        seqs = "—" if r["full_length_sequences"] is None else str(r["full_length_sequences"])
        gbs = "—" if r["gb_per_s"] is None else f"{r['gb_per_s']:.2f}"
        load = "in place" if r["tier"] == "device" else _s(r["load_prefix_s"])
        lines.append(f"{TIER_LABEL[r['tier']]:<7} {_b(r['budget_bytes']):>10} {_b(r['bytes_per_token']):>11} "
                     f"{_b(r['bytes_per_block']):>11} {r['blocks']:>10,} {r['tokens']:>12,} {seqs:>9} {gbs:>7} "
                     f"{load:>15} {_s(r['recompute_prefix_s']):>10}")
    lines.append(f"{'total':<7} {'':>10} {'':>11} {'':>11} {'':>10} {plan['total_tokens']:>12,}")
    pf = plan["prefill"]
    if pf:
        lines.append(f"\nrecompute {P} tokens at {pf['tokens_per_s']:,.0f} tokens/s ({pf['source']}): "
                     f"{_s(P / pf['tokens_per_s'])}; bringing them back is worth it where load < recompute")
    else:
        lines.append("\nrecompute time: give --prefill-rate TOKENS_PER_S (or --measure-prefill with --model)")
    free = plan.get("disk_free")
    if free:
        verdict = "enough" if free["enough"] else "NOT enough: the filesystem would fill first; the tier then " \
                                                  "evicts down and holds fewer blocks than planned"
        lines.append(f"disk: {_b(plan['budgets']['disk'])} bound, {_b(free['free_bytes'])} free at "
                     f"{free['checked']}: {verdict}")
    rp = plan.get("replay")
    if rp:
        lines += ["", f"trace replay: {rp['trace']}, {rp['requests']} requests, {rp['lookup_tokens']:,} prompt "
                      f"tokens; {rp['calls']} per request; eviction {rp['eviction']}, {rp['write_policy']}, "
                      f"admission {rp['admission']}",
                  f"{'tier':<7} {'blocks':>10} {'hit tokens':>12} {'hit rate':>9}"]
        for t in TIERS:
            if t in rp["blocks"]:
                lines.append(f"{TIER_LABEL[t]:<7} {rp['blocks'][t]:>10,} {rp['hit_tokens'][t]:>12,} "
                             f"{rp['hit_rate'][t]:>9.1%}")
        lines.append(f"{'total':<7} {'':>10} {rp['hit_tokens_total']:>12,} {rp['hit_rate_total']:>9.1%}   "
                     f"(unbounded cache: {rp['unbounded_hit_rate']:.1%}; hit rate = cached prompt tokens / "
                     "prompt tokens)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        plan = make_plan(args, parser)
    except (ValueError, OSError) as e:
        print(f"tiercache plan: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(plan) if args.json else render(plan))
    return 0
