"""shutdown(SHUT_RD) wakes a recv() blocked in another thread (it returns
EOF); data the peer sends afterwards can still be read; the shut-down end
can still send."""
import socket
import threading
import time

import runtime as rt


def server(srv):
    c = srv.accept_one()
    rt.tier(c)
    c.sendall(b"g")
    box = []
    t = threading.Thread(target=lambda: box.append(rt.timed(c.recv, 10)))
    t.start()
    time.sleep(1.0)
    c.shutdown(socket.SHUT_RD)
    t.join(10)
    rt.obs("blocked recv", box[0] if box else "hangs")
    rt.obs("recv after", rt.timed(c.recv, 10))
    c.sendall(b"1")                             # the client sends "late"
    time.sleep(0.3)
    rt.obs("late data", rt.call(c.recv, 10))
    rt.obs("send", rt.call(c.send, b"still"))
    rt.obs("eof", rt.call(c.recv, 10))
    c.close()


def client(cli):
    s = cli.connect()
    rt.tier(s)
    rt.obs("go", rt.call(s.recv, 1))
    rt.obs("1", rt.call(s.recv, 1))
    s.sendall(b"late")
    rt.obs("from shut end", rt.call(rt.recv_n, s, 5))
    s.close()
