"""shutdown(SHUT_RD) wakes a recv() blocked in another thread (it returns
EOF); data the peer sends afterwards can still be read; the shut-down end
can still send."""
import socket
import time

import runtime as rt


def server(srv):
    c = srv.conn(go=True)
    rt.obs("blocked recv", rt.recv_woken_by(c, lambda: c.shutdown(socket.SHUT_RD), after=1.0))
    rt.obs("recv after", rt.timed(c.recv, 10))
    c.sendall(b"1")                             # the client sends "late"
    time.sleep(0.3)
    rt.obs("late data", rt.call(c.recv, 10))
    rt.obs("send", rt.call(c.send, b"still"))
    rt.obs("eof", rt.call(c.recv, 10))
    c.close()


def client(cli):
    s = cli.conn()
    rt.obs("go", rt.call(s.recv, 1))
    rt.obs("1", rt.call(s.recv, 1))
    s.sendall(b"late")
    rt.obs("from shut end", rt.call(rt.recv_n, s, 5))
    s.close()
