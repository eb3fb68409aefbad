"""Issue 3's stress sizes, through the real BPF handshake and the interposer:
100,000 connections opened and closed in sequence, then 1,000 open at once.

The pool is large enough for all 1,000 to be in the shm tier at once, so the
slot machinery itself is what is stressed (test_interposer.py covers a full
pool falling back to the kernel tier). Afterwards: every connection moved its
byte, every slot is back on the free list, neither process holds an fd more
than before, memory did not grow with the number of connections, no shared
memory segment of the instance is left, and the BPF programs reported no error."""
import json
import os
import subprocess
import sys

import pytest

from shmbypass import manager, status
from conftest import assert_gone, assert_slots_back, new_instance

HERE = os.path.dirname(os.path.abspath(__file__))
PEER = os.path.join(HERE, "ipc_peer.py")
PY = sys.executable
SEQ, NOPEN = 100_000, 1_000
# Two slots per connection. The pool's memory is only touched as far as data
# flows (a page or two per ring here).
SLOTS = 2 * NOPEN + 64
# Memory a process may gain between its 1,000th connection and its last:
# per-connection state that is never freed would be 100,000 x (at least
# tens of bytes), far above this.
RSS_SLACK_KIB = 4096


def run_peer(inst, argv):
    env = dict(os.environ, SHMBYPASS_INSTANCE=inst.name)
    return subprocess.Popen([PY, "-m", "shmbypass", "run", "--tier", "shm", "--", PY, PEER]
                            + argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def result(p, timeout):
    out, err = p.communicate(timeout=timeout)
    lines = [ln[len("RESULT "):] for ln in out.splitlines() if ln.startswith("RESULT {")]
    assert p.returncode == 0 and lines, (p.returncode, out[-2000:], err[-2000:])
    return json.loads(lines[-1])


def test_100k_sequential_and_1000_concurrent():
    if os.geteuid() != 0:
        pytest.fail("the test suite must run as root")
    inst = new_instance("stress")
    manager.up(inst, slot_count=SLOTS, backend="posix")
    procs = []
    try:
        srv = run_peer(inst, ["manyserver", str(SEQ + NOPEN + 1), str(NOPEN)])
        procs.append(srv)
        port = srv.stdout.readline().split()[1]
        cli = run_peer(inst, ["manyclient", port, str(SEQ), str(NOPEN)])
        procs.append(cli)
        cres = result(cli, 900)
        sres = result(srv, 60)

        assert sres["accepted"] == SEQ + NOPEN + 1
        # Every connection in the shm tier, on both ends (the pool never ran dry).
        assert cres["tiers"] == {"2": SEQ + NOPEN}, cres["tiers"]
        assert sres["tiers"] == {"2": SEQ + NOPEN + 1}, sres["tiers"]
        for res in (cres, sres):
            assert res["fds_after"] == res["fds_before"], res
            assert res["rss_end_kib"] - res["rss_warm_kib"] < RSS_SLACK_KIB, res

        assert_slots_back(inst)
        assert not status.errors(inst), status.errors(inst)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        manager.down(inst, drain_timeout=1, force=True)
    assert_gone(inst)
