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


def test_memory_max_sizes():
    assert policy.size_of("512K") == 512 << 10
    assert policy.size_of("2G") == 2 << 30
    assert policy.size_of("64MiB") == 64 << 20
    assert policy.size_of("4096") == 4096
    for bad in ("", "-1", "2X", "G", "0"):
        with pytest.raises(Exception, match="not a size"):
            policy.size_of(bad)
