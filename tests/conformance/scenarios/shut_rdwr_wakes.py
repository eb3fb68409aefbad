"""shutdown(SHUT_RDWR) wakes a recv() blocked in another thread (EOF); the
peer sees EOF. (A send after it: send_after_shutdown.)"""
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
    c.shutdown(socket.SHUT_RDWR)
    t.join(10)
    rt.obs("blocked recv", box[0] if box else "hangs")
    srv.client_done()
    c.close()


def client(cli):
    s = cli.connect()
    rt.tier(s)
    rt.obs("go", rt.call(s.recv, 1))
    rt.obs("eof", rt.timed(s.recv, 10))
    s.close()
