"""Block keys: chained prefix hashes of full token blocks, scoped by a namespace.

    key[-1] = namespace digest (model id, layout, TP rank/size, salt, weights revision)
    key[i]  = H(key[i-1] || little-endian int64 token ids of block i)

Token ids are always hashed as little-endian int64, whatever container they came
in (list, numpy array, torch tensor), so every process and every restart gets
the same keys. H is xxh3_128 by default, or blake2b keyed with a secret for
multi-tenant deployments (a non-cryptographic hash lets a tenant craft
collisions). Never Python's hash().
"""

from __future__ import annotations

import array
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import xxhash

KEY_BYTES = 16
_INT64 = np.dtype("<i8")
_INT64_MAX = np.iinfo(np.int64).max


class BlockKey(bytes):
    """A 16-byte block key; a distinct type so it is never confused with other bytes."""

    __slots__ = ()

    def __new__(cls, value: bytes) -> "BlockKey":
        if len(value) != KEY_BYTES:
            raise ValueError(f"BlockKey: expected {KEY_BYTES} bytes, got {len(value)}")
        return super().__new__(cls, value)

    def __repr__(self) -> str:
        return f"BlockKey({self.hex()})"


_BOOL_TYPES = (bool, np.bool_)


def _reject_unsigned_overflow(arr: np.ndarray, field_name: str) -> None:
    if arr.dtype.kind == "u" and arr.itemsize >= 8 and arr.size and int(arr.max()) > _INT64_MAX:
        raise ValueError(f"{field_name}: token id {int(arr.max())} does not fit in int64 "
                         f"(ids are hashed as little-endian int64)")


def _ints_fast(seq: list | tuple) -> np.ndarray | None:
    """A list of plain ints as int64 in one C pass (array('q')), or None: let the careful path decide.

    array('q') takes bools as ints; a bool can only have become 0 or 1, so only those positions
    are looked at again (token ids 0 and 1 are rare, so this costs nothing on real prompts).
    """
    try:
        arr = np.frombuffer(array.array("q", seq), dtype=np.int64)
    except (TypeError, OverflowError, ValueError):
        return None
    small = np.flatnonzero((arr >= 0) & (arr <= 1))
    if len(small) and any(type(seq[i]) is not int for i in small.tolist()):
        return None
    return arr if _INT64.isnative else arr.astype(_INT64)


def tokens_to_array(tokens: Any, field_name: str = "tokens") -> np.ndarray:
    """Normalise a sequence of token ids to a 1-D little-endian int64 array (copying only if needed).

    Booleans are not token ids (TypeError, also inside a list); unsigned ids above 2**63 - 1 do
    not fit in int64 and would wrap onto the keys of negative ids (ValueError).
    """
    if type(tokens) is np.ndarray and tokens.dtype is _INT64 and tokens.ndim == 1 and tokens.flags.c_contiguous:
        return tokens  # already what the hash reads (the common case: a second call on the same prompt)
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a hard dependency of the package
        torch = None
    if torch is not None and isinstance(tokens, torch.Tensor):
        if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
            raise TypeError(f"{field_name}: expected integer token ids, got a tensor of {tokens.dtype}")
        if tokens.dim() != 1:
            raise ValueError(f"{field_name}: expected a 1-D sequence of token ids, got shape {tuple(tokens.shape)}")
        arr = tokens.detach().to("cpu").numpy()  # keeps the dtype: uint64 must be checked, not wrapped
        _reject_unsigned_overflow(arr, field_name)
    elif isinstance(tokens, np.ndarray):
        if tokens.dtype.kind not in "iu":
            raise TypeError(f"{field_name}: expected integer token ids, got a numpy array of {tokens.dtype}")
        if tokens.ndim != 1:
            raise ValueError(f"{field_name}: expected a 1-D sequence of token ids, got shape {tokens.shape}")
        _reject_unsigned_overflow(tokens, field_name)
        arr = tokens
    elif isinstance(tokens, (str, bytes, bytearray)):
        raise TypeError(f"{field_name}: expected a sequence of int token ids, got {type(tokens).__name__}")
    else:
        try:
            seq = tokens if isinstance(tokens, (list, tuple)) else list(tokens)
        except TypeError:
            raise TypeError(f"{field_name}: expected a sequence of int token ids, "
                            f"got {type(tokens).__name__}") from None
        if not seq:
            return np.zeros(0, dtype=_INT64)
        fast = _ints_fast(seq)
        if fast is not None:
            return fast
        try:
            arr = np.asarray(seq)
        except (OverflowError, ValueError):
            raise ValueError(f"{field_name}: expected int token ids that fit in int64") from None
        if arr.dtype == object:
            bad = next((t for t in seq if isinstance(t, _BOOL_TYPES) or not isinstance(t, (int, np.integer))), None)
            if bad is not None:
                raise TypeError(f"{field_name}: expected int token ids, got {type(bad).__name__} ({bad!r})")
            raise ValueError(f"{field_name}: a token id does not fit in int64")
        if arr.dtype.kind not in "iu" or arr.ndim != 1:
            bad = next((t for t in seq if isinstance(t, _BOOL_TYPES) or not isinstance(t, (int, np.integer))),
                       seq[0])
            raise TypeError(f"{field_name}: expected a flat sequence of int token ids, got "
                            f"{type(bad).__name__} ({bad!r})")
        # numpy turns [1, True] into int64 [1, 1]: a bool is not a token id
        types = set(map(type, seq))
        if bool in types or np.bool_ in types:
            raise TypeError(f"{field_name}: expected int token ids, got a bool (True/False is not a token id)")
        _reject_unsigned_overflow(arr, field_name)
    return np.ascontiguousarray(arr, dtype=_INT64)


@dataclass(frozen=True)
class Namespace:
    """Everything that makes KV for the same tokens different. Its digest seeds the key chain.

    `salt` keeps its type: a `str` salt and a `bytes` salt are distinct tenants (the canonical
    form tags each with its type, so salt=b"a" never equals salt="61" or salt="a").
    """

    model_id: str
    layout_fingerprint: str
    tp_rank: int = 0
    tp_size: int = 1
    salt: str | bytes | None = None
    weights_revision: str | None = None

    def __post_init__(self) -> None:
        if self.salt is not None and not isinstance(self.salt, (str, bytes)):
            raise TypeError(f"salt: expected None, str or bytes, got {type(self.salt).__name__}")

    def describe(self) -> dict:
        """What may be written to disk about this namespace (the salt itself is never stored)."""
        return {"model_id": self.model_id, "layout": self.layout_fingerprint, "tp_rank": self.tp_rank,
                "tp_size": self.tp_size, "salted": self.salt is not None,
                "weights_revision": self.weights_revision}

    def canonical(self) -> bytes:
        if self.salt is None:
            salt = None
        elif isinstance(self.salt, bytes):
            salt = ["bytes", self.salt.hex()]
        else:
            salt = ["str", str(self.salt)]
        return json.dumps({**self.describe(), "salt": salt}, sort_keys=True).encode()


NAMESPACE_TAG = b"tiercache-namespace-v2\x00"  # v2: salts carry their type


class KeyHasher:
    """Computes chained block keys for one hash algorithm (and secret, for blake2b)."""

    def __init__(self, algo: str = "xxh3_128", secret: bytes | None = None) -> None:
        if algo == "xxh3_128":
            h = xxhash.xxh3_128_digest
        elif algo == "blake2b":
            if not secret:
                raise ValueError("hash_secret: hash_algo='blake2b' needs a non-empty secret")
            key = bytes(secret)

            def h(data: bytes) -> bytes:
                return hashlib.blake2b(data, digest_size=KEY_BYTES, key=key).digest()
        else:
            raise ValueError(f"hash_algo: expected one of ['xxh3_128', 'blake2b'], got {algo!r}")
        self.algo = algo
        self._h: Callable[[bytes], bytes] = h
        self._ns_cache: dict[Namespace, bytes] = {}

    def namespace_digest(self, ns: Namespace) -> bytes:
        d = self._ns_cache.get(ns)
        if d is None:
            d = self._h(NAMESPACE_TAG + ns.canonical())
            if len(self._ns_cache) > 4096:  # salts are unbounded; keep the memo small
                self._ns_cache.clear()
            self._ns_cache[ns] = d
        return d

    def block_keys(self, tokens: Any, block_size: int, ns: Namespace,
                   max_blocks: int | None = None, after: bytes | None = None) -> list[BlockKey]:
        """Keys of every full block of `tokens` (the trailing partial block gets none).

        key[i] = H(key[i-1] || int64 LE tokens of block i). The token bytes are made once; each
        step is one 16 + 8*block_size byte concatenation and one hash (no per-block numpy).
        `after`: the key of the block before `tokens` (the chain goes on from it; `tokens` then starts
        at a block boundary), so a growing sequence is hashed once, block by block, not from token 0.
        """
        if after is None:
            prev = self.namespace_digest(ns)
        elif len(after) != KEY_BYTES:
            raise ValueError(f"after: expected a {KEY_BYTES}-byte block key, got {len(after)} bytes")
        else:
            prev = bytes(after)
        return self.chain(tokens_to_array(tokens), block_size, prev, max_blocks)

    def chain(self, arr: np.ndarray, block_size: int, prev: bytes, max_blocks: int | None = None) -> list[BlockKey]:
        """The key chain over the full blocks of `arr` (an array from tokens_to_array) from `prev`, the
        16-byte key before the first block (a namespace digest, or a block key): no checks, the hot path."""
        n = len(arr) // block_size
        if max_blocks is not None:
            n = min(n, max_blocks)
        if n <= 0:
            return []
        raw = arr[: n * block_size].tobytes()
        step = block_size * 8
        h = self._h
        new = bytes.__new__  # skips BlockKey's length check: a digest is always 16 bytes
        keys: list[BlockKey] = []
        append = keys.append
        for i in range(0, n * step, step):
            prev = h(prev + raw[i:i + step])
            append(new(BlockKey, prev))
        return keys


class Keyer:
    """The block keys of one cache configuration (what `TierCache.keys` computes), without a cache.

    The vLLM connector's scheduler and workers derive the same keys from the same settings in
    different processes; so does `TierCache` itself. `cfg` is a `CacheConfig`.
    """

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg
        self.block_size = cfg.layout.block_size
        self.hasher = KeyHasher(cfg.hash_algo, cfg.hash_secret)
        self._fingerprint = cfg.layout.fingerprint()
        self._starts: dict[str | bytes | None, bytes] = {}

    def namespace(self, salt: Any = None) -> Namespace:
        if salt is not None and not isinstance(salt, (str, bytes)):
            raise TypeError(f"salt: expected None, str or bytes, got {type(salt).__name__}")
        cfg = self.cfg
        return Namespace(cfg.model_id, self._fingerprint, cfg.tp_rank, cfg.tp_size, salt, cfg.weights_revision)

    def start(self, salt: Any = None) -> bytes:
        """The digest the key chain of `salt`'s namespace starts from, remembered per salt: building and
        hashing a Namespace on every call cost more than hashing a 16-token block."""
        d = self._starts.get(salt) if salt is None or type(salt) in (str, bytes) else None
        if d is None:
            d = self.hasher.namespace_digest(self.namespace(salt))
            if type(salt) in (str, bytes) or salt is None:  # subclasses may redefine equality: not remembered
                if len(self._starts) > 4096:  # salts are unbounded; keep the memo small
                    self._starts.clear()
                self._starts[salt] = d
        return d

    def keys(self, tokens: Any, salt: Any = None, max_blocks: int | None = None,
             after: bytes | None = None) -> list[BlockKey]:
        """Keys of every full block of `tokens` (at most `max_blocks`); with `after` (the key of the block
        before `tokens`), the chain goes on from it."""
        prev = self.start(salt)  # checks the salt, whether or not the chain starts from it
        if after is not None:
            if len(after) != KEY_BYTES:
                raise ValueError(f"after: expected a {KEY_BYTES}-byte block key, got {len(after)} bytes")
            prev = bytes(after)
        return self.hasher.chain(tokens_to_array(tokens), self.block_size, prev, max_blocks)

    def tag(self, salt: Any = None) -> tuple[bytes, dict]:
        """The note a slow tier keeps per block: the namespace's short digest and its description."""
        ns = self.namespace(salt)
        return self.hasher.namespace_digest(ns)[:8], ns.describe()
