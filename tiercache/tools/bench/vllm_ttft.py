"""TTFT of one request on vLLM (CPU backend): cold, vLLM's own prefix cache, tiercache host and disk hits,
vLLM's ExampleConnector; and throughput with no reuse, with and without tiercache. Each engine in its own
process. Not a test: numbers, for the closing note.

    .venv-vllm/bin/python tests/vllm/bench_ttft.py [--layers 8] [--tokens 2048] [--reps 5]

TTFT here is the wall time of `generate(max_tokens=1)` for one prompt (prefill + one sampled token).
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

HERE = Path(__file__).resolve().parent


def worker(args: argparse.Namespace) -> None:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    sys.path.insert(0, str(HERE))
    import model
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig

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
    prompts = [model.prompt(args.tokens, 1000 + i) for i in range(args.reps)]

    def ttft(p) -> float:
        t = time.perf_counter()
        llm.generate([{"prompt_token_ids": p}], one, use_tqdm=False)
        return time.perf_counter() - t

    ttft(model.prompt(args.tokens, 999))  # warm-up
    out: dict[str, list[float]] = {}
    if args.phase == "store":  # cold, then a hit from the connector (host for tiercache) or vLLM's own cache
        out["cold"] = [ttft(p) for p in prompts]
        out["vllm_prefix_cache"] = [ttft(p) for p in prompts]
        if args.connector == "tiercache":
            from vllm.distributed.kv_transfer import get_kv_transfer_group
            get_kv_transfer_group().worker.flush()
        llm.reset_prefix_cache()
        out["connector_hit"] = [ttft(p) for p in prompts]
    elif args.phase == "reload":  # a new process: hits from the store (disk for tiercache)
        out["connector_hit_new_process"] = [ttft(p) for p in prompts]
    elif args.phase == "throughput":  # no reuse at all: distinct prompts, tokens per second
        batch = [{"prompt_token_ids": model.prompt(args.tokens, 5000 + i)} for i in range(4 * args.reps)]
        t = time.perf_counter()
        llm.generate(batch, SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True), use_tqdm=False)
        out["no_reuse_seconds"] = [time.perf_counter() - t]
    Path(args.out).write_text(json.dumps(out))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--model"), ap.add_argument("--store"), ap.add_argument("--out")
    ap.add_argument("--connector", default="none"), ap.add_argument("--phase", default="store")
    ap.add_argument("--extra", default="{}", help="more kv_connector_extra_config for tiercache, as JSON")
    ap.add_argument("--runs", default="none:store,tiercache:store,tiercache:reload,example:store,example:reload,"
                                      "none:throughput,tiercache:throughput,none:throughput,tiercache:throughput",
                    help="connector:phase pairs, in order (throughput twice, alternating, against drift)")
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    sys.path.insert(0, str(HERE))
    import model
    from conftest import engine_env

    tmp = Path(tempfile.mkdtemp(prefix="tiercache-vllm-bench-"))
    mdir = str(model.build(tmp / "model", num_layers=args.layers))
    results: dict = {}
    runs = [tuple(r.split(":")) for r in args.runs.split(",")]
    stores: dict[str, str] = {}
    stores_made: list[str] = []
    for connector, phase in runs:
        out = tmp / f"{connector}-{phase}.json"
        # every store/throughput run starts from an empty store; a reload reads the last store run's
        if phase != "reload":
            stores[connector] = str(tmp / f"store-{connector}-{len(stores_made)}")
            stores_made.append(stores[connector])
        store = stores[connector]
        subprocess.run([sys.executable, __file__, "--worker", "--model", mdir, "--store", store, "--out", str(out),
                        "--connector", connector, "--phase", phase, "--tokens", str(args.tokens),
                        "--reps", str(args.reps), "--extra", args.extra], env=engine_env(), check=True,
                       capture_output=True)
        for k, v in json.loads(out.read_text()).items():
            results.setdefault(f"{connector}/{k}", []).extend(round(x * 1000, 1) for x in v)
    results = {k: {"median_ms": statistics.median(v), "all_ms": v} for k, v in results.items()}
    print(json.dumps({"layers": args.layers, "tokens": args.tokens, "reps": args.reps, "results": results},
                     indent=1))


if __name__ == "__main__":
    main()
