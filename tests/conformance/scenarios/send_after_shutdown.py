"""A send() after our own shutdown(SHUT_WR) fails with EPIPE; the peer reads
what came before, then EOF, and nothing after it."""
import socket
import time

import runtime as rt


def server(srv):
    c = srv.conn(go=True)
    time.sleep(0.5)                             # the client's late send is in
    c.settimeout(5)
    rt.obs("recv", rt.call(rt.recv_all, c))
    rt.obs("after eof", rt.call(c.recv, 10))
    c.sendall(b"bye")
    c.close()


def client(cli):
    s = cli.conn(go=True)
    s.sendall(b"before")
    s.shutdown(socket.SHUT_WR)
    rt.obs("send after shutdown", rt.call(s.send, b"after"))
    rt.obs("sendall after shutdown", rt.call(s.sendall, b"after"))
    rt.obs("reply", rt.call(rt.recv_all, s))
    s.close()
