"""tiercache_kernels: move KV blocks between vLLM's paged cache and tiercache's canonical blocks.

    blocks = gather(layers, block_ids, layout)          # -> [n, L, 2, block_size, kv_heads, head_dim]
    scatter(blocks, layers, block_ids, layout)          # the inverse, into the paged cache

`layers` is the list of per-layer KV-cache tensors (what vLLM's `register_kv_caches` hands a
connector, in layer order); `layout` is one of `LAYOUTS` (see `layouts.py`). All layers, both planes
and every block move in one launch on the Triton path; the torch path (CPU tensors, and the reference
in tests) does one `index_select`/`index_copy_` per layer and plane. `impl="auto"` picks Triton for
CUDA tensors (torch when Triton is not installed) and, for CPU tensors, `runs` (the torch views
copied per run of consecutive ids, widened where a plane allows: `runs.py`); `impl="torch"` is the
reference; `impl="triton"` on CPU tensors needs `TRITON_INTERPRET=1`.

Block ids: a 1-D integer tensor (or a list) of ids into the paged cache. A gather may repeat ids
and may read block 0 (vLLM's null block); a scatter may do neither (two writes to one block, or a
write into the block every padded slot points at, are caller bugs). Ids are range-checked on the
host: pass them as a list or a CPU tensor (CUDA ids cost a device-to-host sync). On CUDA the work is
enqueued on the current stream: run it in a transfer-engine job to order it and overlap it with compute.
"""

import sys as _sys

if __name__ == "kernels":
    # Imported as a top-level `kernels`: this folder's parent is on sys.path (the repository root, under
    # `python -m pytest` or `python -m ...` run there), so the folder shadows PyPI's `kernels`, which
    # transformers imports (a dependency from 5.25; probed for before). Behave as a folder without
    # __init__.py would, a namespace portion: a regular `kernels` package elsewhere on sys.path is
    # loaded in its place; without one the name is an empty namespace (no __file__, no __version__:
    # what transformers' probe reads as "not installed"). This folder's import name is tiercache_kernels.
    import importlib.machinery as _machinery
    import importlib.util as _util
    import os as _os
    import types as _types

    _root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    _spec = _machinery.PathFinder.find_spec(
        "kernels", [p for p in _sys.path if _os.path.abspath(p or _os.curdir) != _root])
    if _spec is None or _spec.loader is None:
        _real = _types.ModuleType("kernels")
        _real.__path__ = []
        _sys.modules["kernels"] = _real  # the import statement returns what sys.modules holds once this ends
    else:
        _real = _util.module_from_spec(_spec)
        _sys.modules["kernels"] = _real
        _spec.loader.exec_module(_real)
else:
    from .api import IMPLS, LAYOUTS, _triton_available, block_shape, describe, gather, scatter  # noqa: F401

    __all__ = ["LAYOUTS", "IMPLS", "gather", "scatter", "describe", "block_shape"]
