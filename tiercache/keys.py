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

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import xxhash

KEY_BYTES = 16
_INT64 = np.dtype("<i8")


class BlockKey(bytes):
    """A 16-byte block key; a distinct type so it is never confused with other bytes."""

    __slots__ = ()

    def __new__(cls, value: bytes) -> "BlockKey":
        if len(value) != KEY_BYTES:
            raise ValueError(f"BlockKey: expected {KEY_BYTES} bytes, got {len(value)}")
        return super().__new__(cls, value)

    def __repr__(self) -> str:
        return f"BlockKey({self.hex()})"


def tokens_to_array(tokens: Any, field_name: str = "tokens") -> np.ndarray:
    """Normalise a sequence of token ids to a 1-D little-endian int64 array (copying only if needed)."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a hard dependency of the package
        torch = None
    if torch is not None and isinstance(tokens, torch.Tensor):
        if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
            raise TypeError(f"{field_name}: expected integer token ids, got a tensor of {tokens.dtype}")
        if tokens.dim() != 1:
            raise ValueError(f"{field_name}: expected a 1-D sequence of token ids, got shape {tuple(tokens.shape)}")
        arr = tokens.detach().to("cpu", dtype=torch.int64).numpy()
    elif isinstance(tokens, np.ndarray):
        if tokens.dtype.kind not in "iu":
            raise TypeError(f"{field_name}: expected integer token ids, got a numpy array of {tokens.dtype}")
        if tokens.ndim != 1:
            raise ValueError(f"{field_name}: expected a 1-D sequence of token ids, got shape {tokens.shape}")
        if tokens.dtype.kind == "u" and tokens.size and int(tokens.max()) > np.iinfo(np.int64).max:
            raise ValueError(f"{field_name}: token id {int(tokens.max())} does not fit in int64")
        arr = tokens
    elif isinstance(tokens, (str, bytes, bytearray)):
        raise TypeError(f"{field_name}: expected a sequence of int token ids, got {type(tokens).__name__}")
    else:
        try:
            seq = list(tokens)
        except TypeError:
            raise TypeError(f"{field_name}: expected a sequence of int token ids, "
                            f"got {type(tokens).__name__}") from None
        if not seq:
            return np.zeros(0, dtype=_INT64)
        try:
            arr = np.asarray(seq)
        except (OverflowError, ValueError):
            raise ValueError(f"{field_name}: expected int token ids that fit in int64") from None
        if arr.dtype == object:
            bad = next((t for t in seq if isinstance(t, bool) or not isinstance(t, (int, np.integer))), None)
            if bad is not None:
                raise TypeError(f"{field_name}: expected int token ids, got {type(bad).__name__} ({bad!r})")
            raise ValueError(f"{field_name}: a token id does not fit in int64")
        if arr.dtype.kind not in "iu" or arr.ndim != 1:
            bad = next((t for t in seq if isinstance(t, bool) or not isinstance(t, (int, np.integer))), seq[0])
            raise TypeError(f"{field_name}: expected a flat sequence of int token ids, got "
                            f"{type(bad).__name__} ({bad!r})")
        if arr.dtype.kind == "u" and int(arr.max()) > np.iinfo(np.int64).max:
            raise ValueError(f"{field_name}: token id {int(arr.max())} does not fit in int64")
    return np.ascontiguousarray(arr, dtype=_INT64)


@dataclass(frozen=True)
class Namespace:
    """Everything that makes KV for the same tokens different. Its digest seeds the key chain."""

    model_id: str
    layout_fingerprint: str
    tp_rank: int = 0
    tp_size: int = 1
    salt: str | None = None
    weights_revision: str | None = None

    def describe(self) -> dict:
        """What may be written to disk about this namespace (the salt itself is never stored)."""
        return {"model_id": self.model_id, "layout": self.layout_fingerprint, "tp_rank": self.tp_rank,
                "tp_size": self.tp_size, "salted": self.salt is not None,
                "weights_revision": self.weights_revision}

    def canonical(self) -> bytes:
        return json.dumps({**self.describe(), "salt": self.salt}, sort_keys=True).encode()


class KeyHasher:
    """Computes chained block keys for one hash algorithm (and secret, for blake2b)."""

    def __init__(self, algo: str = "xxh3_128", secret: bytes | None = None) -> None:
        if algo == "xxh3_128":
            def h(data: bytes) -> bytes:
                return xxhash.xxh3_128_digest(data)
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
            d = self._h(b"tiercache-namespace-v1\x00" + ns.canonical())
            if len(self._ns_cache) > 4096:  # salts are unbounded; keep the memo small
                self._ns_cache.clear()
            self._ns_cache[ns] = d
        return d

    def block_keys(self, tokens: Any, block_size: int, ns: Namespace,
                   max_blocks: int | None = None) -> list[BlockKey]:
        """Keys of every full block of `tokens` (the trailing partial block gets none)."""
        arr = tokens_to_array(tokens)
        n = len(arr) // block_size
        if max_blocks is not None:
            n = min(n, max_blocks)
        raw = arr[: n * block_size].tobytes()
        step = block_size * 8
        prev = self.namespace_digest(ns)
        h = self._h
        keys = []
        for i in range(n):
            prev = h(prev + raw[i * step:(i + 1) * step])
            keys.append(BlockKey(prev))
        return keys
