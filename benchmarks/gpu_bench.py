"""The GPU data path, measured in one short run (< 3 minutes on a GPU), every goal as a same-run ratio.

    python benchmarks/gpu_bench.py        # on a CUDA machine: benchmarks/results/<date>-<gpu>-gpu-data-path.md
    python benchmarks/gpu_bench.py --cpu  # smoke mode: tiny sizes on the CPU, checks that it runs;
                                          # its numbers are not GPU figures (written to /tmp by default)

Rows (issue 10's goals):
1. Transfer engine H2D and D2H GB/s next to a bare pinned `copy_` of the same bytes (goal >= 0.9x).
2. Triton gather/scatter (flash layout, all layers one launch) next to the torch path that uses
   `index_select`/`index_copy_` per layer and plane (goal >= 1x); a raw per-layer `index_select` of the
   pages (no layout change) is listed as the bound.
3. A layer-wise load (one high-priority H2D job per layer, compute waiting per layer on the device)
   overlapped with compute, against the same compute alone (goal <= 1.1x).
4. The cache's own host<->device path (scattered slots gathered through the pinned staging pool,
   `tiercache.pinned.host_to_device` / `device_to_host`) next to the bare pinned `copy_` of row 1.
Every transfer is checked bit-exact after timing; the exit status is 1 if one was not.
"""

from __future__ import annotations

import argparse
import datetime
import math
import platform
import re
import statistics
import sys
import time

import tiercache_kernels as tk
import torch

from tiercache.pinned import HostBuffer, StagingPool, device_to_host, host_to_device
from tiercache.transfer import TransferEngine


class Clock:
    """Median seconds of `reps` runs: CUDA events on the current stream on a GPU, host time on the CPU."""

    def __init__(self, cuda: bool, reps: int, warmup: int = 2) -> None:
        self.cuda, self.reps, self.warmup = cuda, reps, warmup

    def __call__(self, fn) -> float:
        for _ in range(self.warmup):
            fn()
        self.sync()
        times = []
        for _ in range(self.reps):
            if self.cuda:
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                b.synchronize()
                times.append(a.elapsed_time(b) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
        return statistics.median(times)

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


def sizes(cpu: bool) -> dict:
    if cpu:
        return dict(copy_bytes=8 << 20, layers=2, blocks=64, pick=24, bs=16, heads=2, dim=64,
                    lw_layers=4, lw_layer_bytes=1 << 20, matmul=128, reps=3, staged_row_bytes=64 << 10)
    return dict(copy_bytes=1 << 30, layers=32, blocks=4096, pick=1024, bs=16, heads=8, dim=128,
                lw_layers=8, lw_layer_bytes=64 << 20, matmul=4096, reps=10, staged_row_bytes=2 << 20)


def bench_copies(dev, eng, clock, s, rows, ok) -> None:
    n = s["copy_bytes"]
    with HostBuffer(n, pin=True) as host:
        host.tensor.copy_(torch.randint(0, 256, (n,), dtype=torch.uint8))
        dst = torch.empty(n, dtype=torch.uint8, device=dev)
        back = HostBuffer(n, pin=True)
        for name, d, src in (("H2D", dst, host.tensor), ("D2H", back.tensor, dst)):
            bare = clock(lambda d=d, src=src: d.copy_(src, non_blocking=True))
            whole = clock(lambda d=d, src=src: eng.copy([(d, src)]).wait())
            chunk = n // 256  # 256 block-sized pairs, as a plan of blocks would be
            pairs = [(d[i * chunk:(i + 1) * chunk], src[i * chunk:(i + 1) * chunk]) for i in range(256)]
            blocks = clock(lambda pairs=pairs: eng.copy(pairs).wait())
            rows.append((f"{name} bare pinned copy_", n, bare, None, ""))
            rows.append((f"{name} engine, one job", n, whole, bare / whole, ">= 0.9x"))
            rows.append((f"{name} engine, 256 block pairs", n, blocks, bare / blocks, ">= 0.9x"))
        ok.append(torch.equal(back.tensor, host.tensor))
        back.close()


def bench_staged(dev, clock, s, rows, ok) -> None:
    """What load/store do between a host slab and the device: slots picked in random order, staged through
    pooled pinned buffers (16 MiB, 4 of them), copied asynchronously chunk by chunk."""
    n, row = s["copy_bytes"], s["staged_row_bytes"]
    slots = n // row
    with HostBuffer(((slots, row), torch.uint8), pin=True) as slab, StagingPool(16 << 20, count=4) as pool:
        slab.tensor.copy_(torch.randint(0, 256, (slots, row), dtype=torch.uint8))
        ids = torch.randperm(slots, generator=torch.Generator().manual_seed(1))
        dst = torch.empty((slots, row), dtype=torch.uint8, device=dev)
        bare = clock(lambda: dst.copy_(slab.tensor, non_blocking=True))
        up = clock(lambda: host_to_device(pool, slab.tensor, 0, ids, dst))
        clock.sync()
        ok.append(torch.equal(dst.cpu(), slab.tensor.index_select(0, ids)))
        back = torch.empty((slots, row), dtype=torch.uint8)
        with HostBuffer(((slots, row), torch.uint8), pin=True) as pinned_back:
            bare_down = clock(lambda: pinned_back.tensor.copy_(dst, non_blocking=True))
        down = clock(lambda: device_to_host(pool, dst, 0, back, pos=ids))
        ok.append(torch.equal(back, slab.tensor))
        rows.append((f"H2D staged gather of {slots} random slots (the cache's load path)", n, up, bare / up,
                     ">= 0.9x vs bare pinned copy_"))
        rows.append((f"D2H staged scatter into {slots} random slots (the cache's store path)", n, down,
                     bare_down / down, ">= 0.9x vs bare pinned D2H copy_"))


def paged_layers(dev, s, dtype=torch.bfloat16):
    """vLLM FlashAttention layout (LBNHC): [blocks, bs, heads, 2*dim] per layer, seen as [blocks, heads, bs, 2*dim]."""
    shape = (s["blocks"], s["bs"], s["heads"], 2 * s["dim"])
    return [torch.randn(shape, device=dev).to(dtype).transpose(1, 2) for _ in range(s["layers"])]


def bench_kernels(dev, clock, s, rows, ok, triton_ok: bool) -> None:
    layers = paged_layers(dev, s)
    g = torch.Generator().manual_seed(0)
    ids = torch.randperm(s["blocks"] - 1, generator=g)[: s["pick"]] + 1  # host ids, as a connector has them
    ids_dev = ids.to(dev)
    out = torch.empty((s["pick"], s["layers"], *tk.block_shape(layers, "flash")[1:]), dtype=layers[0].dtype,
                      device=dev)
    nbytes = out.numel() * out.element_size()
    raw = clock(lambda: [t.index_select(0, ids_dev) for t in layers])
    ref_g = clock(lambda: tk.gather(layers, ids, "flash", out=out, impl="torch"))
    rows.append(("raw index_select of the pages (bound)", nbytes, raw, None, ""))
    rows.append(("gather, torch index_select path", nbytes, ref_g, None, ""))
    ref_out = out.clone()
    ref_s = clock(lambda: tk.scatter(ref_out, layers, ids, "flash", impl="torch"))
    rows.append(("scatter, torch index_copy_ path", nbytes, ref_s, None, ""))
    if not triton_ok:
        rows.append(("Triton gather/scatter", nbytes, float("nan"), None, "skipped: no Triton path here"))
        return
    tri_g = clock(lambda: tk.gather(layers, ids, "flash", out=out, impl="triton"))
    ok.append(torch.equal(out.view(torch.int16), ref_out.view(torch.int16)))
    tri_s = clock(lambda: tk.scatter(ref_out, layers, ids, "flash", impl="triton"))
    ok.append(torch.equal(tk.gather(layers, ids, "flash", impl="torch").view(torch.int16), ref_out.view(torch.int16)))
    rows.append(("gather, Triton one launch", nbytes, tri_g, ref_g / tri_g, ">= 1x vs torch path"))
    rows.append(("scatter, Triton one launch", nbytes, tri_s, ref_s / tri_s, ">= 1x vs torch path"))


def bench_layerwise(dev, eng, clock, s, rows, ok) -> None:
    n_layers, per = s["lw_layers"], s["lw_layer_bytes"]
    host = HostBuffer(n_layers * per, pin=True)
    host.tensor.copy_(torch.randint(0, 256, (n_layers * per,), dtype=torch.uint8))
    kv = torch.empty(n_layers * per, dtype=torch.uint8, device=dev)
    m = s["matmul"]
    a = torch.randn(m, m, device=dev, dtype=torch.bfloat16 if dev.type == "cuda" else torch.float32)
    one_copy = clock(lambda: kv[:per].copy_(host.tensor[:per], non_blocking=True))
    one_mm = clock(lambda: a @ a)
    reps = max(1, math.ceil(1.5 * one_copy / one_mm))  # each layer's compute ~1.5x its load, as in a prefill

    def compute(i: int) -> None:
        x = a
        for _ in range(reps):
            x = x @ a
        kv[i * per: i * per + 1].add_(0)  # the layer reads its KV (so it must wait for it)

    def alone() -> None:
        for i in range(n_layers):
            compute(i)

    def overlapped() -> None:
        jobs = [eng.submit(lambda i=i: kv[i * per:(i + 1) * per].copy_(host.tensor[i * per:(i + 1) * per],
                                                                      non_blocking=True),
                           "h2d", priority=True, track=False) for i in range(n_layers)]
        for i, job in enumerate(jobs):
            job.wait_stream()
            compute(i)

    t_alone = clock(alone)
    t_load = clock(lambda: [kv[i * per:(i + 1) * per].copy_(host.tensor[i * per:(i + 1) * per], non_blocking=True)
                            for i in range(n_layers)])
    t_both = clock(overlapped)
    clock.sync()
    ok.append(torch.equal(kv.cpu(), host.tensor))
    rows.append((f"compute alone ({n_layers} layers, {reps} matmuls {m}^3 each)", 0, t_alone, None, ""))
    rows.append(("layer loads alone", n_layers * per, t_load, None, ""))
    rows.append(("layer-wise load overlapped with compute", n_layers * per, t_both, t_both / t_alone,
                 "<= 1.1x of compute alone"))
    host.close()


def report(rows, device_name: str, args, ok: list[bool]) -> str:
    lines = [f"# GPU data path: {device_name}", "",
             f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
             f"- command: `python {' '.join(sys.argv)}`",
             f"- torch {torch.__version__}, python {platform.python_version()}, {platform.machine()}",
             f"- all transfers bit-exact: {all(ok)}", ""]
    if args.cpu:
        lines += ["**CPU smoke run: these numbers are not GPU figures; they only show the script runs.**", ""]
    lines += ["| row | bytes | seconds | GB/s | ratio | goal |", "|---|---:|---:|---:|---:|---|"]
    for name, nbytes, sec, ratio, goal in rows:
        gbs = f"{nbytes / sec / 1e9:.2f}" if nbytes and sec == sec and sec > 0 else ""
        lines.append(f"| {name} | {nbytes} | {sec:.6f} | {gbs} | {'' if ratio is None else f'{ratio:.2f}x'} | {goal} |")
    lines += ["", "Ratios: engine rows are bare/engine (>= 0.9x is the goal), Triton rows torch/Triton (>= 1x),",
              "the overlap row overlapped/compute-alone (<= 1.1x)."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cpu", action="store_true", help="smoke mode on the CPU (tiny sizes; not GPU figures)")
    p.add_argument("--out", help="markdown path (default: benchmarks/results/<date>-<device>-gpu-data-path.md)")
    args = p.parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        print("no CUDA device: run with --cpu for the smoke mode", file=sys.stderr)
        return 2
    dev = torch.device("cpu" if args.cpu else "cuda")
    s = sizes(args.cpu)
    clock = Clock(dev.type == "cuda", s["reps"])
    device_name = "CPU smoke" if args.cpu else torch.cuda.get_device_name()
    triton_ok = dev.type == "cuda" and tk._triton_available()
    rows: list = []
    ok: list[bool] = []
    eng = TransferEngine(dev, threads=2)
    try:
        t0 = time.perf_counter()
        bench_copies(dev, eng, clock, s, rows, ok)
        bench_staged(dev, clock, s, rows, ok)
        bench_kernels(dev, clock, s, rows, ok, triton_ok)
        bench_layerwise(dev, eng, clock, s, rows, ok)
        print(f"measured in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    finally:
        eng.close()
    text = report(rows, device_name, args, ok)
    slug = re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-")
    out = args.out or (f"/tmp/gpu-bench-{slug}.md" if args.cpu else
                       f"benchmarks/results/{datetime.date.today():%Y-%m-%d}-{slug}-gpu-data-path.md")
    with open(out, "w") as f:
        f.write(text)
    print(text)
    print(f"written to {out}", file=sys.stderr)
    return 0 if all(ok) else 1


if __name__ == "__main__":
    sys.exit(main())
