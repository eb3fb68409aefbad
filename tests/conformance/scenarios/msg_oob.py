"""MSG_OOB: one urgent byte, read with recv(MSG_OOB) apart from the stream."""
import select
import socket
import time

import runtime as rt


def server(srv):
    c = srv.conn(go=True)
    rt.obs("poll", rt.poll(c, select.POLLIN | select.POLLPRI, 5))
    time.sleep(0.2)
    rt.obs("oob", rt.call(c.recv, 1, socket.MSG_OOB))
    rt.obs("stream", rt.call(rt.recv_all, c))
    c.close()


def client(cli):
    s = cli.conn(go=True)
    s.sendall(b"abc")
    rt.obs("send oob", rt.call(s.send, b"!", socket.MSG_OOB))
    s.sendall(b"def")
    s.close()
