"""connect() to a port nobody listens on: ECONNREFUSED, blocking or not
(non-blocking: EINPROGRESS, then poll reports it, SO_ERROR names it)."""
import errno
import select
import socket

import runtime as rt


def server(srv):
    c = srv.accept_one()          # a control connection, to show the tier
    rt.tier(c)
    closed = socket.socket()
    closed.bind((rt.HOST, 0))     # bound, never listening: the port stays ours
    c.sendall(str(closed.getsockname()[1]).encode())
    c.close()
    srv.client_done()


def client(cli):
    s = cli.conn()
    port = int(rt.recv_all(s))
    s.close()
    b = socket.socket()
    rt.obs("blocking", rt.call(b.connect, (rt.HOST, port)))
    b.close()
    n = socket.socket()
    n.setblocking(False)
    rt.obs("non-blocking", errno.errorcode.get(n.connect_ex((rt.HOST, port)), "0"))
    rt.obs("poll", rt.poll(n, select.POLLOUT, 5))
    rt.obs("SO_ERROR", errno.errorcode.get(n.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR), "0"))
    n.close()
