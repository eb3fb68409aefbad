"""recv(100, MSG_WAITALL) with 40 bytes queued waits for all 100 (they come
1 s later)."""
import socket

import runtime as rt


def server(srv):
    c = srv.conn(go=True)
    rt.obs("first byte", rt.call(c.recv, 1, socket.MSG_PEEK))
    rt.obs("waitall", rt.timed(c.recv, 100, socket.MSG_WAITALL))
    rt.obs("eof", rt.call(c.recv, 10))
    c.close()


def client(cli):
    rt.send_in_two(cli.conn(go=True), b"a" * 40, b"b" * 60, pause=1.0)
