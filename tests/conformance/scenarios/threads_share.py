"""Four threads send 64-byte records on one socket at once (each sendall
whole); the reader sees every record intact, each thread's in order."""
import runtime as rt
from sockets import check_records, send_records   # tests/

THREADS, PER, REC = 4, 2000, 64


def server(srv):
    c = srv.conn()
    data = rt.recv_n(c, THREADS * PER * REC)
    bad, complete = check_records(data, THREADS, PER, REC)
    rt.obs("bytes", len(data))
    rt.obs("bad records", bad)
    rt.obs("complete", complete)
    c.sendall(b"done")
    c.close()


def client(cli):
    s = cli.conn()
    send_records(s, THREADS, PER, REC)
    rt.obs("reply", rt.call(rt.recv_all, s))
    s.close()
