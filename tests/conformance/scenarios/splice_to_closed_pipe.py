"""splice() out of the socket into a pipe whose reader is gone fails with
EPIPE and takes nothing from the socket: recv() then gets all 64 KiB."""
import os
import time

import runtime as rt

SIZE = 64 << 10


def server(srv):
    rt.serve_until_done(srv, SIZE, 3)


def client(cli):
    s = rt.settle(cli.conn())
    s.settimeout(15)
    time.sleep(1)  # the 64 KiB are in (a peek that waits for them: peek_waitall_large)
    r, w = os.pipe()
    os.close(r)
    rt.obs("splice", rt.call(os.splice, s.fileno(), w, SIZE))
    os.close(w)
    got = rt.recv_n(s, SIZE)
    rt.obs("recv", rt.data(got))
    rt.obs("intact", got == rt.pattern(SIZE, 3))
    s.sendall(b"done")
