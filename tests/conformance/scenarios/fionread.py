"""FIONREAD counts the bytes queued for reading, as they arrive and go."""
import fcntl
import socket
import struct
import time

import runtime as rt

FIONREAD = 0x541B


def queued(s):
    return struct.unpack("i", fcntl.ioctl(s, FIONREAD, b"\0" * 4))[0]


def server(srv):
    c = srv.conn()
    rt.obs("empty", queued(c))
    c.sendall(b"g")
    time.sleep(0.5)
    rt.obs("after 11 + 7", queued(c))
    rt.obs("recv 5", rt.call(c.recv, 5))
    rt.obs("after recv 5", queued(c))
    rt.obs("recv", rt.call(rt.recv_n, c, 13))
    rt.obs("drained", queued(c))
    rt.obs("eof", rt.call(c.recv, 1))
    rt.obs("at eof", queued(c))
    c.close()


def client(cli):
    s = cli.conn(go=True)
    s.sendall(b"hello world")
    time.sleep(0.1)
    s.sendall(b"1234567")
    s.shutdown(socket.SHUT_WR)
    rt.obs("eof", rt.call(s.recv, 1))
    s.close()
