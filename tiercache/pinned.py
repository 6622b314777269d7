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

`host_to_device` and `device_to_host` are the copies every device<->host move goes through: rows
gathered into (or copied out of) pooled pinned buffers chunk by chunk, so the DMA is asynchronous
and the next chunk is prepared while the previous one is in flight. An H2D buffer goes back to the
pool with an event recorded after its copy (`CopyDone`); a D2H buffer once its bytes have been read
on the host. Between two CPU tensors (`crosses` false, the CPU path) they are plain copies.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Sequence

import torch


def _cuda_pinning_available() -> bool:
    return torch.cuda.is_available()


def crosses(a: torch.device, b: torch.device) -> bool:
    """Whether a copy between tensors on `a` and `b` is a device<->host transfer (staged through pinned memory)."""
    return (a.type == "cpu") != (b.type == "cpu")


class CopyDone:
    """`done()`/`wait()` of everything enqueued so far on a CUDA stream (an event recorded on it), the
    handle `StagingPool.release` takes. Off CUDA the copy already happened: done at once."""

    def __init__(self, device: torch.device | None = None, stream: torch.cuda.Stream | None = None) -> None:
        self._event = None
        if device is not None and device.type == "cuda":
            self._event = torch.cuda.Event()
            self._event.record(stream or torch.cuda.current_stream(device))

    def done(self) -> bool:
        return self._event is None or self._event.query()

    def wait(self) -> None:
        if self._event is not None:
            self._event.synchronize()


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
        self.acquired = 0  # buffers handed out so far (what tests and stats can check)

    @property
    def pinned(self) -> bool:
        return all(b.pinned for b in self._buffers)

    def free(self) -> int:
        """Buffers free right now (copies seen done included)."""
        with self._lock:
            self._reap()
            return len(self._free)

    def acquire(self, nbytes: int, block: bool = True) -> torch.Tensor | None:
        """A free buffer's first `nbytes`; with `block=False`, None instead of waiting for one."""
        if nbytes > self.buffer_bytes or nbytes < 0:
            raise ValueError(f"nbytes must be in [0, {self.buffer_bytes}] (the pool's buffer size), got {nbytes}; "
                             "split the copy")
        with self._lock:
            while True:
                if self._closed:
                    raise RuntimeError("the staging pool is closed")
                self._reap()
                if self._free:
                    self.acquired += 1
                    return self._buffers[self._free.popleft()].tensor[:nbytes]
                if not block:
                    return None
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


# -- the staged copies ---------------------------------------------------------------------------------
def _rows_per_chunk(pool: StagingPool, src: torch.Tensor, dim: int) -> tuple[list[int], int]:
    shape = list(src.shape)
    row = src.element_size() * (src.numel() // max(1, shape[dim])) if shape[dim] else 0
    if row > pool.buffer_bytes:
        raise ValueError(f"one row of {row} bytes does not fit the staging pool's {pool.buffer_bytes}-byte buffers")
    return shape, max(1, pool.buffer_bytes // max(1, row))


def _stage(raw: torch.Tensor, dtype: torch.dtype, shape: list[int]) -> torch.Tensor:
    return raw.view(dtype).view(shape)


def host_to_device(pool: StagingPool, src: torch.Tensor, dim: int, idx: torch.Tensor | None, out: torch.Tensor,
                   pos: torch.Tensor | None = None) -> None:
    """`out <- src.index_select(dim, idx)` (or `out.index_copy_(dim, pos, ...)`), src in host memory.

    Rows are gathered on the host into pinned staging buffers, a chunk at a time, and each chunk is
    copied asynchronously on the current stream; a buffer goes back to the pool with an event after
    its copy. `idx=None` takes src's rows in order. The caller's stream sees `out` filled."""
    n = src.shape[dim] if idx is None else idx.numel()
    if not n:
        return
    shape, per = _rows_per_chunk(pool, src if idx is None else src.narrow(dim, 0, 1), dim)
    if idx is not None:
        idx = idx.to(device=src.device, dtype=torch.long)
    if pos is not None:
        pos = pos.to(device=out.device, dtype=torch.long)
    for k0 in range(0, n, per):
        k = min(per, n - k0)
        shape[dim] = k
        raw = pool.acquire(src.element_size() * _numel(shape))
        try:
            stage = _stage(raw, src.dtype, shape)
            if idx is None:
                stage.copy_(src.narrow(dim, k0, k))
            else:
                torch.index_select(src, dim, idx[k0:k0 + k], out=stage)
            if pos is None:
                out.narrow(dim, k0, k).copy_(stage, non_blocking=True)
            else:
                out.index_copy_(dim, pos[k0:k0 + k], stage.to(out.device, non_blocking=True))
        except BaseException:
            pool.release(raw, CopyDone(out.device))  # whatever was enqueued from it runs first
            raise
        pool.release(raw, CopyDone(out.device))


def device_to_host(pool: StagingPool, src: torch.Tensor, dim: int, out: torch.Tensor,
                   pos: torch.Tensor | None = None) -> None:
    """`out.narrow(dim, 0, n) <- src` (or `out.index_copy_(dim, pos, src)`), src on the device, out on the host.

    Each chunk is copied asynchronously into a pinned staging buffer; the next one is enqueued while
    the host waits for the previous one and writes it into `out`. Returns once `out` holds the bytes.
    A buffer is never held while blocking on the pool (no deadlock between threads sharing it)."""
    n = src.shape[dim]
    if not n:
        return
    shape, per = _rows_per_chunk(pool, src, dim)
    if pos is not None:
        pos = pos.to(device=out.device, dtype=torch.long)
    pending: deque = deque()

    def finish_one() -> None:
        raw, stage, done, k0, k = pending.popleft()
        try:
            done.wait()
            if pos is None:
                out.narrow(dim, k0, k).copy_(stage)
            else:
                out.index_copy_(dim, pos[k0:k0 + k], stage)
        finally:
            pool.release(raw)

    try:
        for k0 in range(0, n, per):
            k = min(per, n - k0)
            shape[dim] = k
            nbytes = src.element_size() * _numel(shape)
            raw = pool.acquire(nbytes, block=False)
            while raw is None:
                if pending:
                    finish_one()
                    raw = pool.acquire(nbytes, block=False)
                else:
                    raw = pool.acquire(nbytes)
            stage = _stage(raw, src.dtype, shape)
            try:
                stage.copy_(src.narrow(dim, k0, k), non_blocking=True)
            except BaseException:
                pool.release(raw, CopyDone(src.device))
                raise
            pending.append((raw, stage, CopyDone(src.device), k0, k))
        while pending:
            finish_one()
    finally:
        for raw, _, done, _, _ in pending:  # an error part-way: the copies in flight still own their buffers
            pool.release(raw, done)


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
