"""A server-first protocol (SMTP-like): the server greets before the client
has sent anything; the client answers; the server closes."""
import runtime as rt


def server(srv):
    c = srv.conn()
    c.sendall(b"220 hello\r\n")
    rt.obs("request", rt.call(rt.recv_n, c, 8))
    c.sendall(b"250 ok\r\n")
    c.close()


def client(cli):
    s = cli.conn()
    rt.obs("greeting", rt.call(rt.recv_n, s, 11))
    s.sendall(b"HELO x\r\n")
    rt.obs("reply", rt.call(rt.recv_all, s))
    s.close()
