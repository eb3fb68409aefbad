"""SO_RCVLOWAT=100 set on the client's socket before connect: with 50
bytes queued poll() does not report it readable; a recv() that waits
returns once 100 are there (50 + 60). (The interposer learns a value set
before its channel existed from its own notes, not from the kernel:
rcvlowat.py sets it on the connection.)"""
import select
import socket
import time

import runtime as rt


def server(srv):
    c = srv.conn()
    rt.send_in_two(c, b"a" * 50, b"b" * 60, pause=2.0)
    c.close()


def client(cli):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 100)
    s.connect((rt.HOST, cli.port))
    rt.settle(s)
    rt.tier(s)
    time.sleep(0.3)                                 # the first 50 are here
    rt.obs("poll at 50 B", rt.poll(s, select.POLLIN, 0.6))
    s.settimeout(5)
    rt.obs("recv", rt.timed(s.recv, 200))
    rt.obs("eof", rt.call(s.recv, 10))
    s.close()
