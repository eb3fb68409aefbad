"""The ring's per-operation cost from Python (cffi wrapper and raw calls),
and the raw ring between two processes (sbp-ringbench)."""
import mmap
import os

import pytest

from shmbypass import ring
from shmbypass.bench import measure, micro
from shmbypass.region import SLOT_SIZE_DEFAULT as SLOT

SIZES = [64, 1024, 65536]


@pytest.fixture
def pair():
    buf = mmap.mmap(-1, SLOT)
    w = ring.Ring.create(buf, generation=1)
    r = ring.Ring.attach(buf, generation=1)
    yield w, r
    w.close()
    r.close()
    buf.close()


@pytest.mark.parametrize("size", SIZES)
def test_ring_write_read_python(benchmark, pair, size):
    """One write and one read of `size` bytes through the Python API."""
    w, r = pair
    data, out = os.urandom(size), bytearray(size)

    def op():
        w.write(data)
        r.readinto(out)

    benchmark(op)
    assert out == data


@pytest.mark.parametrize("size", SIZES)
def test_ring_write_read_cffi(benchmark, pair, size):
    """The same through the C calls directly: the ring's own cost plus a cffi call."""
    from shmbypass._native import ffi, lib
    w, r = pair
    src = ffi.new("char[]", os.urandom(size))
    dst = ffi.new("char[]", size)
    write, read, wr, rr = lib.sbp_ring_write, lib.sbp_ring_read, w._r, r._r

    def op():
        write(wr, src, size)
        read(rr, dst, size, 0)

    benchmark(op)
    assert ffi.buffer(dst)[:] == ffi.buffer(src)[:size]


@pytest.mark.parametrize("placement", ["same-core", "cross-core"])
def test_raw_ring_rtt_64(benchmark, ringbench, placement):
    """Two processes, 64 B ping-pong through two rings of the shm tier's size
    (C, run as `shmbypass bench` runs it): p50 in extra_info."""
    if not micro.placement_possible(ringbench, placement):
        pytest.skip(f"this machine cannot place {placement}")
    server_cpu, client_cpu = measure.PLACEMENTS[placement]  # A measures, like the matrix's client
    argv = measure.ringbench_argv("rtt", 64, iters=20000, warmup=2000, cpu_a=client_cpu, cpu_b=server_cpu)
    results = []

    def run():
        results.append(micro.run_ringbench(ringbench, argv, f"raw ring rtt64 {placement}", log=False))

    benchmark.pedantic(run, rounds=3, iterations=1)
    best = min(results, key=lambda x: x["p50_ns"])
    benchmark.extra_info.update(p50_ns=best["p50_ns"], p99_ns=best["p99_ns"], cpu_ns_per_op=best["cpu_ns_per_op"])
