"""Issue 10 case 4: a process that runs without the interposer (no
LD_PRELOAD) receives the connected socket over SCM_RIGHTS and reads it to
EOF: exactly the 1 MiB the server sent; the sender sees no error. Under
the shm tier the connection goes back to plain TCP before the fd is sent."""
import os
import socket
import subprocess
import sys

import runtime as rt
from scenarios.splice_out_peer_closed import server  # noqa: F401  (the same server: 1 MiB, close)

# The client gives the socket away as soon as it took the rings: the server
# end may be back on plain TCP (revert.c) by the time it records its tier.
FALLBACK_OK = {"not-live"}


def client(cli):
    give_away(cli, __name__)


def give_away(cli, scenario, before=None):
    """Connect, run before(sock) if given, then pass the socket to a process
    without the interposer (scenario's `receiver`) and wait for it."""
    a, b = socket.socketpair()
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    # started before the connection exists (subprocess.run's vfork is case 2)
    child = subprocess.Popen([sys.executable, rt.PEER, scenario.split(".")[-1], "receiver",
                              str(b.fileno())], env=env, pass_fds=[b.fileno()])
    b.close()
    s = cli.conn()
    if before:
        before(s)
    socket.send_fds(a, [b"fd"], [s.fileno()])
    s.close()
    try:
        rt.obs("receiver", child.wait(15))
    except subprocess.TimeoutExpired:
        child.kill()
        rt.obs("receiver", "hangs")


def receiver(args):
    unix = socket.socket(fileno=int(args[0]))
    _, fds, _, _ = socket.recv_fds(unix, 16, 1)
    s = socket.socket(fileno=fds[0])
    s.settimeout(6)
    rt.obs("received", rt.call(rt.recv_all, s))
