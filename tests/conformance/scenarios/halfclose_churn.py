"""Issue 10 case 1: a client connects and at once calls shutdown(SHUT_WR);
the server sends 64 KiB and closes; before the client reads, the same
process opens and closes 400 other connections to that server. Three tries;
every try must get all 65,536 bytes, then EOF."""
import select
import socket
import time

import runtime as rt

TRIES, CHURN, SIZE = 3, 400, 64 << 10


def server(srv):
    ls = srv.listen(backlog=512)
    ls.settimeout(6)                        # a client that broke off is not waited for
    for i in range(TRIES):
        c = rt.settle(ls.accept()[0])       # the half-closed one comes first
        if i == 0:
            rt.tier(c)
        rt.obs(f"send {i}", rt.call(c.sendall, rt.pattern(SIZE, 1)))
        c.close()
        for _ in range(CHURN):
            ls.accept()[0].close()


def client(cli):
    for i in range(TRIES):
        s = cli.connect()
        if i == 0:
            rt.tier(s)
        s.shutdown(socket.SHUT_WR)
        select.select([s], [], [], 10)      # the reply is there (not read)
        time.sleep(0.1)                     # and the server's FIN
        for _ in range(CHURN):
            cli.connect(settle_rings=False).close()
        s.settimeout(6)
        rt.obs(f"try {i}", rt.call(rt.recv_all, s))
        s.close()
