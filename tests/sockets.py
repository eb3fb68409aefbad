"""Small socket helpers for the tests and their peers (ipc_common.py,
conformance/runtime.py): connected pairs, exact transfers, reading to EOF."""
import hashlib
import os
import socket
import struct
import threading

SO_RCVBUFFORCE = 33     # <asm-generic/socket.h>: Python's socket module lacks it


def packet_socket(ifname="lo"):
    """An AF_PACKET socket on ifname (root): every frame from now on. Its
    buffer goes past rmem_max: on lo it also queues other programs' streams."""
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))   # ETH_P_ALL
    s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 64 << 20)
    s.bind((ifname, 0))
    return s


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


def send_records(s, nthreads, per, size):
    """nthreads threads send `per` records of size bytes each on s at once,
    each with one sendall: (thread, seq), then the thread's number as filler."""
    def run(tid):
        for seq in range(per):
            s.sendall(struct.pack("!II", tid, seq) + bytes([tid]) * (size - 8))
    ts = [threading.Thread(target=run, args=(t,)) for t in range(nthreads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()


def check_records(data, nthreads, per, size):
    """What send_records sent, as one reader got it: (records torn, out of
    their thread's order or foreign; whether every thread's came, all of them)."""
    seqs, bad = {t: -1 for t in range(nthreads)}, 0
    for off in range(0, len(data), size):
        tid, seq = struct.unpack_from("!II", data, off)
        if tid not in seqs or seq != seqs[tid] + 1 or data[off + 8:off + size] != bytes([tid]) * (size - 8):
            bad += 1
            continue
        seqs[tid] = seq
    return bad, all(v == per - 1 for v in seqs.values())


def transfer(src, dst, data):
    """Send data src->dst from a thread while dst reads; return sha256 of what arrived."""
    t = threading.Thread(target=src.sendall, args=(data,))
    t.start()
    got = recv_exact(dst, len(data))
    t.join()
    return hashlib.sha256(got).hexdigest()


def sha(data):
    return hashlib.sha256(data).hexdigest()
