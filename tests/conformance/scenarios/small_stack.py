"""send/recv, writev/readv (more pieces than fit on our stack) and poll
from threads with the smallest stack Python allows (32 KiB): a call on
TCP takes no user stack, so the interposer's must fit in a little.
(Python's own select.select() needs more than 32 KiB.)"""
import os
import select
import threading

import runtime as rt

SIZE = 256 << 10
PIECES = 40


def small_stack(fn, *args):
    """fn(*args) in a thread with a 32 KiB stack, as `call` reports it."""
    box = []
    old = threading.stack_size(32 << 10)
    try:
        t = threading.Thread(target=lambda: box.append(rt.call(fn, *args)))
        t.start()
    finally:
        threading.stack_size(old)
    t.join(30)
    return box[0] if box else "hangs"


def readv_all(fd, n):
    got = bytearray()
    while len(got) < n:
        bufs = [bytearray(7) for _ in range(PIECES)]
        k = os.readv(fd, bufs)
        if k == 0:
            break
        got += b"".join(bufs)[:k]
    return bytes(got[:n])


def server(srv):
    c = srv.conn()
    data = rt.pattern(SIZE, 3)
    rt.obs("sendall", small_stack(c.sendall, data))
    pieces = [data[i::PIECES] for i in range(PIECES)]
    rt.obs("writev", small_stack(os.writev, c.fileno(), pieces))
    rt.obs("poll", small_stack(rt.poll, c, select.POLLIN, 10))
    rt.obs("recv", small_stack(rt.recv_n, c, 4))
    c.close()


def client(cli):
    s = cli.conn()
    rt.obs("recv", small_stack(rt.recv_n, s, SIZE))
    rt.obs("readv", small_stack(readv_all, s.fileno(), SIZE))
    s.sendall(b"done")
    rt.obs("eof", small_stack(s.recv, 10))
    s.close()
