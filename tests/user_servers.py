"""Echo servers and a client for tests/test_apps_users.py, meant to run as
non-root users (nobody, daemon) under `shmbypass run`.

    python user_servers.py fork            fork-per-connection echo server
    python user_servers.py thread          thread-per-connection echo server
    python user_servers.py client PORT N   echo N random bytes, then hold
                                           (N more per line on stdin)

A server prints "PORT <n>", then "CONN <client port> <uid> <tier> <live>"
for each connection once its first bytes arrived, and echoes until EOF. The
client prints "HELD <local port> <uid> <tier> <live> <echo ok>" once its N
bytes came back, echoes N more for each line on its stdin and prints "AGAIN
<tier> <rings> <echo ok>" (rings: 3 when both directions use them), keeps
the connection open until its stdin closes, and exits 0 only if every echo
was exact. <tier> is what the interposer's test build
says (2: shm, 0: TCP or no test build); <live> is 1 if the end waited until
it used the rings before the echo (so the bytes went through them), else 0.
"""
import ctypes
import hashlib
import os
import socket
import sys
import threading

try:
    _tier = ctypes.CDLL(None).shmbypass_fd_tier
    _tier.argtypes = [ctypes.c_int]
    _settle = ctypes.CDLL(None).shmbypass_fd_settle
    _settle.argtypes = [ctypes.c_int, ctypes.c_int]
    _ring_bits = ctypes.CDLL(None).shmbypass_fd_rings
    _ring_bits.argtypes = [ctypes.c_int]
except AttributeError:
    _tier = _settle = _ring_bits = None


def tier(sock):
    return _tier(sock.fileno()) if _tier else 0


def settle(sock):
    """Wait until our direction uses the rings (1), as it would after a
    first exchange, so that the bytes that follow take them; 0 if it did not
    within 30 s (or plain TCP)."""
    return _settle(sock.fileno(), 30000) if _settle else 0


def echo(c, port):
    """Echo until EOF; report the connection after its first bytes."""
    first, live = True, settle(c)
    while True:
        b = c.recv(1 << 16)
        if not b:
            break
        if first:
            print(f"CONN {port} {os.getuid()} {tier(c)} {live}", flush=True)
            first = False
        c.sendall(b)
    c.close()


def serve(kind):
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("127.0.0.1", 0))
    ls.listen(64)
    print(f"PORT {ls.getsockname()[1]}", flush=True)
    while True:
        c, (_, port) = ls.accept()
        if kind == "thread":
            threading.Thread(target=echo, args=(c, port), daemon=True).start()
            continue
        if os.fork() == 0:
            ls.close()
            try:
                echo(c, port)
            finally:
                os._exit(0)
        c.close()


def client(port, n):
    data = os.urandom(n)
    s = socket.create_connection(("127.0.0.1", port))
    live = settle(s)
    ok = echoed(s, data)
    print(f"HELD {s.getsockname()[1]} {os.getuid()} {tier(s)} {live} {int(ok)}", flush=True)
    for _ in sys.stdin:                  # each line: N more bytes (until stdin closes)
        again = echoed(s, os.urandom(n))
        print(f"AGAIN {tier(s)} {_rings(s)} {int(again)}", flush=True)
        ok &= again
    s.close()
    return 0 if ok else 1


def echoed(s, data):
    """Send data and read it back: sha256 of both equal?"""
    sender = threading.Thread(target=s.sendall, args=(data,))
    sender.start()
    got = bytearray()
    while len(got) < len(data):
        b = s.recv(1 << 20)
        if not b:
            break
        got += b
    sender.join()
    return hashlib.sha256(got).digest() == hashlib.sha256(data).digest()


def _rings(s):
    """Which directions use rings now (3: both), 0 without the test build."""
    return _ring_bits(s.fileno()) if _ring_bits else 0


if __name__ == "__main__":
    if sys.argv[1] == "client":
        sys.exit(client(int(sys.argv[2]), int(sys.argv[3])))
    serve(sys.argv[1])
