"""Issue 10 case 7: recv(100, MSG_PEEK|MSG_WAITALL) with 40 bytes queued
waits for all 100 (they come 1 s later), and consumes nothing."""
import socket

import runtime as rt
from scenarios.msg_waitall import client  # noqa: F401  (40 B, 1 s, 60 B)


def server(srv):
    c = srv.conn(go=True)
    rt.obs("first byte", rt.call(c.recv, 1, socket.MSG_PEEK))
    rt.obs("peek waitall", rt.timed(c.recv, 100, socket.MSG_PEEK | socket.MSG_WAITALL))
    rt.obs("recv", rt.call(rt.recv_n, c, 100))
    c.close()
