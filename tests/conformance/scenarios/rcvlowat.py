"""Issue 10 case 7: SO_RCVLOWAT=100. With 50 bytes queued, poll() and
epoll do not report the socket readable; a recv() that waits (Python's settimeout: poll
then recv) returns once 100 are there (50 + 60 = 110).
(A *blocking* recv here never returns on Linux TCP: the wake-up after the
first 50 were copied looks at the 60 new bytes alone. Not this scenario.)"""
import select
import socket
import time

import runtime as rt


def server(srv):
    c = srv.conn()
    c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 100)
    c.sendall(b"g")
    time.sleep(0.2)                                 # the first 50 are here
    rt.obs("poll at 50 B", rt.poll(c, select.POLLIN, 0.6))
    ep = select.epoll()
    ep.register(c.fileno(), select.EPOLLIN)
    rt.obs("epoll at 50 B", rt.epoll_wait(ep, 0.3))
    ep.close()
    c.settimeout(5)
    rt.obs("recv", rt.timed(c.recv, 200))
    rt.obs("eof", rt.call(c.recv, 10))
    c.close()


def client(cli):
    rt.send_in_two(cli.conn(go=True), b"a" * 50, b"b" * 60, pause=1.8)
