"""Readiness after the peer's close(): poll and epoll report IN (EOF is
readable), OUT and RDHUP, but not HUP (that needs both directions shut);
after our own shutdown(SHUT_WR), HUP too."""
import select
import socket
import time

import runtime as rt

ALL = select.POLLIN | select.POLLOUT | select.POLLRDHUP


def server(srv):
    c = srv.conn()
    c.sendall(b"bye")
    c.close()


def client(cli):
    s = cli.conn()
    time.sleep(0.3)                         # "bye" and the FIN are in
    rt.obs("poll", rt.poll(s, ALL, 5))
    ep = select.epoll()
    ep.register(s, ALL)
    rt.obs("epoll", rt.epoll_wait(ep, 5))
    rt.obs("data", rt.call(rt.recv_all, s))
    rt.obs("poll at eof", rt.poll(s, ALL, 5))
    s.shutdown(socket.SHUT_WR)
    time.sleep(0.1)
    rt.obs("poll after SHUT_WR", rt.poll(s, ALL, 5))
    rt.obs("epoll after SHUT_WR", rt.epoll_wait(ep, 5))
    s.close()
