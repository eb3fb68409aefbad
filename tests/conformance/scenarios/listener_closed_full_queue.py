"""Four connections wait in the accept queue (each has sent a request) when
the server closes its listener: each client's recv() gets ECONNRESET, its
next send() EPIPE."""
import time

import runtime as rt

QUEUED = 4


def server(srv):
    ls = srv.listen(backlog=8)
    ctl = rt.settle(ls.accept()[0])
    rt.tier(ctl)
    rt.obs("ready", rt.call(rt.recv_n, ctl, 5))       # the others are queued
    time.sleep(0.2)
    ls.close()
    ctl.sendall(b"closed")
    rt.obs("eof", rt.call(ctl.recv, 1))
    ctl.close()


def client(cli):
    ctl = cli.conn()
    queued = [cli.connect(timeout=10, settle_rings=False) for _ in range(QUEUED)]
    for s in queued:
        s.sendall(b"request")
    ctl.sendall(b"ready")
    rt.obs("closed", rt.call(rt.recv_n, ctl, 6))
    time.sleep(0.2)
    rt.obs("recv", [rt.call(s.recv, 10) for s in queued])
    rt.obs("send", [rt.call(s.send, b"x") for s in queued])
    for s in queued + [ctl]:
        s.close()
