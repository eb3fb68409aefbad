"""The LD_PRELOAD interposer's per-call overhead on sockets it does not
bypass: the same ping-pong (sbp-pingpong) with and without the library, over
a Unix socket (never TCP: pure pass-through) and over loopback TCP with an
unshimmed server (the connection falls back to plain TCP). extra_info holds
the mean round trip and the overhead per socket call (4 calls per round trip
on the critical path). Each round runs both, so the timing covers two runs.
The programs run as `shmbypass bench` runs them (its Runner, its argv)."""
import os

import pytest

from shmbypass import shmtier
from shmbypass.bench.measure import pingpong_argv
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
