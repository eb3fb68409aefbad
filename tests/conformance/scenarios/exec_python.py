"""exec() of another (dynamically linked) program that inherits the
connection: it reads, answers, and its close is the end."""
import os
import sys

import runtime as rt


def server(srv):
    c = srv.conn()
    fd = c.detach()
    os.set_inheritable(fd, True)
    os.execv(sys.executable, [sys.executable, rt.PEER, __name__.split(".")[-1], "after_exec", str(fd)])


def after_exec(args):
    import socket
    s = socket.socket(fileno=int(args[0]))
    rt.tier(s, "after exec")
    rt.obs("recv", rt.call(rt.recv_n, s, 5))
    rt.obs("send", rt.call(s.sendall, b"HELLO"))
    s.close()


def client(cli):
    s = cli.conn()
    s.sendall(b"hello")
    rt.obs("reply", rt.call(rt.recv_n, s, 5))
    rt.obs("eof", rt.call(s.recv, 1))
    s.close()
