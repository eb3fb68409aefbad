"""Small socket helpers for the tests and their peers (ipc_common.py,
conformance/runtime.py): connected pairs, exact transfers, reading to EOF."""
import hashlib
import os
import socket
import threading


def listener(family=socket.AF_INET, host=None):
    host = host or ("::1" if family == socket.AF_INET6 else "127.0.0.1")
    ls = socket.socket(family, socket.SOCK_STREAM)
    ls.bind((host, 0))
    ls.listen(128)
    return ls


def pair(family=socket.AF_INET, host=None, connect_host=None):
    """(client, server) connected over loopback."""
    ls = listener(family, host)
    port = ls.getsockname()[1]
    c = socket.socket(family, socket.SOCK_STREAM)
    c.connect((connect_host or ls.getsockname()[0], port))
    s, _ = ls.accept()
    ls.close()
    return c, s


def recv_exact(sock, n):
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            raise EOFError(f"EOF after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def recv_all(s):
    """Bytes until EOF."""
    buf = bytearray()
    while True:
        b = s.recv(1 << 20)
        if not b:
            return bytes(buf)
        buf += b


def splice_all(s, limit=None):
    """Bytes spliced socket -> pipe -> us, until EOF or `limit` bytes."""
    r, w = os.pipe()
    buf = bytearray()
    while limit is None or len(buf) < limit:
        k = os.splice(s.fileno(), w, 1 << 16)
        if k == 0:
            break
        while k:
            b = os.read(r, k)
            buf += b
            k -= len(b)
    return bytes(buf)


def transfer(src, dst, data):
    """Send data src->dst from a thread while dst reads; return sha256 of what arrived."""
    t = threading.Thread(target=src.sendall, args=(data,))
    t.start()
    got = recv_exact(dst, len(data))
    t.join()
    return hashlib.sha256(got).hexdigest()


def sha(data):
    return hashlib.sha256(data).hexdigest()
