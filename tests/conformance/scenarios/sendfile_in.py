"""sendfile() from a file into the socket, with an offset (the file position
stays) and without (it advances)."""
import os
import tempfile

import runtime as rt

SIZE = 1 << 20


def server(srv):
    c = srv.conn()
    with tempfile.TemporaryFile() as f:
        f.write(rt.pattern(SIZE, 1))
        f.flush()
        off = 0
        while off < SIZE:
            off += os.sendfile(c.fileno(), f.fileno(), off, SIZE - off)
        rt.obs("position after offset sends", f.tell())
        f.seek(0)
        sent = 0
        while sent < 1000:
            sent += os.sendfile(c.fileno(), f.fileno(), None, 1000 - sent)
        rt.obs("position after", f.tell())
    c.close()


def client(cli):
    s = cli.conn()
    rt.obs("recv", rt.call(rt.recv_all, s))
    s.close()
