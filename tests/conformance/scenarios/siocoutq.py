"""Issue 10 case 7: SIOCOUTQ (TIOCOUTQ) counts bytes the peer has not
acknowledged: on loopback 0 once they were delivered, read or not."""
import fcntl
import struct
import time

import runtime as rt

SIOCOUTQ = 0x5411


def outq(s):
    return struct.unpack("i", fcntl.ioctl(s, SIOCOUTQ, b"\0" * 4))[0]


def server(srv):
    c = srv.conn()
    time.sleep(1.0)                 # the client looks while we have not read
    rt.obs("recv", rt.call(rt.recv_n, c, 1001))
    c.sendall(b"k")
    rt.obs("eof", rt.call(c.recv, 1))
    c.close()


def client(cli):
    s = cli.conn()
    rt.obs("outq at rest", outq(s))
    s.sendall(b"q" * 1000)
    time.sleep(0.3)
    rt.obs("outq delivered, unread", outq(s))
    s.sendall(b"!")
    rt.obs("ack", rt.call(s.recv, 1))
    rt.obs("outq read", outq(s))
    s.close()
