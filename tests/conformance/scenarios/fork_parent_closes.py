"""The pre-fork server pattern: the parent closes its copy at once, the
child answers later; the peer sees the child's bytes, then EOF."""
import os
import time

import runtime as rt


def server(srv):
    c = srv.conn()
    pid = os.fork()
    if pid == 0:
        time.sleep(1.0)
        c.sendall(b"from the child")
        c.close()
        os._exit(0)
    c.close()
    rt.obs("child", os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))


def client(cli):
    s = cli.conn()
    rt.obs("recv", rt.timed(rt.recv_all, s))
    s.close()
