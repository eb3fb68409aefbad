"""Issue 10 case 2: subprocess.run(["/bin/true"]) while a connection is
open (CPython: vfork + close_range in the child) must leave the
connection alone: the peer sees no EOF and both ends go on."""
import subprocess

import runtime as rt


def server(srv):
    c = srv.conn()
    rt.obs("before", rt.call(rt.recv_n, c, 6))
    c.sendall(b"1")
    rt.obs("after", rt.timed(rt.recv_n, c, 5))     # EOF at once would be the bug
    rt.obs("send", rt.call(c.sendall, b"2"))
    rt.obs("eof", rt.call(c.recv, 1))
    c.close()


def client(cli):
    s = cli.conn()
    s.sendall(b"before")
    rt.obs("reply 1", rt.call(rt.recv_n, s, 1))
    rt.obs("child", spawn())
    rt.obs("send", rt.call(s.sendall, b"after"))
    rt.obs("reply 2", rt.call(rt.recv_n, s, 1))
    s.close()


def spawn():
    return subprocess.run(["/bin/true"]).returncode
