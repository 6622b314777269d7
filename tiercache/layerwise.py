"""Handles for work that finishes later: a prefetch, and a layer-by-layer load.

PrefetchHandle.wait() returns the tokens of the prefix now in memory tiers and
counts the prefetch as `ready` (it was done before anyone waited) or `late`
(the caller had to wait). A prefetch refused because too many are queued is
`dropped` and its handle is complete at once with 0 tokens.

LayerLoad is what layer-wise attention needs: `num_tokens` is fixed when the
load starts; a background worker brings layer 0 of every prefix block, then
layer 1, and so on; `wait_layer(i)` blocks only until layer i is in place and
counts the time compute stalled (`tiercache_prefetch_wait_seconds`). If a
block turns out corrupt or vanished mid-way, `wait_layer` raises
KVUnavailable: the caller recomputes instead (layers already handed out
cannot be taken back, so the whole load fails rather than shrinks).

On a GPU, `wait_layer` does not block the host on the copy: the caller's stream waits for
the layer's event. The stall is then what the stream spent there, measured with CUDA
events recorded on it (before the wait, after it) and reported to the same metric once the
device has passed them (see transfer.DeviceTimes): host time would read ~0. On the CPU
the stall is host time.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future

import torch

from .errors import TierCacheError
from .stats import Recorder
from .transfer import DeviceTimes


class KVUnavailable(TierCacheError):
    """A layer-wise load could not deliver a layer (corrupt or evicted block)."""


class PrefetchHandle:
    def __init__(self, future: Future | None, recorder: Recorder, dropped: bool = False) -> None:
        self._future = future
        self._recorder = recorder
        self._counted = dropped
        if dropped:
            recorder.prefetch("dropped")

    @property
    def dropped(self) -> bool:
        return self._future is None

    def done(self) -> bool:
        return self._future is None or self._future.done()

    def wait(self, timeout: float | None = None) -> int:
        """Block until the prefetch finished; tokens of the cached prefix now in memory tiers."""
        if self._future is None:
            return 0
        if self._counted:
            return self._future.result(timeout)
        self._counted = True
        if self._future.done():
            self._recorder.prefetch("ready")
            return self._future.result()
        t0 = time.perf_counter()
        try:
            return self._future.result(timeout)
        finally:
            # the caller needed this KV and had to wait: that is a stall
            self._recorder.prefetch("late")
            self._recorder.prefetch_wait(time.perf_counter() - t0)


class LayerLoad:
    def __init__(self, out: torch.Tensor, num_tokens: int, recorder: Recorder,
                 cuda_events: bool = False, times: DeviceTimes | None = None) -> None:
        self.out = out
        self.num_tokens = num_tokens
        self.num_layers = out.shape[0]
        self._recorder = recorder
        self._ready = [threading.Event() for _ in range(self.num_layers)]
        self._delivered = [False] * self.num_layers  # layers in place stay valid if a later one fails
        self._cuda = [None] * self.num_layers if cuda_events else None
        self._error: BaseException | None = None
        self._done = threading.Event()
        self._times = (times if times is not None else DeviceTimes()) if cuda_events else None
        self._stall = 0.0
        self._stalls: dict[int, float] = {}  # layer -> seconds compute stalled on it, in the order asked
        self._stall_lock = threading.Lock()

    # -- worker side ---------------------------------------------------------------------
    def layer_ready(self, i: int, event: torch.cuda.Event | None = None) -> None:
        if self._cuda is not None:
            self._cuda[i] = event
        self._delivered[i] = True
        self._ready[i].set()

    def fail(self, error: BaseException) -> None:
        self._error = error
        for e in self._ready:
            e.set()
        self._done.set()

    def finish(self) -> None:
        self._done.set()

    # -- consumer side -------------------------------------------------------------------
    def wait_layer(self, i: int, timeout: float | None = None) -> torch.Tensor:
        """Layer i of the prefix, [planes, num_tokens, heads, head_dim]; blocks only until it is in place."""
        if not 0 <= i < self.num_layers:
            raise IndexError(f"layer: expected 0..{self.num_layers - 1}, got {i}")
        t0 = time.perf_counter()
        before = None
        if self._times is not None:
            self._times.settle()  # earlier stalls the device has passed by now
            # recorded before the host waits for the worker: if the stream runs dry meanwhile, that counts too
            before = torch.cuda.Event(enable_timing=True)
            before.record(torch.cuda.current_stream(self.out.device))
        ev = self._ready[i]
        if not ev.is_set():
            if not ev.wait(timeout):
                raise TimeoutError(f"layer {i} not loaded within {timeout}s")
        if not self._delivered[i]:
            raise KVUnavailable(f"layer {i} could not be loaded: {self._error}") from self._error
        if before is not None:
            stream = torch.cuda.current_stream(self.out.device)
            if self._cuda[i] is not None:
                stream.wait_event(self._cuda[i])  # the device waits, not the host
            after = torch.cuda.Event(enable_timing=True)
            after.record(stream)
            self._times.add(lambda s, i=i: self._stalled(i, s), before, after)
        else:
            self._stalled(i, time.perf_counter() - t0)
        return self.out[i]

    def _stalled(self, i: int, seconds: float) -> None:
        with self._stall_lock:
            self._stall += seconds
            self._stalls[i] = self._stalls.get(i, 0.0) + seconds
        self._recorder.prefetch_wait(seconds)

    def stalls(self) -> dict[int, float]:
        """Seconds compute stalled per layer waited for so far (on a GPU this waits for the device to get
        past those waits)."""
        if self._times is not None:
            self._times.settle(block=True)
        with self._stall_lock:
            return dict(self._stalls)

    @property
    def stall_seconds(self) -> float:
        """Seconds compute stalled on this load so far (see `stalls`)."""
        if self._times is not None:
            self._times.settle(block=True)
        with self._stall_lock:
            return self._stall

    def wait(self, timeout: float | None = None) -> torch.Tensor:
        """Every layer; the whole [L, planes, n, H, D] prefix."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"layer-wise load not finished within {timeout}s")
        if self._error is not None:
            raise KVUnavailable(str(self._error)) from self._error
        return self.out

    def done(self) -> bool:
        return self._done.is_set()
