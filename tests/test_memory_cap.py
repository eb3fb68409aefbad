"""The memory cap (issue 12: memory is refused only at a configurable cap,
with a reason). `up --memory-max` bounds the ring memory one process's
connections may hold: each connection's block (its header and both first
areas, charged by the passive end that makes it) and the larger areas a
writer grows into. A server capped at CAP_BLOCKS blocks, with 3 x
CAP_BLOCKS connections held: the first CAP_BLOCKS take the shm tier, the
rest stay on TCP with reason memory-cap in `status --json` (both rows), a
one-line note on the server's stderr, and every connection still carries
its bytes (a sample echoes 32 KiB). Closing them gives the memory back: the
next connections take the shm tier again."""
import os
import subprocess
import sys

import pytest

from shmbypass import manager, policy
from conftest import assert_gone, new_instance
from test_scale import line, result, rows_on_port, run_peer, stop, tell

CAP_BLOCKS = 4
BLOCK = 4096 + 2 * (16 << 10)       # a block's header and its two first areas
N = 3 * CAP_BLOCKS
FORKED = 10 * CAP_BLOCKS


def tiers_of(inst, port):
    """(tier, reason, code) -> how many rows of status show it."""
    out = {}
    for r in rows_on_port(inst, port):
        k = (r["tier"], r["reason"], r["reason_code"])
        out[k] = out.get(k, 0) + 1
    return out


def hold(inst, n):
    """A server and a client holding n connections; (server, client, port)."""
    srv = run_peer(inst, ["manyserver", str(n), str(n)])
    port = line(srv, "PORT ")[0]
    cli = run_peer(inst, ["holdclient", port, str(n), str(n)])
    line(cli, "HELD ")
    return srv, cli, port


def test_memory_cap_keeps_the_rest_on_tcp_with_its_reason():
    if os.geteuid() != 0:
        pytest.fail("the test suite must run as root")
    inst = new_instance("memcap")
    manager.up(inst, allow=policy.Policy(memory_max=CAP_BLOCKS * BLOCK))
    procs = []
    try:
        srv, cli, port = hold(inst, N)
        procs += [srv, cli]
        tell(cli)                       # one byte each way, then every one echoes 32 KiB
        line(cli, "SAMPLED")
        assert tiers_of(inst, port) == {("shm", "", 0): 2 * CAP_BLOCKS,
                                        ("tcp", "memory-cap", 0x03040000): 2 * (N - CAP_BLOCKS)}
        tell(cli)
        cres = result(cli, 120)
        assert cres["echo_ok"] == N and cres["both_rings"] == CAP_BLOCKS, cres
        out, err = srv.communicate(timeout=60)
        assert srv.returncode == 0 and '"accepted": %d' % N in out, (out[-2000:], err[-2000:])
        assert err.count("reached its memory cap (up --memory-max)") == 1, err[-2000:]

        # Closed, they gave their memory back: a new server process is
        # capped afresh, and an old one would be too (per process).
        srv, cli, port = hold(inst, CAP_BLOCKS)
        procs += [srv, cli]
        tell(cli)
        line(cli, "SAMPLED")
        assert tiers_of(inst, port) == {("shm", "", 0): 2 * CAP_BLOCKS}
        tell(cli)
        assert result(cli, 60)["both_rings"] == CAP_BLOCKS
        result(srv, 60)
    finally:
        stop(inst, procs)
    assert_gone(inst)


def test_fork_per_connection_server_gives_its_memory_back():
    """A fork-per-connection server: the parent closes its copy after fork,
    the child echoes and exits without a close. Each connection's block is
    given back once no process holds the socket any more (the kernel says
    so: native/preload/orphan.c), so under a cap of CAP_BLOCKS blocks,
    FORKED connections one after the other all take the shm tier with both
    rings, bytes compared. (Before, the parent never gave a shared socket's
    block back: past the cap every connection stayed on TCP, memory-cap.)"""
    inst = new_instance("memfork")
    manager.up(inst, allow=policy.Policy(memory_max=CAP_BLOCKS * BLOCK))
    procs = []
    try:
        srv = run_peer(inst, ["forkserver", str(FORKED)])
        procs.append(srv)
        port = line(srv, "PORT ")[0]
        cli = run_peer(inst, ["seqclient", port, str(FORKED)])
        procs.append(cli)
        cres = result(cli, 120)
        assert cres == {"tiers": {"2": FORKED}, "echo_ok": FORKED, "both_rings": FORKED}, cres
        assert result(srv, 60)["accepted"] == FORKED
    finally:
        stop(inst, procs)
    assert_gone(inst)


FORK_SERVER = """
import os, socket, sys
sys.path.insert(0, sys.argv[1])
from ipc_common import tier
n = int(sys.argv[2])

def serve(ls):
    held = [ls.accept()[0] for _ in range(n)]
    for c in held:                   # echo pings until the client's "d"
        while (b := c.recv(1)) != b"d":
            c.sendall(b)
    return held

la = socket.socket()
la.bind(("127.0.0.1", 0))
la.listen(n)
print("PORT", la.getsockname()[1], flush=True)
held = serve(la)                     # the cap reached: n blocks held
if os.fork() == 0:                   # the child serves n more
    la.close()
    lb = socket.socket()
    lb.bind(("127.0.0.1", 0))
    lb.listen(n)
    print("PORT", lb.getsockname()[1], flush=True)
    print("CHILD", [tier(c) for c in serve(lb)], flush=True)
    os._exit(0)
os.wait()
"""

FORK_CLIENT = """
import socket, sys
sys.path.insert(0, sys.argv[1])
from ipc_common import rings, tier
n = int(sys.argv[2])
for port in sys.stdin:
    socks = [socket.create_connection(("127.0.0.1", int(port))) for _ in range(n)]
    for s in socks:
        for _ in range(100):         # until both directions use rings
            s.sendall(b"p")
            assert s.recv(1) == b"p"
            if rings(s) == 3:
                break
        s.sendall(b"d")
    print("LIVE", [tier(s) * 10 + rings(s) for s in socks], flush=True)
"""


def test_a_forked_child_is_capped_for_its_own_memory():
    """A server at its cap (CAP_BLOCKS connections held) forks a child that
    serves CAP_BLOCKS connections of its own: they take the shm tier with
    both rings, since the cap counts what each process charges (memory.c
    mem_atfork_child). Before, the child started with its parent's count
    and put all of its connections on TCP, memory-cap."""
    inst = new_instance("memforkcap")
    manager.up(inst, allow=policy.Policy(memory_max=CAP_BLOCKS * BLOCK))
    env = dict(os.environ, SHMBYPASS_INSTANCE=inst.name)
    run = [sys.executable, "-m", "shmbypass", "run", "--tier", "shm", "--", sys.executable, "-c"]
    here = os.path.dirname(os.path.abspath(__file__))
    procs = []
    try:
        srv = subprocess.Popen(run + [FORK_SERVER, here, str(CAP_BLOCKS)], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
        procs.append(srv)
        cli = subprocess.Popen(run + [FORK_CLIENT, here, str(CAP_BLOCKS)], env=env, stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
        procs.append(cli)
        both = [23] * CAP_BLOCKS        # tier 2 (shm) * 10 + rings 3 (both directions)
        for what in ("parent", "child"):
            cli.stdin.write(line(srv, "PORT ")[0] + "\n")
            cli.stdin.flush()
            assert " ".join(line(cli, "LIVE ")) == str(both), what
        assert " ".join(line(srv, "CHILD ")) == str([2] * CAP_BLOCKS)
        cli.stdin.close()
        assert srv.wait(30) == 0 and cli.wait(30) == 0
    finally:
        stop(inst, procs)
    assert_gone(inst)


def test_memory_max_sizes():
    assert policy.size_of("512K") == 512 << 10
    assert policy.size_of("2G") == 2 << 30
    assert policy.size_of("64MiB") == 64 << 20
    assert policy.size_of("4096") == 4096
    for bad in ("", "-1", "2X", "G", "0"):
        with pytest.raises(Exception, match="not a size"):
            policy.size_of(bad)
