"""GPU paths: device pool in GPU memory, pinned host slab, CUDA-stream copies. Skipped without a GPU."""

import pytest
import torch

from tiercache import CacheConfig, KVLayout, TierCache

from .conftest import same_bytes

pytestmark = pytest.mark.cuda


@pytest.fixture
def gpu_layout():
    return KVLayout(num_layers=4, num_kv_heads=2, head_dim=64, dtype=torch.bfloat16, block_size=16)


def kv_on_gpu(layout, n, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(layout.kv_shape(n), generator=g, device="cuda").to(layout.dtype)


def test_device_pool_and_pinned_host(tmp_path, gpu_layout):
    cfg = CacheConfig(layout=gpu_layout, device="cuda", device_bytes=4 * gpu_layout.block_bytes,
                      host_bytes=8 * gpu_layout.block_bytes, disk_path=tmp_path / "d")
    with TierCache(cfg) as c:
        assert c.pools["device"].slab.is_cuda
        assert c.pools["host"].slab.is_pinned()
        kv = kv_on_gpu(gpu_layout, 128)
        assert c.store(list(range(128)), kv) == 128
        c.flush()
        assert c.lookup_by_tier(list(range(128))) == {"device": 64, "host": 64, "disk": 0}
        out = c.load(list(range(128)))
        assert out.is_cuda and same_bytes(out, kv)


def test_stream_ordering_store_right_after_compute(tmp_path, gpu_layout):
    """The copy stream waits for the kernel that produced the KV: no torn blocks."""
    cfg = CacheConfig(layout=gpu_layout, device="cuda", device_bytes=0, host_bytes=16 * gpu_layout.block_bytes,
                      disk_path=None)
    with TierCache(cfg) as c:
        for seed in range(5):
            base = kv_on_gpu(gpu_layout, 64, seed)
            kv = (base.float() * 2).to(gpu_layout.dtype)          # queued kernel, not yet finished
            toks = list(range(seed * 1000, seed * 1000 + 64))
            c.store(toks, kv)
            assert same_bytes(c.load(toks).cuda(), kv)


def test_layerwise_load_on_gpu_waits_per_layer(tmp_path, gpu_layout):
    cfg = CacheConfig(layout=gpu_layout, device="cuda", device_bytes=0, host_bytes=2 * gpu_layout.block_bytes,
                      disk_path=tmp_path / "d")
    with TierCache(cfg) as c:
        kv = kv_on_gpu(gpu_layout, 96)
        c.store(list(range(96)), kv)
        c.flush()
        ll = c.load_layers(list(range(96)))
        assert ll.num_tokens == 96
        for i in range(gpu_layout.num_layers):
            assert same_bytes(ll.wait_layer(i), kv[i])


def test_prefetch_into_device(tmp_path, gpu_layout):
    cfg = CacheConfig(layout=gpu_layout, device="cuda", device_bytes=8 * gpu_layout.block_bytes,
                      host_bytes=8 * gpu_layout.block_bytes, disk_path=tmp_path / "d")
    with TierCache(cfg) as c:
        kv = kv_on_gpu(gpu_layout, 64)
        c.store(list(range(64)), kv)
        c.flush()
    with TierCache(cfg) as c:
        assert c.lookup_by_tier(list(range(64)))["disk"] == 64
        assert c.prefetch(list(range(64))).wait() == 64
        assert c.lookup_by_tier(list(range(64)))["device"] == 64
        assert same_bytes(c.load(list(range(64))), kv)
