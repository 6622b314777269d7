import pytest
import torch

from tiercache import CacheConfig, KVLayout, parse_size


@pytest.mark.parametrize("text,expected", [
    (0, 0), (1048576, 1 << 20), ("512MiB", 512 << 20), ("20GB", 20 * 10**9), ("1.5GiB", 3 << 29),
    ("64 KiB", 64 << 10), ("7", 7), ("3kb", 3000), ("2TiB", 2 << 40),
])
def test_sizes_parse(text, expected):
    assert parse_size(text, "host_bytes") == expected


@pytest.mark.parametrize("bad", ["lots", "12XB", "-1MiB", "", "1.2.3GB"])
def test_bad_size_names_field(bad):
    with pytest.raises(ValueError, match="host_bytes"):
        parse_size(bad, "host_bytes")


@pytest.mark.parametrize("bad", [-1, True, 1.5, None, [1]])
def test_bad_size_types(bad):
    with pytest.raises((TypeError, ValueError), match="disk_bytes"):
        parse_size(bad, "disk_bytes")


def test_layout_shapes_and_bytes():
    lay = KVLayout(num_layers=32, num_kv_heads=8, head_dim=128, dtype="bf16", block_size=256)
    assert lay.dtype is torch.bfloat16
    assert lay.block_shape == (32, 2, 256, 8, 128)
    assert lay.block_bytes == 32 * 2 * 256 * 8 * 128 * 2 == 32 << 20
    assert lay.kv_shape(10) == (32, 2, 10, 8, 128)
    assert lay.fingerprint() == "L32-P2-B256-H8-D128-bfloat16"
    mla = KVLayout(num_layers=4, num_kv_heads=1, head_dim=576, dtype=torch.float16, planes=1)
    assert mla.block_shape == (4, 1, 16, 1, 576)


@pytest.mark.parametrize("field,value,exc", [
    ("num_layers", 0, ValueError), ("num_kv_heads", -2, ValueError), ("head_dim", 2.5, TypeError),
    ("block_size", "16", TypeError), ("planes", 3, ValueError), ("dtype", "float64", ValueError),
    ("dtype", torch.int64, ValueError),
])
def test_layout_rejects_bad_fields(field, value, exc):
    kw = dict(num_layers=2, num_kv_heads=2, head_dim=8, dtype=torch.bfloat16, block_size=4)
    kw[field] = value
    with pytest.raises(exc, match=field):
        KVLayout(**kw)


def test_layout_is_frozen():
    lay = KVLayout(num_layers=2, num_kv_heads=2, head_dim=8)
    with pytest.raises(AttributeError):
        lay.num_layers = 3


def test_config_parses_and_freezes(layout, tmp_path):
    cfg = CacheConfig(layout=layout, host_bytes="1MiB", disk_path=tmp_path, disk_bytes="20GB")
    assert cfg.host_bytes == 1 << 20 and cfg.disk_bytes == 20 * 10**9
    assert cfg.disk_path == str(tmp_path) and cfg.disk_enabled
    assert cfg.device == torch.device("cpu")
    with pytest.raises(AttributeError):
        cfg.host_bytes = 5
    assert not CacheConfig(layout=layout, disk_path=None).disk_enabled
    assert not CacheConfig(layout=layout, disk_path=tmp_path, disk_bytes=0).disk_enabled


@pytest.mark.parametrize("field,value", [
    ("layout", "L2"), ("model_id", ""), ("device", "warp:0"), ("host_bytes", "big"), ("disk_bytes", -5),
    ("write_policy", "write_around"), ("admission", "third_hit"), ("eviction", "random"),
    ("hash_algo", "md5"), ("compression", "lz4"), ("zstd_level", 40), ("tp_rank", 2), ("tp_size", 0),
    ("remote_url", "http://x"), ("metrics_port", 70000), ("write_queue_blocks", 0), ("io_threads", 0),
    ("hash_secret", b"abc"),  # a secret without blake2b
    ("disk_path", 12),
])
def test_config_rejects_bad_fields(layout, field, value):
    kw = {"layout": layout, field: value}
    with pytest.raises((ValueError, TypeError), match=field):
        CacheConfig(**kw)


def test_blake2b_needs_secret(layout):
    with pytest.raises(ValueError, match="hash_secret"):
        CacheConfig(layout=layout, hash_algo="blake2b")
    assert CacheConfig(layout=layout, hash_algo="blake2b", hash_secret=b"k" * 32).hash_algo == "blake2b"


def test_eviction_error_lists_registry(layout):
    with pytest.raises(ValueError) as e:
        CacheConfig(layout=layout, eviction="nope")
    for name in ("lru", "fifo", "s3fifo"):
        assert name in str(e.value)
