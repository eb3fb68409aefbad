"""sendmsg() with 1,024 iovecs (IOV_MAX) of 100 bytes sends all 102,400."""
import runtime as rt
from scenarios.sendmsg_1025_iov import server  # noqa: F401


def client(cli):
    s = cli.conn()
    rt.obs("sendmsg", rt.call(s.sendmsg, [bytes([i % 251]) * 100 for i in range(1024)]))
    s.close()
