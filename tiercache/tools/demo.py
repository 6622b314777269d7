"""`tiercache demo`: a long-context RAG run, without the cache and with it.

A small Llama-architecture model, randomly initialised from a config (nothing is
downloaded; `--model PATH` takes a local checkpoint and its tokenizer instead),
answers a seeded RAG workload: shared system prompt + one of several documents +
a question, questions shuffled across documents. Every request runs twice,
interleaved: cold (plain `model.generate`) and warm (`TierCachedLM` over a
TierCache whose host tier is smaller than the working set, so revisited
documents come back from the compressed LMDB disk tier).

The default workload is sized to finish in well under a minute on 2 CPU cores;
`--full` runs the larger one (documents of 3000 tokens).

TTFT = call start to first-token logits: lookup + KV load + prefill.
Hit rate = prompt tokens served from a tier / prompt tokens looked up.
KV time = lookup + load before the forward pass, plus the time the forward
waited on a layer still loading (layer-wise mode); it is part of warm TTFT.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_TIERS = ("device", "host", "disk", "remote")


@dataclass(frozen=True)
class Preset:
    documents: int
    questions: int
    document_tokens: int
    system_tokens: int


PRESETS = {"quick": Preset(documents=3, questions=3, document_tokens=1024, system_tokens=256),
           "full": Preset(documents=6, questions=5, document_tokens=3000, system_tokens=512)}
DEFAULT_PRESET = "quick"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tiercache demo",
        description="Long-context RAG run: TTFT without and with tiered prefix-KV reuse (host + LMDB disk).")
    p.add_argument("--full", action="store_true", help="the larger workload: 6 documents of 3000 tokens x 5 "
                   "questions, 9x the default's prompt tokens (the default: 3 documents of 1024 x 3)")
    p.add_argument("--quick", action="store_true", help=argparse.SUPPRESS)  # the default; kept for old scripts
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object on stdout")
    p.add_argument("--model", metavar="PATH", help="local checkpoint dir (model + tokenizer); default: built-in "
                   "random-init Llama-architecture model with a byte-level tokenizer")
    p.add_argument("--dtype", default="bfloat16", help="model/KV dtype: bfloat16 (default), float16, float32, "
                   "or 'auto' (the checkpoint's own)")
    p.add_argument("--layers", type=int, default=8, help="built-in model: decoder layers (default 8)")
    p.add_argument("--hidden", type=int, default=512, help="built-in model: hidden size (default 512)")
    p.add_argument("--documents", type=int, help="documents in the workload")
    p.add_argument("--questions", type=int, help="questions per document")
    p.add_argument("--doc-tokens", type=int, help="tokens per document")
    p.add_argument("--system-tokens", type=int, help="tokens in the shared system prompt")
    p.add_argument("--seed", type=int, default=0, help="workload and model seed (default 0)")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV block (default 16)")
    p.add_argument("--host-bytes", help="host tier size, e.g. 32MiB (default: 40%% of the working set, so some "
                   "blocks must come back from disk)")
    p.add_argument("--disk-path", help="LMDB directory for the disk tier (default: a temporary directory)")
    p.add_argument("--disk-bytes", default="2GiB", help="disk tier size (default 2GiB)")
    p.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port while running")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: the CPUs this process may use)")
    p.add_argument("--device", default="cpu", help="torch device for the model and the cache (default cpu)")
    lw = p.add_mutually_exclusive_group()
    lw.add_argument("--layerwise", action="store_true", help="load the prefix layer by layer while the forward "
                    "runs (the default on a GPU)")
    lw.add_argument("--no-layerwise", action="store_true", help="load the whole prefix before the forward pass "
                    "(the default on a CPU)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return p


class Progress:
    """A one-line progress bar on stderr."""

    def __init__(self, total: int, enabled: bool, width: int = 28) -> None:
        self.total, self.enabled, self.width = total, enabled, width
        self.tty = enabled and sys.stderr.isatty()
        self.start = time.perf_counter()

    def update(self, done: int, note: str = "") -> None:
        if not self.enabled:
            return
        filled = int(self.width * done / max(self.total, 1))
        line = (f"[{'#' * filled}{'.' * (self.width - filled)}] {done}/{self.total} "
                f"{time.perf_counter() - self.start:5.1f}s {note}")
        if self.tty:
            sys.stderr.write("\r" + line.ljust(100)[:100])
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def close(self) -> None:
        if self.tty:
            sys.stderr.write("\n")
            sys.stderr.flush()


def _builtin_model(args: argparse.Namespace, torch: Any) -> tuple[Any, Any, dict]:
    from transformers import AutoModelForCausalLM, LlamaConfig

    from tiercache.tools.tokenizer import ByteTokenizer

    tok = ByteTokenizer()
    if args.hidden % 64:
        raise ValueError(f"--hidden: expected a multiple of 64 (head_dim 64), got {args.hidden}")
    heads = args.hidden // 64
    kv_heads = 2 if heads % 2 == 0 else 1
    cfg = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3,
                      num_hidden_layers=args.layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      max_position_embeddings=16384, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, tie_word_embeddings=True)
    torch.manual_seed(args.seed)
    dtype = torch.bfloat16 if args.dtype == "auto" else getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    desc = {"name": f"builtin-llama-L{args.layers}-h{args.hidden}", "random_init": True, "layers": args.layers,
            "hidden": args.hidden, "heads": heads, "kv_heads": kv_heads,
            "params": sum(p.numel() for p in model.parameters())}
    return model, tok, desc


def _local_model(args: argparse.Namespace, torch: Any) -> tuple[Any, Any, dict]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(args.model)
    if not path.is_dir():
        raise ValueError(f"--model: expected a local checkpoint directory, got {args.model!r}")
    dtype = "auto" if args.dtype == "auto" else getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype)
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    desc = {"name": path.name, "random_init": False, "params": sum(p.numel() for p in model.parameters())}
    return model, tok, desc


def machine_line() -> str:
    """The CPU model and the cores this process may use (and the GPU, if any): what every figure ran on."""
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    import platform

    cpu = cpu or platform.processor() or platform.machine() or "unknown CPU"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    line = f"{cpu}, {cores} cores"
    import torch

    if torch.cuda.is_available():
        line += f", {torch.cuda.get_device_name(0)}"
    return line


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:7.0f} ms"


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def _render(summary: dict) -> str:
    m, w = summary["model"], summary["workload"]
    tiers = [t for t in _TIERS if summary["capacity_bytes_by_tier"].get(t)]
    lines = [
        f"tiercache demo  model {m['name']} ({m['params'] / 1e6:.1f}M params, {summary['dtype']}"
        f"{', random init' if m['random_init'] else ''})  threads {summary['threads']}",
        f"workload: {w['documents']} documents x {w['questions']} questions, ~{w['mean_prompt_tokens']:.0f} "
        f"tokens per prompt, seed {w['seed']}; working set {_mib(summary['working_set_bytes'])}, "
        f"host tier {_mib(summary['host_bytes'])}, disk {summary['disk_path']}",
        "",
        f"{'req':>3} {'doc':>3} {'q':>2} {'prompt':>6}  {'cold TTFT':>10} {'warm TTFT':>10} {'speedup':>7}   "
        "reused tokens: total "
        + " ".join(f"{t:>6}" for t in tiers),
    ]
    for r in summary["requests"]:
        lines.append(
            f"{r['index'] + 1:>3} {r['document']:>3} {r['question']:>2} {r['prompt_tokens']:>6}  "
            f"{_ms(r['cold_ttft_s']):>10} {_ms(r['warm_ttft_s']):>10} {r['speedup']:>6.1f}x   {r['reused_tokens']:>19} "
            + " ".join(f"{r['reused_by_tier'].get(t, 0):>6}" for t in tiers))
    lines += [
        f"{'all':>3} {'':>3} {'':>2} {summary['prompt_tokens']:>6}  {summary['cold_ttft_s']:>8.2f} s "
        f"{summary['warm_ttft_s']:>8.2f} s {summary['speedup']:>6.1f}x   {summary['reused_tokens']:>19} "
        + " ".join(f"{summary['hit_tokens_by_tier'].get(t, 0):>6}" for t in tiers),
        "",
        f"{'tier':<6} {'hit tokens':>10} {'hit rate':>8} {'loaded':>12} {'stored':>12} {'used / capacity':>22}",
    ]
    for t in tiers:
        lines.append(
            f"{t:<6} {summary['hit_tokens_by_tier'].get(t, 0):>10} {summary['hit_rate_by_tier'].get(t, 0):>8.1%} "
            f"{_mib(summary['loaded_bytes_by_tier'].get(t, 0)):>12} "
            f"{_mib(summary['stored_bytes_by_tier'].get(t, 0)):>12} "
            f"{_mib(summary['used_bytes_by_tier'].get(t, 0)) + ' / ' + _mib(summary['capacity_bytes_by_tier'][t]):>22}")
    n = len(summary["requests"])
    lines += [
        f"{'total':<6} {summary['hit_tokens']:>10} {summary['hit_rate']:>8.1%}   (hit rate: tokens served / "
        f"{summary['lookup_tokens']} prompt tokens looked up)",
        "",
        f"speedup {summary['speedup']:.2f}x (total cold TTFT / total warm TTFT over the same {n} requests)   "
        f"disk compression {summary['disk_compression_ratio']:.2f}x"
        + (f" ({summary['disk_codec']})" if summary.get("disk_codec") else "") + "   first tokens equal "
        f"{summary['first_tokens_equal']}/{n}",
        f"KV time {summary['kv_time_s'] * 1e3:.0f} ms of the {summary['warm_ttft_s']:.2f} s warm TTFT (lookup + "
        f"load before the forward; of it, KV stall {summary['kv_wait_s'] * 1e3:.0f} ms waiting on layers "
        f"mid-forward)   ran in {summary['elapsed_s']:.1f} s on {summary['machine']}",
    ]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict:
    import torch
    import transformers

    from tiercache import CacheConfig, TierCache
    from tiercache.integrations.hf import FirstTokenClock, TierCachedLM, layout_for_model, with_clock
    from tiercache.tools.workload import make_rag_workload

    transformers.logging.set_verbosity_error()
    threads = args.threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                               else os.cpu_count() or 1)
    torch.set_num_threads(threads)
    preset = PRESETS["full" if args.full else DEFAULT_PRESET]
    model, tok, desc = (_local_model if args.model else _builtin_model)(args, torch)
    model = model.to(args.device).eval()
    sizes = {"seed": args.seed, "num_documents": args.documents or preset.documents,
             "questions_per_document": args.questions or preset.questions,
             "document_tokens": args.doc_tokens or preset.document_tokens,
             "system_tokens": args.system_tokens or preset.system_tokens}
    if args.model:  # the checkpoint's own tokenizer; segments are encoded without special tokens
        workload = make_rag_workload(**sizes, encode=lambda text: tok.encode(text, add_special_tokens=False),
                                     bos_id=tok.bos_token_id)
    else:
        workload = make_rag_workload(**sizes)
    layout = layout_for_model(model, block_size=args.block_size)
    token_bytes = layout.block_bytes // layout.block_size
    working_set = (workload.unique_prefix_tokens // layout.block_size) * layout.block_bytes
    host_bytes = args.host_bytes if args.host_bytes is not None else max(int(working_set * 0.4), layout.block_bytes)
    tmp = None if args.disk_path else tempfile.TemporaryDirectory(prefix="tiercache-demo-")
    disk_path = args.disk_path or tmp.name
    cfg = CacheConfig(layout=layout, model_id=desc["name"], device=args.device, device_bytes=0,
                      host_bytes=host_bytes, disk_path=disk_path, disk_bytes=args.disk_bytes,
                      metrics_port=args.metrics_port)
    if args.metrics_port is not None:
        print(f"serving Prometheus metrics on http://localhost:{args.metrics_port}/metrics", file=sys.stderr)
    t_start = time.perf_counter()
    rows = []
    try:
        with TierCache(cfg) as cache:
            layerwise = False if args.no_layerwise else (True if args.layerwise else None)
            lm = TierCachedLM(model, cache, layerwise=layerwise)
            progress = Progress(len(workload.requests), enabled=not args.no_progress)
            progress.update(0, "warming up")
            gen = {"max_new_tokens": 1, "do_sample": False}
            # one untimed full-length prefill: kernel selection and allocator growth are not part of any TTFT
            warm_ids = torch.tensor([workload.requests[0].token_ids], device=args.device)
            model.generate(warm_ids, attention_mask=torch.ones_like(warm_ids), **gen)

            def cold_run(ids: Any) -> tuple[Any, float]:
                clock = FirstTokenClock()
                out = model.generate(ids, attention_mask=torch.ones_like(ids), **with_clock(gen, clock))
                return out, clock.seconds

            def warm_run(ids: Any) -> tuple[Any, float]:
                out = lm.generate(ids, **gen)
                return out, lm.last_ttft_seconds

            for r in workload.requests:
                ids = torch.tensor([r.token_ids], device=args.device)
                # alternate which run goes first, so neither profits from the other's warm CPU caches
                if r.index % 2 == 0:
                    (cold_out, cold), (warm_out, warm) = cold_run(ids), warm_run(ids)
                else:
                    (warm_out, warm), (cold_out, cold) = warm_run(ids), cold_run(ids)
                rows.append({
                    "index": r.index, "document": r.document, "question": r.question, "prompt_tokens": r.num_tokens,
                    "cold_ttft_s": cold, "warm_ttft_s": warm, "speedup": cold / warm,
                    "reused_tokens": lm.last_reused_tokens, "reused_by_tier": dict(lm.last_reused_by_tier),
                    "kv_wait_s": lm.last_kv_wait_seconds,
                    "kv_time_s": lm.last_timings["prepare_s"] + lm.last_kv_wait_seconds,
                    "first_token_equal": bool(cold_out[0, -1] == warm_out[0, -1]),
                })
                progress.update(len(rows), f"doc {r.document} cold {cold * 1e3:.0f} ms warm {warm * 1e3:.0f} ms "
                                f"reused {lm.last_reused_tokens}")
            progress.close()
            if hasattr(cache, "flush"):
                cache.flush()  # queued disk writes land, so the disk tier's usage is final
            in_use = cache.stats()  # gauges (bytes used) while the cache is open
        stats = cache.stats()  # counters after close: background disk writes have finished
    finally:
        if tmp is not None:
            tmp.cleanup()
    cold_total = sum(r["cold_ttft_s"] for r in rows)
    warm_total = sum(r["warm_ttft_s"] for r in rows)
    lookup_tokens = stats["lookup_tokens"] or 1
    return {
        "model": desc, "dtype": str(layout.dtype).removeprefix("torch."), "threads": threads,
        "device": str(args.device), "layerwise": lm.layerwise, "block_size": layout.block_size,
        "workload": {"seed": args.seed, "documents": len(workload.documents),
                     "questions": len(workload.questions[0]), "requests": len(rows),
                     "mean_prompt_tokens": workload.total_prompt_tokens / len(rows)},
        "kv_bytes_per_token": token_bytes, "working_set_bytes": working_set, "host_bytes": cfg.host_bytes,
        "disk_path": args.disk_path or "(temporary)",
        "requests": rows,
        "prompt_tokens": workload.total_prompt_tokens,
        "cold_ttft_s": cold_total, "warm_ttft_s": warm_total,
        "speedup": cold_total / warm_total if warm_total else 0.0,
        "reused_tokens": sum(r["reused_tokens"] for r in rows),
        "hit_tokens": stats["hit_tokens_total"], "hit_rate": stats["hit_rate"],
        "hit_tokens_by_tier": dict(stats["hit_tokens"]),
        "hit_rate_by_tier": {t: n / lookup_tokens for t, n in stats["hit_tokens"].items()},
        "hit_blocks_by_tier": dict(stats["hits"]),
        "loaded_bytes_by_tier": dict(stats["loaded_bytes"]),
        "stored_bytes_by_tier": dict(stats["stored_bytes"]),
        "used_bytes_by_tier": dict(in_use["used_bytes"]),
        "capacity_bytes_by_tier": dict(stats["capacity_bytes"]),
        "disk_compression_ratio": stats["disk_compression_ratio"],
        # what compression="auto" chose for the demo's store on this machine, and why
        "disk_codec": (stats.get("disk_codec") or {}).get("chosen"),
        "disk_codec_why": (stats.get("disk_codec") or {}).get("why"),
        "kv_wait_s": sum(r["kv_wait_s"] for r in rows),
        "kv_time_s": sum(r["kv_time_s"] for r in rows),
        "lookup_tokens": stats["lookup_tokens"],
        "machine": machine_line(),
        "first_tokens_equal": sum(r["first_token_equal"] for r in rows),
        "elapsed_s": time.perf_counter() - t_start,
    }


def device_problem(device: str) -> str | None:
    """Why torch cannot run on `device` here (one phrase), or None if it can."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        return "expected a torch device such as cpu, cuda or cuda:1"
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = f"torch {torch.__version__} was built without CUDA" if torch.version.cuda is None \
                else "no CUDA GPU is visible"
            return f"CUDA is not available ({build}); use --device cpu"
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            return f"only {torch.cuda.device_count()} CUDA device(s) are visible"
    elif dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        return "MPS is not available; use --device cpu"
    elif dev.type not in ("cpu", "cuda", "mps"):
        return f"device type {dev.type!r} is not supported by the demo; use cpu or cuda"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("layers", "hidden", "documents", "questions", "doc_tokens", "system_tokens", "block_size",
                 "threads"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            parser.error(f"--{name.replace('_', '-')}: expected a positive int, got {value}")
    if args.dtype not in ("auto", "bfloat16", "float16", "float32"):
        parser.error(f"--dtype: expected one of auto, bfloat16, float16, float32, got {args.dtype!r}")
    if args.full and args.quick:
        parser.error("--full and --quick: choose one (the default is the quick workload)")
    try:
        import transformers  # noqa: F401  (the optional extra the demo's model needs)
    except ModuleNotFoundError as e:
        from tiercache.cli import missing_extra_message

        print(missing_extra_message("tiercache demo", e) or f"tiercache demo: error: {e}", file=sys.stderr)
        return 2
    problem = device_problem(args.device)
    if problem:
        print(f"tiercache demo: error: --device {args.device}: {problem}", file=sys.stderr)
        return 2
    try:
        summary = run(args)
    except (ValueError, OSError) as e:
        print(f"tiercache demo: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(summary))
    else:
        print(_render(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
