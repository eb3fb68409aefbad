"""The LD_PRELOAD interposer's per-call overhead on sockets it does not
bypass: the same ping-pong (sbp-pingpong) with and without the library, over
a Unix socket (never TCP: pure pass-through) and over loopback TCP with an
unshimmed server (the connection falls back to plain TCP). extra_info holds
the mean round trip and the overhead per socket call (4 calls per round trip
on the critical path). Each round runs both, so the timing covers two runs."""
import json
import os
import signal
import subprocess

import pytest

from shmbypass import shmtier
from shmbypass.bench import measure

PRELOAD = shmtier.library_path()
ITERS = 20000

pytestmark = pytest.mark.skipif(not os.path.exists(PRELOAD),
                                reason=f"{PRELOAD} is not built (native/interpose.c, the shm tier's interposer)")


def _plain_env():
    env = dict(os.environ)
    env.pop("LD_PRELOAD", None)
    return env


def _server(addr):
    p = subprocess.Popen(measure.pingpong_argv("server", addr, 0), stdout=subprocess.PIPE, text=True,
                         env=_plain_env())
    return p, json.loads(p.stdout.readline())["listening"]


def _rtt(addr, preload):
    env = _plain_env()
    if preload:
        env["LD_PRELOAD"] = PRELOAD
    argv = measure.pingpong_argv("client", addr, 0, False, "--mode", "rtt", "--iters", str(ITERS),
                                 "--warmup", "2000")
    return measure.run_json(argv, env=env)["mean_ns"]


@pytest.mark.parametrize("transport", ["unix", "tcp-unshimmed-peer"])
def test_interposer_overhead(benchmark, tmp_path, transport):
    srv, addr = _server(f"unix:{tmp_path}/s.sock" if transport == "unix" else "127.0.0.1:0")
    try:
        # Interleaved, both ends on CPU 0 (the steadiest placement), best of 5 each.
        plain, means = [], []

        def one_round():
            plain.append(_rtt(addr, False))
            means.append(_rtt(addr, True))

        benchmark.pedantic(one_round, rounds=5, iterations=1)
        plain, shimmed = min(plain), min(means)
        benchmark.extra_info.update(rtt_plain_ns=plain, rtt_preload_ns=shimmed,
                                    overhead_ns_per_call=(shimmed - plain) / 4)
    finally:
        srv.send_signal(signal.SIGTERM)
        srv.wait(10)
