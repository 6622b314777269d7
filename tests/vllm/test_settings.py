"""The connector's settings and page conversions, without an engine (these run without vLLM too)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from tiercache.integrations import vllm_pages
from tiercache.integrations.vllm_settings import cache_config, layout_from_vllm


class FullAttentionSpec(SimpleNamespace):
    """Stands in for vLLM's spec of the same name (the settings read its fields and its type name)."""


def configs(extra: dict, groups: int = 1, tp: int = 1):
    spec = FullAttentionSpec(block_size=128, num_kv_heads=2, head_size=64, head_size_v=64, dtype=torch.bfloat16)
    vllm_config = SimpleNamespace(
        kv_transfer_config=SimpleNamespace(kv_connector_extra_config=extra),
        model_config=SimpleNamespace(model="/models/tiny", revision=None),
        parallel_config=SimpleNamespace(tensor_parallel_size=tp))
    kv = SimpleNamespace(kv_cache_groups=[SimpleNamespace(layer_names=[f"model.layers.{i}.attn" for i in range(4)],
                                                          kv_cache_spec=spec)] * groups)
    return vllm_config, kv


def test_layout_and_model_come_from_vllm(tmp_path):
    cfg = cache_config(*configs({"disk_path": str(tmp_path), "host_bytes": "8MiB"}, tp=2), tp_rank=1)
    assert cfg.layout.fingerprint() == "L4-P2-B128-H2-D64-bfloat16"
    assert (cfg.model_id, cfg.tp_rank, cfg.tp_size, cfg.host_bytes, cfg.device_bytes) == ("/models/tiny", 1, 2,
                                                                                          8 << 20, 0)
    assert cache_config(*configs({"model_id": "shared-name", "disk_path": str(tmp_path)})).model_id == "shared-name"


def test_the_connector_needs_a_tier_and_write_through(tmp_path):
    assert cache_config(*configs({"host_bytes": "8MiB"})).host_bytes == 8 << 20   # host memory alone is enough
    with pytest.raises(ValueError, match="kv_connector_extra_config: host_bytes, disk_path, remote_url"):
        cache_config(*configs({"host_bytes": 0}))
    with pytest.raises(ValueError, match="kv_connector_extra_config: host_bytes, disk_path, remote_url"):
        cache_config(*configs({"host_bytes": "64KiB"}))   # less than one 128-token block
    with pytest.raises(ValueError, match="kv_connector_extra_config: write_policy"):
        cache_config(*configs({"disk_path": str(tmp_path), "write_policy": "write_back"}))


@pytest.mark.parametrize("key", ["hostbytes", "disk"])
def test_unknown_key_is_an_error_naming_it(key):
    with pytest.raises(ValueError, match=f"kv_connector_extra_config: unknown key '{key}'"):
        cache_config(*configs({key: 1}))


@pytest.mark.parametrize("key", ["layout", "device_bytes", "tp_rank"])
def test_keys_vllm_decides_are_refused(key):
    with pytest.raises(ValueError, match=f"kv_connector_extra_config: '{key}' cannot be set"):
        cache_config(*configs({key: 1}))


def test_bad_value_is_validated_by_cache_config():
    with pytest.raises(ValueError, match="kv_connector_extra_config: host_bytes"):
        cache_config(*configs({"host_bytes": "lots"}))
    with pytest.raises(ValueError, match="kv_connector_extra_config: write_policy"):
        cache_config(*configs({"write_policy": "sometimes"}))


def test_two_kv_cache_groups_are_refused():
    with pytest.raises(ValueError, match="kv_cache_groups"):
        layout_from_vllm(configs({}, groups=2)[1])


IMPLS = {"torch": (vllm_pages.torch_gather, vllm_pages.torch_scatter),
         "auto": (vllm_pages.gather, vllm_pages.scatter)}  # auto: tiercache_kernels when installed


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("layout", vllm_pages.LAYOUTS)
def test_pages_round_trip_bit_exact(layout, impl):
    gather, scatter = IMPLS[impl]
    g = torch.Generator().manual_seed(0)
    layers = [torch.randn((6, 2, 32, 128), generator=g).to(torch.bfloat16) for _ in range(3)]
    blocks = gather(layers, [4, 1], layout)
    assert blocks.shape == (2, 3, 2, 32, 2, 64)
    back = [torch.zeros_like(t) for t in layers]
    scatter(blocks, back, [4, 1], layout)
    for src, dst in zip(layers, back):
        assert torch.equal(dst[[4, 1]].view(torch.int16), src[[4, 1]].view(torch.int16))
        assert not dst[[0, 2, 3, 5]].any()       # no other block written


@pytest.mark.parametrize("impl", IMPLS)
def test_page_positions_match_vllms_packing(impl):
    """Where K[t, h, d] and V[t, h, d] of a block live in a (block, head) page, per layout (vLLM 0.32 source)."""
    gather = IMPLS[impl][0]
    bs, d = 32, 64
    page = torch.arange(2 * bs * d, dtype=torch.int16).view(1, 1, bs, 2 * d)
    t, dd = 5, 19
    k = {L: gather([page], [0], L)[0, 0, 0, t, 0, dd].item() for L in vllm_pages.LAYOUTS}
    v = {L: gather([page], [0], L)[0, 0, 1, t, 0, dd].item() for L in vllm_pages.LAYOUTS}
    assert k["flash"] == t * 2 * d + dd and v["flash"] == t * 2 * d + d + dd
    assert k["cpu_vec"] == dd * bs + t and v["cpu_vec"] == bs * d + t * d + dd
    assert k["cpu_amx"] == ((t // 16) * (d // 2) + dd // 2) * 32 + (t % 16) * 2 + dd % 2
    assert v["cpu_amx"] == bs * d + ((dd // 16) * (bs // 2) + t // 2) * 32 + (dd % 16) * 2 + t % 2


def test_unknown_isa_is_refused():
    with pytest.raises(ValueError, match="'neon'"):
        vllm_pages.layout_for_isa("neon")
