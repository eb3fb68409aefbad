"""One end of an interposer test scenario (tests/test_interposer.py).

    python ipc_peer.py server SCENARIO [ARGS...]   prints "PORT <n>", serves one scenario
    python ipc_peer.py client SCENARIO PORT [ARGS...]
    python ipc_peer.py local SCENARIO [ARGS...]     no peer (e.g. non-TCP programs)

Both ends run under `shmbypass run --tier shm` (or not, for mixed-peer
tests). Each prints "RESULT <json>" at the end: what it saw, including the
tier the interposer gave the connection (shmbypass_fd_tier, 0 when the
library is not loaded). Failures are exceptions (exit status 1) or False
fields in the result; the test asserts on them.
"""
import ctypes
import fcntl
import json
import os
import random
import select
import signal
import socket
import struct
import sys
import tempfile
import threading
import time

from sockets import (check_records, recv_all, recv_exact, send_records, sha,  # tests/ is sys.path[0]
                     splice_all)


from ipc_common import (FAMILY, FIONREAD, HOST, RESULT, SIOCOUTQ, fill_until_eagain,  # noqa: F401
                        out, pattern, rings, settle, tier, wait_readable)
from ipc_many import aio, fork_server, hold_client, many_client, many_server, seq_client

# ---------------------------------------------------------------------------
# scenarios: server part and client part

def s_integrity(c, args):
    sizes = [int(x) for x in args]
    digests = []
    for n in sizes:
        data = recv_exact(c, n)
        digests.append(sha(data))
        c.sendall(data[::-1])
    out(digests=digests, eof=c.recv(1) == b"", tier=tier(c))


def c_integrity(s, args):
    sizes = [int(x) for x in args]
    rng = random.Random(7)
    ok, digests = [], []
    for n in sizes:
        data = rng.randbytes(n)
        digests.append(sha(data))
        t = threading.Thread(target=s.sendall, args=(data,))
        t.start()
        back = recv_exact(s, n)
        t.join()
        ok.append(back == data[::-1])
    s.shutdown(socket.SHUT_WR)
    out(digests=digests, echo_ok=ok, eof=s.recv(1) == b"", tier=tier(s))


def s_flags(c, args):
    res = {}
    # 1. MSG_PEEK, FIONREAD, then MSG_WAITALL across two sends
    wait_readable(c)
    time.sleep(0.05)
    res["peek"] = c.recv(5, socket.MSG_PEEK).decode()
    res["fionread"] = struct.unpack("i", fcntl.ioctl(c, FIONREAD, b"\0" * 4))[0]
    res["after_peek"] = c.recv(11).decode()
    c.sendall(b"g")                      # go: the client sends 40 + 60 bytes, then sleeps
    first = c.recv(100, socket.MSG_WAITALL)
    res["waitall"] = len(first)
    if len(first) < 100:                 # (the kernel tier's tcp_bpf ignores MSG_WAITALL)
        recv_exact(c, 100 - len(first))
    # 2. MSG_DONTWAIT on an empty socket
    try:
        c.recv(10, socket.MSG_DONTWAIT)
        res["dontwait"] = "data?"
    except BlockingIOError:
        res["dontwait"] = "EAGAIN"
    # 3. SO_RCVTIMEO
    c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 0, 200000))
    t0 = time.monotonic()
    try:
        c.recv(10)
        res["rcvtimeo"] = "data?"
    except BlockingIOError:
        res["rcvtimeo"] = "EAGAIN"
    res["rcvtimeo_waited"] = time.monotonic() - t0 >= 0.15
    c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 0, 0))
    # 4. O_NONBLOCK set after connect, then cleared
    fl = fcntl.fcntl(c, fcntl.F_GETFL)
    fcntl.fcntl(c, fcntl.F_SETFL, fl | os.O_NONBLOCK)
    try:
        c.recv(10)
        res["nonblock"] = "data?"
    except BlockingIOError:
        res["nonblock"] = "EAGAIN"
    fcntl.fcntl(c, fcntl.F_SETFL, fl)
    # 5. SIOCOUTQ: bytes the peer has not read (it sleeps 2 s after step 1)
    c.sendall(b"q" * 1000)
    res["outq"] = struct.unpack("i", fcntl.ioctl(c, SIOCOUTQ, b"\0" * 4))[0]
    c.sendall(b"!")
    assert recv_exact(c, 1) == b"k"      # the client read all 1001 bytes
    res["outq_after"] = struct.unpack("i", fcntl.ioctl(c, SIOCOUTQ, b"\0" * 4))[0]
    # 6. SO_SNDTIMEO: the client does not read for 1.5 s; fill and time out
    c.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", 0, 200000))
    sent, chunk = 0, b"y" * 65536
    res["sndtimeo"] = "never"
    t0 = time.monotonic()
    while time.monotonic() - t0 < 30:
        try:
            sent += c.send(chunk)
        except BlockingIOError:
            res["sndtimeo"] = "EAGAIN"
            break
    res["sndtimeo_sent"] = sent
    c.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", 0, 0))
    c.sendall(b"E" + struct.pack("!Q", sent))
    # 7. the client half-closes: we read to EOF, and can still write
    res["halfclose_data"] = recv_all(c).decode()
    c.sendall(b"after-eof")
    # 8. EPIPE once the client has closed; SIGPIPE unless MSG_NOSIGNAL
    hits = []
    signal.signal(signal.SIGPIPE, lambda *a: hits.append(1))
    res["epipe_nosignal"] = "none"
    t0 = time.monotonic()
    while time.monotonic() - t0 < 10:
        try:
            c.send(b"z" * 1000, socket.MSG_NOSIGNAL)
            time.sleep(0.001)
        except (BrokenPipeError, ConnectionResetError) as e:
            res["epipe_nosignal"] = type(e).__name__
            break
    res["sigpipe_with_nosignal"] = len(hits)
    try:
        c.send(b"z" * 1000)
        res["epipe_signal"] = "none"
    except (BrokenPipeError, ConnectionResetError) as e:
        res["epipe_signal"] = type(e).__name__
    res["sigpipe_without"] = len(hits)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    res["tier"] = tier(c)
    out(**res)


def c_flags(s, args):
    s.sendall(b"hello world")
    assert s.recv(1) == b"g"
    s.sendall(b"a" * 40)
    time.sleep(0.1)
    s.sendall(b"b" * 60)
    # steps 2-5: the server reads SIOCOUTQ before it sends the final "!";
    # peeking (which consumes nothing) until the "!" is there keeps the
    # 1000 bytes unread until then
    while len(s.recv(1001, socket.MSG_PEEK)) < 1001:
        time.sleep(0.01)
    got = recv_exact(s, 1001)
    s.sendall(b"k")
    time.sleep(2.5)                      # step 6: the server fills and times out
    data = bytearray()
    while b"E" not in data or len(data) - data.index(b"E") < 9:
        b = s.recv(1 << 20)
        assert b, "EOF in the fill"
        data += b
    i = data.index(b"E")
    cnt = struct.unpack("!Q", bytes(data[i + 1:i + 9]))[0]
    s.sendall(b"last words")
    s.shutdown(socket.SHUT_WR)
    after = recv_exact(s, 9)
    out(got_ok=got == b"q" * 1000 + b"!", fill_ok=cnt == i and data[:i] == b"y" * i,
        after=after.decode(), tier=tier(s))
    s.close()


def s_poll(c, args):
    res = {}
    trials = int(args[0]) if args else 200
    c.setblocking(True)
    # readiness at rest
    p = select.poll()
    p.register(c, select.POLLIN | select.POLLOUT)
    ev = dict(p.poll(0))
    res["rest_pollout"] = bool(ev.get(c.fileno(), 0) & select.POLLOUT)
    res["rest_pollin"] = bool(ev.get(c.fileno(), 0) & select.POLLIN)
    c.sendall(b"1")                      # go
    # poll / select / epoll LT / epoll ET wake-ups, many times each
    missed = {"poll": 0, "select": 0, "epoll_lt": 0, "epoll_et": 0}
    ep_lt = select.epoll()
    ep_lt.register(c, select.EPOLLIN)
    for kind in ("poll", "select", "epoll_lt"):
        for i in range(trials):
            if kind == "poll":
                pp = select.poll()
                pp.register(c, select.POLLIN)
                ok = bool(pp.poll(10000))
            elif kind == "select":
                ok = bool(select.select([c], [], [], 10)[0])
            else:
                ok = bool(ep_lt.poll(10))
            if not ok:
                missed[kind] += 1
            c.recv(1)
            c.sendall(b"a")              # ack: the client sends the next byte after a random pause
    ep_lt.close()
    # LT: reported again while unread; nothing after reading
    ep = select.epoll()
    ep.register(c, select.EPOLLIN)
    wait_readable(c)                     # client sends 2 bytes "LT"
    time.sleep(0.05)
    res["lt_first"] = bool(ep.poll(1))
    res["lt_again"] = bool(ep.poll(1))
    c.recv(2)
    res["lt_after_read"] = bool(ep.poll(0))
    ep.close()
    # ET: one report per arrival
    ep = select.epoll()
    ep.register(c, select.EPOLLIN | select.EPOLLET)
    c.sendall(b"e")
    res["et_first"] = bool(ep.poll(10))
    res["et_again_unread"] = bool(ep.poll(0.1))
    c.sendall(b"f")                      # the client answers with one more byte
    res["et_new_data"] = bool(ep.poll(10))
    time.sleep(0.05)
    c.recv(10)
    for i in range(trials):
        c.sendall(b"n")
        if not ep.poll(10):
            missed["epoll_et"] += 1
        # ET readers drain until EAGAIN
        c.setblocking(False)
        try:
            while c.recv(100):
                pass
        except BlockingIOError:
            pass
        c.setblocking(True)
    ep.close()
    # EPOLLOUT: full, then room after the peer reads
    ep = select.epoll()
    ep.register(c, select.EPOLLOUT)
    res["out_rest"] = bool(ep.poll(0))
    filled = fill_until_eagain(c)
    res["out_full"] = bool(ep.poll(0))
    res["filled"] = filled
    res["out_after_drain"] = bool(ep.poll(10))   # the client drains `filled` bytes
    ep.close()
    # RDHUP/HUP: the client half-closes, then closes
    ep = select.epoll()
    ep.register(c, select.EPOLLIN | select.EPOLLRDHUP)
    evs = ep.poll(10)
    res["rdhup"] = bool(evs and evs[0][1] & select.EPOLLRDHUP)
    res["rdhup_in"] = bool(evs and evs[0][1] & select.EPOLLIN)
    res["eof"] = c.recv(10) == b""
    ep.close()
    res["missed"] = missed
    res["tier"] = tier(c)
    out(**res)


def c_poll(s, args):
    trials = int(args[0]) if args else 200
    rng = random.Random(3)
    assert s.recv(1) == b"1"
    for _ in range(3 * trials):
        d = rng.random()
        if d < 0.3:
            time.sleep(rng.random() * 0.002)
        s.sendall(b"x")
        assert s.recv(1) == b"a"
    time.sleep(0.05)
    s.sendall(b"LT")
    assert s.recv(1) == b"e"
    time.sleep(0.2)
    s.sendall(b"F")                      # before the server's et_again_unread check ends
    assert s.recv(1) == b"f"
    s.sendall(b"G")
    for _ in range(trials):
        assert s.recv(1) == b"n"
        if rng.random() < 0.3:
            time.sleep(rng.random() * 0.002)
        s.sendall(b"y")
    # drain the server's fill after a pause
    time.sleep(0.3)
    s.setblocking(False)
    got = 0
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            b = s.recv(1 << 20)
            got += len(b)
        except BlockingIOError:
            if got and not select.select([s], [], [], 0.2)[0]:
                break
    s.setblocking(True)
    time.sleep(0.1)
    s.shutdown(socket.SHUT_WR)
    time.sleep(0.2)
    out(drained=got, tier=tier(s))
    s.close()


def s_fork(c, args):
    mode = args[0] if args else "both"
    pid = os.fork()
    if pid == 0:
        try:
            if mode == "parent-closes":
                time.sleep(0.3)
                c.sendall(b"late")
            else:
                c.sendall(b"child")
                assert recv_exact(c, 5) == b"12345"
            c.close()
        finally:
            os._exit(0)
    if mode == "parent-closes":
        c.close()               # the pre-fork server pattern: the child owns it now
        os.waitpid(pid, 0)
        out(ok=True)
        return
    os.waitpid(pid, 0)
    c.sendall(b"parent")
    out(tier=tier(c))
    c.close()


def c_fork(s, args):
    mode = args[0] if args else "both"
    if mode == "parent-closes":
        t0 = time.monotonic()
        data = recv_all(s)
        out(data=data.decode(), waited=time.monotonic() - t0 >= 0.2, tier=tier(s))
        return
    a = recv_exact(s, 5)
    s.sendall(b"12345")
    b = recv_exact(s, 6)
    eof = s.recv(1) == b""
    out(data=(a + b).decode(), eof=eof, tier=tier(s))


def s_dup(c, args):
    d = os.dup(c.fileno())
    os.write(d, b"via-dup")
    c2 = socket.socket(fileno=d)
    fd3 = os.dup2(c.fileno(), 200)
    c.close()                            # the duplicates keep it open
    got = recv_exact(c2, 4)
    os.write(fd3, b"via-dup2")
    c2.close()
    t = tier(fd3)
    got2 = os.read(fd3, 4)
    os.close(fd3)                        # last one: the peer sees EOF
    out(got=(got + got2).decode(), tier=t)


def c_dup(s, args):
    a = recv_exact(s, 7)
    s.sendall(b"ping")
    b = recv_exact(s, 8)
    s.sendall(b"pong")
    eof = s.recv(1) == b""
    out(data=(a + b).decode(), eof=eof, tier=tier(s))


REC = 64


def s_threads(c, args):
    nthreads, per = int(args[0]), int(args[1])
    bad, complete = check_records(recv_exact(c, nthreads * per * REC), nthreads, per, REC)
    out(bad=bad, complete=complete, tier=tier(c))
    c.sendall(b"done")


def c_threads(s, args):
    send_records(s, int(args[0]), int(args[1]), REC)
    out(done=recv_exact(s, 4) == b"done", tier=tier(s))


def s_killsender(c, args):
    """Read until EOF (the client is killed -9 mid-stream)."""
    total, good = 0, True
    print("READY", flush=True)
    while True:
        try:
            b = c.recv(1 << 20)
        except ConnectionResetError:
            out(total=total, pattern_ok=good, end="ECONNRESET")
            return
        if not b:
            break
        if b != pattern(total, len(b)):
            good = False
        total += len(b)
    out(total=total, pattern_ok=good, end="EOF", tier=tier(c))


def c_killsender(s, args):
    total = 0
    chunk = 100000
    print(f"TIER {tier(s)}", flush=True)
    while True:
        s.sendall(pattern(total, chunk))
        total += chunk
        print(f"SENT {total}", flush=True)


def s_killreceiver(c, args):
    got = 0
    while got < 1 << 20:
        got += len(c.recv(1 << 20))
    print("READ", flush=True)
    time.sleep(1000)


def c_killreceiver(s, args):
    print(f"TIER {tier(s)}", flush=True)
    t0 = time.monotonic()
    try:
        while True:
            s.send(b"k" * 65536)
    except (BrokenPipeError, ConnectionResetError) as e:
        out(error=type(e).__name__, seconds=time.monotonic() - t0)


def s_closeunread(c, args):
    n = int(args[0])
    time.sleep(0.3)                      # the client has written and closed by now
    data = recv_all(c)
    out(n=len(data), ok=data == pattern(0, n), tier=tier(c))


def c_closeunread(s, args):
    n = int(args[0])
    t = tier(s)
    s.sendall(pattern(0, n))
    s.close()
    out(tier=t)


def s_exec(c, args):
    settle(c)
    # The client's bytes are in our ring, unread: they must reach the new
    # image over TCP (the client sent them after both went live).
    select.select([c], [], [], 5)
    before = rings(c)
    fd = c.detach()
    os.set_inheritable(fd, True)
    os.execv(sys.executable, [sys.executable, os.path.abspath(__file__), "exec-child", "x", str(fd),
                              str(before)])


def exec_child(fd, rings_before):
    s = socket.socket(fileno=fd)
    data = recv_exact(s, 5)
    s.sendall(data.upper())
    out(tier=tier(s), data=data.decode(), rings_before=rings_before)
    s.close()


def c_exec(s, args):
    settle(s)
    s.sendall(b"hello")
    back = recv_exact(s, 5)
    out(data=back.decode(), eof=s.recv(1) == b"", tier=tier(s))


def s_sendfile(c, args):
    n = int(args[0])
    with tempfile.TemporaryFile() as f:
        data = os.urandom(n)
        f.write(data)
        f.flush()
        off = 0
        while off < n:
            off += os.sendfile(c.fileno(), f.fileno(), off, n - off)
        # without an offset: from the file position, which must advance
        f.seek(0)
        sent = 0
        while sent < 1000:
            sent += os.sendfile(c.fileno(), f.fileno(), None, 1000 - sent)
        pos = f.tell()
    out(sha=sha(data + data[:1000]), pos=pos, tier=tier(c))
    c.close()


def c_sendfile(s, args):
    buf = splice_all(s)
    out(sha=sha(buf), n=len(buf), tier=tier(s))


def s_serverfirst(c, args):
    c.sendall(b"220 hello from the server\r\n")
    req = recv_exact(c, 6)
    c.sendall(b"250 ok " + req)
    out(tier=tier(c))
    c.close()


def c_serverfirst(s, args):
    greet = recv_exact(s, 27)
    s.sendall(b"HELO x")
    rep = recv_all(s)
    out(greet=greet.decode(), reply=rep.decode(), tier=tier(s))


def s_pingpong(c, args):
    n, size = int(args[0]), int(args[1])
    for _ in range(n):
        c.sendall(recv_exact(c, size))
    out(tier=tier(c))


def c_pingpong(s, args):
    n, size = int(args[0]), int(args[1])
    msg = b"p" * size
    t0 = time.perf_counter()
    for _ in range(n):
        s.sendall(msg)
        recv_exact(s, size)
    dt = time.perf_counter() - t0
    out(rtt_us=dt / n * 1e6, tier=tier(s))


def _slots(sock):
    tx, rx = ctypes.c_uint(), ctypes.c_uint()
    fn = ctypes.CDLL(None).shmbypass_fd_slots
    fn.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_uint), ctypes.POINTER(ctypes.c_uint)]
    return (tx.value, rx.value) if fn(sock.fileno(), tx, rx) == 0 else None


def _echo_until_error(s, send_first):
    """Ping-pong single bytes until something other than data happens (3 s)."""
    deadline = time.monotonic() + 3
    n = 0
    try:
        while time.monotonic() < deadline:
            if send_first:
                s.sendall(b"c")
            b = s.recv(1)
            if not b:
                return "EOF", n
            if not send_first:
                s.sendall(b)
            n += 1
            time.sleep(0.005)
        return "still-running", n
    except OSError as e:
        return type(e).__name__, n


def s_corrupt(c, args):
    """The test scribbles on our rings while we echo."""
    print(f"SLOTS {' '.join(map(str, _slots(c)))}", flush=True)
    end, n = _echo_until_error(c, False)
    out(end=end, n=n, tier_after=tier(c))


def c_corrupt(s, args):
    end, n = _echo_until_error(s, True)
    out(end=end, n=n, tier_after=tier(s))


def s_hold(c, args):
    """Keep the connection until the client goes."""
    c.sendall(b"h")
    out(eof=recv_all(c) == b"", tier=tier(c))


def c_hold(s, args):
    assert s.recv(1) == b"h"
    host, port = s.getsockname()[:2]
    print(f"HELD {port} {tier(s)}", flush=True)
    sys.stdin.read()                     # until the test closes our stdin
    out(tier=tier(s))
    s.close()


def l_nontcp(args):
    """UDP, pipes, a socketpair, a file, select/poll/epoll over them."""
    res = {}
    u1 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u1.bind(("127.0.0.1", 0))
    u2 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u2.sendto(b"datagram", u1.getsockname())
    res["udp_select"] = bool(select.select([u1], [], [], 5)[0])
    res["udp"] = u1.recvfrom(100)[0].decode()
    r, w = os.pipe()
    os.write(w, b"piped")
    p = select.poll()
    p.register(r, select.POLLIN)
    res["pipe_poll"] = bool(p.poll(1000))
    res["pipe"] = os.read(r, 10).decode()
    a, b = socket.socketpair()
    ep = select.epoll()
    ep.register(b, select.EPOLLIN)
    a.sendall(b"unix")
    res["unix_epoll"] = bool(ep.poll(5))
    res["unix"] = b.recv(10).decode()
    fd = os.dup(b.fileno())
    os.close(fd)
    with tempfile.TemporaryFile() as f:
        f.write(b"file data")
        f.seek(0)
        res["file"] = f.read().decode()
    res["tier"] = tier(u1)
    out(**res)


SCENARIOS = {name[2:] for name in dict(globals()) if name.startswith(("s_", "c_"))}


def main():
    role, scen = sys.argv[1], sys.argv[2]
    try:
        if role == "exec-child":
            exec_child(int(sys.argv[3]), int(sys.argv[4]))
        elif role in ("aioserver", "aioclient"):
            aio(role, sys.argv[2:])
        elif role == "manyserver":
            many_server(sys.argv[2:])
        elif role == "manyclient":
            many_client(sys.argv[2:])
        elif role == "holdclient":
            hold_client(sys.argv[2:])
        elif role == "forkserver":
            fork_server(sys.argv[2:])
        elif role == "seqclient":
            seq_client(sys.argv[2:])
        elif role == "local":
            globals()["l_" + scen](sys.argv[3:])
        elif role == "server":
            ls = socket.socket(FAMILY, socket.SOCK_STREAM)
            ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            ls.bind((HOST, 0))
            ls.listen(16)
            print(f"PORT {ls.getsockname()[1]}", flush=True)
            c, _ = ls.accept()
            ls.close()
            globals()["s_" + scen](c, sys.argv[3:])
        else:
            port = int(sys.argv[3])
            s = socket.create_connection((HOST, port))
            globals()["c_" + scen](s, sys.argv[4:])
    except BaseException as e:  # reported, then re-raised for the exit status
        RESULT["exception"] = f"{type(e).__name__}: {e}"
        print("RESULT " + json.dumps(RESULT), flush=True)
        raise
    print("RESULT " + json.dumps(RESULT), flush=True)



if __name__ == "__main__":
    main()
