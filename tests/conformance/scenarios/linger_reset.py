"""close() with SO_LINGER {1, 0} resets the connection: the peer's recv()
gets ECONNRESET (not EOF), after the bytes sent before it were read...
TCP discards them: the RST flushes the peer's receive queue."""
import socket
import struct
import time

import runtime as rt


def server(srv):
    c = srv.conn()
    c.sendall(b"before the reset")
    rt.obs("go", rt.call(c.recv, 1))
    c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    c.close()


def client(cli):
    s = cli.conn()
    rt.obs("data", rt.call(rt.recv_n, s, 16))
    s.sendall(b"g")
    time.sleep(0.3)                 # the RST is in
    rt.obs("recv", rt.call(s.recv, 10))
    rt.obs("recv again", rt.call(s.recv, 10))
    rt.obs("send", rt.call(s.send, b"x"))
    s.close()
