"""TTFT of one request on vLLM: cold, vLLM's own prefix cache, tiercache hits from host memory and from disk
(a new process), vLLM's ExampleConnector; and throughput with no reuse, with and without tiercache. Each
engine runs in its own process, one after another, in one run. Run it with the Python that has vLLM:

    .venv-vllm/bin/python -m tiercache.tools.bench.vllm_ttft [--layers 8] [--tokens 2048] [--reps 5] [--json]
    tiercache bench --vllm .venv-vllm/bin/python           (the same, as a section of the bench)

TTFT is the wall time of `generate(max_tokens=1)` for one prompt (prefill + one sampled token). Every hit
is checked: its sampled token must be the one vLLM's own prefix-cache hit of the same prompt sampled (and
every cold run's, vLLM's cold run's).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": "2",
       "VLLM_CPU_OMP_THREADS_BIND": "nobind", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
DEFAULT_RUNS = ("none:store,tiercache:store,tiercache:reload,example:store,example:reload,"
                "none:throughput,tiercache:throughput,none:throughput,tiercache:throughput")


def engine(args: argparse.Namespace) -> None:
    """One engine: the phase's requests, timed; writes {series: [seconds]} and the sampled tokens."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig

    from tiercache.tools import tiny_llama

    kw = dict(model=args.model, enforce_eager=True, max_model_len=8192, gpu_memory_utilization=0.3,
              disable_log_stats=True)
    if args.connector == "tiercache":
        kw["kv_transfer_config"] = KVTransferConfig(
            kv_connector="TierCacheConnector", kv_connector_module_path="tiercache.integrations.vllm",
            kv_role="kv_both",
            kv_connector_extra_config={"disk_path": args.store, "host_bytes": "1GiB", **json.loads(args.extra)})
    elif args.connector == "example":
        kw["kv_transfer_config"] = KVTransferConfig(kv_connector="ExampleConnector", kv_role="kv_both",
                                                    kv_connector_extra_config={"shared_storage_path": args.store})
    llm = LLM(**kw)
    one = SamplingParams(temperature=0.0, max_tokens=1)
    prompts = [tiny_llama.prompt(args.tokens, 1000 + i) for i in range(args.reps)]
    tokens: dict[str, list[list[int]]] = {}

    def ttft(series: str, p: list[int]) -> float:
        t = time.perf_counter()
        out = llm.generate([{"prompt_token_ids": p}], one, use_tqdm=False)
        took = time.perf_counter() - t
        tokens.setdefault(series, []).append(list(out[0].outputs[0].token_ids))
        return took

    ttft("warmup", tiny_llama.prompt(args.tokens, 999))
    out: dict[str, list[float]] = {}
    if args.phase == "store":  # cold, then a hit from vLLM's own cache, then from the connector (host memory)
        out["cold"] = [ttft("cold", p) for p in prompts]
        out["vllm_prefix_cache"] = [ttft("vllm_prefix_cache", p) for p in prompts]
        if args.connector == "tiercache":
            from vllm.distributed.kv_transfer import get_kv_transfer_group
            get_kv_transfer_group().worker.flush()
        llm.reset_prefix_cache()
        out["connector_hit"] = [ttft("connector_hit", p) for p in prompts]
    elif args.phase == "reload":  # a new process: hits from the store (disk for tiercache)
        out["connector_hit_new_process"] = [ttft("connector_hit_new_process", p) for p in prompts]
    elif args.phase == "throughput":  # no reuse at all: distinct prompts, seconds for the batch
        batch = [{"prompt_token_ids": tiny_llama.prompt(args.tokens, 5000 + i)} for i in range(4 * args.reps)]
        t = time.perf_counter()
        llm.generate(batch, SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True), use_tqdm=False)
        out["no_reuse_seconds"] = [time.perf_counter() - t]
    tokens.pop("warmup", None)
    Path(args.out).write_text(json.dumps({"seconds": out, "tokens": tokens}))


def measure(layers: int = 8, tokens: int = 2048, reps: int = 5, runs: str = DEFAULT_RUNS, extra: str = "{}",
            log=lambda s: None, omp_threads: int | None = None) -> dict:
    """Run every connector:phase pair in its own process; medians in ms, and whether every hit was exact."""
    from tiercache.tools import tiny_llama

    tmp = Path(tempfile.mkdtemp(prefix="tiercache-vllm-bench-"))
    mdir = str(tiny_llama.build(tmp / "model", num_layers=layers))
    env = dict(os.environ)
    for k, v in ENV.items():
        env.setdefault(k, v)
    if omp_threads is not None:  # every engine alike: e.g. leave a core to tiercache's background writes
        env["OMP_NUM_THREADS"] = str(omp_threads)
    results: dict[str, list[float]] = {}
    sampled: dict[str, list[list[int]]] = {}
    stores: dict[str, str] = {}
    for i, (connector, phase) in enumerate(tuple(r.split(":")) for r in runs.split(",")):
        log(f"vllm: {connector} {phase}")
        out = tmp / f"{i}-{connector}-{phase}.json"
        if phase != "reload":  # every store/throughput run starts from an empty store; a reload reads the last one
            stores[connector] = str(tmp / f"store-{i}")
        proc = subprocess.run([sys.executable, "-m", "tiercache.tools.bench.vllm_ttft", "--engine", "--model", mdir,
                               "--store", stores[connector], "--out", str(out), "--connector", connector,
                               "--phase", phase, "--tokens", str(tokens), "--reps", str(reps), "--extra", extra],
                              env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"vLLM engine ({connector} {phase}) exited with {proc.returncode}:\n"
                               f"{(proc.stdout + proc.stderr)[-4000:]}")
        got = json.loads(out.read_text())
        for k, v in got["seconds"].items():
            results.setdefault(f"{connector}/{k}", []).extend(round(x * 1000, 1) for x in v)
        for k, v in got["tokens"].items():
            sampled[f"{connector}/{k}"] = v
    # Like with like: a cold run against vLLM's cold run; a hit (KV from a cache, the last block computed)
    # against vLLM's own prefix-cache hit. On CPU, bf16 logits of a full prefill and of a cached-prefix step
    # can differ in a near tie, so a hit is not compared with a cold run.
    exact = {}
    for k, v in sampled.items():
        ref = "none/cold" if k.endswith("/cold") else "none/vllm_prefix_cache"
        if k != ref and ref in sampled:
            exact[k] = v == sampled[ref]
    return {"layers": layers, "tokens": tokens, "reps": reps, "omp_threads": omp_threads, "exact": exact,
            "results": {k: {"median_ms": statistics.median(v), "all_ms": v} for k, v in results.items()}}


def rows(result: dict) -> list[dict]:
    """The bench section's rows: each TTFT as a ratio to vLLM's own prefix cache (its bound); the batch time
    with no reuse as a ratio to vLLM without a connector. `verified`: every hit sampled the token vLLM's own
    prefix-cache hit sampled."""
    res = result["results"]
    bound = res.get("none/vllm_prefix_cache", {}).get("median_ms")
    out = []
    for name, r in res.items():
        if name.endswith("no_reuse_seconds"):
            continue
        out.append({"row": f"TTFT {name}", "median_ms": r["median_ms"],
                    "ratio": round(r["median_ms"] / bound, 2) if bound else None,
                    "verified": result["exact"].get(name, True)})
    none = [x for x in res.get("none/no_reuse_seconds", {}).get("all_ms", [])]
    tc = [x for x in res.get("tiercache/no_reuse_seconds", {}).get("all_ms", [])]
    if none and tc:
        out.append({"row": "no reuse, batch time (ratio: tiercache / no connector, best of runs)",
                    "median_ms": min(tc), "ratio": round(min(tc) / min(none), 3), "verified": True})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m tiercache.tools.bench.vllm_ttft", description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json", action="store_true", help="print the section's rows and the raw figures as JSON")
    ap.add_argument("--omp-threads", type=int, help="OMP_NUM_THREADS for every engine (default: vLLM's own choice)")
    ap.add_argument("--engine", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--store", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--connector", default="none", help=argparse.SUPPRESS)
    ap.add_argument("--phase", default="store", help=argparse.SUPPRESS)
    ap.add_argument("--extra", default="{}", help="more kv_connector_extra_config for tiercache, as JSON")
    ap.add_argument("--runs", default=DEFAULT_RUNS,
                    help="connector:phase pairs, in order (throughput twice, alternating, against drift)")
    args = ap.parse_args()
    if args.engine:
        return engine(args)
    result = measure(args.layers, args.tokens, args.reps, args.runs, args.extra, omp_threads=args.omp_threads,
                     log=lambda s: print(f"[vllm-bench] {s}", file=sys.stderr, flush=True))
    print(json.dumps({**result, "rows": rows(result)}, indent=None if args.json else 1))


if __name__ == "__main__":
    main()
