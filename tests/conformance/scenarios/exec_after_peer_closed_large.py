"""exec_after_peer_closed with more than a socket buffer holds: the server
sends 6 MiB. Under the shm tier it finishes (its ring takes 8 MiB) and
exits before the client starts busybox, whose stand-in socket must then be
fed by a helper process (native/preload/standin.c); under TCP the server
waits for busybox to read. Either way busybox gets exactly the 6 MiB, then
EOF. The wait for the peer's FIN is not compared (TCP never sends it
before the reading starts)."""
import select

import runtime as rt
from scenarios.exec_after_peer_closed import cat_into_file

SIZE = 6 << 20


def server(srv):
    rt.serve_and_close(srv, SIZE)


def client(cli):
    s = cli.conn()
    p = select.poll()
    p.register(s, select.POLLRDHUP)
    p.poll(3_000)                   # the shm tier's peer is gone by then
    cat_into_file(s)
