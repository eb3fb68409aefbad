"""Issue 10 case 5: splice() out of the socket into a pipe reads every
byte, then EOF (the peer sent 1 MiB and closed)."""
import os

import runtime as rt

SIZE = 1 << 20


def server(srv):
    c = srv.accept_one()
    rt.tier(c)
    rt.obs("send", rt.call(c.sendall, rt.pattern(SIZE, 1)))
    c.close()


def client(cli):
    s = cli.connect()
    rt.tier(s)
    rt.obs("spliced", rt.in_thread(splice_all, s, None, wait=6))


def splice_all(s, limit):
    """Bytes spliced socket -> pipe -> us, until EOF or `limit` bytes."""
    r, w = os.pipe()
    buf = bytearray()
    while limit is None or len(buf) < limit:
        k = os.splice(s.fileno(), w, 1 << 16)
        if k == 0:
            break
        while k:
            b = os.read(r, k)
            buf += b
            k -= len(b)
    return bytes(buf)
