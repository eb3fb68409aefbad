"""Issue 10 case 5: splice() out of the socket while the peer keeps the
connection open: the 1 MiB arrives, then the client says so."""
import runtime as rt
from scenarios.splice_out_peer_closed import SIZE


def server(srv):
    rt.serve_until_done(srv, SIZE, 1)


def client(cli):
    s = cli.conn()
    rt.obs("spliced", rt.in_thread(rt.splice_all, s, SIZE, wait=6))
    s.sendall(b"done")
