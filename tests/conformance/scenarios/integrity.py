"""Bytes both ways, sizes from 1 B to 4 MiB, then a half-close: the baseline."""
import socket
import threading

import runtime as rt

SIZES = [1, 63, 4096, 65537, 1 << 20, 4 << 20]


def server(srv):
    serve(srv.conn(), SIZES)


def client(cli):
    check(cli.conn(), SIZES)


def serve(c, sizes):
    """Each size received, observed and sent back reversed; then EOF."""
    for n in sizes:
        got = rt.recv_n(c, n)
        rt.obs(f"got {n}", rt.data(got))
        c.sendall(got[::-1])
    rt.obs("eof", rt.call(c.recv, 1))
    c.close()


def check(s, sizes):
    """Each size sent (from a thread) while its echo comes back; then a half-close."""
    for n in sizes:
        out = rt.pattern(n, 2)
        t = threading.Thread(target=s.sendall, args=(out,))
        t.start()
        back = rt.recv_n(s, n)
        t.join()
        rt.obs(f"echo {n}", back == out[::-1])
    s.shutdown(socket.SHUT_WR)
    rt.obs("eof", rt.call(s.recv, 1))
    s.close()
