"""writev() of three buffers, readv() and recvmsg_into() into several: the
bytes land in order across the buffers."""
import os
import time

import runtime as rt


def server(srv):
    c = srv.conn()
    rt.obs("writev", rt.call(os.writev, c.fileno(), [b"abc", b"", b"defgh"]))
    time.sleep(0.3)
    bufs = [bytearray(2), bytearray(3), bytearray(10)]
    n = os.readv(c.fileno(), bufs)
    rt.obs("readv", [n] + [b.decode(errors="replace") for b in bufs])
    bufs = [bytearray(4), bytearray(4)]
    n = c.recvmsg_into(bufs)[0]
    rt.obs("recvmsg_into", [n] + [b.decode(errors="replace") for b in bufs])
    c.close()


def client(cli):
    s = cli.conn()
    rt.obs("got", rt.call(rt.recv_n, s, 8))
    s.sendall(b"0123456789ABCDEFGHIJKLMN")
    time.sleep(0.2)
    s.close()
