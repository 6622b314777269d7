"""File-format baselines per chunk: numpy tofile/fromfile and safetensors save_file/load_file.

Each round writes every chunk to its own file, then reads them back cold (page cache dropped)
and warm, copying each into the destination tensor; every read is checked bit-identical.
Runs in benchmarks/.venvs/baselines when it exists, else in tiercache's own interpreter.
"""

from __future__ import annotations

import os
import shutil
from functools import partial

import numpy as np
import torch
from _common import Bounds, Rows, chunk, chunks, drop_from_page_cache, emit, load_source, main_guard, read_spec


def main() -> None:
    spec = read_spec()
    src = load_source(spec)
    dst = torch.empty_like(src)
    n, B = chunks(spec), spec["chunk_tokens"]
    bounds = Bounds(spec, src, dst)
    rows = Rows(bounds)
    shape = tuple(chunk(src, 0, B).shape)

    def numpy_write(d: str) -> None:
        for c in range(n):
            chunk(src, c, B).view(torch.int16).numpy().tofile(os.path.join(d, f"{c}.bin"))

    def numpy_read(d: str) -> None:
        for c in range(n):
            a = np.fromfile(os.path.join(d, f"{c}.bin"), dtype=np.int16).reshape(shape)
            chunk(dst, c, B).copy_(torch.from_numpy(a).view(torch.bfloat16))

    formats = {"numpy tofile/fromfile": (numpy_write, numpy_read)}
    versions = f"numpy {np.__version__}"
    try:
        import safetensors
        from safetensors.torch import load_file, save_file

        def st_write(d: str) -> None:
            for c in range(n):
                save_file({"kv": chunk(src, c, B).contiguous()}, os.path.join(d, f"{c}.safetensors"))

        def st_read(d: str) -> None:
            for c in range(n):
                chunk(dst, c, B).copy_(load_file(os.path.join(d, f"{c}.safetensors"))["kv"])

        formats["safetensors"] = (st_write, st_read)
        versions += f", safetensors {safetensors.__version__}"
    except ImportError as e:
        rows.missing("safetensors per chunk", "not installed", str(e))

    def one_round(r: int) -> None:
        for name, (write, read) in formats.items():
            d = os.path.join(spec["workdir"], name.split()[0])
            shutil.rmtree(d, ignore_errors=True)
            os.makedirs(d)
            rows.pair(f"{name} per chunk, write", "raw file write", partial(write, d), lambda _: True)
            drop_from_page_cache([os.path.join(d, f) for f in os.listdir(d)] + [bounds.path], spec["drop_caches"])
            rows.pair(f"{name} per chunk, read cold", "raw file read, cold", partial(read, d), bounds.loaded)
            rows.pair(f"{name} per chunk, read warm", "raw file read, warm", partial(read, d), bounds.loaded)
            shutil.rmtree(d, ignore_errors=True)

    rows.run(spec, one_round)
    emit(versions, rows)


if __name__ == "__main__":
    main_guard(main)
