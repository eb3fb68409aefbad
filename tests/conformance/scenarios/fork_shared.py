"""fork(): parent and child both use the connection, one after the other;
the peer sees EOF when the last one closes it."""
import os
import socket

import runtime as rt


def server(srv):
    c = srv.conn()
    pid = os.fork()
    if pid == 0:
        c.sendall(b"child")
        ok = rt.recv_n(c, 5) == b"12345"
        c.close()
        os._exit(0 if ok else 1)
    rt.obs("child", os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
    c.sendall(b"parent")
    rt.obs("eof", rt.call(c.recv, 1))
    c.close()


def client(cli):
    s = cli.conn()
    rt.obs("from child", rt.call(rt.recv_n, s, 5))
    s.sendall(b"12345")
    rt.obs("from parent", rt.call(rt.recv_n, s, 6))
    s.shutdown(socket.SHUT_WR)
    rt.obs("eof", rt.call(s.recv, 1))
    s.close()
