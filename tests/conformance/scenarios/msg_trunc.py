"""recv(MSG_TRUNC) on TCP discards the bytes it would have returned (and
says how many); the next recv() starts after them."""
import socket
import time

import runtime as rt


def server(srv):
    c = srv.conn(go=True)
    time.sleep(0.3)
    rt.obs("trunc 5", rt.call(lambda: len(c.recv(5, socket.MSG_TRUNC))))
    rt.obs("rest", rt.call(rt.recv_n, c, 6))
    c.close()


def client(cli):
    s = cli.conn(go=True)
    s.sendall(b"hello world")
    rt.obs("eof", rt.call(s.recv, 1))
    s.close()
