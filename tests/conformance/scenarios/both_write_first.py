"""Issue 10 case 3: both ends sendall() 300 KB, 1 MiB and 4 MiB before
they read. Loopback TCP buffers that much (autotuning); a program may
never block where TCP would not have. One connection per size, at once."""
import threading
import time

import runtime as rt

SIZES = [300_000, 1 << 20, 4 << 20]
WAIT = 6            # seconds for all three; TCP needs well under one
DEADLINE = 25


def _both_ways(s, seed, results, n):
    s.sendall(rt.pattern(n, seed))
    results[n] = rt.data(rt.recv_n(s, n))


def _run(socks, seed):
    results = {}
    threads = [threading.Thread(target=_both_ways, args=(s, seed, results, n), daemon=True)
               for n, s in zip(SIZES, socks)]
    for t in threads:
        t.start()
    end = time.monotonic() + WAIT
    for t in threads:
        t.join(max(0, end - time.monotonic()))
    for n in SIZES:
        rt.obs(f"{n} B", results.get(n, "hangs"))


def server(srv):
    ls = srv.listen()
    socks = [rt.settle(ls.accept()[0]) for _ in SIZES]
    rt.tier(socks[-1])
    _run(socks, 1)


def client(cli):
    socks = [cli.connect() for _ in SIZES]
    rt.tier(socks[-1])
    _run(socks, 2)
