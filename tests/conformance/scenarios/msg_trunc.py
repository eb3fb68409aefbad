"""recv(MSG_TRUNC) on TCP discards the bytes it would have returned (and
says how many); the next recv() starts after them."""
import socket
import time

import runtime as rt


def server(srv):
    c = srv.accept_one()
    rt.tier(c)
    c.sendall(b"g")
    time.sleep(0.3)
    rt.obs("trunc 5", rt.call(lambda: len(c.recv(5, socket.MSG_TRUNC))))
    rt.obs("rest", rt.call(rt.recv_n, c, 6))
    c.close()


def client(cli):
    s = cli.connect()
    rt.tier(s)
    s.recv(1)
    s.sendall(b"hello world")
    rt.obs("eof", rt.call(s.recv, 1))
    s.close()
