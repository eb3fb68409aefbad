"""Issue 10 case 5: sendfile() from the socket into a file, as busybox cat
tries first: TCP refuses (EINVAL: a socket is no sendfile source), and the
program falls back to recv(): every byte, then EOF."""
import os
import tempfile

import runtime as rt
from scenarios.splice_out_peer_closed import SIZE


def server(srv):
    c = srv.conn()
    c.sendall(rt.pattern(SIZE, 1))
    c.close()


def client(cli):
    s = cli.conn()
    with tempfile.TemporaryFile() as f:
        rt.obs("sendfile", rt.in_thread(os.sendfile, f.fileno(), s.fileno(), None, 1 << 16))
        f.seek(0)
        rt.obs("file", rt.data(f.read()))
    s.settimeout(10)
    rt.obs("recv", rt.call(rt.recv_all, s))
