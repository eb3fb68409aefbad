"""Issue 10 case 7: the first send() after the peer's close() is accepted
(TCP: the peer answers it with a RST), and only the next one fails."""
import time

import runtime as rt
from scenarios.poll_after_peer_close import server  # noqa: F401  (the same server: "bye", close)


def client(cli):
    s = cli.conn()
    rt.obs("recv", rt.call(rt.recv_all, s))         # "bye", then EOF
    rt.obs("send 1", rt.call(s.send, b"x" * 10))
    time.sleep(0.3)                                  # the RST is back
    rt.obs("send 2", rt.call(s.send, b"x" * 10))
    rt.obs("send 3", rt.call(s.send, b"x" * 10))
    rt.obs("recv after", rt.call(s.recv, 10))
    s.close()
