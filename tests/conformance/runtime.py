"""What a scenario program may call (tests/conformance/scenarios/*.py).

A scenario program is one end of a connection, run as its own process by
peer.py, with or without the bypass around it. It reports what a program
can see, as lines on stdout that the harness collects even if the process
is killed later (a hang keeps what came before it):

    OBS  ["key", value]     an observable result, compared with TCP's
    TIER ["label", "tcp", "handshake-race"]
                            the tier a connection took and why (not compared:
                            checked against the tier of the run, so that "same
                            as TCP" under the shm tier proves the shm tier was
                            used)

Values are JSON: counts, byte digests, errno names, event names, wall-time
classes. Never raw timings, ports or anything else that differs between two
TCP runs.
"""
import ctypes
import errno
import hashlib
import json
import os
import select
import socket
import sys
import threading
import time

from sockets import recv_all, splice_all  # noqa: F401  (tests/: to EOF; through a pipe)
from stream_peer import pattern, recv_n  # noqa: F401  (tests/: deterministic bytes; n bytes or to EOF)

HOST = "127.0.0.1"
PEER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "peer.py")
IMMEDIATE = 0.5     # seconds: a call that returns sooner is "immediate"


def obs(key, value):
    print("OBS " + json.dumps([key, value]), flush=True)


# -- values -------------------------------------------------------------------

def err_name(e: BaseException) -> str:
    """An exception as a program sees it: the errno name (EPIPE), or the
    exception's type for what has no errno (timeout, EOFError)."""
    if isinstance(e, TimeoutError) and e.errno is None:
        return "timeout"
    if isinstance(e, OSError) and e.errno:
        return errno.errorcode.get(e.errno, str(e.errno))
    return type(e).__name__


def call(fn, *args, **kw):
    """fn's return value (bytes as `data()`), or the error name it raised."""
    try:
        return value(fn(*args, **kw))
    except Exception as e:
        return err_name(e)


def value(v):
    if isinstance(v, (bytes, bytearray)):
        return data(v)
    if isinstance(v, tuple):
        return [value(x) for x in v]
    return v


def data(b) -> str | dict:
    """Short printable byte strings as text; others as count and digest."""
    b = bytes(b)
    if len(b) <= 64 and all(32 <= c < 127 for c in b):
        return b.decode()
    return {"n": len(b), "sha256": hashlib.sha256(b).hexdigest()[:16]}


def time_class(seconds: float) -> str:
    return "immediate" if seconds < IMMEDIATE else "waits"


def timed(fn, *args, **kw):
    """[result or error name, "immediate" | "waits"]."""
    t0 = time.monotonic()
    r = call(fn, *args, **kw)
    return [r, time_class(time.monotonic() - t0)]


EVENTS = [(select.POLLIN, "IN"), (select.POLLPRI, "PRI"), (select.POLLOUT, "OUT"),
          (select.POLLERR, "ERR"), (select.POLLHUP, "HUP"), (select.POLLRDHUP, "RDHUP"),
          (select.POLLNVAL, "NVAL")]


def events(mask: int) -> list[str]:
    """poll/epoll event bits by name (EPOLLIN == POLLIN, and so on)."""
    return [name for bit, name in EVENTS if mask & bit]


def poll(sock, mask, timeout_s):
    """[event names, time class] of one poll() on one socket."""
    p = select.poll()
    p.register(sock, mask)
    t0 = time.monotonic()
    ev = p.poll(timeout_s * 1000)
    return [events(ev[0][1]) if ev else [], time_class(time.monotonic() - t0)]


def epoll_wait(ep, timeout_s):
    """[[event names of each ready fd], time class] of one epoll_wait()."""
    t0 = time.monotonic()
    ev = ep.poll(timeout_s)
    return [[events(mask) for _, mask in ev], time_class(time.monotonic() - t0)]


def in_thread(fn, *args, wait=10.0):
    """fn(*args) in a thread, as `timed` reports it, or "hangs" if it has not
    returned after `wait` seconds (the thread is left blocked)."""
    box = []
    t = threading.Thread(target=lambda: box.append(timed(fn, *args)), daemon=True)
    t.start()
    t.join(wait)
    return box[0] if box else "hangs"


def recv_woken_by(sock, action, after):
    """What a recv() blocked in another thread returns when action() runs
    `after` seconds into its wait (as `timed` reports it), or "hangs"."""
    box = []
    t = threading.Thread(target=lambda: box.append(timed(sock.recv, 10)), daemon=True)
    t.start()
    time.sleep(after)
    action()
    t.join(10)
    return box[0] if box else "hangs"


def serve_and_close(srv, size):
    """A server that sends `size` bytes of the pattern and closes."""
    c = srv.conn()
    obs("send", call(c.sendall, pattern(size, 1)))
    c.close()


def serve_until_done(srv, size, seed):
    """A server that sends `size` bytes of the pattern (seed), waits up to
    15 s for the client's word that it is done with them, and closes."""
    c = srv.conn()
    obs("send", call(c.sendall, pattern(size, seed)))
    c.settimeout(15)
    obs("ack", call(c.recv, 10))
    c.close()


def send_in_two(s, first, second, pause):
    """A writer that keeps the reader waiting: first, `pause` s later
    second, then close (0.2 s on, so both are in before the FIN)."""
    s.sendall(first)
    time.sleep(pause)
    s.sendall(second)
    time.sleep(0.2)
    s.close()


# -- tiers ----------------------------------------------------------------------

try:
    _fd_tier = ctypes.CDLL(None).shmbypass_fd_tier    # the interposer's test exports
    _fd_tier.argtypes = [ctypes.c_int]
    _fd_rings = ctypes.CDLL(None).shmbypass_fd_rings
    _fd_rings.argtypes = [ctypes.c_int]
    _fd_settle = ctypes.CDLL(None).shmbypass_fd_settle
    _fd_settle.argtypes = [ctypes.c_int, ctypes.c_int]
except (OSError, AttributeError):
    _fd_tier = _fd_rings = _fd_settle = None


def settle(sock):
    """Under the shm tier, wait (briefly) until the connection uses its
    rings: it starts on TCP and moves once the peers hold the memory,
    normally after a first exchange. Scenarios test the rings, not that
    first exchange. Nothing elsewhere."""
    if _fd_settle is not None:
        _fd_settle(sock.fileno(), 500)
    return sock


def tier_of(sock) -> tuple[str, str]:
    """(tier, reason) of this end of a connection: "shm" when the interposer
    in this process moves its bytes through a ring, else what the instance's
    BPF state says (status.connections: tier and reason), "tcp" outside any
    instance."""
    fd = sock if isinstance(sock, int) else sock.fileno()
    if _fd_tier is not None:
        t = _fd_tier(fd)
        if t == 2 and _fd_rings(fd):
            return "shm", ""
        if t == 2:
            return "shm-not-live", "not-live"  # paired, its bytes went over TCP
        if t == -1:
            return "shm-broken", ""
    name = os.environ.get("SHMBYPASS_INSTANCE")
    if not name:
        return "tcp", ""
    from shmbypass import paths, status
    s = socket.socket(fileno=os.dup(fd))
    local, peer = s.getsockname()[1], s.getpeername()[1]
    s.close()
    rows = [r for r in status.connections(paths.Instance(name))
            if r["local"].endswith(f":{local}") and r["remote"].endswith(f":{peer}")]
    return (rows[0]["tier"], rows[0]["reason"]) if rows else ("tcp", "no-row")


def tier(sock, label="conn"):
    print("TIER " + json.dumps([label, *tier_of(sock)]), flush=True)


# -- the two ends ---------------------------------------------------------------

class Server:
    """The server end: `listen()` announces the port to the harness, which
    then starts the client; `client_done()` returns when the client program
    has ended (the harness closes our stdin)."""

    def __init__(self):
        self.port = None

    def listen(self, backlog=16, family=socket.AF_INET):
        ls = socket.socket(family, socket.SOCK_STREAM)
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind((HOST if family == socket.AF_INET else "::1", 0))
        ls.listen(backlog)
        self.announce(ls.getsockname()[1])
        return ls

    def accept_one(self, backlog=16):
        """Listen, accept one connection, close the listener."""
        ls = self.listen(backlog)
        c, _ = ls.accept()
        ls.close()
        return settle(c)

    def conn(self, go=False):
        """The scenario's connection: accept_one(), its tier reported; with
        go, then the byte b"g" that tells the client to start."""
        c = self.accept_one()
        tier(c)
        if go:
            c.sendall(b"g")
        return c

    def announce(self, port):
        self.port = port
        print(f"PORT {port}", flush=True)

    def client_done(self, timeout=None):
        r, _, _ = select.select([sys.stdin], [], [], timeout)
        if r:
            sys.stdin.read()
        return bool(r)


class Client:
    def __init__(self, port):
        self.port = port

    def connect(self, timeout=None, settle_rings=True):
        """A connection to the server; under the shm tier it uses its rings
        (settle) unless settle_rings=False (a server that does not accept
        it at once: the wait would only delay the scenario)."""
        s = socket.create_connection((HOST, self.port), timeout=timeout)
        return settle(s) if settle_rings else s

    def conn(self, go=False):
        """The scenario's connection: connect(), its tier reported; with go,
        then the server's start byte read (Server.conn(go=True))."""
        s = self.connect()
        tier(s)
        if go:
            s.recv(1)
        return s
