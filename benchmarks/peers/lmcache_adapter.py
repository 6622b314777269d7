"""LMCache (0.5.x) as a peer: its CPU tier (LocalCPUBackend) and disk tier (LocalDiskBackend,
buffered and O_DIRECT), driven through LMCacheEngine.store / retrieve as vLLM's connector does.

LMCache's MockGPUConnector moves no bytes, so `CopyConnector` below copies between the source
tensor [layers, 2, tokens, heads, head_dim] and LMCache's memory objects ([2, layers, tokens,
heads * head_dim]) — the work its GPU connector does on a GPU. Disk writes are asynchronous:
the store clock stops only when `lookup` sees every chunk on disk.

Lookup rows: `LMCacheEngine.lookup(tokens)` of the round's cached sequence (its chunk hashing
included, as tiercache's lookup includes its own), timed right after a load like tiercache's
"lookup, <tier> hit" rows, then the same call again; µs per 256-token chunk. The call is the
engine's default (no pinning, search over the engine's own backends). Runs in benchmarks/.venvs/lmcache.
"""

from __future__ import annotations

import os
import shutil
import time

import torch
from _common import (
    Bounds,
    Rows,
    drop_from_page_cache,
    emit,
    files_under,
    load_source,
    main_guard,
    read_spec,
    token_ids,
)


def make_connector(layers: int, heads: int, head_dim: int):
    from lmcache.v1.gpu_connector.mock_gpu_connector import MockGPUConnector

    class CopyConnector(MockGPUConnector):
        def from_gpu(self, memory_obj, start: int, end: int, **kwargs) -> None:
            dst = memory_obj.tensor.view(2, layers, end - start, heads, head_dim)
            dst.copy_(kwargs["kvcaches"][:, :, start:end].transpose(0, 1))

        def to_gpu(self, memory_obj, start: int, end: int, **kwargs) -> None:
            src = memory_obj.tensor.view(2, layers, end - start, heads, head_dim)
            kwargs["kvcaches"][:, :, start:end].copy_(src.transpose(0, 1))

        def batched_from_gpu(self, memory_objs, starts, ends, **kwargs) -> None:
            for m, s, e in zip(memory_objs, starts, ends):
                self.from_gpu(m, s, e, **kwargs)

        def batched_to_gpu(self, memory_objs, starts, ends, **kwargs) -> None:
            for m, s, e in zip(memory_objs, starts, ends):
                self.to_gpu(m, s, e, **kwargs)

    return CopyConnector


def main() -> None:
    import lmcache
    from lmcache.v1.cache_engine import LMCacheEngineBuilder
    from lmcache.v1.config import LMCacheEngineConfig
    from lmcache.v1.metadata import LMCacheMetadata

    spec = read_spec()
    src = load_source(spec)
    dst = torch.empty_like(src)
    L, _, T, H, D = src.shape
    B = spec["chunk_tokens"]
    nbytes = src.numel() * src.element_size()
    gib = nbytes / 2**30
    bounds = Bounds(spec, src, dst)
    rows = Rows(bounds)
    connector = make_connector(L, H, D)((L, 2, B, H, D))
    metadata = LMCacheMetadata(model_name="tiercache-bench", world_size=1, local_world_size=1, worker_id=0,
                               local_worker_id=0, kv_dtype=torch.bfloat16, kv_shape=(L, 2, B, H, D), use_mla=False,
                               role="worker", chunk_size=B)

    def engine(name: str, **config):
        cfg = LMCacheEngineConfig.from_defaults(chunk_size=B, lmcache_instance_id=name, **config)
        eng = LMCacheEngineBuilder.get_or_create(name, cfg, metadata, connector, lambda t, r: None,
                                                 lambda o, r: o)
        eng.post_init()
        return eng

    def loaded(got: torch.Tensor) -> bool:
        return bool(int(got.sum()) == T) & bounds.loaded()

    def lookups(eng, tokens: torch.Tensor, label: str, tier: str) -> None:
        # as tiercache's lookup rows: first call right after a load, then the same call again
        for suffix in ("", " (repeated)"):
            rows.lookup(f"{label} lookup{suffix}", f"lookup, {tier} hit{suffix}", lambda: eng.lookup(tokens),
                        T // B, lambda got: got == T)

    # the CPU tier: room for two rounds' chunks, so a round evicts the one before it
    cpu = engine("bench-cpu", local_cpu=True, max_local_cpu_size=2 * gib + 0.1)

    def cpu_round(r: int) -> None:
        tokens = torch.from_numpy(token_ids(spec["seed"], T, salt=5000 + r))
        rows.pair("LMCache LocalCPUBackend store", "memcpy store", lambda: cpu.store(tokens, kvcaches=src),
                  lambda _: cpu.lookup(tokens) == T)
        rows.pair("LMCache LocalCPUBackend load", "memcpy load", lambda: cpu.retrieve(tokens, kvcaches=dst), loaded)
        lookups(cpu, tokens, "LMCache LocalCPUBackend", "host")

    rows.run(spec, cpu_round)
    LMCacheEngineBuilder.destroy("bench-cpu")

    for mode, odirect in (("buffered", False), ("O_DIRECT", True)):
        disk_dir = os.path.join(spec["workdir"], f"lmcache-{mode}")
        os.makedirs(disk_dir, exist_ok=True)
        name = f"bench-disk-{'odirect' if odirect else 'buffered'}"
        eng = engine(name, local_cpu=False, max_local_cpu_size=2 * gib + 0.1, local_disk=f"file://{disk_dir}/",
                     max_local_disk_size=(spec["warmup"] + spec["rounds"] + 1) * gib + 0.1,
                     extra_config={"use_odirect": odirect})
        label = f"LMCache LocalDiskBackend ({mode})"

        def disk_round(r: int, eng=eng, label=label, disk_dir=disk_dir) -> None:
            tokens = torch.from_numpy(token_ids(spec["seed"], T, salt=6000 + r))

            def store() -> int:
                eng.store(tokens, kvcaches=src)
                deadline = time.monotonic() + 600
                while eng.lookup(tokens, search_range=["LocalDiskBackend"]) < T and time.monotonic() < deadline:
                    time.sleep(0.001)  # writes are asynchronous and LMCache offers no completion handle
                return eng.lookup(tokens, search_range=["LocalDiskBackend"])

            rows.pair(f"{label} store", "raw file write", store, lambda got: got == T)
            drop_from_page_cache(files_under(disk_dir) + [bounds.path], spec["drop_caches"])
            rows.pair(f"{label} load, cold", "raw file read, cold", lambda: eng.retrieve(tokens, kvcaches=dst), loaded)
            rows.pair(f"{label} load, warm", "raw file read, warm", lambda: eng.retrieve(tokens, kvcaches=dst), loaded)
            lookups(eng, tokens, label, "disk")

        rows.run(spec, disk_round)
        LMCacheEngineBuilder.destroy(name)
        shutil.rmtree(disk_dir, ignore_errors=True)
    emit(f"lmcache {lmcache.__version__ if hasattr(lmcache, '__version__') else '?'}", rows)


if __name__ == "__main__":
    main_guard(main)
