"""GPU paths: ordering, lifetimes and kernels that only a GPU can get wrong. Skipped without CUDA.

Each ordering test makes the race real: a producer delayed by `torch.cuda._sleep` on a non-default
caller stream (so a copy that is not ordered after that stream reads the bytes from before), or a
copy delayed the same way on the transfer stream (so compute that is not ordered after the copy
reads the destination's old contents). Sentinel bytes make a lost race visible. These tests use the
transfer engine, the kernels, and TierCache's public API only.
"""

from __future__ import annotations

import threading

import pytest
import tiercache_kernels as tk
import torch

from tiercache import CacheConfig, KVLayout, TierCache
from tiercache.pinned import HostBuffer, StagingPool
from tiercache.transfer import TransferEngine

from .conftest import same_bytes

pytestmark = pytest.mark.cuda

SLOW = 200_000_000  # GPU clock cycles: ~0.1 s on a ~2 GHz GPU, far longer than any copy here


@pytest.fixture
def engine():
    e = TransferEngine(torch.device("cuda"), threads=2)
    yield e
    e.close()


@pytest.fixture
def gpu_layout():
    return KVLayout(num_layers=4, num_kv_heads=2, head_dim=64, dtype=torch.bfloat16, block_size=16)


def kv_on_gpu(layout, n, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(layout.kv_shape(n), generator=g, device="cuda").to(layout.dtype)


def pinned_like(t: torch.Tensor, fill: float) -> HostBuffer:
    buf = HostBuffer((tuple(t.shape), t.dtype), pin=True)
    buf.tensor.fill_(fill)
    return buf


# -- the engine ----------------------------------------------------------------------------------------
def test_copy_waits_for_a_slow_producer_on_the_callers_stream(engine):
    caller = torch.cuda.Stream()
    src = torch.zeros(1 << 20, device="cuda")
    torch.cuda.synchronize()
    with pinned_like(src, -1.0) as host:
        with torch.cuda.stream(caller):
            torch.cuda._sleep(SLOW)
            src.fill_(7.0)                          # the final bytes, written after the sleep
            job = engine.copy([(host.tensor, src)])  # must start only after the fill
        job.wait()
        assert bool((host.tensor == 7.0).all())


def test_a_worker_thread_orders_after_the_callers_fence(engine):
    """A worker's own current stream is not the caller's: it passes the caller's fence."""
    caller = torch.cuda.Stream()
    src = torch.zeros(1 << 20, device="cuda")
    torch.cuda.synchronize()
    with pinned_like(src, -1.0) as host:
        with torch.cuda.stream(caller):
            torch.cuda._sleep(SLOW)
            src.fill_(3.0)
            fence = engine.fence()
        jobs = []
        t = threading.Thread(target=lambda: jobs.append(engine.copy([(host.tensor, src)], after=fence)))
        t.start()
        t.join()
        jobs[0].wait()
        assert bool((host.tensor == 3.0).all())


def test_compute_does_not_read_a_block_before_its_copy_finished(engine):
    dst = torch.full((1 << 20,), -1.0, device="cuda")
    with pinned_like(dst, 5.0) as host:
        def slow_copy():
            torch.cuda._sleep(SLOW)                 # the copy stream is late on purpose
            dst.copy_(host.tensor, non_blocking=True)
        job = engine.submit(slow_copy, "h2d", priority=True, tensors=[dst, host.tensor])
        stall = job.wait_stream(measure=True)       # compute waits on the device
        seen = dst.clone()                          # compute on the current stream
        torch.cuda.synchronize()
        assert bool((seen == 5.0).all())
        assert engine.poll() == [job.id] and job.ok
        assert job.seconds is not None and job.seconds > 0 and stall.seconds is not None and stall.seconds > 0


def test_record_stream_keeps_a_freed_source_from_being_reused(engine):
    caller = torch.cuda.current_stream()
    with HostBuffer(((1 << 22,), torch.float32), pin=True) as host:
        box = [torch.full((1 << 22,), 9.0, device="cuda")]

        def slow_copy():
            torch.cuda._sleep(SLOW)
            host.tensor.copy_(box[0], non_blocking=True)
        job = engine.submit(slow_copy, "d2h", tensors=box, track=False)
        box.clear()                                  # the caller drops its only reference while the copy is queued
        reuse = torch.empty((1 << 22,), device="cuda")
        reuse.fill_(-2.0)                            # would land in src's block without record_stream
        caller.synchronize()
        job.wait()
        assert bool((host.tensor == 9.0).all())


def test_streams_per_direction_and_priority(engine):
    h2d, d2h, hi = engine.stream("h2d"), engine.stream("d2h"), engine.stream("h2d", priority=True)
    assert len({h2d, d2h, hi, torch.cuda.current_stream()}) == 4
    assert hi.priority < h2d.priority


def test_host_buffer_is_pinned_and_unpinned_on_close():
    buf = HostBuffer(3 << 20, pin=True)
    t = buf.tensor
    assert buf.pinned and t.is_pinned() and t.numel() == 3 << 20
    buf.close()
    assert not t.is_pinned() and not buf.pinned
    buf.close()
    assert not HostBuffer(1 << 20, pin=False).tensor.is_pinned()


def test_staging_pool_buffers_are_pinned_and_async(engine):
    with StagingPool(1 << 20, count=2) as pool:
        assert pool.pinned
        src = torch.full((1 << 18,), 4.0, device="cuda")
        buf = pool.acquire(src.numel() * 4)
        host = buf.view(torch.float32)
        job = engine.copy([(host, src)])
        pool.release(buf, job)
        job.wait()
        assert bool((host == 4.0).all())


# -- the kernels on the GPU ------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_triton_gather_scatter_match_the_torch_reference_on_gpu(dtype):
    pytest.importorskip("triton")
    layers = [torch.randn(64, 16, 8, 128, device="cuda").to(dtype).transpose(1, 2) for _ in range(3)]  # LBNHC
    ids = torch.tensor([9, 1, 9, 0, 63, 17])
    fast = tk.gather(layers, ids, "flash", impl="triton")
    ref = tk.gather(layers, ids, "flash", impl="torch")
    assert fast.is_cuda and same_bytes(fast, ref)
    copy = [t.clone() for t in layers]
    new = torch.randn(3, 3, 2, 16, 8, 64, device="cuda").to(dtype)
    tk.scatter(new, layers, [5, 40, 2], "flash", impl="triton")
    tk.scatter(new, copy, [5, 40, 2], "flash", impl="torch")
    assert all(same_bytes(a, b) for a, b in zip(layers, copy))


def test_gather_on_the_transfer_stream_sees_the_callers_writes(engine):
    pytest.importorskip("triton")
    layers = [torch.zeros(32, 16, 8, 128, device="cuda", dtype=torch.bfloat16).transpose(1, 2) for _ in range(2)]
    caller = torch.cuda.Stream()
    torch.cuda.synchronize()
    with torch.cuda.stream(caller):
        torch.cuda._sleep(SLOW)
        for t in layers:
            t.fill_(1.5)                             # the model writes the blocks, late
        out = torch.empty(3, 2, 2, 16, 8, 64, device="cuda", dtype=torch.bfloat16)
        job = engine.submit(lambda: tk.gather(layers, [3, 4, 5], "flash", out=out), "d2d", tensors=[out])
    job.wait()
    assert bool((out == 1.5).all())


# -- TierCache, through its public API ---------------------------------------------------------------------
def test_store_right_after_a_slow_kernel_on_a_side_stream(gpu_layout):
    cfg = CacheConfig(layout=gpu_layout, device="cuda", device_bytes=0, host_bytes=16 * gpu_layout.block_bytes)
    side = torch.cuda.Stream()
    with TierCache(cfg) as c:
        for seed in range(3):
            toks = list(range(seed * 1000, seed * 1000 + 64))
            base = kv_on_gpu(gpu_layout, 64, seed)
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                torch.cuda._sleep(SLOW)
                kv = (base.float() * 2).to(gpu_layout.dtype)   # produced after the sleep, on the side stream
                c.store(toks, kv)
            side.synchronize()
            assert same_bytes(c.load(toks), kv)


def test_load_into_out_is_ordered_before_the_callers_next_kernel(gpu_layout):
    cfg = CacheConfig(layout=gpu_layout, device="cuda", device_bytes=0, host_bytes=64 * gpu_layout.block_bytes)
    caller = torch.cuda.Stream()
    with TierCache(cfg) as c:
        kv = kv_on_gpu(gpu_layout, 1024)
        c.store(list(range(1024)), kv)
        c.flush()
        out = torch.full(gpu_layout.kv_shape(1024), -3.0, device="cuda", dtype=gpu_layout.dtype)
        caller.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(caller):
            c.load(list(range(1024)), out=out)
            seen = out.clone()                       # the caller's next kernel, on its own stream
        caller.synchronize()
        assert same_bytes(seen, kv)


def test_layerwise_load_each_layer_is_in_place_when_compute_reads_it(tmp_path, gpu_layout):
    cfg = CacheConfig(layout=gpu_layout, device="cuda", device_bytes=0, host_bytes=64 * gpu_layout.block_bytes,
                      disk_path=tmp_path / "d")
    with TierCache(cfg) as c:
        kv = kv_on_gpu(gpu_layout, 1024)
        c.store(list(range(1024)), kv)
        c.flush()
        ll = c.load_layers(list(range(1024)))
        seen = [ll.wait_layer(i).clone() for i in range(gpu_layout.num_layers)]  # compute reads at once
        torch.cuda.synchronize()
        for i in range(gpu_layout.num_layers):
            assert same_bytes(seen[i], kv[i])


def test_prefetch_into_device_then_load(tmp_path, gpu_layout):
    cfg = CacheConfig(layout=gpu_layout, device="cuda", device_bytes=8 * gpu_layout.block_bytes,
                      host_bytes=8 * gpu_layout.block_bytes, disk_path=tmp_path / "d")
    with TierCache(cfg) as c:
        kv = kv_on_gpu(gpu_layout, 64)
        c.store(list(range(64)), kv)
        c.flush()
    with TierCache(cfg) as c:
        assert c.lookup_by_tier(list(range(64)))["disk"] == 64
        c.prefetch(list(range(64))).wait()
        out = c.load(list(range(64)))
        assert out.is_cuda and same_bytes(out, kv)


# -- pinned staging for every host<->device copy, and timings from events -----------------------------------
def test_a_staging_buffer_is_not_refilled_before_its_copy_ran():
    """One pinned buffer, three chunks, the stream held back: a buffer handed out again before its copy
    ran would be overwritten by the next chunk, and the first rows of out would hold the last chunk's."""
    from tiercache.pinned import host_to_device

    src = torch.arange(3 * (1 << 18), dtype=torch.float32).reshape(3, 1 << 18)
    with StagingPool(src[0].numel() * 4, count=1) as pool:
        assert pool.pinned
        out = torch.full((3, 1 << 18), -1.0, device="cuda")
        torch.cuda._sleep(SLOW)                      # the copies queue behind this on the current stream
        host_to_device(pool, src, 0, None, out)
        torch.cuda.synchronize()
        assert torch.equal(out.cpu(), src) and pool.free() == 1


def test_host_tier_copies_go_through_the_pinned_pool(gpu_layout):
    cfg = CacheConfig(layout=gpu_layout, device="cuda", device_bytes=0, host_bytes=64 * gpu_layout.block_bytes)
    with TierCache(cfg) as c:
        kv = kv_on_gpu(gpu_layout, 256)
        c.store(list(range(256)), kv)
        pool = c.mover.pool
        assert pool is c.slabs["host"].staging and pool.pinned and pool.acquired >= 1
        before = pool.acquired
        assert same_bytes(c.load(list(range(256))), kv)
        assert pool.acquired > before


def test_store_into_the_host_tier_has_the_bytes_before_the_host_reads_them(gpu_layout):
    """Device -> host slab: the host must not read a staging buffer before its copy landed (the
    producer is late on the current stream, so an early read sees the buffer's old contents)."""
    cfg = CacheConfig(layout=gpu_layout, device="cuda", device_bytes=0, host_bytes=64 * gpu_layout.block_bytes)
    with TierCache(cfg) as c:
        for seed in range(3):
            toks = list(range(seed * 1000, seed * 1000 + 256))
            torch.cuda._sleep(SLOW)
            kv = kv_on_gpu(gpu_layout, 256, seed)    # produced after the sleep, on the current stream
            c.store(toks, kv)
            out = torch.empty(gpu_layout.kv_shape(256), dtype=gpu_layout.dtype)  # host memory: no device copy
            assert same_bytes(c.load(toks, out=out), kv.cpu())


def test_layer_stall_is_measured_on_the_device_not_the_host(gpu_layout):
    cfg = CacheConfig(layout=gpu_layout, device="cuda", device_bytes=0, host_bytes=64 * gpu_layout.block_bytes)
    with TierCache(cfg) as c:
        kv = kv_on_gpu(gpu_layout, 256)
        c.store(list(range(256)), kv)
        torch.cuda.synchronize()
        with torch.cuda.stream(c.engine.stream("h2d", priority=True)):
            torch.cuda._sleep(SLOW)                  # the layer copies queue behind ~0.1 s on their stream
        ll = c.load_layers(list(range(256)))
        seen = [ll.wait_layer(i).clone() for i in range(gpu_layout.num_layers)]
        stall = ll.stall_seconds                     # waits for the device to pass the waits
        assert stall > 0.03
        assert c.stats()["prefetch_wait_seconds"] == pytest.approx(stall)
        assert all(same_bytes(seen[i], kv[i]) for i in range(gpu_layout.num_layers))


def test_load_seconds_are_reported_once_the_copy_has_run(gpu_layout):
    cfg = CacheConfig(layout=gpu_layout, device="cuda", device_bytes=0, host_bytes=64 * gpu_layout.block_bytes)
    with TierCache(cfg) as c:
        kv = kv_on_gpu(gpu_layout, 256)
        c.store(list(range(256)), kv)
        assert same_bytes(c.load(list(range(256))), kv)
        host = c.stats()["tiers"]["host"]            # stats() waits for the copy's events, then counts it
        assert host["loaded_bytes"] == 256 // gpu_layout.block_size * gpu_layout.block_bytes
        assert host["load_seconds"] > 0


def test_hf_layer_from_host_memory_goes_up_through_pinned_memory():
    pytest.importorskip("transformers")
    from tiercache.integrations.hf_layerwise import _to_device

    kv = torch.randn(2, 64, 2, 64)
    assert not kv.is_pinned()
    up = _to_device(kv, torch.device("cuda"))
    torch.cuda.synchronize()
    assert up.is_cuda and torch.equal(up.cpu(), kv)


def test_a_device_slot_read_still_queued_is_not_overwritten_from_another_stream(gpu_layout):
    """A load's gather from a device slot is enqueued (not done) when its plan releases the slot; a write into
    that slot from another stream (a store, a background promotion) must wait for it."""
    from tiercache.tiers.slab import MemorySlab

    slab = MemorySlab("device", gpu_layout, 2, torch.device("cuda"))
    old = torch.full(gpu_layout.block_shape, 1.0, dtype=gpu_layout.dtype, device="cuda")
    new = torch.full(gpu_layout.block_shape, 2.0, dtype=gpu_layout.dtype, device="cuda")
    slab.scatter([0], old.unsqueeze(2))
    torch.cuda.synchronize()
    out6 = torch.empty((gpu_layout.num_layers, gpu_layout.planes, 1, *gpu_layout.block_shape[2:]),
                       dtype=gpu_layout.dtype, device="cuda")
    reader, writer = torch.cuda.Stream(), torch.cuda.Stream()
    with torch.cuda.stream(reader):
        torch.cuda._sleep(SLOW)               # the read is queued behind slow work
        slab.gather([0], out6)
    with torch.cuda.stream(writer):
        slab.scatter([0], new.unsqueeze(2))   # the slot was released and reused meanwhile
    torch.cuda.synchronize()
    assert torch.equal(out6[:, :, 0], old)    # the reader got the bytes it planned for
    assert torch.equal(slab.view(0), new)
