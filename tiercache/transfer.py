"""The transfer engine: jobs with ids that move bytes asynchronously, on CUDA streams or on threads.

    job = engine.submit(fn, "h2d")       # fn enqueues copies/kernels; returns at once with a Job
    job.wait_stream()                    # compute waits on the device, the host does not
    engine.poll() -> [ids]               # jobs finished since the last poll (vLLM's get_finished)

CUDA contract:
- Each direction ("h2d", "d2h", "d2d", "h2h") has its own stream, plus a high-priority one for
  `priority=True` (the load the model waits on), so stores and loads overlap and a layer load is
  not queued behind a prefetch.
- Ordering in: fn runs on its stream only after an event recorded on the SUBMITTING thread's
  current stream (or on `after=`: an event from `engine.fence()` taken on the caller's thread, a
  stream or a job). A job never reads a block before the compute that wrote it. A thread that
  submits on behalf of another (a worker) must pass that caller's `fence()`: its own current stream
  is not the caller's.
- Ordering out: `job.wait_stream(s)` makes stream s wait for the job's end event; compute never reads
  a block before its copy has finished. `job.wait()` blocks the host instead.
- Between jobs: `after=job` orders on the device for two CUDA jobs; host ("h2h") work after a CUDA job
  synchronizes that job's end event on its worker thread; a CUDA job after host work is enqueued once
  that work is done (the submitter waits). A job after a failed one fails without running.
- Lifetime: CUDA tensors passed as `tensors=` are `record_stream`-ed on the job's stream, so the
  caching allocator does not reuse them while the job runs; every tensor in `tensors=` (pinned host
  memory included) is also referenced by the job until it is seen done.
- Timing: `job.seconds` is the elapsed time between a start and an end event on the job's stream.

On a CPU-only machine the same interface runs fn on a small pool of threads (priority jobs first),
or inline when asked; ordering-in is then implicit (the submitter's work is already done) and
`seconds` is host time. `copy(pairs)` is the engine's original entry point and keeps its behaviour.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future

import torch

Pair = tuple[torch.Tensor, torch.Tensor]  # (dst, src)
DIRECTIONS = ("h2d", "d2h", "d2d", "h2h")

_INLINE_BYTES = 1 << 20  # below this, a thread hop costs more than the copy


class Job:
    """One submitted unit of transfer work. `_event` (the CUDA end event) is kept for older callers."""

    def __init__(self, job_id: int, direction: str, nbytes: int = 0, *, start_event=None, end_event=None,
                 futures: Sequence[Future] = (), keep: Sequence[torch.Tensor] = (), error: BaseException | None = None,
                 device: torch.device | None = None) -> None:
        self.id = job_id
        self._device = device
        self.direction = direction
        self.nbytes = nbytes
        self.started = time.perf_counter()
        self._start = start_event
        self._event = end_event
        self._futures = list(futures)
        self._keep = list(keep)   # tensors the job uses: alive until the job is seen done
        self._error = error
        self._host_times: list[tuple[float, float]] = []
        self._lock = threading.Lock()

    # -- completion --------------------------------------------------------------------------
    def done(self) -> bool:
        if self._event is not None and not self._event.query():
            return False
        if not all(f.done() for f in self._futures):
            return False
        self._keep = []
        return True

    def wait(self) -> None:
        """Block the host until the job has finished; re-raise its error."""
        if self._event is not None:
            self._event.synchronize()
        for f in self._futures:
            f.result()
        self._keep = []
        if self._error is not None:
            raise self._error

    def wait_stream(self, stream: torch.cuda.Stream | None = None, measure: bool = False) -> Stall | None:
        """Make `stream` (default: the current one) wait for the job on the device, the host not blocking.

        With `measure=True` returns a `Stall` whose `seconds` is how long that stream sat waiting.
        On the CPU path there is no device: the host waits.
        """
        if self._event is None:
            t0 = time.perf_counter()
            self.wait()
            return Stall(host_seconds=time.perf_counter() - t0) if measure else None
        if self._error is not None:
            self.wait()
        stream = stream or torch.cuda.current_stream(self._device)
        before = after = None
        if measure:
            before = torch.cuda.Event(enable_timing=True)
            before.record(stream)
        stream.wait_event(self._event)
        if measure:
            after = torch.cuda.Event(enable_timing=True)
            after.record(stream)
            return Stall(before=before, after=after)
        return None

    @property
    def ok(self) -> bool:
        """Finished without an error (False while running)."""
        return self.done() and self.error is None

    @property
    def error(self) -> BaseException | None:
        if self._error is not None:
            return self._error
        for f in self._futures:
            if f.done() and f.exception() is not None:
                return f.exception()
        return None

    @property
    def seconds(self) -> float | None:
        """Time the transfer took: CUDA event elapsed time, or host time on the CPU path; None until done."""
        if not self.done():
            return None
        if self._start is not None:
            return self._start.elapsed_time(self._event) / 1e3
        if not self._host_times:
            return 0.0
        return max(t1 for _, t1 in self._host_times) - min(t0 for t0, _ in self._host_times)

    def _timed(self, fn: Callable[[], object]) -> Callable[[], object]:
        def run() -> object:
            t0 = time.perf_counter()
            try:
                return fn()
            finally:
                with self._lock:
                    self._host_times.append((t0, time.perf_counter()))
        return run


TransferHandle = Job  # the name callers of copy() know


class Stall:
    """How long a stream waited for a job (`seconds`: None until the device has passed the wait)."""

    def __init__(self, before=None, after=None, host_seconds: float | None = None) -> None:
        self._before, self._after, self._host = before, after, host_seconds

    @property
    def seconds(self) -> float | None:
        if self._host is not None:
            return self._host
        if not self._after.query():
            return None
        return self._before.elapsed_time(self._after) / 1e3


class DeviceTimes:
    """Timings whose device part is still running, reported once the device has passed them.

    `add(report, start, end, host_seconds)`: `report(host_seconds + elapsed(start, end))` is called
    once `end` has completed — from the next `settle()` that finds it done (`block=False`, what the
    hot paths call: never a host sync), or from `settle(block=True)` (close, stats). Each entry is
    reported exactly once, in the order added. On the CPU path there is nothing to wait for: callers
    report host time directly and never use this.
    """

    def __init__(self) -> None:
        self._pending: list[tuple[Callable[[float], None], object, object, float]] = []
        self._lock = threading.Lock()

    def add(self, report: Callable[[float], None], start, end, host_seconds: float = 0.0) -> None:
        with self._lock:
            self._pending.append((report, start, end, host_seconds))

    def __len__(self) -> int:
        return len(self._pending)

    def settle(self, block: bool = False) -> int:
        """Report every entry whose end has passed (all of them with `block=True`); how many were reported."""
        with self._lock:
            ready = []
            while self._pending:
                report, start, end, host = self._pending[0]
                if not block and not end.query():
                    break
                self._pending.pop(0)
                ready.append((report, start, end, host))
        for report, start, end, host in ready:
            if block:
                end.synchronize()
            report(host + start.elapsed_time(end) / 1e3)
        return len(ready)


class _Workers:
    """Threads taking jobs from a priority heap (priority jobs first, then in submission order)."""

    def __init__(self, threads: int, name: str) -> None:
        self._heap: list = []
        self._seq = itertools.count()
        self._cv = threading.Condition()
        self._closed = False
        self._threads = [threading.Thread(target=self._run, name=f"{name}-{i}", daemon=True) for i in range(threads)]
        for t in self._threads:
            t.start()

    def submit(self, fn: Callable[[], object], priority: bool = False, fut: Future | None = None) -> Future:
        fut = fut if fut is not None else Future()
        with self._cv:
            # while closing, a worker may still queue the job that waited for the one it just finished
            if self._closed and threading.current_thread() not in self._threads:
                raise RuntimeError("the transfer engine is closed")
            heapq.heappush(self._heap, (0 if priority else 1, next(self._seq), fn, fut))
            self._cv.notify()
        return fut

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._heap and not self._closed:
                    self._cv.wait()
                if not self._heap:
                    return
                _, _, fn, fut = heapq.heappop(self._heap)
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn())
            except BaseException as e:  # noqa: BLE001 - handed to whoever waits on the job
                fut.set_exception(e)

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        for t in self._threads:
            t.join()


class TransferEngine:
    def __init__(self, device: torch.device | str, threads: int = 2) -> None:
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self._threads = max(1, int(threads))
        self._workers = _Workers(self._threads, "tiercache-copy")
        self._streams: dict[tuple[str, bool], torch.cuda.Stream] = {}
        self._ids = itertools.count(1)
        self._pending: dict[int, Job] = {}   # submitted jobs not yet reported by poll()
        self._reported: dict[int, Job] = {}  # the jobs the latest poll() reported
        self._lock = threading.Lock()
        self._closed = False

    # -- ordering helpers ------------------------------------------------------------------------
    def fence(self) -> torch.cuda.Event | None:
        """An event on the calling thread's current stream (None on the CPU path): pass it as `after=`
        when another thread submits work that must follow what this thread has enqueued so far."""
        if not self.cuda:
            return None
        ev = torch.cuda.Event()
        ev.record(torch.cuda.current_stream(self.device))
        return ev

    def stream(self, direction: str, priority: bool = False) -> torch.cuda.Stream:
        """The pooled stream for a direction (created on first use)."""
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {list(DIRECTIONS)}, got {direction!r}")
        key = (direction, bool(priority))
        with self._lock:
            s = self._streams.get(key)
            if s is None:
                s = torch.cuda.Stream(device=self.device, priority=-1 if priority else 0)
                self._streams[key] = s
        return s

    # -- submission ------------------------------------------------------------------------------
    def submit(self, fn: Callable[[], object], direction: str, priority: bool = False, *, nbytes: int = 0,
               tensors: Iterable[torch.Tensor] = (), after=None, inline: bool = False, track: bool = True) -> Job:
        """Run `fn` as one job. On CUDA fn only enqueues work (it runs under the job's stream); on the
        CPU path (and for "h2h") it does the work, on a worker thread or inline. `track=False` keeps the
        job out of poll()."""
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {list(DIRECTIONS)}, got {direction!r}")
        if self._closed:
            raise RuntimeError("the transfer engine is closed")
        tensors = list(tensors)
        job_id = next(self._ids)
        if self.cuda and direction != "h2h":  # host-to-host work is CPU work: threads, even beside a GPU
            job = self._submit_cuda(job_id, fn, direction, priority, nbytes, tensors, after)
        else:
            job = self._submit_threads(job_id, fn, direction, priority, nbytes, tensors, after, inline)
        if track:
            with self._lock:
                self._pending[job_id] = job
        return job

    def _submit_threads(self, job_id: int, fn, direction: str, priority: bool, nbytes: int,
                        tensors: list[torch.Tensor], after, inline: bool) -> Job:
        # Ordering in: the submitter's own work is already done; jobs in `after` must finish first.
        deps = [a for a in (after if isinstance(after, (list, tuple)) else [after]) if isinstance(a, Job)]
        job = Job(job_id, direction, nbytes, keep=tensors)
        run = job._timed(_after_deps(fn, deps, host=True))
        if inline:
            for d in deps:
                _quiet_wait(d)
            try:
                run()
            except Exception as e:  # noqa: BLE001 - reported through the job, like a threaded one
                job._error = e
            return job
        fut: Future = Future()
        job._futures.append(fut)
        waiting = [f for d in deps for f in d._futures if not f.done()]
        if not waiting:
            self._workers.submit(run, priority, fut)
            return job
        # held back (not queued) until its dependencies finish: a worker never blocks on another job
        left = [len(waiting)]
        lock = threading.Lock()

        def one_done(_: Future) -> None:
            with lock:
                left[0] -= 1
                ready = left[0] == 0
            if ready:
                try:
                    self._workers.submit(run, priority, fut)
                except RuntimeError as e:  # closed meanwhile
                    fut.set_exception(e)
        for f in waiting:
            f.add_done_callback(one_done)
        return job

    def _submit_cuda(self, job_id: int, fn, direction: str, priority: bool, nbytes: int,
                     tensors: list[torch.Tensor], after) -> Job:
        deps = [a for a in (after if isinstance(after, (list, tuple)) else [after]) if isinstance(a, Job)]
        for d in deps:
            if d._event is None:
                _quiet_wait(d)  # host work (a thread job) this job reads: the stream cannot wait for it
        fn = _after_deps(fn, deps, host=False)  # a dependency that failed fails this job too
        stream = self.stream(direction, priority)
        for ev in self._events_to_wait(after):
            stream.wait_event(ev)  # never read a block before the compute that wrote it
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        error = None
        with torch.cuda.stream(stream):
            start.record(stream)
            try:
                fn()
            except Exception as e:  # noqa: BLE001 - reported through the job
                error = e
            for t in tensors:
                if t.is_cuda:
                    t.record_stream(stream)  # the allocator must not reuse it before this stream is past it
            end.record(stream)
        return Job(job_id, direction, nbytes, start_event=start, end_event=end, keep=tensors, error=error,
                   device=self.device)

    def _events_to_wait(self, after) -> list:
        if after is None:
            return [self.fence()]
        items = after if isinstance(after, (list, tuple)) else [after]
        events = []
        for a in items:
            if isinstance(a, Job):
                if a._event is not None:
                    events.append(a._event)
            elif isinstance(a, torch.cuda.Stream):
                ev = torch.cuda.Event()
                ev.record(a)
                events.append(ev)
            elif isinstance(a, torch.cuda.Event):
                events.append(a)
            else:
                raise TypeError(f"after must be a torch.cuda.Event, a Stream, a Job or a list of them, "
                                f"got {type(a).__name__}")
        return events

    def poll(self) -> list[int]:
        """Ids of submitted (tracked) jobs that finished since the last poll, each reported once, in id order.
        A failed job is reported too: look at `job(id).error` before trusting its bytes."""
        with self._lock:
            finished = sorted(i for i, j in self._pending.items() if j.done())
            self._reported = {i: self._pending.pop(i) for i in finished}
        return finished

    def job(self, job_id: int) -> Job | None:
        """A tracked job still pending, or one reported by the latest poll()."""
        with self._lock:
            return self._pending.get(job_id) or self._reported.get(job_id)

    # -- the original entry point ------------------------------------------------------------------
    def copy(self, pairs: list[Pair], priority: bool = False, after=None) -> Job:
        """Start copying src -> dst for every pair; returns at once with a job (not tracked by poll)."""
        nbytes = sum(d.numel() * d.element_size() for d, _ in pairs)
        if not pairs:
            return Job(0, "h2h", 0)
        if self.cuda and any(t.is_cuda for p in pairs for t in p):
            dst0, src0 = pairs[0]
            direction = ("d" if src0.is_cuda else "h") + "2" + ("d" if dst0.is_cuda else "h")

            def enqueue() -> None:
                for dst, src in pairs:
                    dst.copy_(src, non_blocking=True)
            return self.submit(enqueue, direction, priority, nbytes=nbytes, after=after, track=False,
                               tensors=[t for p in pairs for t in p])
        if nbytes < _INLINE_BYTES or self._threads == 1:
            return self.submit(lambda: _copy_run(pairs), "h2h", priority, nbytes=nbytes, inline=True, track=False)
        # CPU: split the pairs into one run per worker thread (torch releases the GIL while copying)
        job = Job(0, "h2h", nbytes)
        for i in range(self._threads):
            run = pairs[i::self._threads]
            if run:
                job._futures.append(self._workers.submit(job._timed(lambda run=run: _copy_run(run)), priority))
        return job

    def close(self) -> None:
        """Finish all work, stop the threads (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._workers.close()
        for s in list(self._streams.values()):
            s.synchronize()


def _after_deps(fn: Callable[[], object], deps: list[Job], host: bool) -> Callable[[], object]:
    """fn, run only if every dependency succeeded; on the host (`host=True`) also after their CUDA work."""
    def run() -> object:
        for d in deps:
            if host and d._event is not None:
                d._event.synchronize()  # host work after a CUDA job: wait for its end event
            if d.error is not None:
                raise RuntimeError(f"job {d.id}, which this job follows, failed: {d.error!r}")
        return fn()
    return run


def _quiet_wait(job: Job) -> None:
    try:
        job.wait()
    except Exception:  # noqa: BLE001 - its error is checked by _after_deps
        pass


def _copy_run(run: list[Pair]) -> None:
    for dst, src in run:
        dst.copy_(src)


# -- batched row moves (one index_select / index_copy_ per call, never one copy per block) ---------------
def gather_rows(src: torch.Tensor, ids: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """dst[i] = src[ids[i]] for every i. Same device: one index_select written straight into a
    contiguous dst; across devices the rows are gathered on src's device, then copied once."""
    ids = ids.to(device=src.device, dtype=torch.long)
    if dst.device == src.device and dst.is_contiguous():
        return torch.index_select(src, 0, ids, out=dst)
    dst.copy_(src.index_select(0, ids), non_blocking=True)
    return dst


def scatter_rows(src: torch.Tensor, dst: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """dst[ids[i]] = src[i] for every i (ids distinct): one index_copy_ on dst's device."""
    ids = ids.to(device=dst.device, dtype=torch.long)
    if src.device != dst.device:
        src = src.to(dst.device, non_blocking=True)
    return dst.index_copy_(0, ids, src)
