"""close() of a socket while another thread is blocked in recv() on it:
Linux keeps the socket until that recv() returns, which it does with the
peer's next bytes; then the peer sees EOF."""
import time

import runtime as rt


def server(srv):
    c = srv.conn(go=True)
    rt.obs("blocked recv", rt.recv_woken_by(c, c.close, after=0.5))


def client(cli):
    s = cli.conn()
    rt.obs("go", rt.call(s.recv, 1))
    time.sleep(1.5)
    rt.obs("send", rt.call(s.send, b"late"))
    s.settimeout(10)
    rt.obs("eof", rt.timed(s.recv, 10))
    s.close()
