"""The transfer engine's contract on the thread path, the row helpers and the host buffers (no GPU needed).

Jobs are held with threading.Event gates, never with sleeps: what a test asserts about "not yet"
is decided by a gate the test itself still holds.
"""

from __future__ import annotations

import gc
import threading
import weakref

import pytest
import torch

from tiercache.config import KVLayout
from tiercache.pinned import HostBuffer, StagingPool
from tiercache.transfer import TransferEngine, gather_rows, scatter_rows


@pytest.fixture
def engine():
    e = TransferEngine(torch.device("cpu"), threads=2)
    yield e
    e.close()


def gated(gate: threading.Event, log: list, name: str, started: threading.Event | None = None):
    def fn():
        if started is not None:
            started.set()
        assert gate.wait(timeout=30), "test gate never opened"
        log.append(name)
    return fn


def test_ids_are_unique_and_poll_reports_each_finished_job_once(engine):
    gate, log = threading.Event(), []
    held = engine.submit(gated(gate, log, "held"), "h2h")
    quick = engine.submit(lambda: log.append("quick"), "d2h")
    quick.wait()
    assert held.id != quick.id
    assert engine.poll() == [quick.id]          # the held job is not finished
    assert not held.done() and held.seconds is None
    assert engine.poll() == []                  # reported once
    gate.set()
    held.wait()
    assert engine.poll() == [held.id]
    assert engine.job(held.id) is held and held.ok and held.seconds is not None and held.seconds >= 0
    assert engine.poll() == [] and engine.job(held.id) is None


def test_priority_jobs_run_before_queued_ones():
    eng = TransferEngine(torch.device("cpu"), threads=1)
    try:
        gate, log, running = threading.Event(), [], threading.Event()
        first = eng.submit(gated(gate, log, "blocker", running), "h2h")
        assert running.wait(timeout=30)  # the only worker is busy: the rest queue up
        a = eng.submit(lambda: log.append("a"), "h2d")
        b = eng.submit(lambda: log.append("b"), "h2d")
        p = eng.submit(lambda: log.append("priority"), "h2d", priority=True)
        gate.set()
        for j in (first, a, b, p):
            j.wait()
        assert log == ["blocker", "priority", "a", "b"]
    finally:
        eng.close()


def test_a_job_after_another_waits_for_it_and_inherits_its_failure(engine):
    gate, log = threading.Event(), []
    first = engine.submit(gated(gate, log, "first"), "h2d")
    second = engine.submit(lambda: log.append("second"), "h2d", after=first)
    other = engine.submit(lambda: log.append("other"), "h2d")
    other.wait()  # the second worker was free, yet `second` did not run
    assert log == ["other"] and not second.done()
    gate.set()
    second.wait()
    assert log == ["other", "first", "second"]

    def boom():
        raise OSError("disk gone")
    bad = engine.submit(boom, "d2h")
    follower = engine.submit(lambda: log.append("never"), "h2h", after=bad)
    with pytest.raises(RuntimeError, match=f"job {bad.id}.*failed"):
        follower.wait()
    assert "never" not in log


def test_errors_are_reported_through_the_job(engine):
    def boom():
        raise ValueError("bad bytes")
    job = engine.submit(boom, "h2h")
    with pytest.raises(ValueError, match="bad bytes"):
        job.wait()
    assert job.done() and not job.ok and isinstance(job.error, ValueError)
    assert engine.poll() == [job.id]            # a failed job is still reported finished
    inline = engine.submit(boom, "h2h", inline=True)
    assert inline.done() and isinstance(inline.error, ValueError)


def test_inline_runs_in_the_calling_thread_and_wait_stream_waits_on_the_host(engine):
    where = []
    job = engine.submit(lambda: where.append(threading.get_ident()), "h2h", inline=True)
    assert where == [threading.get_ident()] and job.done()
    gate, log = threading.Event(), []
    held = engine.submit(gated(gate, log, "x"), "h2d")
    threading.Timer(0, gate.set).start()
    stall = held.wait_stream(measure=True)      # no device on this path: the host waits
    assert log == ["x"] and stall.seconds is not None and stall.seconds >= 0


def test_tensors_stay_alive_until_the_job_is_seen_done(engine):
    gate, log = threading.Event(), []
    t = torch.ones(4)
    ref = weakref.ref(t)
    job = engine.submit(gated(gate, log, "x"), "h2d", tensors=[t])
    del t
    gc.collect()
    assert ref() is not None                    # the job holds it while it may still be read
    gate.set()
    job.wait()
    gc.collect()
    assert ref() is None


def test_copy_keeps_its_original_behaviour(engine):
    small = [(torch.empty(8), torch.arange(8.0))]
    h = engine.copy(small)
    assert h.done() and h._event is None
    h.wait()
    h.wait_stream()
    assert torch.equal(small[0][0], small[0][1])
    big_src = [torch.randn(64, 1024) for _ in range(8)]   # 2 MiB: split over the threads
    big = [(torch.empty_like(s), s) for s in big_src]
    h = engine.copy(big)
    h.wait()
    assert h.done() and all(torch.equal(d, s) for d, s in big)
    assert engine.poll() == []                  # copy() jobs are not tracked
    assert engine.copy([]).done()


def test_bad_direction_and_closed_engine():
    eng = TransferEngine(torch.device("cpu"), threads=2)
    with pytest.raises(ValueError, match="direction must be one of"):
        eng.submit(lambda: None, "up")
    gate, log = threading.Event(), []
    queued = [eng.submit(lambda i=i: log.append(i), "h2h") for i in range(5)]
    first = eng.submit(gated(gate, log, "first"), "h2h")
    held = eng.submit(lambda: log.append("held"), "h2h", after=first)  # not queued until `first` is done
    threading.Timer(0, gate.set).start()
    eng.close()                                  # finishes queued work, and the work that waited for it
    assert all(j.done() for j in queued) and len(log) == 7 and set(log) == {0, 1, 2, 3, 4, "first", "held"}
    assert log.index("first") < log.index("held")
    assert held.ok
    eng.close()
    with pytest.raises(RuntimeError, match="closed"):
        eng.submit(lambda: None, "h2h")
    with pytest.raises(TypeError, match="after must be"):
        eng._events_to_wait(object())


def test_gather_and_scatter_rows_match_a_loop():
    slab = torch.randn(10, 3, 4).to(torch.bfloat16)
    ids = torch.tensor([7, 2, 7, 0])
    out = torch.empty(4, 3, 4, dtype=torch.bfloat16)
    assert gather_rows(slab, ids, out) is out
    assert torch.equal(out, torch.stack([slab[i] for i in ids.tolist()]))
    strided = torch.empty(3, 4, 4, dtype=torch.bfloat16).transpose(0, 1)  # a non-contiguous destination
    gather_rows(slab, ids, strided)
    assert torch.equal(strided, out)
    dst = torch.zeros(10, 3, 4, dtype=torch.bfloat16)
    scatter_rows(out[:3], dst, torch.tensor([1, 5, 9]))
    expect = torch.zeros_like(dst)
    for row, i in zip(out[:3], (1, 5, 9)):
        expect[i] = row
    assert torch.equal(dst, expect)


def test_host_buffer_without_cuda_is_plain_memory_and_closes_once():
    with HostBuffer(1000, pin=True) as buf:
        assert buf.tensor.shape == (1000,) and buf.tensor.dtype == torch.uint8 and buf.nbytes == 1000
        assert buf.pinned == torch.cuda.is_available()
    assert buf.tensor is None and not buf.pinned
    buf.close()
    typed = HostBuffer(((3, 5), torch.bfloat16), pin=False)
    assert typed.tensor.shape == (3, 5) and typed.nbytes == 30 and not typed.pinned
    typed.close()
    with pytest.raises(ValueError, match="size"):
        HostBuffer(-1)
    with pytest.raises(TypeError, match="size"):
        HostBuffer("1MiB")
    with pytest.raises(TypeError, match="size"):
        HostBuffer(((3,), "bf16"))


def test_staging_pool_hands_a_buffer_back_only_after_its_job(engine):
    pool = StagingPool(256, count=1, pin=False)
    try:
        buf = pool.acquire(100)
        assert buf.numel() == 100
        gate, log = threading.Event(), []
        job = engine.submit(gated(gate, log, "copy"), "d2h")
        pool.release(buf, job)
        got = []
        taker = threading.Thread(target=lambda: got.append(pool.acquire(256)))
        taker.start()
        taker.join(timeout=0.5)
        assert not got                          # the only buffer is still in use by the copy
        gate.set()
        taker.join(timeout=30)
        assert log == ["copy"] and got and got[0].data_ptr() == buf.data_ptr()
        pool.release(got[0])
        with pytest.raises(ValueError, match="nbytes"):
            pool.acquire(257)
        with pytest.raises(ValueError, match="buf is not a buffer of this pool"):
            pool.release(torch.empty(4, dtype=torch.uint8))
    finally:
        pool.close()
    with pytest.raises(RuntimeError, match="closed"):
        pool.acquire(1)


def test_gpu_bench_runs_in_its_cpu_smoke_mode(tmp_path):
    """benchmarks/gpu_bench.py waits for a GPU session: keep it runnable (its --cpu mode, tiny sizes)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_bench.py"
    spec = importlib.util.spec_from_file_location("gpu_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "smoke.md"
    assert bench.main(["--cpu", "--out", str(out)]) == 0  # 0: every transfer came back bit-exact
    text = out.read_text()
    assert "not GPU figures" in text and "layer-wise load overlapped with compute" in text


# -- the CUDA protocol, on fake streams and events (what the GPU path enqueues, checked without a GPU) ------
class FakeCuda:
    """Records what the engine asks of CUDA: event records, stream waits, the stream a job's fn runs on."""

    def __init__(self):
        self.log = []
        self.local = threading.local()
        fake = self

        class Stream:
            def __init__(s, device=None, priority=0, name=None):
                s.priority, s.name = priority, name or f"stream-{priority}"

            def wait_event(s, ev):
                fake.log.append(("wait", s, ev))

            def synchronize(s):
                pass

        class Event:
            def __init__(e, enable_timing=False):
                e.stream = None

            def record(e, stream=None):
                e.stream = stream or fake.current_stream()
                fake.log.append(("record", e.stream, e))

            def query(e):
                return True

            def synchronize(e):
                fake.log.append(("sync", e.stream, e))

            def elapsed_time(e, other):
                return 1.5

        self.Stream, self.Event = Stream, Event
        self.default = Stream(name="default")

    def current_stream(self, device=None):
        return getattr(self.local, "stream", self.default)

    def stream(self, s):
        fake = self

        class Ctx:
            def __enter__(c):
                c.prev = fake.current_stream()
                fake.local.stream = s

            def __exit__(c, *exc):
                fake.local.stream = c.prev
        return Ctx()


@pytest.fixture
def fake_cuda(monkeypatch):
    fake = FakeCuda()
    for name in ("Stream", "Event", "current_stream", "stream"):
        monkeypatch.setattr(torch.cuda, name, getattr(fake, name))
    eng = TransferEngine(torch.device("cuda"), threads=2)
    yield fake, eng
    eng.close()


def test_cuda_job_runs_on_its_stream_after_the_callers_stream(fake_cuda):
    fake, eng = fake_cuda
    caller = fake.Stream(name="caller")
    ran_on = []
    with fake.stream(caller):
        job = eng.submit(lambda: ran_on.append(fake.current_stream()), "h2d")
    h2d = eng.stream("h2d")
    assert ran_on == [h2d]
    fence = fake.log[0]
    assert fence[0] == "record" and fence[1] is caller                   # an event on the caller's stream...
    assert fake.log[1] == ("wait", h2d, fence[2])                         # ...that the copy stream waits for
    assert [e[0] for e in fake.log[2:]] == ["record", "record"] and all(e[1] is h2d for e in fake.log[2:])
    assert job._event is fake.log[-1][2] and job.seconds == pytest.approx(1.5e-3)
    fake.log.clear()
    with fake.stream(caller):
        stall = job.wait_stream(measure=True)                            # compute waits on the device
    assert [(e[0], e[1]) for e in fake.log] == [("record", caller), ("wait", caller), ("record", caller)]
    assert fake.log[1][2] is job._event and stall.seconds == pytest.approx(1.5e-3)
    assert eng.poll() == [job.id]


def test_cuda_worker_thread_orders_after_the_fence_not_its_own_stream(fake_cuda):
    fake, eng = fake_cuda
    caller = fake.Stream(name="caller")
    with fake.stream(caller):
        fence = eng.fence()
    fake.log.clear()
    t = threading.Thread(target=lambda: eng.submit(lambda: None, "d2h", after=fence))
    t.start()
    t.join()
    d2h = eng.stream("d2h")
    assert fake.log[0] == ("wait", d2h, fence)
    assert not any(e[0] == "record" and e[1] is fake.default for e in fake.log)  # the worker's stream is irrelevant


def test_cuda_streams_per_direction_priority_and_record_stream(fake_cuda):
    fake, eng = fake_cuda
    assert eng.stream("h2d") is eng.stream("h2d") and eng.stream("h2d") is not eng.stream("d2h")
    assert eng.stream("h2d", priority=True).priority == -1 and eng.stream("h2d").priority == 0

    class FakeCudaTensor:
        is_cuda = True

        def __init__(self):
            self.recorded = []

        def record_stream(self, s):
            self.recorded.append(s)
    t = FakeCudaTensor()
    job = eng.submit(lambda: None, "d2d", priority=True, tensors=[t])
    assert t.recorded == [eng.stream("d2d", priority=True)]
    assert job.done() and job._keep == []                                 # released once seen done

    def boom():
        raise OSError("launch failed")
    bad = eng.submit(boom, "h2d")
    assert fake.log[-1][0] == "record" and bad.error is not None         # the end event is still recorded
    with pytest.raises(OSError, match="launch failed"):
        bad.wait()
    follower = eng.submit(lambda: None, "h2d", after=bad)
    with pytest.raises(RuntimeError, match=f"job {bad.id}"):
        follower.wait()
    ran = []
    eng.submit(lambda: ran.append(threading.get_ident()), "h2h").wait()  # host work goes to the threads
    assert ran and ran[0] != threading.get_ident()


def test_host_buffer_registers_exactly_its_bytes_and_unregisters_once(monkeypatch):
    import tiercache.pinned as pinned

    calls = []

    class FakeCudart:
        def cudaHostRegister(self, ptr, nbytes, flags):
            calls.append(("register", ptr, nbytes, flags))
            return 0

        def cudaHostUnregister(self, ptr):
            calls.append(("unregister", ptr))
            return 0
    monkeypatch.setattr(pinned, "_cuda_pinning_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "cudart", lambda: FakeCudart())
    monkeypatch.setattr(torch.cuda, "check_error", lambda res: None)
    buf = HostBuffer(((1000, 3), torch.bfloat16), pin=True)
    ptr = buf.tensor.data_ptr()
    assert buf.pinned and calls == [("register", ptr, 6000, 0)]          # 6000 bytes, not a power of two
    buf.close()
    buf.close()
    assert calls == [("register", ptr, 6000, 0), ("unregister", ptr)] and buf.tensor is None
    assert not HostBuffer(64, pin=False).pinned and len(calls) == 2


def test_cuda_and_host_jobs_order_after_each_other(fake_cuda):
    fake, eng = fake_cuda
    d2h = eng.submit(lambda: None, "d2h")                                  # e.g. device -> pinned staging
    seen = []
    host = eng.submit(lambda: seen.append(list(fake.log)), "h2h", after=d2h)  # staging -> slab, on a thread
    host.wait()
    assert ("sync", eng.stream("d2h"), d2h._event) in seen[0]             # the thread waited for the copy's event
    gate, log = threading.Event(), []
    fill = eng.submit(gated(gate, log, "filled"), "h2h")                   # host work filling a buffer
    threading.Timer(0, gate.set).start()
    h2d = eng.submit(lambda: log.append("enqueued"), "h2d", after=fill)    # must not enqueue before it
    assert log == ["filled", "enqueued"] and h2d.ok


# -- pinned staging: every host<->device copy goes through the pool (checked here on CPU tensors) ---------
def test_host_to_device_gathers_through_the_pool_in_chunks():
    from tiercache.pinned import host_to_device

    src = torch.arange(2 * 7 * 3, dtype=torch.float32).reshape(2, 7, 3)   # rows along dim 1: 12 bytes each
    idx = torch.tensor([6, 0, 6, 3, 5])                                   # odd order, a repeated id
    with StagingPool(24, count=2, pin=False) as pool:                     # 24 bytes: one row of both planes
        out = torch.full((2, 5, 3), -1.0)
        host_to_device(pool, src, 1, idx, out)
        assert torch.equal(out, src.index_select(1, idx))
        assert pool.acquired == 5 and pool.free() == 2                    # one buffer per chunk, all back
        out2 = torch.full((2, 6, 3), -1.0)
        host_to_device(pool, src, 1, idx[:2], out2, pos=torch.tensor([4, 1]))
        want = torch.full((2, 6, 3), -1.0)
        want.index_copy_(1, torch.tensor([4, 1]), src.index_select(1, idx[:2]))
        assert torch.equal(out2, want)


def test_device_to_host_does_not_deadlock_on_a_one_buffer_pool():
    from tiercache.pinned import device_to_host

    src = torch.randn(3, 9, 4)
    with StagingPool(3 * 4 * 4 * 2, count=1, pin=False) as pool:         # two rows a chunk, five chunks
        out = torch.zeros(3, 9, 4)
        t = threading.Thread(target=device_to_host, args=(pool, src, 1, out))
        t.start()
        t.join(timeout=30)
        assert not t.is_alive() and torch.equal(out, src)
        scattered = torch.zeros(3, 12, 4)
        pos = torch.tensor([11, 0, 5, 7, 1, 2, 3, 9, 10])
        device_to_host(pool, src, 1, scattered, pos=pos)
        assert torch.equal(scattered.index_select(1, pos), src) and pool.free() == 1


def test_a_staging_buffer_is_reused_only_after_the_copy_that_read_it(monkeypatch):
    """H2D: each buffer goes back with an event after its copy; the next chunk waits for it, not before."""
    import tiercache.pinned as pinned

    log = []

    class Done:
        def __init__(self, device=None, stream=None):
            self.n, self.finished = len([e for e in log if e[0] == "enqueued"]), False
            log.append(("enqueued", self.n))

        def done(self):
            return self.finished  # the "device" never finishes by itself: only wait() gets past it

        def wait(self):
            log.append(("waited", self.n))
            self.finished = True

    monkeypatch.setattr(pinned, "CopyDone", Done)
    src = torch.arange(12, dtype=torch.float32).reshape(1, 3, 4)
    with StagingPool(16, count=1, pin=False) as pool:
        out = torch.zeros(1, 3, 4)
        pinned.host_to_device(pool, src, 1, None, out)
        assert torch.equal(out, src)
        # chunk k+1 got the only buffer after chunk k's copy was waited for, never while it was in flight
        assert log == [("enqueued", 0), ("waited", 0), ("enqueued", 1), ("waited", 1), ("enqueued", 2)]


def test_staged_paths_of_a_whole_cache_are_bit_exact(make_cache, layout, monkeypatch):
    """Store, spill, write-behind, disk reads, promotion, load and layer-wise load with every copy between
    two tiers taken down the staged (host<->device) path, through a pool of one-block buffers."""
    import tiercache.pinned as pinned
    from tiercache.tiers import slab

    from .conftest import make_kv, same_bytes

    monkeypatch.setattr(pinned, "crosses", lambda a, b: True)
    monkeypatch.setattr(slab, "STAGING_BYTES", 1)  # buffers of one block: many chunks
    cache = make_cache(host_blocks=3, device_blocks=2, disk=True)
    tokens = list(range(7 * layout.block_size))
    kv = make_kv(layout, len(tokens), seed=3)
    assert cache.store(tokens, kv) == len(tokens)
    cache.flush()
    assert cache.lookup_by_tier(tokens)["disk"] > 0                 # 5 memory slots for 7 blocks
    assert same_bytes(cache.load(tokens), kv)                       # device + host + disk, promotions
    out = torch.zeros(layout.kv_shape(len(tokens)), dtype=layout.dtype)
    assert same_bytes(cache.load(tokens, out=out), kv)
    ll = cache.load_layers(tokens)
    assert same_bytes(torch.stack([ll.wait_layer(i) for i in range(layout.num_layers)]), kv)
    ll.wait()
    pool = cache.mover.pool
    assert pool.buffer_bytes == layout.block_bytes and pool.acquired > 10
    assert pool.free() == 4
    assert all(v == {"pinned": 0, "reserved": 0} for v in cache.stats()["in_flight"].values())


def test_device_times_report_each_entry_once_when_the_device_has_passed_it():
    from tiercache.transfer import DeviceTimes

    class Ev:
        def __init__(self, t, done=True):
            self.t, self.is_done, self.synced = t, done, False

        def query(self):
            return self.is_done

        def synchronize(self):
            self.synced = self.is_done = True

        def elapsed_time(self, end):
            return (end.t - self.t) * 1e3

    got = []
    times = DeviceTimes()
    late = Ev(5.0, done=False)
    times.add(lambda s: got.append(("a", s)), Ev(1.0), Ev(1.5), host_seconds=0.25)
    times.add(lambda s: got.append(("b", s)), Ev(2.0), late)
    times.add(lambda s: got.append(("c", s)), Ev(3.0), Ev(3.5))
    assert times.settle() == 1 and got == [("a", 0.75)]   # "b" still running: never a host sync, order kept
    assert times.settle() == 0 and len(times) == 2
    assert times.settle(block=True) == 2 and late.synced
    assert got == [("a", 0.75), ("b", 3.0), ("c", 0.5)] and times.settle(block=True) == 0


def test_layer_stalls_come_from_events_on_the_callers_stream(fake_cuda):
    """With CUDA events, wait_layer does not time the host: it records an event before and after the
    stream's wait on the layer's copy, and the stall (their elapsed time) is reported when settled."""
    from tiercache.layerwise import LayerLoad
    from tiercache.stats import Recorder

    fake, _ = fake_cuda
    rec = Recorder(("host",))
    ll = LayerLoad(torch.zeros(2, 2, 4, 2, 8), 4, rec, cuda_events=True)
    copied = [fake.Event(), fake.Event()]
    for i, ev in enumerate(copied):
        ll.layer_ready(i, ev)
    ll.wait_layer(0)
    ll.wait_layer(1)
    waits = [e for e in fake.log if e[0] == "wait"]
    assert [w[2] for w in waits] == copied and all(w[1] is fake.default for w in waits)
    assert ll.stall_seconds == pytest.approx(2 * 1.5e-3)  # FakeCuda: 1.5 ms between any two events
    assert ll.stalls() == pytest.approx({0: 1.5e-3, 1: 1.5e-3})
    assert rec.snapshot()["prefetch_wait_seconds"] == pytest.approx(3e-3)


def test_hf_layer_waits_believe_the_loads_own_stall_figures():
    pytest.importorskip("transformers")  # the GPU session's image has none
    from tiercache.integrations.hf_layerwise import LayerWaits, _to_device

    class Load:
        num_tokens = 4

        def wait_layer(self, i):
            return torch.full((2, 4, 1, 2), float(i))

        def stalls(self):
            return {1: 0.5, 0: 0.25}

    waits = LayerWaits(Load())
    assert torch.equal(waits.wait(1), torch.full((2, 4, 1, 2), 1.0))
    waits.wait(0)
    waits.wait(1)
    assert waits.seconds == 0.75 and waits.per_layer == {1: 0.5, 0: 0.25} and waits.order == [1, 0]
    kv = torch.randn(2, 3, 1, 2)
    assert _to_device(kv, torch.device("cpu")) is kv  # CPU to CPU: no copy


def test_background_promotions_run_on_the_engines_stream_and_are_waited_for(fake_cuda, layout):
    """A prefetch's promoted slots become readable to other streams: the copies run on the engine's H2D
    stream and the host waits for their end event before the plan completes. A load on the caller's
    thread promotes on the caller's own stream instead (what it reads next is ordered after them)."""
    from tiercache.reads import ReadPath

    fake, eng = fake_cuda
    seen = []

    class Mover:
        def promote(self, plan, good, targets):
            seen.append(fake.current_stream())
            return set(good)

    rp = ReadPath(layout=layout, device=torch.device("cuda"), core=None, mover=Mover(), disk=None, gate=None,
                  engine=eng, recorder=None, queue=None)
    try:
        assert rp._promote(None, {0, 2}, {}, background=True) == {0, 2}
        h2d = eng.stream("h2d")
        assert seen == [h2d] and ("sync", h2d) in [(e[0], e[1]) for e in fake.log]
        assert not [e for e in fake.log if e[0] == "wait" and e[1] is h2d]  # reads host bytes only: no fence
        assert rp._promote(None, {1}, {}, background=False) == {1} and seen[-1] is fake.default
    finally:
        rp.close()


def test_run_start_finds_one_ascending_run_only():
    from tiercache.mover import _run_start

    assert _run_start(torch.tensor([3, 4, 5, 6])) == 3
    assert _run_start(torch.tensor([7])) == 7
    assert _run_start(torch.tensor([0, 2, 1, 3])) is None      # same ends, not a run
    assert _run_start(torch.tensor([1, 2, 4])) is None
    assert _run_start(torch.tensor([2, 2])) is None
    assert _run_start(torch.tensor([], dtype=torch.long)) is None


@pytest.mark.parametrize("big", [False, True], ids=["small-blocks", "1MiB-blocks"])
@pytest.mark.parametrize("slots", [[0, 1, 2, 3, 4, 5], [5, 6, 7, 2, 0, 1], [7, 5, 3, 1, 0, 2]],
                         ids=["one-run", "three-runs", "no-runs"])
def test_slab_scatter_by_runs_or_index_copy_is_exact(big, slots):
    """MemorySlab.scatter copies runs of consecutive slots with one copy_ each (large blocks, or few runs) and
    falls back to index_copy_ otherwise: every slot holds exactly its block, the others are untouched."""
    from tiercache.tiers.slab import MemorySlab
    lay = KVLayout(num_layers=4, num_kv_heads=4 if big else 1, head_dim=128 if big else 8, dtype=torch.bfloat16,
                   block_size=128 if big else 4)
    assert (lay.block_bytes >= 1 << 20) == big
    slab = MemorySlab("host", lay, 8, torch.device("cpu"), pin=False)
    try:
        slab.tensor.fill_(7)
        blocks = torch.randn((len(slots), *lay.block_shape)).to(lay.dtype)
        slab.scatter(slots, blocks.permute(1, 2, 0, 3, 4, 5))
        for j, s in enumerate(slots):
            assert torch.equal(slab.tensor[s].view(torch.int16), blocks[j].view(torch.int16))
        for s in set(range(8)) - set(slots):
            assert bool((slab.tensor[s] == 7).all())
    finally:
        slab.close()


def test_write_sources_as_numpy_bytes_are_the_blocks_own_memory():
    """The write-behind encodes from numpy byte views made once per buffer: a staging buffer's view and a
    host slot's row are the same memory as the tensors (a write to one shows in the other), reused
    buffers keep their view, and a slab off the host has no such row."""
    import numpy as np

    from tiercache.tiers.slab import MemorySlab, StagingArea

    lay = KVLayout(num_layers=2, num_kv_heads=1, head_dim=8, dtype=torch.bfloat16, block_size=4)
    area = StagingArea(lay, keep=1)
    buf, raw = area.get(3), area.bytes(3)
    assert raw.dtype == np.uint8 and raw.shape == (lay.block_bytes,)
    buf.copy_(torch.randn(lay.block_shape).to(lay.dtype))
    assert raw.tobytes() == buf.contiguous().view(torch.uint8).numpy().tobytes()
    area.release(3)
    assert area.get(7) is buf and area.bytes(7) is raw           # the spare comes back with its view
    slab = MemorySlab("host", lay, 3, torch.device("cpu"))
    slab.view(1).copy_(torch.randn(lay.block_shape).to(lay.dtype))
    row = slab.row_bytes(1)
    assert row.tobytes() == slab.view(1).contiguous().view(torch.uint8).numpy().tobytes()
    row[:] = 0
    assert not slab.view(1).view(torch.uint8).any()             # the row is the slot itself
    assert slab.row_bytes(2).ctypes.data - row.ctypes.data == lay.block_bytes
    meta = MemorySlab("device", lay, 3, torch.device("meta"))
    with pytest.raises(ValueError, match="row_bytes: the device slab is on meta, not in host memory"):
        meta.row_bytes(0)
