"""close() of a socket while another thread is blocked in recv() on it:
Linux keeps the socket until that recv() returns, which it does with the
peer's next bytes; then the peer sees EOF."""
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
    time.sleep(0.5)
    c.close()
    t.join(10)
    rt.obs("blocked recv", box[0] if box else "hangs")


def client(cli):
    s = cli.connect()
    rt.tier(s)
    rt.obs("go", rt.call(s.recv, 1))
    time.sleep(1.5)
    rt.obs("send", rt.call(s.send, b"late"))
    s.settimeout(10)
    rt.obs("eof", rt.timed(s.recv, 10))
    s.close()
