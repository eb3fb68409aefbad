"""The kernel tier across network namespaces (containers on one host)."""
import hashlib
import json
import os
import select
import socket
import time

import pytest

from shmbypass import manager, status
from netns import VethPair, enter
from sockets import recv_exact


def child(fn, *args):
    """Run fn(*args) in a forked child; return (pid, read end of its result pipe)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            out = fn(*args)
            os.write(w, json.dumps({"ok": out}).encode())
            code = 0
        except BaseException as e:  # report, never fall back into pytest
            import traceback
            os.write(w, json.dumps({"error": traceback.format_exc()}).encode())
            code = 1
        os._exit(code)
    os.close(w)
    return pid, r


def result(pid_r, timeout=60):
    pid, r = pid_r
    deadline = time.time() + timeout
    while time.time() < deadline:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.02)
    else:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        raise TimeoutError("child timed out")
    data = os.read(r, 1 << 20)
    os.close(r)
    res = json.loads(data or b'{"error": "no result"}')
    assert "error" not in res, res["error"]
    return res["ok"]


def server(inst, ns, ip, port, family, seed):
    manager.join_cgroup(inst)  # the cgroup first: `enter` leaves /sys alone, but be safe
    enter(ns)
    ls = socket.socket(family)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind((ip, port))
    ls.listen()
    ls.settimeout(30)
    s, _ = ls.accept()
    got = recv_exact(s, 2 << 20)
    s.sendall(hashlib.sha256(got).digest() + os.urandom(seed % 7 + 1))
    s.shutdown(socket.SHUT_WR)
    assert s.recv(1) == b""
    return hashlib.sha256(got).hexdigest()


def client(inst, ns, ip, port, family, src, sport, seed, hold=None):
    """hold: a pipe (read end, write end) whose EOF says the test has seen
    the connection in `status` (else a short pause)."""
    if hold:
        os.close(hold[1])
    manager.join_cgroup(inst)
    enter(ns)
    for _ in range(200):
        c = socket.socket(family)
        c.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        c.bind((src, sport))
        try:
            c.connect((ip, port))
            break
        except ConnectionRefusedError:
            c.close()
            time.sleep(0.05)
    data = hashlib.sha256(str(seed).encode()).digest() * 65536  # 2 MiB, seed-specific
    c.sendall(data)
    digest = recv_exact(c, 32)
    assert digest == hashlib.sha256(data).digest(), "got the other namespace's data"
    if hold:                # the test reads status while the connection is open
        select.select([hold[0]], [], [], 60)
    else:
        time.sleep(0.3)
    # Read the server's tail up to its FIN: closing with unread bytes would
    # send an RST (as plain TCP does), and the server expects our FIN.
    tail = b""
    while True:
        b = c.recv(64)
        if not b:
            break
        tail += b
    assert len(tail) == seed % 7 + 1, tail
    c.close()
    return hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6])
def test_two_namespaces_over_veth(inst, family):
    with VethPair() as v:
        ips = v.ips if family == socket.AF_INET else v.ip6s
        before = status.counters(inst)
        srv = child(server, inst, v.ns[1], ips[1], 5555, family, 1)
        cli = child(client, inst, v.ns[0], ips[1], 5555, family, ips[0], 0, 1)
        sent = result(cli)
        assert result(srv) == sent
        after = status.counters(inst)
        assert after["paired"] - before["paired"] == 1
        assert after["bytes_redirect"] - before["bytes_redirect"] >= 2 << 20


def test_same_four_tuple_in_two_namespace_pairs(inst):
    """Two connections with the very same 4-tuple, in two namespace pairs, at
    once: each end is paired with its own peer, never the other pair's."""
    with VethPair() as v1, VethPair() as v2:
        pairs = ((11, v1), (22, v2))
        servers = [child(server, inst, v.ns[1], v.ips[1], 6000, socket.AF_INET, seed)
                   for seed, v in pairs]
        hold = os.pipe()    # the clients keep their connections until we close it
        procs = [(srv, child(client, inst, v.ns[0], v.ips[1], 6000, socket.AF_INET, v.ips[0], 41000,
                             seed, hold)) for srv, (seed, v) in zip(servers, pairs)]
        # the four ends while they talk (pairing happens at establishment:
        # look until all four have it, not once after a fixed delay)
        # (past the clients' 10 s of connect retries while the servers start)
        deadline = time.monotonic() + 30
        while True:
            same = [r for r in status.connections(inst)
                    if r["local"] in ("10.213.0.1:41000", "10.213.0.2:6000")]
            if (len(same) == 4 and {r["tier"] for r in same} == {"kernel"}) or \
                    time.monotonic() > deadline:
                break
            time.sleep(0.01)
        os.close(hold[1])
        os.close(hold[0])
        for srv, cli in procs:
            assert result(srv) == result(cli)
        assert len(same) == 4 and {r["tier"] for r in same} == {"kernel"}, same
        assert len({r["netns"] for r in same}) == 4


@pytest.mark.parametrize("guarded", [False, True])
def test_half_close_bug_across_namespaces(inst, guarded):
    """The half-close bug, reproduced: over veth, the ACK of the client's FIN
    arrives while it waits in a blocking recv(), and tcp_bpf_recvmsg() says
    EAGAIN. Without the guard the bug shows; with it (what `shmbypass run`
    gives every program) the program never sees it."""
    import subprocess
    import sys
    peer = os.path.join(os.path.dirname(os.path.abspath(__file__)), "halfclose_peer.py")
    env = dict(os.environ, SHMBYPASS_INSTANCE=inst.name)
    run = [sys.executable, "-m", "shmbypass", "run", "--tier", "kernel", "--"]
    if not guarded:
        run += ["env", "-u", "LD_PRELOAD"]
    with VethPair() as v:
        srv = subprocess.Popen(run + [sys.executable, peer, v.ns[1], "server", v.ips[1], "7000", "40"],
                               env=env, stdout=subprocess.PIPE, text=True)
        try:
            assert srv.stdout.readline().strip() == "listening"
            cli = subprocess.run(run + [sys.executable, peer, v.ns[0], "client", v.ips[1], "7000", "40"],
                                 env=env, capture_output=True, text=True, timeout=120)
            assert cli.returncode == 0, cli.stderr
            res = json.loads(cli.stdout.strip().splitlines()[-1])
        finally:
            srv.kill()
            srv.wait()
    assert status.counters(inst)["paired"] >= 40
    if guarded:
        assert res == {"eagain": 0, "ok": 40}
    else:
        assert res["eagain"] > 0, f"the bug did not reproduce this time: {res}"
