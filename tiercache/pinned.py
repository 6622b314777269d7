"""Host memory pinned once at its exact size, and a small pool of pinned staging buffers.

`torch.empty(..., pin_memory=True)` goes through the caching host allocator: it rounds a request
up to a power of two (96 GiB asked, 128 GiB pinned) and keeps the pages pinned after the tensor is
gone. `HostBuffer` instead allocates plain memory and registers exactly those bytes with
`cudaHostRegister`, and unregisters them on `close()`. Without CUDA (or when not asked) nothing is
pinned and the buffer is plain memory.

Lifetime rule: pinned memory is read by the GPU asynchronously. Whoever enqueues a copy from or
into a buffer keeps the buffer (and its tensor) alive until that copy has finished: close a
`HostBuffer` only after the jobs using it are done, and give a staging buffer back with the job
that uses it (`StagingPool.release(buf, job)`), never before.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Sequence

import torch


def _cuda_pinning_available() -> bool:
    return torch.cuda.is_available()


class HostBuffer:
    """`HostBuffer(nbytes, pin)` (a uint8 tensor) or `HostBuffer((shape, dtype), pin)`; `.tensor`, `.pinned`."""

    def __init__(self, size: int | tuple[Sequence[int], torch.dtype], pin: bool = True) -> None:
        if isinstance(size, bool) or not isinstance(size, (int, tuple)):
            raise TypeError(f"size must be a byte count or (shape, dtype), got {type(size).__name__}")
        if isinstance(size, int):
            if size < 0:
                raise ValueError(f"size must be >= 0 bytes, got {size}")
            shape, dtype = (size,), torch.uint8
        else:
            if len(size) != 2 or not isinstance(size[1], torch.dtype):
                raise TypeError(f"size must be (shape, dtype), got {size!r}")
            shape, dtype = tuple(int(s) for s in size[0]), size[1]
        self.tensor: torch.Tensor | None = torch.empty(shape, dtype=dtype)  # plain memory, not the caching allocator
        self.nbytes = self.tensor.numel() * self.tensor.element_size()
        self.pinned = False
        self._ptr = self.tensor.data_ptr()
        if pin and self.nbytes and _cuda_pinning_available():
            # registering faults in and locks every page: the cost is paid here, once, not on a hot path
            torch.cuda.check_error(torch.cuda.cudart().cudaHostRegister(self._ptr, self.nbytes, 0))
            self.pinned = True

    def close(self) -> None:
        """Unpin (if pinned) and drop the buffer; calling it again does nothing."""
        if self.pinned:
            self.pinned = False
            torch.cuda.check_error(torch.cuda.cudart().cudaHostUnregister(self._ptr))
        self.tensor = None

    def __enter__(self) -> HostBuffer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:  # a forgotten close() must not leak pinned pages
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown: CUDA may already be gone
            pass


class StagingPool:
    """`count` reusable host buffers of `nbytes` each (pinned when asked and CUDA is there).

    `buf = pool.acquire(n)` returns a `n`-byte uint8 view of a free buffer (blocking until one is
    free); `pool.release(buf, job)` gives it back once `job` (anything with `done()`/`wait()`, or
    None) has finished with it.
    """

    def __init__(self, nbytes: int, count: int = 4, pin: bool = True) -> None:
        if nbytes <= 0 or count <= 0:
            raise ValueError(f"nbytes and count must be > 0, got nbytes={nbytes}, count={count}")
        self.buffer_bytes = nbytes
        self._buffers = [HostBuffer(nbytes, pin=pin) for _ in range(count)]
        self._free: deque[int] = deque(range(count))
        self._busy: deque[tuple[int, object]] = deque()  # (buffer index, job) in release order
        self._by_ptr = {b._ptr: i for i, b in enumerate(self._buffers)}
        self._lock = threading.Condition()
        self._closed = False

    @property
    def pinned(self) -> bool:
        return all(b.pinned for b in self._buffers)

    def acquire(self, nbytes: int) -> torch.Tensor:
        if nbytes > self.buffer_bytes or nbytes < 0:
            raise ValueError(f"nbytes must be in [0, {self.buffer_bytes}] (the pool's buffer size), got {nbytes}; "
                             "split the copy")
        with self._lock:
            while True:
                if self._closed:
                    raise RuntimeError("the staging pool is closed")
                self._reap()
                if self._free:
                    return self._buffers[self._free.popleft()].tensor[:nbytes]
                if self._busy:
                    job = self._busy[0][1]
                    self._lock.release()  # wait for the oldest copy without holding the lock
                    try:
                        job.wait()
                    except Exception:  # noqa: BLE001 - a failed copy still frees its buffer; its owner sees the error
                        pass
                    finally:
                        self._lock.acquire()
                else:
                    self._lock.wait()

    def release(self, buf: torch.Tensor, job: object = None) -> None:
        i = self._by_ptr.get(buf.data_ptr())
        if i is None:
            raise ValueError("buf is not a buffer of this pool (give back what acquire returned)")
        with self._lock:
            if job is None:
                self._free.append(i)
            else:
                self._busy.append((i, job))
            self._lock.notify()

    def _reap(self) -> None:
        while self._busy and self._busy[0][1].done():
            self._free.append(self._busy.popleft()[0])

    def close(self) -> None:
        """Wait for the copies still using a buffer, then unpin everything (idempotent)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            busy, self._busy = list(self._busy), deque()
            self._lock.notify_all()
        for _, job in busy:
            try:
                job.wait()
            except Exception:  # noqa: BLE001 - the copy's own error was reported to its owner
                pass
        for b in self._buffers:
            b.close()

    def __enter__(self) -> StagingPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
