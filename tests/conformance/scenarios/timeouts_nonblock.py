"""MSG_DONTWAIT and O_NONBLOCK on an empty socket: EAGAIN at once;
SO_RCVTIMEO: EAGAIN after the timeout; SO_SNDTIMEO while the peer does not
read: sends succeed until the buffers are full (TCP: a few MiB), then
EAGAIN after the timeout."""
import socket
import struct
import time

import runtime as rt

CAP = 64 << 20


def server(srv):
    c = srv.conn()
    rt.obs("MSG_DONTWAIT", rt.timed(c.recv, 10, socket.MSG_DONTWAIT))
    c.setblocking(False)
    rt.obs("O_NONBLOCK", rt.timed(c.recv, 10))
    c.setblocking(True)
    c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 0, 700_000))
    rt.obs("SO_RCVTIMEO", rt.timed(c.recv, 10))
    c.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", 0, 700_000))
    sent, end = 0, ["never", "immediate"]
    while sent < CAP:
        r = rt.timed(c.send, b"s" * (1 << 20))
        if not isinstance(r[0], int):
            end = r
            break
        sent += r[0]
    rt.obs(f"SO_SNDTIMEO, before {CAP >> 20} MiB", end)
    c.close()


def client(cli):
    s = cli.conn()
    time.sleep(4)                   # reads nothing
    s.close()
