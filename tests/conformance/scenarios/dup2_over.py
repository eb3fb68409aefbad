"""dup2() of another connection's socket over a connection's fd: the first
connection is closed (its peer sees EOF), and the fd now writes to the
second connection."""
import os

import runtime as rt


def server(srv):
    ls = srv.listen()
    conns = {}
    for _ in range(2):
        c = rt.settle(ls.accept()[0])
        conns[rt.recv_n(c, 1)] = c
    a, b = conns[b"A"], conns[b"B"]
    rt.tier(a, "A")
    rt.tier(b, "B")
    a.sendall(b"1")
    b.sendall(b"1")
    a.settimeout(10)
    rt.obs("A after dup2", rt.call(rt.recv_all, a))
    b.settimeout(10)
    rt.obs("B", rt.call(rt.recv_all, b))


def client(cli):
    s1 = cli.connect()
    s1.sendall(b"A")
    s2 = cli.connect()
    s2.sendall(b"B")
    rt.tier(s1, "A")
    rt.tier(s2, "B")
    rt.recv_n(s1, 1)
    rt.recv_n(s2, 1)
    os.dup2(s2.fileno(), s1.fileno())       # connection A loses its last fd
    rt.obs("write via old fd", rt.call(os.write, s1.fileno(), b"via-dup2"))
    s2.sendall(b"+direct")
    s1.close()
    s2.close()
