import numpy as np
import pytest
import torch

from tiercache.codec import HEADER_BYTES, BlockCodec, read_header
from tiercache.errors import CorruptFrame

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn, torch.int8]


def block_bytes(dtype, layers=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(layers, 2, 16, 2, 32, generator=g) * 0.7
    if dtype == torch.int8:
        x = (x * 40).clamp(-128, 127).to(torch.int8)
    else:
        x = x.to(dtype)
    return x.contiguous().view(torch.uint8).numpy().reshape(-1).copy()


def codec_for(dtype, compression="auto", layers=4):
    return BlockCodec(f"fp-{dtype}", torch.empty((), dtype=dtype).element_size(), layers, compression)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("compression", ["auto", "byteplane", "zstd", "none"])
def test_roundtrip_bit_exact(dtype, compression):
    raw = block_bytes(dtype)
    c = codec_for(dtype, compression)
    frame = c.encode(raw)
    assert np.array_equal(c.decode(frame, len(raw)), raw)
    # each layer decodes on its own, into exactly its slice
    seg = len(raw) // 4
    for i in range(4):
        out = np.empty(seg, dtype=np.uint8)
        c.decode_layer_into(frame, i, out)
        assert np.array_equal(out, raw[i * seg:(i + 1) * seg])
    assert read_header(frame)["raw_len"] == len(raw)


def test_nan_payloads_and_extremes_survive():
    raw = np.frombuffer(np.array([0x7FC1, 0xFFFF, 0x7F80, 0x0001, 0x8000, 0xFF80] * 64, dtype="<u2").tobytes(),
                        dtype=np.uint8).copy()
    c = BlockCodec("fp", 2, 2, "auto")
    assert np.array_equal(c.decode(c.encode(raw), len(raw)), raw)


def test_byteplane_beats_plain_zstd_on_bf16():
    raw = block_bytes(torch.bfloat16, layers=8)
    plane = len(codec_for(torch.bfloat16, "byteplane", 8).encode(raw))
    plain = len(codec_for(torch.bfloat16, "zstd", 8).encode(raw))
    assert len(raw) / plane > 1.3
    assert plane < plain


def test_incompressible_data_stays_near_raw_size():
    raw = np.random.default_rng(0).integers(0, 256, 64 * 1024, dtype=np.uint8)
    frame = BlockCodec("fp", 2, 4, "auto").encode(raw)
    assert len(frame) < len(raw) + 512  # planes that do not shrink are stored raw


@pytest.mark.parametrize("compression", ["auto", "zstd", "none"])
def test_every_single_byte_flip_is_detected(compression):
    """Flip each byte of a frame in turn: decoding raises CorruptFrame or returns the exact bytes, never others."""
    raw = block_bytes(torch.bfloat16, layers=2)[:2048]
    c = BlockCodec("fp", 2, 2, compression)
    frame = bytearray(c.encode(raw))
    wrong = 0
    for pos in range(len(frame)):
        frame[pos] ^= 0x5A
        try:
            out = c.decode(bytes(frame), len(raw))
            wrong += not np.array_equal(out, raw)
        except CorruptFrame:
            pass
        frame[pos] ^= 0x5A
    assert wrong == 0


def test_truncation_extension_and_garbage():
    raw = block_bytes(torch.float16)
    c = codec_for(torch.float16)
    frame = c.encode(raw)
    for bad in (frame[:-1], frame[:HEADER_BYTES], frame[:10], frame + b"\0", b"", b"TCKV" + b"\0" * 100,
                bytes(len(frame))):
        with pytest.raises(CorruptFrame):
            c.decode(bad, len(raw))


def test_frame_of_another_layout_is_rejected():
    raw = block_bytes(torch.bfloat16)
    frame = BlockCodec("layout-A", 2, 4).encode(raw)
    with pytest.raises(CorruptFrame, match="layout"):
        BlockCodec("layout-B", 2, 4).decode(frame, len(raw))
    with pytest.raises(CorruptFrame):
        BlockCodec("layout-A", 2, 4).decode(frame, len(raw) * 2)


def test_no_pickle_in_the_codec():
    import pathlib

    import tiercache.codec as mod
    src = pathlib.Path(mod.__file__).read_text()
    assert "pickle" not in src.replace("No pickle", "")


def test_small_blocks_are_one_segment_large_blocks_one_per_layer():
    from tiercache.codec import MIN_SEGMENT_BYTES, frame_segments
    small = block_bytes(torch.bfloat16, layers=4)              # 8 KiB per layer
    c = codec_for(torch.bfloat16, layers=4)
    assert frame_segments(c.encode(small)) == 1
    big = np.random.default_rng(1).integers(0, 256, 4 * MIN_SEGMENT_BYTES, dtype=np.uint8)
    frame = c.encode(big)
    assert frame_segments(frame) == 4
    out = np.empty(len(big), dtype=np.uint8)
    for layers in (range(0, 2), range(2, 4)):                   # two threads' halves
        c.decode_into(frame, out, layers)
    assert np.array_equal(out, big)
