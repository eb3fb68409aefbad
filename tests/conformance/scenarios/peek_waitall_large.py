"""recv(64 KiB, MSG_PEEK|MSG_WAITALL) while the peer sends 64 KiB at once:
TCP waits until all of it is queued, and consumes nothing."""
import socket

import runtime as rt

SIZE = 64 << 10


def server(srv):
    rt.serve_until_done(srv, SIZE, 5)


def client(cli):
    s = rt.settle(cli.conn())  # blocking: with a timeout, Python's recv does not wait
    rt.obs("peek", rt.call(lambda: len(s.recv(SIZE, socket.MSG_PEEK | socket.MSG_WAITALL))))
    got = rt.recv_n(s, SIZE)
    rt.obs("intact", got == rt.pattern(SIZE, 5))
    s.sendall(b"done")
