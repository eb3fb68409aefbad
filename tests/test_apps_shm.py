"""Application-shaped traffic through the shm tier: the readiness sequences
real servers rely on (nginx's edge-triggered EPOLLOUT around sendfile, a
poll() writer), checked without timing assertions.

The file is also its own peer program: ``python test_apps_shm.py writer|reader
...`` (run under ``shmbypass run --tier shm``).

Regression (issue 3, wrk fetching 1 MiB from nginx: 28 req/s against 2,476
over TCP): a writer that filled the ring and went to wait for room looked at
the ring, found it full, and then went to sleep *without arming it* if the
reader freed room before the arming: no doorbell could come, and it slept
until some unrelated wake-up. Here a non-blocking writer fills the ring again
and again while a reader drains it; each wait for room has a generous
timeout, and a wait that sleeps through all of it while the reader is
reading is a lost wake-up. A test hook (SHMBYPASS_TEST_ARM_DELAY_NS) holds the
window between the look and the arming open, so the old code fails every
time (checked: 9 of 9 set-up/mode pairs), not only under load.
"""
import hashlib
import json
import os
import select
import socket
import sys
import time

import pytest

CHUNK = 64 << 10
WAIT_S = 3.0          # a wait for room this long means nothing will wake us
MAX_STALLS = 2        # stop early once the bug is shown
IDLE = 12             # idle shm connections in the writer's set (2 slots each)


def _pattern(total):
    block = os.urandom(CHUNK)
    return block, total


def writer(mode, total):
    """Serve one connection: send `total` bytes non-blocking, waiting for room
    with `mode` (epoll-et, epoll-lt, poll). Prints PORT, then RESULT."""
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(1)
    print("PORT", ls.getsockname()[1], flush=True)
    # Idle connections first: their registrations come before the data
    # socket's, so each wait looks at and arms them too, which widens the
    # window between the look at the data socket and its arming.
    idle = [ls.accept()[0] for _ in range(IDLE)]
    s, _ = ls.accept()
    tier = _tier(s)
    s.setblocking(False)
    block, total = _pattern(total)
    if mode.startswith("epoll"):
        ep = select.epoll()
        for c in idle:
            ep.register(c.fileno(), select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLET)
        ev = select.EPOLLIN | select.EPOLLOUT | select.EPOLLRDHUP | (select.EPOLLET if mode == "epoll-et" else 0)
        ep.register(s.fileno(), ev)
        wait = lambda: ep.poll(WAIT_S)  # noqa: E731
    else:
        p = select.poll()
        for c in idle:
            p.register(c.fileno(), select.POLLIN)
        p.register(s.fileno(), select.POLLOUT)
        wait = lambda: p.poll(WAIT_S * 1000)  # noqa: E731
    sent = waits = stalls = 0
    longest = 0.0
    h = hashlib.sha256()
    while sent < total:
        want = min(CHUNK, total - sent)
        try:
            n = s.send(block[:want])
            h.update(block[:n])
            sent += n
            if n == want:
                continue
        except BlockingIOError:
            pass
        # Short or nothing: the ring is full; wait for room (as nginx does
        # after a short sendfile).
        waits += 1
        t0 = time.monotonic()
        wait()
        dt = time.monotonic() - t0
        longest = max(longest, dt)
        if dt >= WAIT_S:
            # Slept through the whole timeout while the reader reads in a
            # tight loop: nothing woke it (the interposer then looks once
            # more and reports the room, so the result is not empty).
            stalls += 1
            if stalls >= MAX_STALLS:
                break
    s.setblocking(True)
    s.shutdown(socket.SHUT_WR)
    s.recv(1)               # the reader's close
    s.close()
    print("RESULT", json.dumps({"sent": sent, "waits": waits, "stalls": stalls, "longest": round(longest, 3),
                                "sha": h.hexdigest(), "tier": tier}), flush=True)


def reader(port, pause=0.0):
    """Read everything in 8 KiB pieces (wrk's buffer size), or in 64 KiB
    pieces with a pause after each."""
    idle = [socket.create_connection(("127.0.0.1", int(port))) for _ in range(IDLE)]
    s = socket.create_connection(("127.0.0.1", int(port)))
    tier = _tier(s)
    h = hashlib.sha256()
    buf = bytearray(65536 if pause else 8192)
    got = 0
    while True:
        n = s.recv_into(buf)
        if not n:
            break
        if pause:
            time.sleep(pause)
        h.update(memoryview(buf)[:n])
        got += n
    s.close()
    for c in idle:
        c.close()
    print("RESULT", json.dumps({"got": got, "sha": h.hexdigest(), "tier": tier}), flush=True)


def _tier(sock):
    """The tier the interposer gave the socket (0: not loaded or plain TCP)."""
    import ctypes
    try:
        f = ctypes.CDLL(None).shmbypass_fd_tier
    except AttributeError:
        return 0
    f.argtypes = [ctypes.c_int]
    return f(sock.fileno())


if __name__ == "__main__":
    if sys.argv[1] == "writer":
        writer(sys.argv[2], int(sys.argv[3]))
    else:
        reader(sys.argv[2], float(sys.argv[3]) if len(sys.argv) > 3 else 0.0)
    sys.exit(0)


# -- the tests -----------------------------------------------------------------

from interposer_env import PY, Proc, get_setup, setups  # noqa: E402,F401  (fixture)

ME = os.path.abspath(__file__)


@pytest.fixture(params=["shm", "bell", "slots"])
def su(request, setups):  # noqa: F811
    return get_setup(setups, request.param)


def _writer_reader(su, mode, total, pause=0.0, **env):
    srv = Proc([PY, ME, "writer", mode, str(total)], su.env(**env))
    cli = None
    try:
        port = srv.wait_for("PORT ")
        cli = Proc([PY, ME, "reader", port, str(pause)], su.env())
        cres = cli.finish(120)
        sres = srv.finish(60)
        assert srv.p.returncode == 0 and cli.p.returncode == 0, (srv.stderr(), cli.stderr())
        return sres, cres
    finally:
        for p in (srv, cli):
            if p:
                p.kill()


@pytest.mark.parametrize("mode", ["epoll-et", "epoll-lt", "poll"])
@pytest.mark.parametrize("delayed", [True, False], ids=["window-held-open", "natural"])
def test_writer_waiting_for_room_is_woken(su, mode, delayed):
    """A writer waiting for room is woken when the reader frees some, however
    the two interleave. window-held-open: the writer does not spin and
    sleeps 2 ms between its last look at the ring and arming it (a test
    hook), while the reader takes 64 KiB every 0.5 ms: the reader frees room
    inside that window on nearly every wait (the old code then slept through
    the timeout). natural: no hook, a reader as quick as it can be."""
    if not delayed and mode != "epoll-et":
        pytest.skip("the natural run: edge-triggered epoll (nginx's way) is enough")
    if delayed:
        total, pause = 16 << 20, 0.0005
        env = {"SHMBYPASS_TEST_ARM_DELAY_NS": 2000000, "SHMBYPASS_EPOLL_SPIN_NS": 0}
    else:
        total, pause, env = 512 << 20, 0.0, {}
    sres, cres = _writer_reader(su, mode, total, pause, **env)
    assert sres["stalls"] == 0, (
        f"{sres['stalls']} of {sres['waits']} waits for room ({mode}) slept through the whole "
        f"{WAIT_S} s timeout while the reader was reading: a lost wake-up", sres)
    assert sres["sent"] == total and cres["got"] == total and cres["sha"] == sres["sha"], (sres, cres)
    assert sres["tier"] == su.expect_tier and cres["tier"] == su.expect_tier, (sres, cres)
    assert sres["waits"] > 20, sres         # the ring really filled, again and again
