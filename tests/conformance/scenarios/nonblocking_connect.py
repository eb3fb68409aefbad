"""A non-blocking connect(): EINPROGRESS, then poll says writable, SO_ERROR
is 0, and the first send and the reply go through."""
import errno
import select
import socket

import runtime as rt


def server(srv):
    c = srv.conn()
    rt.obs("request", rt.call(rt.recv_n, c, 4))
    c.sendall(b"pong")
    rt.obs("eof", rt.call(c.recv, 1))
    c.close()


def client(cli):
    s = socket.socket()
    s.setblocking(False)
    rt.obs("connect", errno.errorcode.get(s.connect_ex((rt.HOST, cli.port)), "0"))
    rt.obs("poll", rt.poll(s, select.POLLOUT, 5)[0])
    rt.obs("SO_ERROR", s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR))
    rt.settle(s)
    rt.tier(s)
    rt.obs("send", rt.call(s.send, b"ping"))
    rt.obs("poll in", rt.poll(s, select.POLLIN, 5))
    rt.obs("reply", rt.call(s.recv, 10))
    s.close()
