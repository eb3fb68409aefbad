"""A non-blocking writer whose peer does not read gets EAGAIN once the
buffers are full (TCP: a few MiB on loopback), long before 64 MiB; the
reader then gets every byte in order."""
import runtime as rt

CAP = 64 << 20
CHUNK = rt.pattern(1 << 16, 2)


def server(srv):
    c = srv.conn()
    srv.client_done()               # the client has filled and closed
    c.settimeout(20)
    got = rt.call(rt.recv_all, c)
    rt.obs("all in order", isinstance(got, dict) and got["sha256"] == rt.data(
        (CHUNK * (got["n"] // len(CHUNK) + 1))[:got["n"]])["sha256"])
    c.close()


def client(cli):
    s = cli.conn()
    s.setblocking(False)
    sent = 0
    while sent < CAP:
        try:
            sent += s.send(CHUNK[sent % len(CHUNK):])
        except BlockingIOError:
            break
    rt.obs("EAGAIN before 64 MiB", sent < CAP)
    s.setblocking(True)
    s.close()
