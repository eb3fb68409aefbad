"""recv(100, MSG_WAITALL) with 40 bytes queued waits for all 100 (they come
1 s later)."""
import socket
import time

import runtime as rt


def server(srv):
    c = srv.accept_one()
    rt.tier(c)
    c.sendall(b"g")
    rt.obs("first byte", rt.call(c.recv, 1, socket.MSG_PEEK))
    rt.obs("waitall", rt.timed(c.recv, 100, socket.MSG_WAITALL))
    rt.obs("eof", rt.call(c.recv, 10))
    c.close()


def client(cli):
    s = cli.connect()
    rt.tier(s)
    s.recv(1)
    s.sendall(b"a" * 40)
    time.sleep(1.0)
    s.sendall(b"b" * 60)
    time.sleep(0.2)
    s.close()
