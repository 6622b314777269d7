"""tiercache_kernels: gather/scatter between vLLM's paged KV layouts and canonical blocks.

The paged caches here are filled the way vLLM fills them: `write_tokens` re-states, token by token,
the index arithmetic of vLLM 0.32's cache writers (FlashAttention's `kv.transpose(1, 2).split(D)`
view; the CPU backend's `reshape_and_cache` for the vec/vec16 and amx ISAs), independently of
`layouts.py`. A gather must return exactly the K and V that were written.

The Triton kernel runs through Triton's interpreter (`TRITON_INTERPRET=1`, which must be set before
triton is imported), so those tests run in one pytest subprocess with the variable set; in this
process they are skipped unless the variable is already set.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import tiercache_kernels as tk
import torch

ROOT = Path(__file__).resolve().parents[1]
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
interp = pytest.mark.skipif(not INTERPRETED, reason="runs in the TRITON_INTERPRET=1 subprocess")
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
ODD_IDS = [5, 1, 5, 0, 3, 7, 1]          # out of order, repeated, the null block


def layout_dtypes():
    for layout in tk.LAYOUTS:
        for dt in DTYPES:
            if layout == "cpu_amx" and dt == torch.float32:
                continue  # amx packs 2-byte elements only (vLLM uses it for bf16)
            yield layout, dt


def random_bits(shape, dtype, seed):
    """Random bit patterns (NaN payloads and negative zeros included): bit-exactness, not value equality."""
    g = torch.Generator().manual_seed(seed)
    width = torch.empty(0, dtype=dtype).element_size()
    raw = torch.randint(0, 256, (*shape, width), generator=g, dtype=torch.uint8)
    return raw.view(dtype).reshape(shape)


def same_bits(a, b):
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.contiguous().view(torch.uint8),
                                                                      b.contiguous().view(torch.uint8))


# -- paged caches filled the way vLLM fills them -----------------------------------------------------
def make_layers(layout, num_layers=3, num_blocks=9, heads=2, bs=32, d=32, dtype=torch.bfloat16, physical="LBNHC"):
    """Zeroed per-layer caches as vLLM allocates them for `layout` (flash: in the physical order given)."""
    if layout != "flash":  # CPU backend: LBHNC, [B, H, bs, 2D] contiguous per layer
        return [torch.zeros(num_blocks, heads, bs, 2 * d, dtype=dtype) for _ in range(num_layers)]
    if physical == "LBNHC":  # FlashAttention's default: each block is [bs, H, 2D]
        return [torch.zeros(num_blocks, bs, heads, 2 * d, dtype=dtype).transpose(1, 2) for _ in range(num_layers)]
    if physical == "LBHNC":
        return [torch.zeros(num_blocks, heads, bs, 2 * d, dtype=dtype) for _ in range(num_layers)]
    if physical == "BLNHC":  # cross-layer: a block holds every layer's page
        raw = torch.zeros(num_blocks, num_layers, bs, heads, 2 * d, dtype=dtype)
        return [raw[:, i].transpose(1, 2) for i in range(num_layers)]
    if physical == "legacy5d":  # vLLM before 0.12: [2, B, bs, H, D]
        return [torch.zeros(2, num_blocks, bs, heads, d, dtype=dtype) for _ in range(num_layers)]
    raise AssertionError(physical)


def write_tokens(layer, layout, slots, k, v):
    """vLLM's cache write for one layer: token i (k[i], v[i] of shape [H, D]) goes to slot slots[i]."""
    if layout == "flash" and layer.dim() == 5:
        bs = layer.shape[2]
        for i, s in enumerate(slots):
            layer[0, s // bs, s % bs] = k[i]
            layer[1, s // bs, s % bs] = v[i]
        return
    bs, d = layer.shape[2], layer.shape[3] // 2
    if layout == "flash":
        key_cache, value_cache = layer.transpose(1, 2).split(d, dim=-1)  # [B, bs, H, D] each
        for i, s in enumerate(slots):
            key_cache[s // bs, s % bs] = k[i]
            value_cache[s // bs, s % bs] = v[i]
        return
    for i, s in enumerate(slots):
        b, t = s // bs, s % bs
        for h in range(layer.shape[1]):
            page = layer[b, h].view(-1)  # bs*D of K, then bs*D of V
            if layout == "cpu_vec":  # K column-major [D, bs], V row-major [bs, D]
                for j in range(d):
                    page[j * bs + t] = k[i, h, j]
                page[bs * d + t * d: bs * d + (t + 1) * d] = v[i, h]
            else:  # amx: K as 32-bit pairs in 16-token groups; V token pairs in 16-dim groups
                kq = k[i, h].contiguous().view(torch.int32)
                kpage = page[:bs * d].view(torch.int32)
                group, offset = divmod(t, 16)
                for j in range(d // 2):
                    kpage[group * 16 * (d // 2) + offset + j * 16] = kq[j]
                vpage = page[bs * d:]
                base = (t // 2) * 2 * 16 + t % 2
                for g in range(d // 16):
                    for j in range(16):
                        vpage[g * bs * 16 + base + j * 2] = v[i, h, g * 16 + j]


def filled(layout, dtype=torch.bfloat16, physical="LBNHC", num_layers=3, num_blocks=9, heads=2, bs=32, d=32, seed=0):
    """Paged layers with every block written through vLLM's writer, and the canonical truth [B, L, 2, bs, H, D]."""
    layers = make_layers(layout, num_layers, num_blocks, heads, bs, d, dtype, physical)
    truth = random_bits((num_blocks, num_layers, 2, bs, heads, d), dtype, seed)
    slots = list(range(num_blocks * bs))
    for i, layer in enumerate(layers):
        k = truth[:, i, 0].reshape(-1, heads, d)
        v = truth[:, i, 1].reshape(-1, heads, d)
        write_tokens(layer, layout, slots, k, v)
    return layers, truth


# -- the torch path against vLLM's writers --------------------------------------------------------
@pytest.mark.parametrize("layout,dtype", list(layout_dtypes()))
def test_gather_returns_what_vllm_wrote(layout, dtype):
    layers, truth = filled(layout, dtype)
    out = tk.gather(layers, torch.tensor(ODD_IDS), layout)
    assert out.shape == (len(ODD_IDS), 3, 2, 32, 2, 32) and out.is_contiguous()
    assert same_bits(out, truth[ODD_IDS])


@pytest.mark.parametrize("physical", ["LBNHC", "LBHNC", "BLNHC", "legacy5d"])
def test_flash_layout_accepts_every_physical_order(physical):
    layers, truth = filled("flash", torch.float16, physical, bs=16, d=8, heads=4)
    assert same_bits(tk.gather(layers, ODD_IDS, "flash"), truth[ODD_IDS])


@pytest.mark.parametrize("layout,dtype", list(layout_dtypes()))
def test_scatter_writes_exactly_the_named_blocks(layout, dtype):
    layers, truth = filled(layout, dtype)
    before = [t.clone() for t in layers]
    ids = torch.tensor([7, 2, 5])
    new = random_bits((3, 3, 2, 32, 2, 32), dtype, seed=9)
    tk.scatter(new, layers, ids, layout)
    assert same_bits(tk.gather(layers, ids, layout), new)
    others = [b for b in range(9) if b not in (7, 2, 5)]
    assert same_bits(tk.gather(layers, others, layout), truth[others])
    # and the bytes vLLM's kernels read are the ones its writer would have written
    expect = make_layers(layout, dtype=dtype)
    for i, layer in enumerate(expect):
        full = truth[:, i].clone()
        full[[7, 2, 5]] = new[:, i]
        write_tokens(layer, layout, list(range(9 * 32)), full[:, 0].reshape(-1, 2, 32), full[:, 1].reshape(-1, 2, 32))
        assert same_bits(layers[i], layer) and not same_bits(layers[i], before[i])


def test_round_trip_into_another_cache():
    src, truth = filled("cpu_vec", torch.bfloat16)
    blocks = tk.gather(src, [4, 8, 1], "cpu_vec")
    dst = make_layers("cpu_vec")
    tk.scatter(blocks, dst, [2, 3, 6], "cpu_vec")
    assert same_bits(tk.gather(dst, [2, 3, 6], "cpu_vec"), truth[[4, 8, 1]])
    assert not dst[0][[0, 1, 4, 5, 7, 8]].any()  # nothing else written


def test_gather_into_out_and_empty_ids():
    layers, truth = filled("flash", torch.bfloat16, bs=16, d=8)
    out = torch.empty(2, 3, 2, 16, 2, 8, dtype=torch.bfloat16)
    assert tk.gather(layers, [3, 0], "flash", out=out) is out and same_bits(out, truth[[3, 0]])
    assert tk.gather(layers, [], "flash").shape == (0, 3, 2, 16, 2, 8)
    tk.scatter(torch.empty(0, 3, 2, 16, 2, 8, dtype=torch.bfloat16), layers, [], "flash")
    assert tk.block_shape(layers, "flash") == (3, 2, 16, 2, 8)


# -- caller mistakes name the field -----------------------------------------------------------------
def test_scatter_refuses_the_null_block_and_repeats():
    layers, _ = filled("flash", torch.bfloat16, bs=16, d=8)
    before = [t.clone() for t in layers]
    blocks = torch.zeros(2, 3, 2, 16, 2, 8, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="block_ids.*null block"):
        tk.scatter(blocks, layers, [4, 0], "flash")
    with pytest.raises(ValueError, match="block_ids.*repeated"):
        tk.scatter(blocks, layers, [4, 4], "flash")
    assert all(same_bits(a, b) for a, b in zip(layers, before))


@pytest.mark.parametrize("call,exc,match", [
    (lambda L: tk.gather(L, [9], "flash"), ValueError, r"block_ids must lie in \[0, 9\)"),
    (lambda L: tk.gather(L, [-1], "flash"), ValueError, "block_ids"),
    (lambda L: tk.gather(L, torch.tensor([1.0]), "flash"), TypeError, "block_ids"),
    (lambda L: tk.gather(L, torch.tensor([[1]]), "flash"), TypeError, "block_ids"),
    (lambda L: tk.gather(L, "1", "flash"), TypeError, "block_ids"),
    (lambda L: tk.gather(L, [1], "nhd"), ValueError, "layout must be one of"),
    (lambda L: tk.gather(L, [1], "flash", impl="cuda"), ValueError, "impl must be one of"),
    (lambda L: tk.gather([], [1], "flash"), ValueError, "layers"),
    (lambda L: tk.gather([L[0], L[1].float()], [1], "flash"), TypeError, r"layers\[1\]"),
    (lambda L: tk.gather([L[0], L[1][:4]], [1], "flash"), ValueError, r"layers\[1\]"),
    (lambda L: tk.gather([x[..., :15] for x in L], [1], "flash"), ValueError, "2\\*head_dim"),
    (lambda L: tk.gather(L, [1], "flash", out=torch.empty(1, 3, 2, 16, 2, 8)), TypeError, "out"),
    (lambda L: tk.gather(L, [1], "flash", out=torch.empty(2, 3, 2, 16, 2, 8, dtype=torch.bfloat16)),
     ValueError, "out must have shape"),
    (lambda L: tk.scatter(torch.empty(1, 3, 2, 16, 2, 4, dtype=torch.bfloat16), L, [1], "flash"),
     ValueError, "blocks must have shape"),
    (lambda L: tk.gather(L, [1], "cpu_vec"), ValueError, "page must be contiguous"),
    (lambda L: tk.gather([x.contiguous().float() for x in L], [1], "cpu_amx"), ValueError, "cpu_amx packs 2-byte"),
])
def test_bad_input_names_the_field(call, exc, match):
    layers, _ = filled("flash", torch.bfloat16, bs=16, d=8)
    with pytest.raises(exc, match=match):
        call(layers)


def test_triton_on_cpu_without_the_interpreter_is_refused():
    if INTERPRETED:
        pytest.skip("the interpreter is on in this process")
    layers, _ = filled("flash", torch.bfloat16, bs=16, d=8)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        tk.gather(layers, [1], "flash", impl="triton")


def test_pyproject_lists_every_tiercache_package():
    """`packages` is explicit (kernels/ is renamed): a subpackage left out would be missing from a wheel."""
    tomllib = pytest.importorskip("tomllib")
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    # the committed packages (what a clone installs); a folder not yet added to git is not checked
    tracked = subprocess.run(["git", "ls-files", "tiercache"], cwd=ROOT, capture_output=True, text=True)
    if tracked.returncode != 0:
        pytest.skip("not a git checkout")
    packages = {".".join(Path(f).parent.parts) for f in tracked.stdout.split() if f.endswith("/__init__.py")}
    assert "tiercache.tiers" in packages
    assert packages <= set(cfg["packages"]), f"add {sorted(packages - set(cfg['packages']))} to pyproject packages"
    assert cfg["package-dir"]["tiercache_kernels"] == "kernels"


@pytest.mark.parametrize("site", [True, False], ids=["site-packages", "no-site-packages"])
def test_the_kernels_folder_does_not_shadow_pypi_kernels(site):
    """Run from the repository root (`python -m pytest`, `python -m tiercache`), the kernels/ folder is
    importable as a top-level `kernels`, the name of a PyPI package that transformers imports (or probes
    for). It acts as a folder without __init__.py would: the installed package is loaded in its place; with
    none (`python -S`: no site-packages), the name is an empty namespace, which transformers' probe reads as
    not installed. Either way nothing of ours is under that name."""
    code = ("import kernels\n"
            "print(getattr(kernels, '__file__', None))\n"
            "print(hasattr(kernels, 'gather'), hasattr(kernels, '__version__'))\n")
    r = subprocess.run([sys.executable, *([] if site else ["-S"]), "-c", code], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    where, attrs = r.stdout.splitlines()
    if site and importlib.util.find_spec("kernels") is not None and where != "None":  # PyPI's, installed
        assert not where.startswith(str(ROOT / "kernels")) and "-packages" in where, where
        assert attrs.startswith("False"), attrs
    else:
        assert (where, attrs) == ("None", "False False"), r.stdout
    assert callable(tk.gather) and Path(tk.__file__).parent == ROOT / "kernels"


# -- the Triton kernel, through Triton's interpreter --------------------------------------------------
def test_triton_kernels_through_the_interpreter():
    """Runs this file's `interp` tests in a subprocess with TRITON_INTERPRET=1 (it must precede `import triton`)."""
    if INTERPRETED:
        pytest.skip("already in the interpreter subprocess")
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "interp_"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout.splitlines()[-1], proc.stdout[-2000:]


@interp
@pytest.mark.parametrize("layout,dtype", list(layout_dtypes()))
def test_interp_gather_matches_torch_and_vllm(layout, dtype):
    layers, truth = filled(layout, dtype, bs=16, d=16)
    ids = torch.tensor(ODD_IDS)
    fast = tk.gather(layers, ids, layout, impl="triton")
    assert same_bits(fast, tk.gather(layers, ids, layout, impl="torch"))
    assert same_bits(fast, truth[ODD_IDS])


@interp
@pytest.mark.parametrize("layout,dtype", list(layout_dtypes()))
def test_interp_scatter_matches_torch(layout, dtype):
    a, _ = filled(layout, dtype, bs=16, d=16)
    b = [t.clone() for t in a]
    new = random_bits((3, 3, 2, 16, 2, 16), dtype, seed=5)
    tk.scatter(new, a, [8, 3, 1], layout, impl="triton")
    tk.scatter(new, b, [8, 3, 1], layout, impl="torch")
    assert all(same_bits(x, y) for x, y in zip(a, b))
    assert same_bits(tk.gather(a, [8, 3, 1], layout, impl="triton"), new)


@interp
@pytest.mark.parametrize("physical", ["LBHNC", "BLNHC", "legacy5d"])
def test_interp_flash_physical_orders(physical):
    layers, truth = filled("flash", torch.bfloat16, physical, bs=16, d=16, heads=4)
    assert same_bits(tk.gather(layers, ODD_IDS, "flash", impl="triton"), truth[ODD_IDS])
    new = random_bits((2, 3, 2, 16, 4, 16), torch.bfloat16, seed=3)
    tk.scatter(new, layers, [6, 2], "flash", impl="triton")
    assert same_bits(tk.gather(layers, [6, 2], "flash", impl="torch"), new)


@interp
def test_interp_odd_sizes_span_several_chunks():
    """block planes of 3*5*24 = 360 elements and 128*8*8 = 8192 elements (two 4096-element chunks)."""
    for bs, heads, d in ((3, 5, 12), (128, 8, 4)):
        layers, truth = filled("flash", torch.float32, num_layers=2, num_blocks=4, heads=heads, bs=bs, d=d)
        ids = [3, 3, 0, 1]
        assert same_bits(tk.gather(layers, ids, "flash", impl="triton"), truth[ids])


@pytest.mark.parametrize("layout,dtype", list(layout_dtypes()))
@pytest.mark.parametrize("ids", [[2, 3, 4, 5], ODD_IDS, [8, 7, 6], [1, 2, 5, 6, 7, 3]])
def test_runs_engine_is_bit_identical_to_the_reference(layout, dtype, ids):
    """The CPU engine (`impl="auto"` on CPU): runs of consecutive ids, indexed fallback, widened planes."""
    layers, truth = filled(layout, dtype)
    got = tk.gather(layers, ids, layout, impl="runs")
    assert same_bits(got, truth[ids]) and same_bits(got, tk.gather(layers, ids, layout, impl="torch"))
    scatter_ids = [i for i in dict.fromkeys(ids) if i != 0]
    new = random_bits((len(scatter_ids), 3, 2, 32, 2, 32), dtype, 11)
    a, _ = filled(layout, dtype)
    b, _ = filled(layout, dtype)
    tk.scatter(new, a, scatter_ids, layout, impl="runs")
    tk.scatter(new, b, scatter_ids, layout, impl="torch")
    assert all(same_bits(x, y) for x, y in zip(a, b))        # the same bytes everywhere, untouched blocks too


@pytest.mark.parametrize("physical", ["LBNHC", "LBHNC", "BLNHC", "legacy5d"])
def test_runs_engine_on_every_flash_physical_order(physical):
    layers, truth = filled("flash", physical=physical)
    assert same_bits(tk.gather(layers, [3, 4, 5, 1], "flash", impl="runs"), truth[[3, 4, 5, 1]])
    new = random_bits((3, 3, 2, 32, 2, 32), torch.bfloat16, 5)
    tk.scatter(new, layers, [6, 7, 2], "flash", impl="runs")
    assert same_bits(tk.gather(layers, [6, 7, 2], "flash", impl="torch"), new)


def test_runs_splits_consecutive_ids():
    from tiercache_kernels.runs import runs
    assert runs([4, 5, 6, 1, 2, 9]) == [(4, 3, 0), (1, 2, 3), (9, 1, 5)]
    assert runs([]) == [] and runs([3, 3]) == [(3, 1, 0), (3, 1, 1)]
