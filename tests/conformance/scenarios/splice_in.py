"""splice() from a pipe into the socket."""
import os
import threading

import runtime as rt

SIZE = 1 << 20


def server(srv):
    c = srv.conn()
    r, w = os.pipe()
    data = rt.pattern(SIZE, 1)
    t = threading.Thread(target=_write_all, args=(w, data))
    t.start()
    moved = 0
    while moved < SIZE:
        moved += os.splice(r, c.fileno(), SIZE - moved)
    t.join()
    rt.obs("spliced", moved)
    c.close()


def _write_all(fd, data):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def client(cli):
    s = cli.conn()
    rt.obs("recv", rt.call(rt.recv_all, s))
    s.close()
