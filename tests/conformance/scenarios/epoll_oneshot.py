"""EPOLLONESHOT: one report, then nothing for new data until EPOLL_CTL_MOD
re-arms the fd, which then reports the data already there."""
import select

import runtime as rt


def server(srv):
    c = srv.conn()
    ep = select.epoll()
    ep.register(c, select.EPOLLIN | select.EPOLLONESHOT)
    c.sendall(b"1")
    rt.obs("first", rt.epoll_wait(ep, 5))
    rt.obs("data 1", rt.call(c.recv, 10))
    c.sendall(b"2")                              # the client sends "b"
    rt.obs("disarmed", rt.epoll_wait(ep, 1.0))
    ep.modify(c, select.EPOLLIN | select.EPOLLONESHOT)
    rt.obs("re-armed", rt.epoll_wait(ep, 5))
    rt.obs("again", rt.epoll_wait(ep, 0.6))
    rt.obs("data 2", rt.call(c.recv, 10))
    c.close()


def client(cli):
    s = cli.conn(go=True)
    s.sendall(b"a")
    s.recv(1)
    s.sendall(b"b")
    rt.obs("eof", rt.call(s.recv, 1))
    s.close()
