import numpy as np
import pytest
import torch

from tiercache.codec import HEADER_BYTES, BlockCodec, read_header
from tiercache.errors import CorruptFrame

K = bytes(range(16))            # the block key frames in these tests are bound to
K2 = bytes(range(1, 17))

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
    frame = c.encode(raw, K)
    assert np.array_equal(c.decode(frame, len(raw), key=K), raw)
    # each layer decodes on its own, into exactly its slice
    seg = len(raw) // 4
    for i in range(4):
        out = np.empty(seg, dtype=np.uint8)
        c.decode_layer_into(frame, i, out, key=K)
        assert np.array_equal(out, raw[i * seg:(i + 1) * seg])
    assert read_header(frame)["raw_len"] == len(raw)


def test_nan_payloads_and_extremes_survive():
    raw = np.frombuffer(np.array([0x7FC1, 0xFFFF, 0x7F80, 0x0001, 0x8000, 0xFF80] * 64, dtype="<u2").tobytes(),
                        dtype=np.uint8).copy()
    c = BlockCodec("fp", 2, 2, "auto")
    assert np.array_equal(c.decode(c.encode(raw, K), len(raw), key=K), raw)


def test_byteplane_beats_plain_zstd_on_bf16():
    raw = block_bytes(torch.bfloat16, layers=8)
    plane = len(codec_for(torch.bfloat16, "byteplane", 8).encode(raw, K))
    plain = len(codec_for(torch.bfloat16, "zstd", 8).encode(raw, K))
    assert len(raw) / plane > 1.3
    assert plane < plain


def test_incompressible_data_stays_near_raw_size():
    raw = np.random.default_rng(0).integers(0, 256, 64 * 1024, dtype=np.uint8)
    frame = BlockCodec("fp", 2, 4, "auto").encode(raw, K)
    assert len(frame) < len(raw) + 512  # planes that do not shrink are stored raw


@pytest.mark.parametrize("compression", ["auto", "zstd", "none"])
def test_every_single_byte_flip_is_detected(compression):
    """Flip each byte of a frame in turn: decoding raises CorruptFrame or returns the exact bytes, never others."""
    raw = block_bytes(torch.bfloat16, layers=2)[:2048]
    c = BlockCodec("fp", 2, 2, compression)
    frame = bytearray(c.encode(raw, K))
    wrong = 0
    for pos in range(len(frame)):
        frame[pos] ^= 0x5A
        try:
            out = c.decode(bytes(frame), len(raw), key=K)
            wrong += not np.array_equal(out, raw)
        except CorruptFrame:
            pass
        frame[pos] ^= 0x5A
    assert wrong == 0


def test_truncation_extension_and_garbage():
    raw = block_bytes(torch.float16)
    c = codec_for(torch.float16)
    frame = c.encode(raw, K)
    for bad in (frame[:-1], frame[:HEADER_BYTES], frame[:10], frame + b"\0", b"", b"TCKV" + b"\0" * 100,
                bytes(len(frame))):
        with pytest.raises(CorruptFrame):
            c.decode(bad, len(raw), key=K)


def test_frame_of_another_layout_is_rejected():
    raw = block_bytes(torch.bfloat16)
    frame = BlockCodec("layout-A", 2, 4).encode(raw, K)
    with pytest.raises(CorruptFrame, match="layout"):
        BlockCodec("layout-B", 2, 4).decode(frame, len(raw), key=K)
    with pytest.raises(CorruptFrame):
        BlockCodec("layout-A", 2, 4).decode(frame, len(raw) * 2, key=K)


def test_no_pickle_in_the_codec():
    import pathlib

    import tiercache.codec as mod
    src = pathlib.Path(mod.__file__).read_text()
    assert "pickle" not in src.replace("No pickle", "")


def test_small_blocks_are_one_segment_large_blocks_one_per_layer():
    from tiercache.codec import MIN_SEGMENT_BYTES, frame_segments
    small = block_bytes(torch.bfloat16, layers=4)              # 8 KiB per layer
    c = codec_for(torch.bfloat16, layers=4)
    assert frame_segments(c.encode(small, K)) == 1
    big = np.random.default_rng(1).integers(0, 256, 4 * MIN_SEGMENT_BYTES, dtype=np.uint8)
    frame = c.encode(big, K)
    assert frame_segments(frame) == 4
    out = np.empty(len(big), dtype=np.uint8)
    for layers in (range(0, 2), range(2, 4)):                   # two threads' halves
        c.decode_into(frame, out, layers, key=K)
    assert np.array_equal(out, big)


# -- frames are bound to their key; crafted planes are refused before allocating (issue 11, items 7-8) --

def _rehead(frame: bytearray, **fields) -> bytearray:
    """Rewrite header fields and recompute the header checksum (a corruption that passes the header check)."""
    import struct

    import xxhash

    from tiercache.codec import _HEAD
    vals = list(_HEAD.unpack_from(frame, 0))
    names = ["magic", "version", "codec", "itemsize", "reserved", "layout_fp", "raw_len", "table_sum", "key",
             "nseg", "crc"]
    for k, v in fields.items():
        vals[names.index(k)] = v
    head = _HEAD.pack(*vals)
    frame[:_HEAD.size] = head[:-4] + struct.pack("<I", xxhash.xxh32_intdigest(head[:-4]))
    return frame


@pytest.mark.parametrize("compression", ["auto", "zstd", "none"])
def test_frame_of_another_key_is_rejected(compression):
    raw = block_bytes(torch.bfloat16)
    c = codec_for(torch.bfloat16, compression)
    frame = c.encode(raw, K2)                       # a valid frame of another block
    with pytest.raises(CorruptFrame, match="key"):
        c.decode(frame, len(raw), key=K)
    with pytest.raises(CorruptFrame, match="key"):
        c.decode_layer_into(frame, 0, np.empty(len(raw) // 4, np.uint8), key=K)
    # rewriting the key in the header is not enough: the table and segment checksums are seeded by the key
    forged = _rehead(bytearray(frame), key=K)
    with pytest.raises(CorruptFrame, match="checksum"):
        c.decode(bytes(forged), len(raw), key=K)
    assert np.array_equal(c.decode(frame, len(raw), key=K2), raw)
    with pytest.raises(ValueError, match="key"):
        c.encode(raw, b"short")


def test_swapped_segments_are_detected():
    import struct

    import xxhash

    from tiercache.codec import _ENTRY, MIN_SEGMENT_BYTES, _key_seed
    raw = np.random.default_rng(2).integers(0, 256, 4 * MIN_SEGMENT_BYTES, dtype=np.uint8)
    c = BlockCodec("fp", 2, 4, "none")             # equal segment lengths: a swap keeps every length valid
    frame = bytearray(c.encode(raw, K))
    table = HEADER_BYTES
    ents = [_ENTRY.unpack_from(frame, table + i * _ENTRY.size) for i in range(4)]
    body = table + 4 * _ENTRY.size
    seg = ents[0][0]
    s0, s1 = frame[body:body + seg], frame[body + seg:body + 2 * seg]
    frame[body:body + seg], frame[body + seg:body + 2 * seg] = s1, s0
    # swap the table entries too, and make the table checksum match (a consistent-looking frame)
    for i, e in ((0, ents[1]), (1, ents[0])):
        _ENTRY.pack_into(frame, table + i * _ENTRY.size, *e)
    frame = _rehead(frame, table_sum=xxhash.xxh3_64_intdigest(bytes(frame[table:body]), seed=_key_seed(K)))
    with pytest.raises(CorruptFrame, match="checksum mismatch in layer"):
        c.decode(bytes(frame), len(raw), key=K)
    with pytest.raises(CorruptFrame, match="checksum mismatch in layer 0"):
        c.decode_layer_into(bytes(frame), 0, np.empty(MIN_SEGMENT_BYTES, np.uint8), key=K)
    assert struct.unpack_from("<B", frame, 4)[0] == 2


def test_old_format_version_is_refused():
    raw = block_bytes(torch.float16)
    c = codec_for(torch.float16)
    frame = _rehead(bytearray(c.encode(raw, K)), version=1)
    with pytest.raises(CorruptFrame, match="version"):
        c.decode(bytes(frame), len(raw), key=K)


def _zstd_frame_declaring(size: int, body: bytes) -> bytes:
    """A well-formed zstd frame whose header declares `size` content bytes but holds one raw block of `body`."""
    import struct
    fhd = (3 << 6) | (1 << 5)                       # 8-byte content size, single segment, no checksum
    block = struct.pack("<I", 1 | (len(body) << 3))[:3]  # last block, raw
    return struct.pack("<IB", 0xFD2FB528, fhd) + struct.pack("<Q", size) + block + body


@pytest.mark.parametrize("declared", [1 << 40, 256 << 20], ids=["1TiB", "256MiB"])
@pytest.mark.parametrize("compression", ["zstd", "byteplane"])
def test_crafted_zstd_plane_is_refused_before_allocating(compression, declared):
    import zstandard
    raw = block_bytes(torch.bfloat16)[:16384]
    c = BlockCodec("fp", 2, 1, compression)
    crafted = _zstd_frame_declaring(declared, bytes(4000))
    assert zstandard.frame_content_size(crafted) == declared

    class Crafted:                                  # a compressor that writes the crafted plane
        def compress(self, data):
            return crafted
    c._local.c = Crafted()
    frame = c.encode(raw, K)                        # every checksum in the frame is valid
    c._local.c = None
    with pytest.raises(CorruptFrame, match="declares"):   # refused from the header, no MemoryError, no 256 MiB
        c.decode(frame, len(raw), key=K)
