"""The copy engine: moves block bytes between tensors, asynchronously.

On a GPU, copies run on a dedicated CUDA stream (pinned host memory makes H2D
and D2H truly asynchronous); the stream first waits for the caller's current
stream, so a block is never copied before the kernel that produced it has
finished, and completion is an event. On a CPU-only machine, copies are split
across a thread pool (torch releases the GIL while copying). Either way the
caller gets a handle with `wait()` (host blocks) and, on CUDA, `wait_stream()`
(the caller's stream waits, the host does not).
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor

import torch

Pair = tuple[torch.Tensor, torch.Tensor]  # (dst, src)

_INLINE_BYTES = 1 << 20  # below this, a thread hop costs more than the copy


class TransferHandle:
    def __init__(self, futures: list[Future] | None = None, event: torch.cuda.Event | None = None,
                 nbytes: int = 0, started: float | None = None) -> None:
        self._futures = futures or []
        self._event = event
        self.nbytes = nbytes
        self.started = started if started is not None else time.perf_counter()

    def done(self) -> bool:
        if self._event is not None and not self._event.query():
            return False
        return all(f.done() for f in self._futures)

    def wait(self) -> None:
        """Block the host until every copy has finished; re-raise a copy's error."""
        if self._event is not None:
            self._event.synchronize()
        for f in self._futures:
            f.result()

    def wait_stream(self, stream: torch.cuda.Stream | None = None) -> None:
        """Make `stream` (default: the current one) wait for the copies without blocking the host."""
        if self._event is not None:
            (stream or torch.cuda.current_stream()).wait_event(self._event)
        for f in self._futures:
            f.result()


class TransferEngine:
    def __init__(self, device: torch.device, threads: int = 2) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self._stream = torch.cuda.Stream(device=device) if self.cuda else None
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="tiercache-copy")
        self._threads = threads

    def copy(self, pairs: list[Pair]) -> TransferHandle:
        """Start copying src -> dst for every pair; returns at once with a handle."""
        nbytes = sum(d.numel() * d.element_size() for d, _ in pairs)
        started = time.perf_counter()
        if not pairs:
            return TransferHandle(nbytes=0, started=started)
        if self.cuda and any(t.is_cuda for p in pairs for t in p):
            # wait for the computation that produced the sources before copying them
            self._stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self._stream):
                for dst, src in pairs:
                    dst.copy_(src, non_blocking=True)
                event = torch.cuda.Event()
                event.record(self._stream)
            return TransferHandle(event=event, nbytes=nbytes, started=started)
        if nbytes < _INLINE_BYTES or self._threads == 1:
            for dst, src in pairs:
                dst.copy_(src)
            return TransferHandle(nbytes=nbytes, started=started)
        # CPU: split the pairs into one run per worker thread
        runs = [pairs[i::self._threads] for i in range(self._threads)]
        futures = [self._pool.submit(_copy_run, run) for run in runs if run]
        return TransferHandle(futures=futures, nbytes=nbytes, started=started)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        if self._stream is not None:
            self._stream.synchronize()


def _copy_run(run: list[Pair]) -> None:
    for dst, src in run:
        dst.copy_(src)
