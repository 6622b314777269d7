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


def test_one_raw_segment_from_memory_takes_the_short_path_with_the_same_checks(monkeypatch):
    """An uncompressed one-segment frame decoded from memory into one array skips the general per-segment
    loop (the common small block). Flip each byte in turn: it refuses or returns exact bytes exactly when
    the general path (the same frame decoded into rows) does."""
    raw = block_bytes(torch.bfloat16, layers=2)[:2048]
    c = BlockCodec("fp", 2, 2, "none")
    general: list[int] = []
    real = BlockCodec._decode_segment
    monkeypatch.setattr(BlockCodec, "_decode_segment", lambda self, *a: general.append(1) or real(self, *a))

    def outcome(frame: bytes, rows: bool) -> str:
        out = np.zeros(len(raw), dtype=np.uint8)
        try:
            c.decode_into(frame, [[out[:1024]], [out[1024:]]] if rows else out, key=K)
        except CorruptFrame:
            return "refused"
        return "exact" if np.array_equal(out, raw) else "WRONG"
    frame = bytearray(c.encode(raw, K))
    assert outcome(bytes(frame), rows=False) == "exact" and not general       # the short path
    assert outcome(bytes(frame), rows=True) == "exact" and general == [1]     # the general one
    for pos in range(len(frame)):
        frame[pos] ^= 0x5A
        short, full = outcome(bytes(frame), rows=False), outcome(bytes(frame), rows=True)
        assert short == full != "WRONG", (pos, short, full)
        frame[pos] ^= 0x5A
    out = np.zeros(len(raw), dtype=np.uint8)
    c.decode_into(bytes(frame), out, range(1, 2), key=K)                       # not layer 0: nothing to do
    assert not out.any()


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


# -- frames read in place from a file (tiercache.tiers.frame_files.FileFrame) --------------------------

def _kv_bytes(layer_bytes: int, layers: int = 4, seed: int = 0) -> np.ndarray:
    """bf16 KV-like bytes (Gaussian values): the exponent planes compress, the mantissa planes do not."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(layers * layer_bytes // 2, generator=g) * 0.7).to(torch.bfloat16)
    return x.view(torch.uint8).numpy().copy()


def _frame_file(tmp_path, frame: bytes, name: str = "frame"):
    from tiercache.tiers.frame_files import FileFrame
    p = tmp_path / name
    p.write_bytes(frame)
    return FileFrame(str(p), len(frame))


SIZES = {"one-segment": 8 << 10, "per-layer": None}     # per-layer: MIN_SEGMENT_BYTES per layer


@pytest.fixture(params=[None, 1000, 100_000], ids=["one-read", "pieces-1000B", "pieces-100000B"])
def file_reads(request, monkeypatch):
    """Compressed frame files read in one read, or (above codec._OVERLAP_READ_BYTES) with a read-ahead
    hint and then in pieces of whole segments, each read into one small buffer just before its segments
    decode: a segment a piece (1000 B, smaller than any segment: the buffer grows to the largest) and
    several segments a piece (100000 B). Returns the willneed calls."""
    from tiercache import codec
    from tiercache.tiers.frame_files import FileFrame
    calls = []
    if request.param is not None:
        monkeypatch.setattr(codec, "_OVERLAP_READ_BYTES", request.param)
        real = FileFrame.willneed

        def spy(self, offset, length):
            calls.append((offset, length))
            return real(self, offset, length)
        monkeypatch.setattr(FileFrame, "willneed", spy)
    else:
        monkeypatch.setattr(codec, "_OVERLAP_READ_BYTES", 1 << 40)
    return calls


def _layer_bytes(size):
    from tiercache.codec import MIN_SEGMENT_BYTES
    return SIZES[size] or MIN_SEGMENT_BYTES


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("compression", ["none", "zstd", "byteplane"])
def test_file_frame_decodes_bit_exact(tmp_path, compression, size, file_reads):
    from tiercache.codec import frame_segments
    lb = _layer_bytes(size)
    raw = _kv_bytes(lb)
    c = BlockCodec("fp-file", 2, 4, compression)
    parts = c.encode_parts(raw, K)
    frame = c.encode(raw, K)
    assert b"".join(bytes(memoryview(p)) for p in parts) == frame
    nseg = 4 if size == "per-layer" else 1
    assert frame_segments(frame) == nseg
    ff = _frame_file(tmp_path, frame)
    assert frame_segments(ff) == nseg
    h = read_header(ff)
    assert h == {**read_header(frame), "frame_len": len(frame)}
    assert (h["raw_len"], h["segments"], h["key"], h["codec"]) == (len(raw), nseg, K, compression)

    out = np.full(len(raw), 0xA5, dtype=np.uint8)
    c.decode_into(ff, out, key=K)                            # the whole block
    assert np.array_equal(out, raw)
    from tiercache import codec as codec_mod
    if compression != "none" and len(frame) > codec_mod._OVERLAP_READ_BYTES:
        payload = codec_mod.HEADER_BYTES + nseg * codec_mod._ENTRY.size  # the header and table are read first
        assert file_reads == [(payload, len(frame) - payload)], file_reads  # the whole payload hinted, once
    else:
        assert not file_reads                                # one read: no hint

    for i in range(4):                                       # every single layer, into its place only
        out = np.full(len(raw), 0xA5, dtype=np.uint8)
        c.decode_into(ff, out, range(i, i + 1), key=K)
        want = np.full(len(raw), 0xA5, dtype=np.uint8)
        if nseg == 4:
            want[i * lb:(i + 1) * lb] = raw[i * lb:(i + 1) * lb]
        elif i == 0:
            want[:] = raw                                    # a one-segment frame arrives whole with layer 0
        assert np.array_equal(out, want), i
    if nseg == 4:                                            # a middle run of layers
        out = np.full(len(raw), 0xA5, dtype=np.uint8)
        c.decode_into(ff, out, range(1, 3), key=K)
        want = np.full(len(raw), 0xA5, dtype=np.uint8)
        want[lb:3 * lb] = raw[lb:3 * lb]
        assert np.array_equal(out, want)
        with pytest.raises(ValueError, match="consecutive"):
            c.decode_into(ff, out, [0, 2], key=K)


def _rows_target(lb: int, layers: int = 4):
    """Per layer, 2 non-adjacent uint8 slices (the K and V rows of a block inside a bigger tensor):
    the arena, the rows, and a mask of the arena bytes the rows cover."""
    half = lb // 2
    gap = 24
    arena = np.full(layers * (2 * half + 2 * gap) + gap, 0x5A, dtype=np.uint8)
    mask = np.zeros(len(arena), dtype=bool)
    rows, pos = [], gap
    for _ in range(layers):
        r = []
        for _ in range(2):
            r.append(arena[pos:pos + half])
            mask[pos:pos + half] = True
            pos += half + gap
        rows.append(r)
    return arena, rows, mask


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("compression", ["none", "zstd", "byteplane"])
def test_file_frame_decodes_into_rows(tmp_path, compression, size, file_reads):
    lb = _layer_bytes(size)
    raw = _kv_bytes(lb, seed=3)
    c = BlockCodec("fp-file", 2, 4, compression)
    ff = _frame_file(tmp_path, c.encode(raw, K))
    nseg = 4 if size == "per-layer" else 1

    arena, rows, mask = _rows_target(lb)
    c.decode_into(ff, rows, key=K)
    assert np.array_equal(np.concatenate([p for r in rows for p in r]), raw)
    assert (arena[~mask] == 0x5A).all()                      # nothing written between the rows

    for layers in [range(i, i + 1) for i in range(4)] + [range(1, 3)]:
        arena, rows, mask = _rows_target(lb)
        c.decode_into(ff, rows, layers, key=K)
        for i in range(4):
            got = np.concatenate(rows[i])
            filled = i in layers if nseg == 4 else 0 in layers
            if filled:
                assert np.array_equal(got, raw[i * lb:(i + 1) * lb]), (layers, i)
            else:
                assert (got == 0x5A).all(), (layers, i)
        assert (arena[~mask] == 0x5A).all()
    # the same rows from the frame in memory: identical
    arena2, rows2, _ = _rows_target(lb)
    c.decode_into(c.encode(raw, K), rows2, key=K)
    arena, rows, _ = _rows_target(lb)
    c.decode_into(ff, rows, key=K)
    assert np.array_equal(arena, arena2)


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("compression", ["none", "zstd", "byteplane"])
def test_damaged_frame_file_raises_corrupt_frame(tmp_path, compression, size, file_reads):
    from tiercache.tiers.frame_files import FileFrame
    lb = _layer_bytes(size)
    raw = _kv_bytes(lb, seed=5)
    c = BlockCodec("fp-file", 2, 4, compression)
    frame = c.encode(raw, K)
    out = np.empty(len(raw), dtype=np.uint8)

    # cut short: the pointer's recorded length is the whole frame, the file holds half
    short = _frame_file(tmp_path, frame[:len(frame) // 2], "short")
    with pytest.raises(CorruptFrame):
        c.decode_into(FileFrame(short.path, len(frame)), out, key=K)
    with pytest.raises(CorruptFrame):                       # and recorded as short as it is
        c.decode_into(short, out, key=K)
    arena, rows, _ = _rows_target(lb)
    with pytest.raises(CorruptFrame):
        c.decode_into(FileFrame(short.path, len(frame)), rows, key=K)

    # one flipped payload byte, in the last layer's bytes
    bad = bytearray(frame)
    bad[-7] ^= 0x10
    flipped = _frame_file(tmp_path, bytes(bad), "flipped")
    with pytest.raises(CorruptFrame):
        c.decode_into(flipped, out, key=K)
    arena, rows, _ = _rows_target(lb)
    with pytest.raises(CorruptFrame):
        c.decode_into(flipped, rows, key=K)
    if size == "per-layer":                                   # the other layers still verify on their own
        out = np.full(len(raw), 0xA5, dtype=np.uint8)
        c.decode_into(flipped, out, range(0, 3), key=K)
        assert np.array_equal(out[:3 * lb], raw[:3 * lb])
        with pytest.raises(CorruptFrame):
            c.decode_into(flipped, out, range(3, 4), key=K)

    # a valid frame of another block
    other = _frame_file(tmp_path, c.encode(raw, K2), "other")
    with pytest.raises(CorruptFrame, match="key"):
        c.decode_into(other, out, key=K)
    arena, rows, _ = _rows_target(lb)
    with pytest.raises(CorruptFrame, match="key"):
        c.decode_into(other, rows, range(0, 1), key=K)
    c.decode_into(other, out, key=K2)
    assert np.array_equal(out, raw)

    # a frame file longer than its frame (garbage appended): refused
    longer = _frame_file(tmp_path, frame + b"\0" * 16, "longer")
    with pytest.raises(CorruptFrame):
        c.decode_into(longer, out, key=K)


def test_read_header_of_a_short_frame_file(tmp_path):
    from tiercache.codec import frame_segments
    ff = _frame_file(tmp_path, b"TCKV" + b"\0" * 20)
    with pytest.raises(CorruptFrame, match="shorter than the header"):
        read_header(ff)
    with pytest.raises(CorruptFrame):
        frame_segments(ff)


def test_file_frame_decode_layer_into(tmp_path):
    from tiercache.codec import MIN_SEGMENT_BYTES
    raw = _kv_bytes(MIN_SEGMENT_BYTES, seed=9)
    c = BlockCodec("fp-file", 2, 4, "byteplane")
    ff = _frame_file(tmp_path, c.encode(raw, K))
    for i in range(4):
        out = np.empty(MIN_SEGMENT_BYTES, dtype=np.uint8)
        c.decode_layer_into(ff, i, out, key=K)
        assert np.array_equal(out, raw[i * MIN_SEGMENT_BYTES:(i + 1) * MIN_SEGMENT_BYTES])
    with pytest.raises(IndexError):
        c.decode_layer_into(ff, 4, np.empty(MIN_SEGMENT_BYTES, dtype=np.uint8), key=K)


def test_read_ahead_hint_on_a_missing_file_is_ignored(tmp_path):
    """willneed is a hint: a frame file removed under the reader raises nothing there (the read after it
    reports the miss)."""
    from tiercache.tiers.frame_files import FileFrame
    ff = FileFrame(str(tmp_path / "gone"), 1 << 20)
    assert ff.willneed(0, 1 << 20) is None
    with pytest.raises(OSError):
        ff.readinto(memoryview(bytearray(16)), 0)


def test_pieces_hold_whole_segments_in_one_small_buffer(tmp_path, monkeypatch):
    """Above codec._OVERLAP_READ_BYTES a compressed frame file is read in pieces of whole segments, each
    from the start of one buffer no bigger than max(_OVERLAP_READ_BYTES, largest segment): every read
    starts where a segment starts, and the bytes decode exactly."""
    from tiercache import codec as codec_mod
    from tiercache.tiers.frame_files import FileFrame
    raw = _kv_bytes(codec_mod.MIN_SEGMENT_BYTES, layers=6, seed=9)
    c = BlockCodec("fp-file", 2, 6, "byteplane")
    frame = c.encode(raw, K)
    ff = _frame_file(tmp_path, frame)
    monkeypatch.setattr(codec_mod, "_OVERLAP_READ_BYTES", 100_000)
    table = codec_mod.HEADER_BYTES + 6 * codec_mod._ENTRY.size
    lens = [codec_mod._ENTRY.unpack_from(frame, codec_mod.HEADER_BYTES + i * codec_mod._ENTRY.size)[0]
            for i in range(6)]
    starts = [table + sum(lens[:i]) for i in range(6)]
    reads, real = [], FileFrame.readinto

    def spy(self, bufs, offset):
        reads.append((offset, len(memoryview(bufs).cast("B"))))
        return real(self, bufs, offset)
    monkeypatch.setattr(FileFrame, "readinto", spy)
    out = np.empty(len(raw), dtype=np.uint8)
    c.decode_into(ff, out, key=K)
    assert np.array_equal(out, raw)
    pieces = [r for r in reads if r[0] >= table]
    assert len(pieces) >= 2 and sum(n for _, n in pieces) == len(frame) - table  # every byte read once
    for off, n in pieces:
        assert off in starts and off + n in starts + [len(frame)]            # whole segments only
        assert n <= max(100_000, max(lens))
