"""End to end: the demo's RAG workload through the transformers integration, TTFT per tier against the ideal.

Model and workload are the demo's (`tiercache demo`): its built-in Llama-architecture model,
randomly initialised from a config (8 layers, hidden 512, bf16; `tiny`: 2 layers, hidden 128), and
its seeded RAG workload (system prompt + one of several documents + a question); quick mode uses
the demo's default workload, --full the demo's --full one.

Each document's prefix (system + document) is stored once through `TierCachedLM` (the full blocks
of the prefix only, never a question's), then copied into a second, disk-only cache. Every request
(a new question on a cached document) is then measured, probes in a rotating order:

- no cache: `model.generate` on the whole prompt (full prefill);
- ideal: the prefill of only the uncached suffix, timed with the prefix KV already in a
  transformers `DynamicCache` (filled outside the clock), plus a measured memcpy of the bytes a
  load brings (one `copy_` between preallocated buffers);
- warm from each tier, with `TierCachedLM.generate` (`store=False`) in both loading modes
  (layer-wise, the default when the cache offers it, and whole prefix): host (a host-only
  cache), disk with the page cache dropped (the disk-only cache is closed, its files are evicted,
  the cache is reopened outside the clock), and disk warm (the same request again right after);
  the disk rows twice: the default codec (`compression="auto"`, whose choice is reported) and
  `compression="none"`, so that what decoding costs a request is measured, not guessed.

TTFT is the integration's own: call start to the first logits (lookup and load included); the
ratio per request is warm TTFT / ideal, reported as the median (min-max) over requests.
"""

from __future__ import annotations

import os
import shutil
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from tiercache.config import CacheConfig
from tiercache.tiers.frame_files import store_files
from tiercache.tools.bench.protocol import BenchConfig, drop_from_page_cache, resident_fraction, summary

VLLM_ROW = ("not measured in this section (transformers): vLLM runs in its own venv; `tiercache bench --vllm PYTHON` "
            "adds its TTFT section (tiercache, vLLM's own prefix cache, ExampleConnector)")
TINY = {"layers": 2, "hidden": 128, "documents": 2, "questions": 2, "document_tokens": 160, "system_tokens": 48}
DISKS = {"auto": "disk", "none": "disk, compression none"}  # the disk-only caches: compression -> row prefix
TIERS = ("host", *(f"{p}, page cache {t}" for p in DISKS.values() for t in ("dropped", "warm")))


def e2e_sizes(size: str) -> dict:
    """Model and workload sizes: the demo's default workload (`quick`), its --full one (`full`), or `tiny`."""
    from tiercache.tools import demo

    if size == "tiny":
        return dict(TINY)
    p = demo.PRESETS[size]
    defaults = demo.build_parser().parse_args([])
    return {"layers": defaults.layers, "hidden": defaults.hidden, "documents": p.documents,
            "questions": p.questions, "document_tokens": p.document_tokens, "system_tokens": p.system_tokens}


def _build(cfg: BenchConfig, sizes: dict) -> tuple[Any, Any, dict, Any]:
    """The demo's built-in model (random init from a config) and its RAG workload."""
    from tiercache.integrations.hf import layout_for_model
    from tiercache.tools import demo
    from tiercache.tools.workload import make_rag_workload

    args = demo.build_parser().parse_args(["--seed", str(cfg.seed), "--layers", str(sizes["layers"]),
                                           "--hidden", str(sizes["hidden"])])
    model, _tok, desc = demo._builtin_model(args, torch)
    model.eval()
    workload = make_rag_workload(seed=cfg.seed, num_documents=sizes["documents"],
                                 questions_per_document=sizes["questions"],
                                 document_tokens=sizes["document_tokens"], system_tokens=sizes["system_tokens"])
    return model, workload, desc, layout_for_model(model, block_size=args.block_size)


class _Run:
    """One end-to-end measurement: the caches, the probes of a request, and the samples they record."""

    def __init__(self, cfg: BenchConfig, workdir: str) -> None:
        from tiercache.integrations.hf import TierCachedLM
        from tiercache.manager import TierCache

        self.cfg = cfg
        self.sizes = e2e_sizes(cfg.e2e)
        self.model, self.workload, self.desc, layout = _build(cfg, self.sizes)
        self.layout = layout
        self.token_bytes = layout.block_bytes // layout.block_size
        working_set = (self.workload.unique_prefix_tokens // layout.block_size + len(self.workload.documents)) \
            * layout.block_bytes
        self.paths = {c: os.path.join(workdir, f"e2e-lmdb-{c}") for c in DISKS}
        self.disk_cfgs = {c: CacheConfig(layout=layout, model_id=self.desc["name"], host_bytes=0, disk_path=path,
                                         disk_bytes=4 * working_set + (64 << 20), compression=c)
                          for c, path in self.paths.items()}
        for path in self.paths.values():
            shutil.rmtree(path, ignore_errors=True)
        self.host = TierCache(CacheConfig(layout=layout, model_id=self.desc["name"], host_bytes=2 * working_set))
        self.disks: dict[str, Any] = {}
        self.disk_codec: str | None = None  # what compression="auto" chose for these blocks here
        self.gen = {"max_new_tokens": 1, "do_sample": False}
        self.default_mode = "layer-wise" if TierCachedLM(self.model, self.host, store=False).layerwise \
            else "whole prefix"
        self.modes = {"layer-wise": True, "whole prefix": False} if hasattr(self.host, "load_layers") \
            else {"whole prefix": False}
        self.whole = TierCachedLM(self.model, self.host, store=False, layerwise=False)
        self.host_lms = {m: TierCachedLM(self.model, self.host, store=False, layerwise=lw)
                         for m, lw in self.modes.items()}
        most = max(r.prefix_tokens for r in self.workload.requests) * self.token_bytes
        self.mem_src, self.mem_dst = torch.ones(most, dtype=torch.uint8), torch.zeros(most, dtype=torch.uint8)
        self.verified = True
        self.measuring = False
        self.samples: dict[str, list[float]] = {}
        self.kv_wait: dict[str, list[float]] = {}
        self.resident: list[float] = []
        self.reused: list[int] = []
        self.loaded_bytes: list[int] = []
        self.first_equal = {"cold": 0, "ideal": 0}

    def close(self) -> None:
        for disk in self.disks.values():
            disk.close()
        self.host.close()
        for path in self.paths.values():
            shutil.rmtree(path, ignore_errors=True)

    def populate(self) -> None:
        """Store each document's prefix through the integration, copy it to the disk-only caches, compare bytes."""
        from tiercache.integrations.hf import TierCachedLM
        from tiercache.manager import TierCache

        B = self.layout.block_size
        firsts: dict[int, Any] = {}
        for r in self.workload.requests:
            firsts.setdefault(r.document, r)
        writer = TierCachedLM(self.model, self.host)
        prefixes = []
        for r in firsts.values():
            writer.generate(torch.tensor([r.token_ids[:r.prefix_tokens]]), **self.gen)  # stores its full blocks
            prefixes.append(torch.tensor(r.token_ids[:r.prefix_tokens // B * B]))
        for codec, cfg in self.disk_cfgs.items():
            with TierCache(cfg) as disk:
                for full in prefixes:
                    disk.store(full, self.host.load(full))
                disk.flush()
                for full in prefixes:
                    a, b = self.host.load(full), disk.load(full)
                    self.verified &= a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))
                if codec == "auto":
                    self.disk_codec = disk.stats().get("disk_codec", {}).get("chosen")

    def record(self, row: str, seconds: float) -> None:
        if self.measuring:
            self.samples.setdefault(row, []).append(seconds)

    def clock_generate(self, ids: torch.Tensor, **kw: Any) -> tuple[torch.Tensor, float]:
        from tiercache.integrations.hf import FirstTokenClock, with_clock

        clock = FirstTokenClock()
        out = self.model.generate(ids, attention_mask=torch.ones_like(ids), **with_clock({**self.gen, **kw}, clock))
        return out, clock.seconds

    def reopen_cold(self, codec: str) -> Any:
        """Close a disk-only cache, evict its files from the page cache, reopen (all outside any clock)."""
        from tiercache.manager import TierCache

        if codec in self.disks:
            self.disks.pop(codec).close()
        files = store_files(self.paths[codec])
        drop_from_page_cache(files, self.cfg.drop_caches)
        self.disks[codec] = TierCache(self.disk_cfgs[codec])
        fracs = [resident_fraction(p) for p in files]
        if self.measuring and None not in fracs:
            self.resident.append(max(fracs))
        return self.disks[codec]

    def request(self, r: Any) -> None:
        """Every probe of one request, in an order rotated by the request's index."""
        from tiercache.integrations.hf import TierCachedLM

        ids = torch.tensor([r.token_ids])
        tokens = ids[0]
        expect = self.host.lookup(tokens)  # the cached prefix; the disk cache holds the same blocks
        firsts: dict[str, int] = {}
        warm_firsts: list[int] = []

        def warm(lm: Any, row: str, tier: str) -> None:
            got = lm.generate(ids, **self.gen)
            by_tier = {t: n for t, n in lm.last_reused_by_tier.items() if n}
            self.verified &= by_tier == {tier: expect} and lm.last_loaded_tokens == expect
            warm_firsts.append(int(got[0, -1]))
            self.record(row, lm.last_ttft_seconds)
            if self.measuring:
                self.kv_wait.setdefault(row, []).append(lm.last_kv_wait_seconds)

        def cold() -> None:
            got, seconds = self.clock_generate(ids)
            firsts["cold"] = int(got[0, -1])
            self.record("no cache (full prefill)", seconds)

        def ideal() -> None:
            from tiercache.integrations.hf import cache_kwargs

            pkv, usable, loaded = self.whole._prefix_cache(tokens, 1)  # the prefix KV in a DynamicCache, unclocked
            got, prefill = self.clock_generate(ids, **cache_kwargs(pkv))
            nb = loaded * self.token_bytes
            self.mem_dst[:nb].zero_()
            t0 = time.perf_counter()
            self.mem_dst[:nb].copy_(self.mem_src[:nb])
            memcpy = time.perf_counter() - t0
            firsts["ideal"] = int(got[0, -1])
            if self.measuring:
                self.reused.append(usable)
                self.loaded_bytes.append(nb)
            self.record("ideal: suffix prefill", prefill)
            self.record("ideal: memcpy", memcpy)
            self.record("ideal", prefill + memcpy)

        def host(mode: str) -> Callable[[], None]:
            return lambda: warm(self.host_lms[mode], f"host, {mode}", "host")

        def disk(mode: str, codec: str) -> Callable[[], None]:
            def run() -> None:
                lm = TierCachedLM(self.model, self.reopen_cold(codec), store=False, layerwise=self.modes[mode])
                warm(lm, f"{DISKS[codec]}, page cache dropped, {mode}", "disk")
                warm(lm, f"{DISKS[codec]}, page cache warm, {mode}", "disk")  # the same request again
            return run

        probes = [cold, ideal, *(host(m) for m in self.modes), *(disk(m, c) for c in DISKS for m in self.modes)]
        k = r.index % len(probes)
        for probe in probes[k:] + probes[:k]:
            probe()
        if self.measuring:
            for ref in ("cold", "ideal"):
                self.first_equal[ref] += all(t == firsts[ref] for t in warm_firsts)

    def rows(self) -> list[dict]:
        ms = [s * 1e3 for s in self.samples["ideal"]]
        cold, ideal = self.samples["no cache (full prefill)"], self.samples["ideal"]
        rows = [{"row": "no cache (full prefill)", "ttft_ms": summary([s * 1e3 for s in cold])},
                {"row": "ideal: suffix prefill + memcpy", "ttft_ms": summary(ms),
                 "prefill_ms": summary([s * 1e3 for s in self.samples["ideal: suffix prefill"]]),
                 "memcpy_ms": summary([s * 1e3 for s in self.samples["ideal: memcpy"]])}]
        for tier in TIERS:
            for mode in self.modes:
                name = f"{tier}, {mode}"
                warm = self.samples[name]
                rows.append({"row": name, "tier": tier, "mode": mode, "default": mode == self.default_mode,
                             "ttft_ms": summary([s * 1e3 for s in warm]),
                             "ratio": summary([w / i for w, i in zip(warm, ideal)]),
                             "speedup": statistics.median(c / w for c, w in zip(cold, warm)),
                             "kv_wait_ms": statistics.median(self.kv_wait[name]) * 1e3})
        return rows


def measure_e2e(cfg: BenchConfig, workdir: str, log: Callable[[str], None]) -> dict:
    import transformers

    transformers.logging.set_verbosity_error()
    run = _Run(cfg, workdir)
    w = run.workload
    n = len(w.requests)
    log(f"e2e: {run.desc['name']}, {n} requests, ~{w.total_prompt_tokens // n} tokens each")
    try:
        run.populate()
        for _ in range(max(cfg.warmup, 1)):  # kernel selection, allocator growth, first touch of the buffers
            run.request(w.requests[0])
        run.measuring = True
        for i, r in enumerate(w.requests):
            log(f"e2e: request {i + 1}/{n}")
            run.request(r)
    finally:
        run.close()
    return {"model": run.desc, "layout": run.layout.fingerprint(), "threads": torch.get_num_threads(),
            "size": cfg.e2e,
            "workload": {"documents": len(w.documents), "questions": run.sizes["questions"], "requests": n,
                         "prompt_tokens_median": statistics.median(r.num_tokens for r in w.requests),
                         "reused_tokens_median": statistics.median(run.reused),
                         "loaded_bytes_median": statistics.median(run.loaded_bytes),
                         "document_tokens": run.sizes["document_tokens"],
                         "system_tokens": run.sizes["system_tokens"]},
            "default_mode": run.default_mode, "rows": run.rows(), "verified": bool(run.verified),
            "disk_codec": run.disk_codec,
            "first_tokens_equal_cold": run.first_equal["cold"], "first_tokens_equal_ideal": run.first_equal["ideal"],
            "cold_resident": max(run.resident) if run.resident else None, "vllm": VLLM_ROW}
