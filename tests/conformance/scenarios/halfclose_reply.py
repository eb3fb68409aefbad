"""The client sends its request and calls shutdown(SHUT_WR) at once; the
server reads to EOF, then replies with 1 MiB and closes (what proxies do
with half-close all the time). No churn: issue 10 case 1 without it."""
import socket

import runtime as rt

SIZE = 1 << 20


def server(srv):
    c = srv.conn()
    rt.obs("request", rt.call(rt.recv_all, c))
    rt.obs("send", rt.call(c.sendall, rt.pattern(SIZE, 1)))
    c.close()


def client(cli):
    s = cli.conn()
    s.sendall(b"GET /big")
    s.shutdown(socket.SHUT_WR)
    s.settimeout(10)
    rt.obs("reply", rt.call(rt.recv_all, s))
    s.close()
