"""Issue 10 case 4, the peer gone first: the server sends 60 kB and exits;
only then does the client pass the socket over SCM_RIGHTS to a process
without the interposer. The receiver reads exactly the 60 kB, then EOF."""
import os
import socket
import subprocess
import sys

import runtime as rt
from scenarios.exec_after_peer_closed import server, wait_peer_closed  # noqa: F401
from scenarios.scm_rights_unpreloaded import receiver  # noqa: F401


def client(cli):
    a, b = socket.socketpair()
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    child = subprocess.Popen([sys.executable, rt.PEER, __name__.split(".")[-1], "receiver",
                              str(b.fileno())], env=env, pass_fds=[b.fileno()])
    b.close()
    s = cli.conn()
    wait_peer_closed(s)
    socket.send_fds(a, [b"fd"], [s.fileno()])
    s.close()
    try:
        rt.obs("receiver", child.wait(15))
    except subprocess.TimeoutExpired:
        child.kill()
        rt.obs("receiver", "hangs")
