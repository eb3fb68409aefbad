"""The LD_PRELOAD interposer's per-call cost.

On sockets it does not bypass: the same ping-pong (sbp-pingpong) with and
without the library, over a Unix socket (never TCP: pure pass-through) and
over loopback TCP with an unshimmed server (the connection falls back to
plain TCP). extra_info holds the mean round trip and the overhead per socket
call (4 calls per round trip on the critical path). Each round runs both, so
the timing covers two runs.

On the shm tier's own sockets: a send and a recv of 64 B with both ends in
one process (`sbp-pingpong self`), nothing to wait for, against the raw
ring's write and read (`sbp-ringbench --mode self`, the tier's first ring
size): what the interposer adds to each pair of data calls, the part of the
64 B round trip's gap to the raw ring that is the tier's own (two pairs per
round trip, one at each end). No core-to-core traffic, so it does not move
with where the host runs the two vCPUs, as the round trip does.

The programs run as `shmbypass bench` runs them (its Runner, its argv)."""
import os

import pytest

from shmbypass import shmtier
from shmbypass.bench.measure import PINGPONG, engaged, pingpong_argv, ringbench_argv
from shmbypass.bench.runner import Child

PRELOAD = shmtier.library_path()
ITERS = 20000

pytestmark = pytest.mark.skipif(not os.path.exists(PRELOAD),
                                reason=f"{PRELOAD} is not built (native/preload/, the shm tier's interposer)")


def _env(preload):
    """The caller's environment (not the bench instance's: nothing here is
    bypassed), with or without the interposer."""
    env = dict(os.environ)
    env.pop("LD_PRELOAD", None)
    if preload:
        env["LD_PRELOAD"] = PRELOAD
    return env


def _rtt(runner, addr, preload):
    argv = pingpong_argv("client", addr, 0, False, "--mode", "rtt", "--iters", str(ITERS), "--warmup", "2000")
    return runner.run_once(argv, f"client{' + interposer' if preload else ''}", env=_env(preload))["mean_ns"]


@pytest.mark.parametrize("transport", ["unix", "tcp-unshimmed-peer"])
def test_interposer_overhead(benchmark, pingpong, tmp_path, transport):
    listen = f"unix:{tmp_path}/s.sock" if transport == "unix" else "127.0.0.1:0"
    server = Child(pingpong, pingpong_argv("server", listen, 0), "server", env=_env(False))
    try:
        addr = server.read_json(timeout=30)["listening"]
        # Interleaved, both ends on CPU 0 (the steadiest placement), best of 5 each.
        plain, means = [], []

        def one_round():
            plain.append(_rtt(pingpong, addr, False))
            means.append(_rtt(pingpong, addr, True))

        benchmark.pedantic(one_round, rounds=5, iterations=1)
        plain, shimmed = min(plain), min(means)
        benchmark.extra_info.update(rtt_plain_ns=plain, rtt_preload_ns=shimmed,
                                    overhead_ns_per_call=(shimmed - plain) / 4)
    finally:
        server.stop()


SELF_ITERS = 1_000_000
AREA0_SLOT = 4096 + (16 << 10)  # the ring a 64 B ping-pong uses in the shm tier (pairmem.h)


def _ring_self(runner):
    argv = ringbench_argv("self", 64, iters=SELF_ITERS, warmup=2000, cpu_a=0, slot_size=AREA0_SLOT)
    return runner.run_once(argv, "raw ring, one process")["ns_per_pair"]


def _shm_self(runner):
    """One process, both ends, under the shm tier; its tier checked while held."""
    argv = runner.wrap("shm", [PINGPONG, "self", "127.0.0.1:0", "--cpu", "0", "--iters", str(SELF_ITERS),
                               "--hold"])
    child = Child(runner, argv, "shm tier, one process", stdin=True)
    try:
        r = child.read_json(timeout=120)
        tiers = runner.tiers_for_port(r["port"])
        assert engaged("shm", tiers), f"the connection took {tiers}, not the shm tier"
        return r["ns_per_pair"]
    finally:
        child.finish()
        runner.children.remove(child)


def test_shm_tier_call_cost(benchmark, shm_tier):
    ring, shm = [], []

    def one_round():
        ring.append(_ring_self(shm_tier))
        shm.append(_shm_self(shm_tier))

    benchmark.pedantic(one_round, rounds=3, iterations=1)
    benchmark.extra_info.update(ring_ns_per_pair=min(ring), shm_ns_per_pair=min(shm),
                                added_ns_per_pair=round(min(shm) - min(ring), 1))

