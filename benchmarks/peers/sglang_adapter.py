"""SGLang (0.5.x) as a peer: its HiCacheFile storage tier (hierarchical cache L3, one file per page),
used standalone.

Keys are SGLang's own chained page hashes (`get_hash_str`, SHA-256); each 256-token chunk is one
page. `set` writes the chunk's bytes to a file; `get` reads them into a preallocated contiguous
page (SGLang's host pool holds pages like that), and the page is then copied into the destination
tensor, so the bytes end where tiercache's `load(out=...)` puts them. Runs in benchmarks/.venvs/sglang.
"""

from __future__ import annotations

import os
import shutil

import torch
from _common import (
    Bounds,
    Rows,
    chunk,
    chunks,
    drop_from_page_cache,
    emit,
    files_under,
    load_source,
    main_guard,
    read_spec,
    token_ids,
)


def main() -> None:
    from importlib.metadata import version

    from sglang.srt.mem_cache.hicache_storage import HiCacheFile, HiCacheStorageConfig
    from sglang.srt.mem_cache.utils import get_hash_str

    spec = read_spec()
    src = load_source(spec)
    dst = torch.empty_like(src)
    n, B = chunks(spec), spec["chunk_tokens"]
    pages = torch.empty((n, *chunk(src, 0, B).shape), dtype=src.dtype)
    pages.zero_()
    bounds = Bounds(spec, src, dst)
    rows = Rows(bounds)
    path = os.path.join(spec["workdir"], "hicache")
    cfg = HiCacheStorageConfig(tp_rank=0, tp_size=1, pp_rank=0, pp_size=1, attn_cp_rank=0, attn_cp_size=1,
                               is_mla_model=False, enable_storage_metrics=False, is_page_first_layout=False,
                               model_name="tiercache-bench", extra_config={"file_storage_path": path})

    def loaded(got: list) -> bool:
        return all(g is not None for g in got) & bounds.loaded()

    def one_round(r: int) -> None:
        shutil.rmtree(path, ignore_errors=True)
        store = HiCacheFile(cfg, file_path=path)
        tokens = token_ids(spec["seed"], src.shape[2], salt=7000 + r).tolist()

        def put() -> bool:
            keys = get_hash_str(tokens, None, page_size=B)
            return all(store.set(k, value=chunk(src, c, B)) for c, k in enumerate(keys))

        def get() -> list:
            keys = get_hash_str(tokens, None, page_size=B)
            got = []
            for c, k in enumerate(keys):
                got.append(store.get(k, target_location=pages[c]))
                chunk(dst, c, B).copy_(pages[c])
            return got

        rows.pair("SGLang HiCacheFile store", "raw file write", put, bool)
        drop_from_page_cache(files_under(path) + [bounds.path], spec["drop_caches"])
        rows.pair("SGLang HiCacheFile load, cold", "raw file read, cold", get, loaded)
        rows.pair("SGLang HiCacheFile load, warm", "raw file read, warm", get, loaded)
        shutil.rmtree(path, ignore_errors=True)

    rows.run(spec, one_round)
    emit(f"sglang {version('sglang')}", rows)


if __name__ == "__main__":
    main_guard(main)
