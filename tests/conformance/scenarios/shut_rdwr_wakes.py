"""shutdown(SHUT_RDWR) wakes a recv() blocked in another thread (EOF); the
peer sees EOF. (A send after it: send_after_shutdown.)"""
import socket

import runtime as rt


def server(srv):
    c = srv.conn(go=True)
    rt.obs("blocked recv", rt.recv_woken_by(c, lambda: c.shutdown(socket.SHUT_RDWR), after=1.0))
    srv.client_done()
    c.close()


def client(cli):
    s = cli.conn()
    rt.obs("go", rt.call(s.recv, 1))
    rt.obs("eof", rt.timed(s.recv, 10))
    s.close()
