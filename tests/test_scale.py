"""10,000 concurrent held connections in the shm tier (issue 12, Tests):
between one client process and one server process under `shmbypass run
--tier shm` (tests/ipc_peer.py `holdclient`, and `manyserver` as in
test_stress.py).

While they are all open and idle: every connection is in the shm tier at
both ends, as the interposer says and as `shmbypass status --json` shows
it (20,000 rows, no reason), and the shared memory they hold (RssShmem of
both processes: the pages of their blocks and channels, no ring) is
measured and printed per connection. A connection is not live until used
(its bytes go over TCP until both ends hold its memory; the passive end's
offers wait for room in the peer's inbox, which holds 10), so then every
connection moves one byte each way, all at once (10,000 offers cross the
inbox while the client is busy elsewhere), and 200 of them, spread over
the range, are used: each pings until both directions use rings (a few
pings) and echoes 32 KiB of random bytes through them, compared. (Before
the active end kept the offers of all its waiting sockets, memory.c
mem_expect, only the last 512 read survived the all-at-once round: a third
of the sample never went live.) No timing is asserted."""
import json
import os
import subprocess
import sys
import time

import pytest

from shmbypass import manager, status
from conftest import assert_gone, new_instance

HERE = os.path.dirname(os.path.abspath(__file__))
PEER = os.path.join(HERE, "ipc_peer.py")
PY = sys.executable
N, SAMPLE = 10_000, 200
# Shared memory an idle connection may hold, both ends together: a block
# header page, a channel page at each end and a share of the region
# headers is ~12 KiB; a ring touched per idle connection would be more.
SHMEM_PER_IDLE_KIB = 48


def run_peer(inst, argv):
    env = dict(os.environ, SHMBYPASS_INSTANCE=inst.name)
    return subprocess.Popen([PY, "-m", "shmbypass", "run", "--tier", "shm", "--", PY, PEER]
                            + argv, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def program_pid(p):
    """The peer program itself (`run` is its parent)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
            if os.getpgid(int(pid)) == p.pid and PEER.encode() in argv and b"run" not in argv:
                return int(pid)
        except (ProcessLookupError, FileNotFoundError):
            continue
    raise AssertionError(f"no peer program in {p.args}")


def rss_shmem_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        return next(int(ln.split()[1]) for ln in f if ln.startswith("RssShmem:"))


def line(p, prefix):
    while True:
        ln = p.stdout.readline()
        assert ln, (p.args, p.poll(), p.stderr.read()[-3000:] if p.poll() is not None else "")
        if ln.startswith(prefix):
            return ln[len(prefix):].split()


def tell(p):
    p.stdin.write("\n")
    p.stdin.flush()


def rows_on_port(inst, port):
    """`shmbypass status --json`'s rows of the connections on port."""
    st = subprocess.run([PY, "-m", "shmbypass", "status", "--json"], capture_output=True,
                        text=True, timeout=300, env=dict(os.environ, SHMBYPASS_INSTANCE=inst.name))
    assert st.returncode == 0, st.stderr[-3000:]
    return [r for r in json.loads(st.stdout)["connections"]
            if port in (r["local"].rsplit(":", 1)[1], r["remote"].rsplit(":", 1)[1])]


def stop(inst, procs):
    """Whatever peer is left killed (its process group), the instance down."""
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, 9)
            p.wait()
    manager.down(inst, drain_timeout=1, force=True)


def result(p, timeout):
    out, err = p.communicate(timeout=timeout)
    lines = [ln[len("RESULT "):] for ln in out.splitlines() if ln.startswith("RESULT {")]
    assert p.returncode == 0 and lines, (p.returncode, out[-2000:], err[-2000:])
    return json.loads(lines[-1])


def test_10k_concurrent_held_connections():
    if os.geteuid() != 0:
        pytest.fail("the test suite must run as root")
    inst = new_instance("scale")
    manager.up(inst)
    procs = []
    t0 = time.monotonic()
    try:
        srv = run_peer(inst, ["manyserver", str(N), str(N)])
        procs.append(srv)
        port = line(srv, "PORT ")[0]
        srv_pid = program_pid(srv)
        srv_before = rss_shmem_kib(srv_pid)
        cli = run_peer(inst, ["holdclient", port, str(N), str(SAMPLE)])
        procs.append(cli)
        n, cli_before = map(int, line(cli, "HELD "))
        cli_pid = program_pid(cli)
        t_held = time.monotonic()

        # All held and idle: every one in the shm tier at both ends.
        rows = rows_on_port(inst, port)
        tiers = {(r["tier"], r["reason"]) for r in rows}
        assert len(rows) == 2 * N and tiers == {("shm", "")}, (len(rows), tiers)
        shmem = rss_shmem_kib(srv_pid) - srv_before + rss_shmem_kib(cli_pid) - cli_before
        per_conn = shmem / N
        print(f"\n{N} idle shm-tier connections: RssShmem server {rss_shmem_kib(srv_pid)} KiB, "
              f"client {rss_shmem_kib(cli_pid)} KiB; {per_conn:.1f} KiB per connection (both ends)")
        assert per_conn < SHMEM_PER_IDLE_KIB, per_conn

        tell(cli)                       # now use a sample of them
        line(cli, "SAMPLED")
        tell(cli)
        cres = result(cli, 300)
        sres = result(srv, 120)
        print(f"sampled {SAMPLE}: {cres['pings']} pings in all (at most {cres['max_pings']} "
              f"for one) before both directions used rings; held after "
              f"{t_held - t0:.1f} s, all done after {time.monotonic() - t0:.1f} s")
        assert cres["tiers"] == {"2": N} and sres["tiers"] == {"2": N}, (cres, sres)
        assert sres["accepted"] == N, sres
        assert cres["echo_ok"] == SAMPLE and cres["both_rings"] == SAMPLE, cres
        assert cres["max_pings"] < 100, cres
        assert not status.errors(inst), status.errors(inst)
    finally:
        stop(inst, procs)
    assert_gone(inst)


GONE = """
import os, socket, sys, time
socks = [socket.create_connection(("127.0.0.1", int(sys.argv[1]))) for _ in range(60)]
time.sleep(0.5)     # the server takes and offers them; this process reads no offer
os._exit(0)
"""


def test_peer_gone_before_its_offers_leaves_no_memory():
    """A client that opens 60 connections and exits without one call on
    them: its inbox fills (10) and the rest of the server's offers wait,
    then find it gone. The server closes them all and holds no fd more than
    before: the regions none of whose offers reached the client are
    unmapped once no connection uses them (their memfds stayed among the
    server's fds before)."""
    if os.geteuid() != 0:
        pytest.fail("the test suite must run as root")
    inst = new_instance("gone")
    manager.up(inst)
    srv = None
    try:
        srv = run_peer(inst, ["manyserver", "60", "60"])
        port = line(srv, "PORT ")[0]
        env = dict(os.environ, SHMBYPASS_INSTANCE=inst.name)
        subprocess.run([PY, "-m", "shmbypass", "run", "--tier", "shm", "--", PY, "-c", GONE, port],
                       env=env, timeout=120, check=True)
        res = result(srv, 120)
        assert res["accepted"] == 60 and res["tiers"] == {"2": 60}, res
        assert res["fds_after"] == res["fds_before"], res
    finally:
        stop(inst, [srv] if srv else [])
    assert_gone(inst)


ONE = """
import socket, sys
sys.path.insert(0, sys.argv[2])
from ipc_common import rings, tier
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
for _ in range(100):                 # until both directions use rings
    s.sendall(b"p")
    assert s.recv(1) == b"p"
    if rings(s) == 3:
        break
assert tier(s) == 2 and rings(s) == 3, (tier(s), rings(s))
"""


def region_mappings(pid):
    """How many pair regions (memfd:shmbypass) the process has mapped."""
    with open(f"/proc/{pid}/maps") as f:
        return sum(1 for ln in f if "/memfd:shmbypass" in ln)


def test_regions_of_gone_peers_are_unmapped():
    """A server that served CLIENTS client processes, one after the other,
    each through its own pair region: once a client is gone and no
    connection uses its region, the server unmaps it (memory.c,
    reap_gone_locked). Before, the server kept a mapping (and the pages its
    blocks touched) for every client process it ever served, and made no
    region past 4,096 of them."""
    if os.geteuid() != 0:
        pytest.fail("the test suite must run as root")
    clients = 12
    inst = new_instance("reap")
    manager.up(inst)
    srv = None
    try:
        srv = run_peer(inst, ["manyserver", str(clients + 1)])
        port = line(srv, "PORT ")[0]
        env = dict(os.environ, SHMBYPASS_INSTANCE=inst.name)
        for _ in range(clients):
            subprocess.run([PY, "-m", "shmbypass", "run", "--tier", "shm", "--", PY, "-c", ONE, port,
                            HERE], env=env, timeout=60, check=True)
        mapped = region_mappings(program_pid(srv))
        subprocess.run([PY, "-m", "shmbypass", "run", "--tier", "shm", "--", PY, "-c", ONE, port, HERE],
                       env=env, timeout=60, check=True)
        res = result(srv, 60)
        assert res["accepted"] == clients + 1 and res["tiers"] == {"2": clients + 1}, res
        assert mapped <= 3, f"{mapped} regions mapped after {clients} clients came and went"
    finally:
        stop(inst, [srv] if srv else [])
    assert_gone(inst)


SERVER = """
import socket
ls = socket.socket()
ls.bind(("127.0.0.1", 0))
ls.listen(1)
print("PORT", ls.getsockname()[1], flush=True)
c, _ = ls.accept()
while data := c.recv(65536):
    c.sendall(data)
"""

CLIENT = """
import socket, sys
sys.path.insert(0, sys.argv[1])
from ipc_common import rings, tier
for port in sys.stdin:
    s = socket.create_connection(("127.0.0.1", int(port)))
    for _ in range(100):             # until both directions use rings
        s.sendall(b"p")
        assert s.recv(1) == b"p"
        if rings(s) == 3:
            break
    live = tier(s) == 2 and rings(s) == 3
    s.close()
    with open("/proc/self/maps") as f:
        print("DONE", int(live), sum(1 for ln in f if "/memfd:shmbypass" in ln), flush=True)
"""


def test_regions_of_gone_servers_are_unmapped():
    """The same at the active end: a client that talks to SERVERS server
    processes, one after the other (each exits after its connection), maps
    each one's region; once its maker has exited and no connection uses it,
    the client unmaps it."""
    if os.geteuid() != 0:
        pytest.fail("the test suite must run as root")
    servers = 8
    inst = new_instance("reapc")
    manager.up(inst)
    env = dict(os.environ, SHMBYPASS_INSTANCE=inst.name)
    run = [PY, "-m", "shmbypass", "run", "--tier", "shm", "--", PY, "-c"]
    cli = subprocess.Popen(run + [CLIENT, HERE], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, start_new_session=True)
    procs = [cli]
    try:
        done = []
        for _ in range(servers):
            srv = subprocess.Popen(run + [SERVER], env=env, stdout=subprocess.PIPE, text=True,
                                   start_new_session=True)
            procs.append(srv)
            cli.stdin.write(line(srv, "PORT ")[0] + "\n")
            cli.stdin.flush()
            done.append(line(cli, "DONE "))
            assert srv.wait(30) == 0
        assert all(live == "1" for live, _ in done), done
        assert int(done[-1][1]) <= 3, f"{done[-1][1]} regions mapped after {servers} servers came and went"
    finally:
        stop(inst, procs)
    assert_gone(inst)

