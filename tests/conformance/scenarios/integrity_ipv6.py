"""Bytes both ways over ::1, 1 B to 1 MiB, then a half-close."""
import socket

import runtime as rt
from scenarios.integrity import check, serve

SIZES = [1, 4096, 1 << 20]


def server(srv):
    ls = srv.listen(family=socket.AF_INET6)
    c = rt.settle(ls.accept()[0])
    ls.close()
    rt.tier(c)
    serve(c, SIZES)


def client(cli):
    s = rt.settle(socket.create_connection(("::1", cli.port)))
    rt.tier(s)
    check(s, SIZES)
