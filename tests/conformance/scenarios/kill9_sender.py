"""The sender sendall()s 3 MiB and is killed (SIGKILL) before the reader
read it: the reader gets every byte, then EOF."""
import os
import signal
import time

import runtime as rt

SIZE = 3 << 20


def server(srv):
    c = srv.conn()
    time.sleep(0.5)
    c.settimeout(15)
    rt.obs("recv", rt.call(rt.recv_all, c))
    c.close()


def client(cli):
    s = cli.conn()
    s.sendall(rt.pattern(SIZE, 2))
    os.kill(os.getpid(), signal.SIGKILL)
