"""Issue 10 case 7: the reader is killed (SIGKILL) with unread data queued;
the writer's next sends fail with ECONNRESET (TCP: the reader's kernel
answered with a RST), then EPIPE."""
import os
import signal

import runtime as rt


def server(srv):
    c = srv.conn()
    rt.recv_n(c, 1 << 20)
    os.kill(os.getpid(), signal.SIGKILL)


def client(cli):
    s = cli.conn()
    errors, sent = [], 0
    while len(errors) < 2 and sent < 1 << 30:
        try:
            sent += s.send(b"k" * 65536)
        except Exception as e:
            errors.append(rt.err_name(e))
    rt.obs("errors", errors)
    s.close()
