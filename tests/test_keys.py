import subprocess
import sys

import numpy as np
import pytest
import torch

from tiercache.keys import BlockKey, KeyHasher, Namespace, tokens_to_array

NS = Namespace("model", "L2-P2-B4-H2-D8-bfloat16")


def keys(tokens, ns=NS, algo="xxh3_128", secret=None, block=4):
    return KeyHasher(algo, secret).block_keys(tokens, block, ns)


def test_containers_give_identical_keys():
    toks = [5, 9, 100_000, 3, 7, 1, 2, 8, 6]
    k_list = keys(toks)
    assert k_list == keys(np.array(toks, dtype=np.int32))
    assert k_list == keys(np.array(toks, dtype=np.uint32))
    assert k_list == keys(torch.tensor(toks, dtype=torch.int64))
    assert k_list == keys(torch.tensor(toks, dtype=torch.int32))
    assert k_list == keys(tuple(toks))
    assert len(k_list) == 2  # 9 tokens: two full blocks, the partial one gets no key
    assert all(isinstance(k, BlockKey) and len(k) == 16 for k in k_list)


def test_chain_is_prefix_stable_and_position_dependent():
    a = keys(list(range(12)))
    b = keys(list(range(8)) + [99, 98, 97, 96])
    assert a[:2] == b[:2] and a[2] != b[2]
    # the same block content at another position gets another key
    c = keys([0, 1, 2, 3, 0, 1, 2, 3])
    assert c[0] != c[1]


def test_golden_value_is_stable():
    # Keys must never change between releases: stored blocks would become unreachable.
    k = keys([1, 2, 3, 4], ns=Namespace("golden", "L1-P2-B4-H1-D1-bfloat16"))
    assert k[0].hex() == GOLDEN
    salted = keys([1, 2, 3, 4], ns=Namespace("golden", "L1-P2-B4-H1-D1-bfloat16", salt=b"a"))
    assert salted[0].hex() == GOLDEN_BYTES_SALT


# xxh3_128 chain of v2 keys (v2: salts carry their type); changing them orphans every store
GOLDEN = "8b8fb110aee1ebd07fc71c9c717b7899"
GOLDEN_BYTES_SALT = "3e7ce348aa4e22c16b8eda8048e50042"


def test_str_and_bytes_salts_are_distinct_namespaces():
    toks = list(range(8))
    by = {repr(s): keys(toks, ns=Namespace("model", NS.layout_fingerprint, salt=s))[0]
          for s in (None, b"a", "61", "a", b"61", b"", "")}
    assert len(set(by.values())) == len(by)          # b"a" is never "61" (nor "a"); b"" is not "" nor None
    assert keys(toks, ns=Namespace("model", NS.layout_fingerprint, salt=b"a")) == \
        keys(toks, ns=Namespace("model", NS.layout_fingerprint, salt=b"a"))
    with pytest.raises(TypeError, match="salt"):
        Namespace("model", NS.layout_fingerprint, salt=bytearray(b"a"))


def test_namespace_isolation():
    toks = list(range(8))
    base = keys(toks)
    for ns in (Namespace("other", NS.layout_fingerprint), Namespace("model", "L2-P2-B4-H2-D8-float16"),
               Namespace("model", NS.layout_fingerprint, tp_rank=1, tp_size=2),
               Namespace("model", NS.layout_fingerprint, salt="tenant-a"),
               Namespace("model", NS.layout_fingerprint, weights_revision="v2")):
        assert keys(toks, ns=ns)[0] != base[0]


def test_blake2b_keyed():
    toks = list(range(8))
    a = keys(toks, algo="blake2b", secret=b"s" * 32)
    assert a == keys(toks, algo="blake2b", secret=b"s" * 32)
    assert a != keys(toks, algo="blake2b", secret=b"t" * 32)
    assert a != keys(toks)


def test_keys_identical_across_processes():
    code = ("from tiercache.keys import KeyHasher, Namespace;"
            "print(','.join(k.hex() for k in KeyHasher().block_keys(list(range(20)), 4, "
            "Namespace('model', 'L2-P2-B4-H2-D8-bfloat16'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONHASHSEED": "12345", "PATH": ""}).stdout.strip()
    assert out == ",".join(k.hex() for k in keys(list(range(20))))


@pytest.mark.parametrize("bad,exc", [
    ([1.5, 2.0], TypeError), ("abcd", TypeError), (np.zeros((2, 2), dtype=np.int64), ValueError),
    (torch.zeros(4), TypeError), ([True, False], TypeError), (5, TypeError), ([2**70], ValueError),
    (np.array([2**64 - 1], dtype=np.uint64), ValueError),
    (np.array([1, 2**63], dtype=np.uint64), ValueError),
    (torch.tensor([2**63, 1], dtype=torch.uint64), ValueError),       # would wrap to the keys of negative ids
    (torch.tensor([2**64 - 1], dtype=torch.uint64), ValueError),
    ([1, 2, True, 4], TypeError), ([np.True_, 2], TypeError), (np.array([True, False]), TypeError),
    (torch.tensor([True, False]), TypeError),
])
def test_bad_tokens(bad, exc):
    with pytest.raises(exc, match="tokens"):
        tokens_to_array(bad)


def test_large_ids_hash_as_int64():
    toks = [2**40, 2**62, 1, 2]
    assert keys(toks) == keys(np.array(toks, dtype=np.int64))
    assert tokens_to_array(toks).dtype == np.dtype("<i8")


def test_blockkey_type():
    with pytest.raises(ValueError, match="BlockKey"):
        BlockKey(b"short")


def test_uint64_ids_that_fit_hash_like_int64():
    toks = [0, 5, 2**63 - 1, 7]
    assert keys(torch.tensor(toks, dtype=torch.uint64)) == keys(toks)
    assert keys(np.array(toks, dtype=np.uint64)) == keys(toks)


def test_block_keys_reference_definition():
    """key[i] = xxh3_128(key[i-1] || int64 LE tokens of block i), seeded by the namespace digest."""
    import xxhash
    h = KeyHasher()
    toks = np.arange(64, dtype=np.int64) * 7919
    prev = h.namespace_digest(NS)
    want = []
    for i in range(0, 64, 16):
        prev = xxhash.xxh3_128_digest(prev + toks[i:i + 16].astype("<i8").tobytes())
        want.append(prev)
    got = h.block_keys(toks, 16, NS)
    assert got == want and all(type(k) is BlockKey for k in got)
    assert h.block_keys(toks, 16, NS, max_blocks=2) == want[:2]
    assert h.block_keys(toks[:15], 16, NS) == []


def test_many_salts_keep_the_namespace_memo_bounded():
    h = KeyHasher()
    for i in range(10_000):                                   # one tenant each
        h.block_keys([1, 2, 3, 4], 4, Namespace("model", NS.layout_fingerprint, salt=f"tenant-{i}"))
    assert len(h._ns_cache) <= 4097


@pytest.mark.parametrize("algo,secret", [("xxh3_128", None), ("blake2b", b"s3cret")])
def test_chain_goes_on_from_a_given_key(algo, secret):
    """Hashing a growing sequence block by block (after=the last key) gives exactly the keys of hashing it
    from token 0: what the vLLM scheduler does instead of re-hashing the whole prefix per new block."""
    h = KeyHasher(algo, secret)
    toks = list(np.random.default_rng(1).integers(0, 128_000, 4 * 9 + 3))
    whole = h.block_keys(toks, 4, NS)
    grown: list = []
    for end in (4, 12, 12, 20, 36, 39):                  # steps of 1, 2, 0 and 4 blocks, then a partial one
        start = len(grown) * 4
        grown += h.block_keys(toks[start:end], 4, NS, after=grown[-1] if grown else None)
    assert grown == whole and len(whole) == 9
    other = h.block_keys(toks[4:8], 4, NS, after=whole[1])
    assert other != whole[1:2]                           # the chain depends on the key it goes on from
    with pytest.raises(ValueError, match="after: expected a 16-byte block key"):
        h.block_keys(toks, 4, NS, after=b"short")


def test_keyer_remembers_each_salts_start_without_mixing_salts():
    """TierCache and the vLLM connector hash from a digest remembered per salt: every salt still gets its
    own namespace's keys (str and bytes apart, a str subclass like its str), bad salts still raise, and
    many tenants keep the memo bounded."""
    from tiercache.config import CacheConfig, KVLayout
    from tiercache.keys import Keyer

    layout = KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, dtype=torch.bfloat16, block_size=4)
    cfg = CacheConfig(layout=layout, model_id="model", host_bytes=0)
    k = Keyer(cfg)
    toks = np.arange(12, dtype=np.int64)

    def reference(salt):
        return KeyHasher().block_keys(toks, 4, Namespace("model", layout.fingerprint(), salt=salt))

    class Tenant(str):
        pass

    for _ in range(2):  # the second pass is served from the memo
        for salt in (None, "a", b"a", "", b"", Tenant("a")):
            got = k.keys(toks, salt)
            assert got == reference(salt) and all(type(x) is BlockKey for x in got), salt
    assert k.keys(toks, "a") != k.keys(toks, b"a") != k.keys(toks, None)
    assert set(k._starts) == {None, "a", b"a", "", b""}  # the subclass is hashed each time, not remembered
    for bad in (1, True, 1.0, bytearray(b"a")):
        with pytest.raises(TypeError, match="salt: expected None, str or bytes"):
            k.keys(toks, bad)
    for i in range(10_000):
        k.keys(toks, f"tenant-{i}")
    assert len(k._starts) <= 4097
    assert k.keys(toks, "tenant-3") == reference("tenant-3")


def test_tokens_to_array_returns_a_ready_array_itself_and_copies_the_rest():
    ready = np.arange(8, dtype=np.int64)
    assert tokens_to_array(ready) is ready
    strided = np.arange(16, dtype=np.int64)[::2]
    got = tokens_to_array(strided)
    assert got is not strided and got.flags.c_contiguous and got.tolist() == strided.tolist()
    big_endian = np.arange(8, dtype=">i8")
    got = tokens_to_array(big_endian)
    assert got.dtype == np.dtype("<i8") and got.tolist() == list(range(8))
    with pytest.raises(ValueError, match="1-D"):
        tokens_to_array(np.arange(8, dtype=np.int64).reshape(2, 4))
