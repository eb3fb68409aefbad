"""Issue 10 case 4, the peer gone first: the server sends 60 kB (what TCP
buffers without a reader here) and exits;
only then does the client start a static program on the socket (busybox
cat into a file: a program that cannot read the rings, and a peer that can
no longer put its bytes back on TCP). It must get exactly the 60 kB, then
EOF, as from TCP. (Into a file, busybox cannot sendfile from a socket and
reads: the pipe form is busybox_inherit.)"""
import os
import select
import tempfile

import runtime as rt
from scenarios.busybox_inherit import BUSYBOX, WAIT, wait

SIZE = 60_000


def server(srv):
    rt.serve_and_close(srv, SIZE)


def wait_peer_closed(s):
    """Until the peer's FIN is in (its bytes still unread)."""
    p = select.poll()
    p.register(s, select.POLLRDHUP)
    rt.obs("peer closed", rt.events(sum(ev for _, ev in p.poll(10_000))))


def client(cli):
    s = cli.conn()
    wait_peer_closed(s)
    cat_into_file(s)


def cat_into_file(s):
    """busybox cat, started on the socket as a shell would: what it wrote."""
    with tempfile.TemporaryFile() as f:
        pid = os.fork()             # fork + exec, as a shell does
        if pid == 0:
            os.dup2(s.fileno(), 0)
            os.dup2(f.fileno(), 1)
            os.execv(BUSYBOX, ["busybox", "cat"])
        s.close()
        rt.obs("busybox cat", wait(pid, WAIT))
        f.seek(0)
        rt.obs("bytes", rt.data(f.read()))
