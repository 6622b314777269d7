"""Frozen, validated configuration: the KV layout and the cache's settings.

Strings are parsed here, at the edge ("512MiB", "20GB", "bfloat16"); everything
behind this module sees ints and torch dtypes. Every bad field raises a
ValueError/TypeError that names the field and what was expected.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Any

import torch

_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
    "t": 1000**4, "tb": 1000**4,
    "ki": 1024, "kib": 1024, "mi": 1024**2, "mib": 1024**2, "gi": 1024**3, "gib": 1024**3,
    "ti": 1024**4, "tib": 1024**4,
}
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*$")

# dtypes a block may hold; the codec knows how to split each by element size.
SUPPORTED_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float8_e4m3fn": torch.float8_e4m3fn,
    "float8_e5m2": torch.float8_e5m2,
    "int8": torch.int8,
    "uint8": torch.uint8,
}
_DTYPE_NAMES = {v: k for k, v in SUPPORTED_DTYPES.items()}
_ALIASES = {"fp32": "float32", "float": "float32", "fp16": "float16", "half": "float16",
            "bf16": "bfloat16", "fp8": "float8_e4m3fn", "fp8_e4m3": "float8_e4m3fn",
            "fp8_e5m2": "float8_e5m2"}

WRITE_POLICIES = ("write_through", "write_back")
HASH_ALGOS = ("xxh3_128", "blake2b")
COMPRESSIONS = ("auto", "byteplane", "zstd", "none")


def parse_size(value: Any, field_name: str) -> int:
    """Parse a byte size: a non-negative int, or a string like "512MiB" / "20GB"."""
    if isinstance(value, bool):
        raise TypeError(f"{field_name}: expected a byte size (int or a string like '512MiB'), got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"{field_name}: expected a non-negative byte size, got {value}")
        return value
    if isinstance(value, float) and value.is_integer() and value >= 0:
        return int(value)
    if isinstance(value, str):
        m = _SIZE_RE.match(value)
        if m and m.group(2).lower() in _UNITS:
            n = float(m.group(1)) * _UNITS[m.group(2).lower()]
            return int(n)
        raise ValueError(
            f"{field_name}: expected a byte size like 1048576, '512MiB' or '20GB' "
            f"(units B, KB, MB, GB, TB, KiB, MiB, GiB, TiB), got {value!r}")
    raise TypeError(f"{field_name}: expected a byte size (int or a string like '512MiB'), got {type(value).__name__}")


def parse_dtype(value: Any, field_name: str = "dtype") -> torch.dtype:
    if isinstance(value, torch.dtype):
        if value in _DTYPE_NAMES:
            return value
    elif isinstance(value, str):
        name = value.lower().removeprefix("torch.")
        name = _ALIASES.get(name, name)
        if name in SUPPORTED_DTYPES:
            return SUPPORTED_DTYPES[name]
    raise ValueError(f"{field_name}: expected one of {sorted(SUPPORTED_DTYPES)}, got {value!r}")


def dtype_name(dtype: torch.dtype) -> str:
    return _DTYPE_NAMES[dtype]


def _positive_int(value: Any, field_name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{field_name}: expected a positive int, got {value!r}")
    if value <= 0:
        raise ValueError(f"{field_name}: expected a positive int, got {value}")
    return value


REMOTE_SCHEMES = ("redis://", "rediss://", "unix://", "redis+cluster://", "rediss+cluster://")


@dataclass(frozen=True)
class KVLayout:
    """Shape of one KV block: [num_layers, planes, block_size, num_kv_heads, head_dim]."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: Any = torch.bfloat16
    block_size: int = 16
    planes: int = 2  # 2 for K and V; 1 for an MLA latent

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "head_dim", "block_size"):
            _positive_int(getattr(self, name), name)
        if isinstance(self.planes, bool) or self.planes not in (1, 2):
            raise ValueError(f"planes: expected 1 (MLA latent) or 2 (K and V), got {self.planes!r}")
        object.__setattr__(self, "dtype", parse_dtype(self.dtype, "dtype"))

    @property
    def itemsize(self) -> int:
        return self.dtype.itemsize

    @property
    def block_shape(self) -> tuple[int, int, int, int, int]:
        return (self.num_layers, self.planes, self.block_size, self.num_kv_heads, self.head_dim)

    @property
    def block_numel(self) -> int:
        n = 1
        for d in self.block_shape:
            n *= d
        return n

    @property
    def block_bytes(self) -> int:
        return self.block_numel * self.itemsize

    @property
    def layer_block_bytes(self) -> int:
        return self.block_bytes // self.num_layers

    def kv_shape(self, num_tokens: int) -> tuple[int, int, int, int, int]:
        """Shape of a KV tensor for `num_tokens` tokens, as store/load use it."""
        return (self.num_layers, self.planes, num_tokens, self.num_kv_heads, self.head_dim)

    def fingerprint(self) -> str:
        """Stable text that identifies this layout (goes into keys and codec frames)."""
        return (f"L{self.num_layers}-P{self.planes}-B{self.block_size}-H{self.num_kv_heads}"
                f"-D{self.head_dim}-{dtype_name(self.dtype)}")

    def to_dict(self) -> dict[str, Any]:
        return {"num_layers": self.num_layers, "num_kv_heads": self.num_kv_heads,
                "head_dim": self.head_dim, "dtype": dtype_name(self.dtype),
                "block_size": self.block_size, "planes": self.planes}


@dataclass(frozen=True)
class CacheConfig:
    """Everything a TierCache needs. Sizes are ints or strings ("512MiB"); 0 turns a tier off."""

    layout: KVLayout
    model_id: str = "default"
    device: Any = "cpu"
    device_bytes: Any = 0
    host_bytes: Any = "256MiB"
    disk_path: Any = None
    disk_bytes: Any = "4GiB"
    remote_url: str | None = None
    remote_timeout_s: float = 0.5  # per Redis call; a dead server costs a request at most this, then back-off
    write_policy: str = "write_through"
    admission: str = "all"
    eviction: str = "lru"
    hash_algo: str = "xxh3_128"
    hash_secret: bytes | None = None
    compression: str = "auto"
    zstd_level: int = 1
    tp_rank: int = 0
    tp_size: int = 1
    weights_revision: str | None = None
    write_queue_blocks: int = 1024
    # faster disk puts (1.3-1.6x, benchmarks/disk_speed.py); allocates all of disk_bytes up front (so a full
    # filesystem stays an error, not SIGBUS), or is not used, said once, where the filesystem cannot hold it
    disk_writemap: bool = False
    # frames at least this long are files of their own next to the LMDB index, written with one writev and
    # read with positional reads (raw-file speed); smaller ones stay inside LMDB. None: every frame in LMDB
    disk_file_bytes: Any = "256KiB"
    # True: frame files are written with O_DIRECT, from an aligned buffer straight to the device, not through
    # the page cache (whose writeback paces a buffered writer): stores ran 2x faster and steadier on the
    # bench's VM, but cold loads of those files ran ~20% slower there, so it is opt-in. Where the filesystem
    # refuses O_DIRECT (some network file systems, older tmpfs) the writes are buffered, said once
    disk_direct_writes: bool = False
    io_threads: int = 2
    # integrations that can load in the background (the vLLM connector) do so for a request whose blocks to
    # bring up from disk or remote exceed this; 0: always, None: never (loads finish before the forward)
    async_load_bytes: Any = "64MiB"
    metrics_port: int | None = None
    metrics_addr: str = "127.0.0.1"
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        if not isinstance(self.layout, KVLayout):
            raise TypeError(f"layout: expected a KVLayout, got {type(self.layout).__name__}")
        if not isinstance(self.model_id, str) or not self.model_id:
            raise ValueError(f"model_id: expected a non-empty string, got {self.model_id!r}")
        try:
            dev = torch.device(self.device)
        except (RuntimeError, TypeError) as e:
            raise ValueError(f"device: expected a torch device like 'cpu' or 'cuda:0', got {self.device!r}") from e
        object.__setattr__(self, "device", dev)
        for name in ("device_bytes", "host_bytes", "disk_bytes"):
            object.__setattr__(self, name, parse_size(getattr(self, name), name))
        if self.disk_path is not None:
            import os
            if not isinstance(self.disk_path, (str, os.PathLike)):
                raise TypeError(f"disk_path: expected a path or None, got {type(self.disk_path).__name__}")
            object.__setattr__(self, "disk_path", os.fspath(self.disk_path))
            if not self.disk_path:
                raise ValueError("disk_path: expected a directory path (or None to turn the disk tier off), got ''")
        if self.remote_url is not None and (not isinstance(self.remote_url, str)
                                            or not self.remote_url.startswith(REMOTE_SCHEMES)):
            raise ValueError(f"remote_url: expected None or a URL like 'redis://host:6379/0' (also rediss://, "
                             f"unix://, redis+cluster://, rediss+cluster://), got {self.remote_url!r}")
        if isinstance(self.remote_timeout_s, bool) or not isinstance(self.remote_timeout_s, (int, float)) \
                or not 0 < self.remote_timeout_s <= 60:
            raise ValueError(f"remote_timeout_s: expected seconds in (0, 60], got {self.remote_timeout_s!r}")
        from .policy import ADMISSION_POLICIES, EVICTION_POLICIES
        for name, allowed in (("write_policy", WRITE_POLICIES), ("admission", tuple(ADMISSION_POLICIES)),
                              ("hash_algo", HASH_ALGOS), ("compression", COMPRESSIONS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}: expected one of {list(allowed)}, got {getattr(self, name)!r}")
        if self.eviction not in EVICTION_POLICIES:
            raise ValueError(f"eviction: expected one of {sorted(EVICTION_POLICIES)}, got {self.eviction!r}")
        if self.hash_algo == "blake2b":
            if not isinstance(self.hash_secret, (bytes, bytearray)) or not 1 <= len(self.hash_secret) <= 64:
                raise ValueError("hash_secret: hash_algo='blake2b' needs a secret of 1..64 bytes "
                                 f"(keyed hashing for multi-tenant isolation), got {self.hash_secret!r}")
        elif self.hash_secret is not None:
            raise ValueError("hash_secret: only used with hash_algo='blake2b'; leave it None for xxh3_128")
        if isinstance(self.zstd_level, bool) or not isinstance(self.zstd_level, int) or not -7 <= self.zstd_level <= 22:
            raise ValueError(f"zstd_level: expected an int in -7..22, got {self.zstd_level!r}")
        if isinstance(self.tp_size, bool) or not isinstance(self.tp_size, int) or self.tp_size < 1:
            raise ValueError(f"tp_size: expected an int >= 1, got {self.tp_size!r}")
        if isinstance(self.tp_rank, bool) or not isinstance(self.tp_rank, int) or not 0 <= self.tp_rank < self.tp_size:
            raise ValueError(f"tp_rank: expected an int in 0..tp_size-1 ({self.tp_size - 1}), got {self.tp_rank!r}")
        if self.weights_revision is not None and not isinstance(self.weights_revision, str):
            raise TypeError(f"weights_revision: expected a string or None, got {self.weights_revision!r}")
        _positive_int(self.write_queue_blocks, "write_queue_blocks")
        if not isinstance(self.disk_writemap, bool):
            raise TypeError(f"disk_writemap: expected a bool, got {self.disk_writemap!r}")
        if not isinstance(self.disk_direct_writes, bool):
            raise TypeError(f"disk_direct_writes: expected a bool, got {self.disk_direct_writes!r}")
        _positive_int(self.io_threads, "io_threads")
        if self.disk_file_bytes is not None:
            object.__setattr__(self, "disk_file_bytes", parse_size(self.disk_file_bytes, "disk_file_bytes"))
        if self.async_load_bytes is not None:
            object.__setattr__(self, "async_load_bytes", parse_size(self.async_load_bytes, "async_load_bytes"))
        if self.metrics_port is not None and (isinstance(self.metrics_port, bool)
                                              or not isinstance(self.metrics_port, int)
                                              or not 0 <= self.metrics_port <= 65535):
            raise ValueError(f"metrics_port: expected None or a port in 0..65535, got {self.metrics_port!r}")
        if not isinstance(self.metrics_addr, str) or not self.metrics_addr:
            raise ValueError(f"metrics_addr: expected an address like '127.0.0.1' or '0.0.0.0', "
                             f"got {self.metrics_addr!r}")
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device: {self.device} requested but CUDA is not available "
                             f"(torch {torch.__version__}); use device='cpu'")

    @property
    def disk_enabled(self) -> bool:
        return self.disk_path is not None and self.disk_bytes > 0

    def replace(self, **changes: Any) -> "CacheConfig":
        return replace(self, **changes)
