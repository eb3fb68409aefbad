"""MSG_PEEK returns the bytes without consuming them; the next recv gets them again."""
import select
import socket
import time

import runtime as rt


def server(srv):
    c = srv.conn()
    rt.obs("poll", rt.poll(c, select.POLLIN, 5))
    time.sleep(0.2)                                   # both sends have arrived
    rt.obs("peek 5", rt.call(c.recv, 5, socket.MSG_PEEK))
    rt.obs("peek 100", rt.call(c.recv, 100, socket.MSG_PEEK))
    rt.obs("recv 11", rt.call(c.recv, 11))
    rt.obs("peek dontwait empty", rt.call(c.recv, 5, socket.MSG_PEEK | socket.MSG_DONTWAIT))
    c.sendall(b"k")
    rt.obs("peek eof", rt.timed(c.recv, 5, socket.MSG_PEEK))
    rt.obs("recv eof", rt.call(c.recv, 5))
    c.close()


def client(cli):
    s = cli.conn()
    s.sendall(b"hello ")
    s.sendall(b"world")
    rt.obs("ack", rt.call(s.recv, 1))
    s.close()
