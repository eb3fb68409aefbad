"""Issue 10 case 7: sendmsg() with 1,025 iovecs (more than IOV_MAX) fails
with EMSGSIZE and sends nothing; the connection goes on."""
import runtime as rt

IOVECS = 1025


def server(srv):
    c = srv.conn()
    rt.obs("recv", rt.call(rt.recv_all, c))
    c.close()


def client(cli):
    s = cli.conn()
    rt.obs("sendmsg", rt.call(s.sendmsg, [b"x"] * IOVECS))
    rt.obs("then send", rt.call(s.send, b"after"))
    s.close()
