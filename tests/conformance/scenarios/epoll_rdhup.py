"""EPOLLRDHUP: the peer's shutdown(SHUT_WR) is reported with EPOLLIN, level
triggered, until and after the reader reached EOF; edge triggered once."""
import select
import socket
import time

import runtime as rt


def server(srv):
    c = srv.conn()
    lt = select.epoll()
    lt.register(c, select.EPOLLIN | select.EPOLLRDHUP)
    et = select.epoll()
    et.register(c, select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLET)
    c.sendall(b"g")
    time.sleep(0.3)                             # the data and the FIN are in
    rt.obs("lt data+fin", rt.epoll_wait(lt, 5))
    rt.obs("et data+fin", rt.epoll_wait(et, 5))
    rt.obs("et again", rt.epoll_wait(et, 0.6))
    rt.obs("data", rt.call(c.recv, 10))
    rt.obs("lt after read", rt.epoll_wait(lt, 0))
    rt.obs("eof", rt.call(c.recv, 10))
    rt.obs("lt at eof", rt.epoll_wait(lt, 0))
    c.sendall(b"bye")
    c.close()


def client(cli):
    s = cli.conn(go=True)
    s.sendall(b"x")
    s.shutdown(socket.SHUT_WR)
    rt.obs("reply", rt.call(rt.recv_all, s))
    s.close()
