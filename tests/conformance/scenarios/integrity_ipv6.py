"""Bytes both ways over ::1, 1 B to 1 MiB, then a half-close."""
import socket
import threading

import runtime as rt

SIZES = [1, 4096, 1 << 20]


def server(srv):
    ls = srv.listen(family=socket.AF_INET6)
    c = rt.settle(ls.accept()[0])
    ls.close()
    rt.tier(c)
    for n in SIZES:
        got = rt.recv_n(c, n)
        rt.obs(f"got {n}", rt.data(got))
        c.sendall(got[::-1])
    rt.obs("eof", rt.call(c.recv, 1))
    c.close()


def client(cli):
    s = rt.settle(socket.create_connection(("::1", cli.port)))
    rt.tier(s)
    for n in SIZES:
        out = rt.pattern(n, 2)
        t = threading.Thread(target=s.sendall, args=(out,))
        t.start()
        back = rt.recv_n(s, n)
        t.join()
        rt.obs(f"echo {n}", back == out[::-1])
    s.shutdown(socket.SHUT_WR)
    rt.obs("eof", rt.call(s.recv, 1))
    s.close()
