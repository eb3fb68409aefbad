"""Issue 10 case 5: splice() out of the socket into a pipe reads every
byte, then EOF (the peer sent 1 MiB and closed)."""
import runtime as rt

SIZE = 1 << 20


def server(srv):
    rt.serve_and_close(srv, SIZE)


def client(cli):
    s = cli.conn()
    rt.obs("spliced", rt.in_thread(rt.splice_all, s, None, wait=6))
