"""The trust model on the BPF side (bpf/ask.bpf.c, bypass.bpf.c, docs/
NEGOTIATION.md "Trust"): a socket asks through a socket option and BPF
records who asked; two local ends pair in the shm tier only if both asked,
from the exact listening socket, for identities the policy allows; nothing
goes on the wire and nothing is held by a connection that never completes.

These tests drive the socket options directly (SOL_SHMBYPASS), as the
interposer does, so they check BPF's decisions alone; the interposer's
use of them is tested with real programs elsewhere."""
import os
import socket
import struct
import subprocess
import threading
import time

import pytest

from shmbypass import ask as asking
from shmbypass import bpf, manager, policy, status
from shmbypass.ask import info
from shmbypass._native import lib
from conftest import InGroup, assert_gone, new_instance
from sockets import packet_socket
from test_negotiate import parse_options

SHM, KERNEL, TCP = lib.SBP_TIER_SHM, lib.SBP_TIER_KERNEL, lib.SBP_TIER_TCP


def ask(s, token=b"T" * 16):
    asking.ask(s, token)


@pytest.fixture
def instance():
    made = []

    def make(allow=None):
        inst = new_instance("trust")
        manager.up(inst, allow=allow)
        made.append(inst)
        return inst
    yield make
    for inst in made:
        errors = status.errors(inst)
        manager.down(inst, drain_timeout=1, force=True)
        assert_gone(inst)
        assert not errors, errors


def connected(inst, ask_client=True, ask_listener=True, host="127.0.0.1", ask_child=True):
    with InGroup(inst):
        ls = socket.socket()
        if ask_listener:
            ask(ls, b"L" * 16)
        ls.bind((host, 0))
        ls.listen(16)
        c = socket.socket()
        if ask_client:
            ask(c, b"C" * 16)
        c.connect(ls.getsockname())
        s, _ = ls.accept()
        if ask_child and ask_listener:
            ask(s, b"S" * 16)
    ls.close()
    return c, s


def test_both_must_ask(instance):
    inst = instance()
    for ask_client, ask_listener, want in ((True, True, SHM), (True, False, KERNEL),
                                           (False, True, KERNEL), (False, False, KERNEL)):
        c, s = connected(inst, ask_client, ask_listener)
        try:
            ci, si = info(c), info(s)
            assert (ci.tier, si.tier) == (want, want), (ask_client, ask_listener)
            if want == SHM:
                # each learns the other's identity and inbox, nothing else
                assert ci.peer_cookie == si.cookie and si.peer_cookie == ci.cookie
                assert bytes(ci.peer_inbox) == b"S" * 16 and bytes(si.peer_inbox) == b"C" * 16
                assert ci.peer.tgid == si.peer.tgid == os.getpid()
                assert ci.role == lib.SBP_ROLE_ACTIVE and si.role == lib.SBP_ROLE_PASSIVE
            c.sendall(b"bytes")
            assert s.recv(10) == b"bytes"
        finally:
            c.close()
            s.close()


def test_outside_the_group_nothing_answers():
    s = socket.socket()
    with pytest.raises(OSError) as e:
        ask(s)
    assert e.value.errno == 92      # ENOPROTOOPT: the kernel's own answer, no bypass here
    s.close()


def test_bad_requests_are_refused(instance):
    inst = instance()
    with InGroup(inst):
        s = socket.socket()
    for bad in (b"short", struct.pack("=II16s", 99, 1, b"x" * 16), struct.pack("=II16s", 1, 0x80, b"x" * 16)):
        with pytest.raises(OSError) as e:
            s.setsockopt(lib.SOL_SHMBYPASS, lib.SBP_SO_ASK, bad)
        assert e.value.errno == 1    # EPERM: not a request BPF knows
    s.close()


def test_exact_listener_identity(instance):
    """Only the listening socket that asked gives shm children: not another
    address on the same port, not an unasked member of a SO_REUSEPORT group."""
    inst = instance()
    with InGroup(inst):
        asked = socket.socket()
        ask(asked)
        asked.bind(("127.0.0.1", 0))
        port = asked.getsockname()[1]
        asked.listen(64)
        other = socket.socket()
        other.bind(("127.0.0.2", port))     # same port, another address, never asked
        other.listen(64)
        c = socket.socket()
        ask(c)
        c.connect(("127.0.0.2", port))
        child, _ = other.accept()
        assert info(c).tier != SHM and info(child).tier != SHM
        c.close()
        child.close()
        # a SO_REUSEPORT group with one member that asked and one that did not
        members = []
        for asks in (True, False):
            m = socket.socket()
            m.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if asks:
                ask(m)
            m.bind(("127.0.0.3", port))
            m.listen(64)
            m.setblocking(False)
            members.append((m, asks))
        seen = {True: 0, False: 0}
        for _ in range(40):
            c = socket.socket()
            ask(c)
            c.connect(("127.0.0.3", port))
            for m, asks in members:
                try:
                    ch, _ = m.accept()
                except BlockingIOError:
                    continue
                assert (info(ch).tier == SHM) == asks and (info(c).tier == SHM) == asks
                seen[asks] += 1
                ch.close()
            c.close()
        assert seen[True] and seen[False], seen    # both members were exercised
        for m, _ in members:
            m.close()
    asked.close()
    other.close()


def _child_info(inst, uid, script):
    """Run script (it prints the peer-side INFO tier and reason) as uid, in the group."""
    def pre():
        with open(os.path.join(inst.cgroup, "cgroup.procs"), "w") as f:
            f.write("0")
        os.setgid(uid)
        os.setuid(uid)
    return subprocess.run(["/usr/bin/python3", "-c", script], preexec_fn=pre, capture_output=True,
                          text=True, timeout=30)


CLIENT = r"""
import socket, struct, sys
SOL, ASK, INFO = %d, %d, %d
s = socket.socket()
s.setsockopt(SOL, ASK, struct.pack("=II16s", 1, 1, b"U" * 16))
s.connect(("127.0.0.1", %d))
s.sendall(b"x")
raw = s.getsockopt(SOL, INFO, 256)
version, tier, reason, role = struct.unpack_from("=IIII", raw)
print(tier, reason)
s.recv(1)
"""


@pytest.mark.parametrize("allowed", [False, True])
def test_policy_by_identity(instance, allowed):
    """A user the policy does not allow learns `policy` and the
    kernel tier (which shares no memory); an allowed one the shm tier.
    Root's end learns the same."""
    nobody = 65534
    inst = instance(policy.Policy(users=[nobody]) if allowed else None)
    with InGroup(inst):
        ls = socket.socket()
        ask(ls)
        ls.bind(("127.0.0.1", 0))
        ls.listen(4)
    port = ls.getsockname()[1]
    result = {}

    def serve():
        s, _ = ls.accept()
        ask(s)
        assert s.recv(1) == b"x"
        i = info(s)
        result["server"] = (i.tier, i.reason, i.peer.uid)
        s.sendall(b"y")
        s.close()
    t = threading.Thread(target=serve)
    t.start()
    r = _child_info(inst, nobody, CLIENT % (lib.SOL_SHMBYPASS, lib.SBP_SO_ASK, lib.SBP_SO_INFO, port))
    t.join(30)
    ls.close()
    assert r.returncode == 0, r.stderr
    tier, reason = map(int, r.stdout.split())
    want = (SHM, lib.SBP_REASON_NONE) if allowed else (lib.SBP_TIER_KERNEL, lib.SBP_REASON_POLICY_EXCLUDED)
    assert (tier, reason) == want
    assert result["server"] == (*want, nobody)


def test_policy_by_port_keeps_both_tiers_off(instance):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    inst = instance(policy.Policy(exclude_ports=[port]))
    with InGroup(inst):
        ls = socket.socket()
        ask(ls)
        ls.bind(("127.0.0.1", port))
        ls.listen(4)
        c = socket.socket()
        ask(c)
        c.connect(ls.getsockname())
        s, _ = ls.accept()
    try:
        assert info(c).tier == TCP and info(s).tier == TCP
        rows = {r["local"]: r for r in status.connections(inst)}
        assert rows[f"127.0.0.1:{c.getsockname()[1]}"]["reason"] == "policy"
        c.sendall(b"through tcp")
        assert s.recv(20) == b"through tcp"
    finally:
        for x in (c, s, ls):
            x.close()


def test_nothing_on_the_wire(instance):
    """An AF_PACKET capture on lo during a handshake that pairs in the shm
    tier and one toward a listener outside the group: no TCP option 253 or
    254 in any segment."""
    inst = instance()
    cap = packet_socket()
    cap.settimeout(0.2)
    outside = socket.socket()
    outside.bind(("127.0.0.1", 0))
    outside.listen(4)
    c, s = connected(inst)
    with InGroup(inst):
        c2 = socket.socket()
        ask(c2)
        c2.connect(outside.getsockname())
    s2, _ = outside.accept()
    ports = {c.getsockname()[1], s.getsockname()[1], c2.getsockname()[1], outside.getsockname()[1]}
    kinds, segments = set(), 0
    end = time.monotonic() + 1
    while time.monotonic() < end:
        try:
            frame = cap.recv(65535)
        except socket.timeout:
            break
        ip = frame[14:]
        if len(ip) < 40 or ip[0] >> 4 != 4 or ip[9] != 6:
            continue
        tcp = ip[(ip[0] & 15) * 4:]
        sport, dport = struct.unpack("!HH", tcp[:4])
        if not ({sport, dport} & ports):
            continue
        segments += 1
        kinds.update(kind for kind, _ in parse_options(tcp[20:(tcp[12] >> 4) * 4]))
    cap.close()
    assert segments >= 6, segments
    assert not kinds & {253, 254}, kinds
    assert info(c2).tier == TCP
    for x in (c, s, c2, s2, outside):
        x.close()


def test_connects_that_never_complete_hold_nothing(instance):
    """1,000 connects that never complete (a listener whose backlog is
    full): nothing is reserved for them, and a new local connection still
    pairs in the shm tier."""
    inst = instance()
    with InGroup(inst):
        full = socket.socket()
        ask(full)
        full.bind(("127.0.0.1", 0))
        full.listen(0)
        stuck = []
        for _ in range(1000):
            c = socket.socket()
            ask(c)
            c.setblocking(False)
            try:
                c.connect(full.getsockname())
            except BlockingIOError:
                pass
            stuck.append(c)
    try:
        c, s = connected(inst)
        assert info(c).tier == SHM and info(s).tier == SHM
        c.close()
        s.close()
    finally:
        for c in stuck:
            c.close()
        full.close()


def _in_sockhash(inst, cookie):
    with bpf.Map.pinned(inst.pin("sock_hash"), "uint64_t", "uint64_t") as m:
        return m.lookup(cookie) is not None


def test_shm_pair_never_enters_the_sockhash(instance):
    """An active end that will be paired in the shm tier stays out of the
    kernel tier's sockhash (no psock made at connect and torn down at the
    pairing); toward a port whose listener did not ask it enters it, as
    the kernel tier needs."""
    inst = instance()
    for ask_listener, want, hashed in ((True, SHM, False), (False, KERNEL, True)):
        c, s = connected(inst, ask_listener=ask_listener)
        try:
            ci, si = info(c), info(s)
            assert (ci.tier, si.tier) == (want, want)
            assert _in_sockhash(inst, ci.cookie) == hashed and _in_sockhash(inst, si.cookie) == hashed
            c.sendall(b"bytes")
            assert s.recv(10) == b"bytes"
        finally:
            c.close()
            s.close()


def test_listener_no_longer_allowed_gives_tcp(instance):
    """The policy changed after a listener listened (its owner is no longer
    allowed): the active end expected the shm tier and stayed out of the
    sockhash, so the pair cannot take the kernel tier either: plain TCP,
    both rows saying `policy`, and the bytes flow."""
    nobody = 65534
    inst = instance(policy.Policy(users=[nobody]))
    with InGroup(inst):
        ls = socket.socket()
        pid = os.fork()
        if pid == 0:            # the listener's request, made by nobody
            try:
                os.setuid(nobody)
                ask(ls)
                os._exit(0)
            except BaseException:
                os._exit(1)
        assert os.waitpid(pid, 0)[1] == 0
        ls.bind(("127.0.0.1", 0))
        ls.listen(4)
    try:
        policy.apply(inst, policy.Policy())         # nobody no longer allowed
        with InGroup(inst):
            c = socket.socket()
            ask(c)
            c.connect(ls.getsockname())
        s, _ = ls.accept()
        ci, si = info(c), info(s)
        assert (ci.tier, ci.reason) == (TCP, lib.SBP_REASON_POLICY_EXCLUDED)
        assert (si.tier, si.reason) == (TCP, lib.SBP_REASON_POLICY_EXCLUDED)
        assert not _in_sockhash(inst, ci.cookie) and not _in_sockhash(inst, si.cookie)
        c.sendall(b"bytes")
        assert s.recv(10) == b"bytes"
        s.sendall(b"back")
        assert c.recv(10) == b"back"
        c.close()
        s.close()
    finally:
        ls.close()
