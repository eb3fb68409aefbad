"""`shmbypass status` like smcss and ss: stable reason codes (docs/REASONS.md),
filters, the process holding each end (in this and other network
namespaces), and --watch."""
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

from shmbypass import manager, status
from apps import SHMBYPASS
from conftest import InGroup
from netns import VethPair, enter
from sockets import listener, pair, transfer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OLD_KEYS = {"cookie", "local", "remote", "tier", "reason", "bytes_tx", "bytes_rx", "netns", "peer"}


def cli_status(inst, *args) -> dict:
    p = subprocess.run(SHMBYPASS + ["status", "--json", *args], capture_output=True, text=True,
                       env=dict(os.environ, SHMBYPASS_INSTANCE=inst.name), timeout=60)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def port_of(sock) -> int:
    return sock.getsockname()[1]


# -- reason codes ---------------------------------------------------------------

def documented_codes() -> dict[str, int]:
    """reason -> code, from the table in docs/REASONS.md."""
    with open(os.path.join(ROOT, "docs", "REASONS.md")) as f:
        text = f.read()
    out = {}
    for m in re.finditer(r"^\| `0x([0-9A-F]{8})` \| (?:`([a-z-]+)`|\(none\)) \|", text, re.M):
        out[m.group(2) or ""] = int(m.group(1), 16)
    return out


def test_reason_codes_are_documented_and_unique():
    assert documented_codes() == status.REASON_CODES
    codes = list(status.REASON_CODES.values())
    assert len(set(codes)) == len(codes), "two reasons share a code"
    # every reason the BPF side can report (and status's own remote-host)
    for name in [*status.REASONS.values(), "remote-host"]:
        assert name in status.REASON_CODES, f"reason {name!r} has no code"
    for code in codes:
        assert code & 0xFFFF == 0 and code >> 24 < 0x7F
    assert status.reason_code("reason-42") == 0x7F00002A


# -- rows: keys, codes, owners, filters -----------------------------------------

def test_rows_owners_and_filters(inst):
    outside = listener()  # not in the group: a connection to it stays on TCP
    with InGroup(inst):
        c, s = pair()
        t = socket.create_connection(outside.getsockname())
    u, _ = outside.accept()
    try:
        transfer(c, s, b"a" * 5000)
        st = cli_status(inst)
        mine = {r["local"]: r for r in st["connections"]}
        rc = mine[f"127.0.0.1:{port_of(c)}"]
        rs = mine[f"127.0.0.1:{port_of(s)}"]
        rt = mine[f"127.0.0.1:{port_of(t)}"]
        for r in (rc, rs, rt):
            assert OLD_KEYS <= set(r), r          # JSON keeps its keys
            assert r["pid"] == os.getpid(), r       # this process holds them all
            assert r["command"] == open("/proc/self/comm").read().strip()
        assert {o["fd"] for o in rc["owners"]} == {c.fileno()}
        assert (rc["tier"], rc["reason"], rc["reason_code"]) == ("kernel", "", 0)
        assert (rt["tier"], rt["reason"], rt["reason_code"]) == ("tcp", "peer-not-capable", 0x01010000)
        assert rc["bytes_tx"] == rs["bytes_rx"] == 5000

        assert {r["local"] for r in cli_status(inst, "--tier", "tcp")["connections"]} == {rt["local"]}
        assert {r["local"] for r in cli_status(inst, "--tier", "kernel")["connections"]} == \
            {rc["local"], rs["local"]}
        by_port = cli_status(inst, "--port", str(port_of(s)))["connections"]  # local or remote
        assert {r["local"] for r in by_port} == {rc["local"], rs["local"]}
        assert cli_status(inst, "--pid", "1")["connections"] == []
        assert len(cli_status(inst, "--pid", str(os.getpid()), "--tier", "tcp")["connections"]) == 1

        text = subprocess.run(SHMBYPASS + ["status", "--tier", "tcp"], capture_output=True, text=True,
                              env=dict(os.environ, SHMBYPASS_INSTANCE=inst.name)).stdout
        line = next(ln for ln in text.splitlines() if ln.startswith(rt["local"]))
        assert f"{os.getpid()}/" in line and "peer-not-capable (0x01010000)" in line, text
    finally:
        for x in (c, s, t, u, outside):
            x.close()


def test_owner_is_the_process_holding_the_socket(inst):
    """A child process (under `shmbypass run`) holds the client end: --pid
    picks its row, and its command is the child's."""
    with InGroup(inst):
        ls = listener()
    env = dict(os.environ, SHMBYPASS_INSTANCE=inst.name)
    holder = subprocess.Popen(
        SHMBYPASS + ["run", "--tier", "kernel", "--", sys.executable, "-c",
                     "import socket,sys; c=socket.create_connection(('127.0.0.1', int(sys.argv[1])));"
                     "print(c.getsockname()[1], flush=True); sys.stdin.read()", str(port_of(ls))],
        env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        cport = int(holder.stdout.readline())
        s, _ = ls.accept()
        rows = [r for r in cli_status(inst)["connections"] if r["local"] == f"127.0.0.1:{cport}"]
        assert len(rows) == 1 and rows[0]["pid"] not in (None, os.getpid()), rows
        child = rows[0]["pid"]
        assert rows[0]["command"] == open(f"/proc/{child}/comm").read().strip()
        picked = cli_status(inst, "--pid", str(child))["connections"]
        assert [r["local"] for r in picked] == [f"127.0.0.1:{cport}"]
        s.close()
    finally:
        holder.stdin.close()
        holder.wait(30)
        ls.close()


def hold_end(inst, ns, role, ip, port, ready_w, done_r):
    """In a forked child: join the group and namespace, make one end of a
    connection, say its local port, hold it until the parent closes done_r."""
    manager.join_cgroup(inst)
    enter(ns)
    if role == "server":
        ls = socket.socket()
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind((ip, port))
        ls.listen()
        os.write(ready_w, b"L\n")
        sock, _ = ls.accept()
    else:
        sock = socket.socket()
        for _ in range(200):
            try:
                sock.connect((ip, port))
                break
            except ConnectionRefusedError:
                time.sleep(0.05)
    os.write(ready_w, f"{sock.getsockname()[1]}\n".encode())
    os.read(done_r, 1)


def test_owners_in_other_network_namespaces(inst):
    """Both ends live in namespaces of their own: sock_diag in ours cannot see
    them, and status still names the processes."""
    with VethPair() as v:
        kids = []
        done_r, done_w = os.pipe()
        try:
            for role, ns in (("server", v.ns[1]), ("client", v.ns[0])):
                r, w = os.pipe()
                pid = os.fork()
                if pid == 0:
                    code = 0
                    os.close(done_w)  # or the parent's close would never reach us
                    try:
                        hold_end(inst, ns, role, v.ips[1], 7100, w, done_r)
                    except BaseException:
                        import traceback
                        traceback.print_exc()
                        code = 1
                    os._exit(code)
                os.close(w)
                kids.append((pid, os.fdopen(r)))
            srv_listen = kids[0][1].readline()
            assert srv_listen == "L\n"
            cport = int(kids[1][1].readline())
            sport = int(kids[0][1].readline())
            assert sport == 7100
            rows = {r["local"]: r for r in cli_status(inst)["connections"]}
            cli = rows[f"{v.ips[0]}:{cport}"]
            srv = rows[f"{v.ips[1]}:7100"]
            assert cli["pid"] == kids[1][0] and srv["pid"] == kids[0][0], (cli, srv)
            assert cli["netns"] != srv["netns"]
        finally:
            os.close(done_w)
            for pid, f in kids:
                os.waitpid(pid, 0)
                f.close()
            os.close(done_r)


def test_watch_redraws_until_interrupted(inst):
    p = subprocess.Popen(SHMBYPASS + ["status", "--json", "--watch", "0.2"],
                         env=dict(os.environ, SHMBYPASS_INSTANCE=inst.name),
                         stdout=subprocess.PIPE, text=True)
    try:
        first, second = json.loads(p.stdout.readline()), json.loads(p.stdout.readline())
        assert first["instance"] == second["instance"] == inst.name
    finally:
        p.send_signal(signal.SIGINT)
        p.wait(30)
    assert p.returncode == 130


UNREAD_PEER = r"""
import socket, sys
role, n = sys.argv[1], int(sys.argv[2])
if role == "server":
    ls = socket.socket(); ls.bind(("127.0.0.1", 0)); ls.listen()
    print(ls.getsockname()[1], flush=True)
    s, _ = ls.accept()
    while s.recv(1) == b"p":               # answer pings until the bulk begins
        s.sendall(b"r")
    print("bulk", flush=True)
    sys.stdin.readline()                   # hold the bulk unread until told
    got = 0
    while got < n:
        b = s.recv(n - got)
        if not b:
            break
        got += len(b)
    print("read", got, flush=True)
    sys.stdin.readline()
else:
    c = socket.create_connection(("127.0.0.1", int(sys.argv[3])))
    print(c.getsockname()[1], flush=True)
    for line in sys.stdin:
        if line.strip() == "ping":
            c.sendall(b"p")
            print("pong" if c.recv(1) == b"r" else "?", flush=True)
        else:
            c.sendall(b"b" + b"q" * n)
            print("sent", flush=True)
            sys.stdin.readline()
            break
"""


def tell(p, line):
    p.stdin.write(line + "\n")
    p.stdin.flush()


@contextlib.contextmanager
def unread_pair(inst, n):
    """UNREAD_PEER's server and client under `shmbypass run --tier shm`:
    (srv, cli, port, the client's address, the server's). Both stopped (as
    process groups: `run` is the parent of the program) whatever happens."""
    env = dict(os.environ, SHMBYPASS_INSTANCE=inst.name)
    run = SHMBYPASS + ["run", "--tier", "shm", "--", sys.executable, "-c", UNREAD_PEER]
    procs = []

    def start(*args):
        procs.append(subprocess.Popen(run + [str(a) for a in args], env=env, text=True,
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      start_new_session=True))
        return procs[-1]

    try:
        srv = start("server", n)
        port = srv.stdout.readline().strip()
        cli = start("client", n, port)
        mine = f"127.0.0.1:{cli.stdout.readline().strip()}"
        yield srv, cli, port, mine, f"127.0.0.1:{port}"
    finally:
        for p in reversed(procs):
            p.stdin.close()
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


def test_ring_fill_of_shm_connections(inst):
    """A shm-tier connection starts on TCP and goes live (rings) once the
    active end took the passive end's offer: a few pings get it there.
    Then bytes written into a ring and not read yet show as the writer's
    tx_queued and the reader's rx_queued (SEND-Q/RECV-Q), across the areas
    the stream grew into, and 0 once read; byte counts are stream positions
    (what went over TCP first included)."""
    n = 100_000  # more than the first 16 KiB area: the stream grows

    def rows():
        return {r["local"]: r for r in cli_status(inst, "--port", port)["connections"]}

    with unread_pair(inst, n) as (srv, cli, port, mine, theirs):
        pings = 0
        while True:
            tell(cli, "ping")
            assert cli.stdout.readline().strip() == "pong"
            pings += 1
            got = rows()
            assert {r["tier"] for r in got.values()} == {"shm"}, got
            # Once the pair's memory block is there (its counters shown), the
            # bytes so far, ring or not yet (a direction still on TCP: what
            # its reader has read, which is all of it here).
            if all("ring_full" in r for r in got.values()):
                assert got[mine]["bytes_tx"] == got[theirs]["bytes_rx"] == pings, got
                assert got[mine]["bytes_rx"] == got[theirs]["bytes_tx"] == pings, got
            if all(r["tx_queued"] is not None and r["rx_queued"] is not None
                   for r in got.values()):
                break  # both directions are in rings
            assert pings < 200, f"not live after {pings} pings: {got}"
        c, s = got[mine], got[theirs]
        assert (c["tx_queued"], c["rx_queued"], s["tx_queued"], s["rx_queued"]) == (0, 0, 0, 0)
        assert c["bytes_tx"] == s["bytes_rx"] == pings and c["bytes_rx"] == s["bytes_tx"] == pings

        tell(cli, "bulk")
        assert cli.stdout.readline().strip() == "sent"
        assert srv.stdout.readline().strip() == "bulk"
        got = rows()
        c, s = got[mine], got[theirs]
        assert (c["tx_queued"], s["rx_queued"]) == (n, n), (c, s)
        assert (c["rx_queued"], s["tx_queued"]) == (0, 0)
        assert c["ring_size"] >= n, c  # the area it writes now
        assert c["bytes_tx"] == pings + 1 + n and s["bytes_rx"] == pings + 1, (c, s)
        text = subprocess.run(SHMBYPASS + ["status", "--tier", "shm"], capture_output=True,
                              text=True, env=dict(os.environ, SHMBYPASS_INSTANCE=inst.name)).stdout
        line = next(ln for ln in text.splitlines() if ln.startswith(mine + " "))
        assert "SEND-Q" in text and "RECV-Q" in text and f" {n} " in line, text

        tell(srv, "")
        assert srv.stdout.readline().split() == ["read", str(n)]
        got = rows()
        c, s = got[mine], got[theirs]
        assert (c["tx_queued"], s["rx_queued"]) == (0, 0), (c, s)
        assert c["bytes_tx"] == s["bytes_rx"] == pings + 1 + n, (c, s)
        assert c["bytes_rx"] == s["bytes_tx"] == pings


def test_ring_full_and_doorbells_counted(inst, tmp_path):
    """A writer whose peer does not read fills every area of its stream
    (12 MiB: more than the 9.6 MiB the four areas hold) and waits: its row
    counts the ring as full, in `status --json` and in the metrics; the
    doorbells each end sent are counted beside it. Every byte then arrives."""
    from shmbypass import metrics
    n = 12 << 20

    def row(port, local):
        return {r["local"]: r for r in cli_status(inst, "--port", port)["connections"]}[local]

    with unread_pair(inst, n) as (srv, cli, port, mine, theirs):
        for _ in range(200):    # until both directions are in rings
            tell(cli, "ping")
            assert cli.stdout.readline().strip() == "pong"
            got = [row(port, mine), row(port, theirs)]
            if all(r.get("rx_queued") is not None and r.get("tx_queued") is not None for r in got):
                break
        assert {r["tier"] for r in got} == {"shm"} and got[0]["ring_full"] == 0, got
        tell(cli, "bulk")                           # blocks: nobody reads
        assert srv.stdout.readline().strip() == "bulk"
        deadline = time.monotonic() + 30
        while (r := row(port, mine))["ring_full"] < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert r["ring_full"] >= 1 and r["tx_queued"] > 9 << 20, r
        assert isinstance(r["doorbells"], int), r  # 1 here: the ring's switch doorbell
        text = tmp_path / "m.prom"
        metrics.write_textfile(inst, str(text))
        series = [ln for ln in text.read_text().splitlines()
                  if ln.startswith("shmbypass_shm_connection_ring_full_total{") and
                  f'local="{mine}"' in ln]
        assert len(series) == 1 and float(series[0].split()[-1]) >= 1, series
        assert 'shmbypass_shm_connection_doorbells_total{' in text.read_text()
        tell(srv, "")                               # now read it all
        assert srv.stdout.readline().split() == ["read", str(n)]
        assert cli.stdout.readline().strip() == "sent"
