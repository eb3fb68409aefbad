"""recv() of 0 bytes returns 0 at once, with or without data queued, and
consumes nothing."""
import time

import runtime as rt


def server(srv):
    c = srv.conn()
    rt.obs("empty", rt.timed(c.recv, 0))
    c.sendall(b"g")
    time.sleep(0.3)
    rt.obs("with data", rt.timed(c.recv, 0))
    rt.obs("data", rt.call(c.recv, 10))
    rt.obs("at eof", rt.timed(c.recv, 0))
    c.close()


def client(cli):
    s = cli.conn(go=True)
    s.sendall(b"abc")
    s.close()
