"""The VM-pair negotiation on the TCP handshake (bpf/bypass.bpf.c, docs/NEGOTIATION.md),
without the interposer and without VMs: the loopback addresses are configured
as peer VMs (`up --vm-peer`, the vm_peers map), so sockets that ask
(SBP_SO_ASK, as the interposer does) carry the option and get region slots.
The tier each end lands in is read back from sk_state (written by BPF only),
SBP_SO_INFO (what the interposer is told) and `status`, and the option
itself is checked on the wire with an AF_PACKET capture.

Slot accounting is checked after every scenario: the free list is full again
and no slot holds a reference once every socket has reached TCP_CLOSE."""
import ctypes
import errno
import os
import random
import select
import socket
import struct
import subprocess
import sys
import time
import uuid

import pytest
from pyroute2 import NetNS, netns

from shmbypass import ask, bpf, manager, slots, status
from shmbypass._native import ffi, lib
from conftest import InGroup, assert_gone, free_list, new_instance
from sockets import packet_socket

SHM, TCP = lib.SBP_TIER_SHM, lib.SBP_TIER_TCP
EXID = lib.SBP_OPT_EXID
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The "peer VMs" of these tests: toward them (only) asked sockets negotiate
# slots. 127.0.0.2 is loopback too, and not a peer: one-host pairing.
VM_PEERS = ("127.0.0.1", "::1")
NOT_A_PEER = "127.0.0.2"


# -- fixtures and helpers -----------------------------------------------------

def bring_up(slot_count=256):
    inst = new_instance("neg")
    manager.up(inst, slot_count=slot_count, backend="posix", vm_peers=VM_PEERS)
    return inst


def take_down(inst):
    errors = status.errors(inst) if manager.is_up(inst) else {}
    manager.down(inst, drain_timeout=1, force=True)
    assert_gone(inst)
    return errors


@pytest.fixture
def neg(request):
    """A private instance with this process in its cgroup; errors map checked
    empty at the end. Slot count: indirect parameter (default 256)."""
    if os.geteuid() != 0:
        pytest.fail("the test suite must run as root")
    inst = bring_up(getattr(request, "param", 256))
    try:
        with InGroup(inst):
            yield inst
    finally:
        errors = take_down(inst)
    assert not errors, f"BPF programs reported errors (line: errno): {errors}"


class Marker:
    """Asks for the shm tier the way the interposer does (SBP_SO_ASK before
    connect/listen; the calling process must be in the group), and reads
    back what BPF recorded in sk_state (user space only reads it)."""

    def __init__(self, inst):
        self.map = bpf.Map.pinned(inst.pin("sk_state"), "int", "struct sbp_sk")

    def __call__(self, sock):
        ask.ask(sock)
        return sock

    def state(self, sock):
        v = self.map.lookup(sock.fileno())
        return None if v is None else {f: getattr(v, f) for f in (
            "vm", "asked", "tier", "reason", "tx_slot", "rx_slot", "held", "tx_gen", "rx_gen",
            "region_id")}

    def close(self):
        self.map.close()


@pytest.fixture
def marker(neg):
    m = Marker(neg)
    yield m
    m.close()


def loopback(family):
    return "::1" if family == socket.AF_INET6 else "127.0.0.1"


def listen(family=socket.AF_INET, mark=None, host=None):
    ls = socket.socket(family, socket.SOCK_STREAM)
    ls.bind((host or loopback(family), 0))
    if mark:
        mark(ls)
    ls.listen(128)
    return ls


def connect(ls, mark=None, host=None):
    c = socket.socket(ls.family, socket.SOCK_STREAM)
    if mark:
        mark(c)
    c.connect((host or ls.getsockname()[0], ls.getsockname()[1]))
    s, _ = ls.accept()
    return c, s


def echo(c, s):
    """Data still flows (over TCP: no interposer here)."""
    c.sendall(b"ping")
    assert s.recv(4, socket.MSG_WAITALL) == b"ping"
    s.sendall(b"pong")
    assert c.recv(4, socket.MSG_WAITALL) == b"pong"


def row(inst, sock):
    port = sock.getsockname()[1]
    rows = [r for r in status.connections(inst) if r["local"].endswith(f":{port}")
            and r["remote"].endswith(f":{sock.getpeername()[1]}")]
    assert len(rows) == 1, rows
    return rows[0]["tier"], rows[0]["reason"]


def wait_for(cond, what, timeout=30.0):
    """Poll until cond() is true (a deadline against hangs, not a speed check)."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"still not true after {timeout:.0f} s: {what}")
        time.sleep(0.05)


def pool_full(inst):
    """Every slot unreferenced, and every id on BPF's free list."""
    n = slots.config(inst)["slot_count"]
    return slots.free_slots(inst) == list(range(n)) and sorted(free_list(inst)) == list(range(n))


def assert_pool_full(inst, timeout=30.0):
    wait_for(lambda: pool_full(inst), "every slot back on the free list with no reference", timeout)


def conns_empty(inst):
    return not status.connections(inst)


def assert_one_host_pair(c, s):
    """Both ends turned out to be on this host (no slots, or no VM path at
    all): BPF pairs them in the shm tier, with no slot, and tells the
    interposer to bring its own memory (SBP_MEM_INBOX)."""
    i, j = ask.info(c), ask.info(s)
    assert (i.tier, i.mem, i.role) == (SHM, lib.SBP_MEM_INBOX, lib.SBP_ROLE_ACTIVE)
    assert (j.tier, j.mem, j.role) == (SHM, lib.SBP_MEM_INBOX, lib.SBP_ROLE_PASSIVE)
    assert i.peer_cookie == j.cookie and j.peer_cookie == i.cookie
    assert i.tx_slot == i.rx_slot == i.region_id == j.tx_slot == j.rx_slot == j.region_id == 0


# -- capture ----------------------------------------------------------------------

class Capture:
    """TCP segments seen on one interface (of the current netns) from now on:
    bind an AF_PACKET socket first, read what queued up afterwards."""

    def __init__(self, ifname="lo"):
        self.sock = packet_socket(ifname)
        self.sock.setblocking(False)
        self.lo = ifname == "lo"

    def segments(self, ports):
        """[(sport, dport, flags, seq, ack, options)] touching any of ports."""
        out = []
        while True:
            try:
                frame, addr = self.sock.recvfrom(70000)
            except BlockingIOError:
                break
            if self.lo and addr[2] == socket.PACKET_OUTGOING:
                continue  # each loopback frame shows up twice
            seg = parse_tcp(frame)
            if seg and (seg[0] in ports or seg[1] in ports):
                out.append(seg)
        return out

    def close(self):
        self.sock.close()


def parse_tcp(frame):
    eth_type = struct.unpack("!H", frame[12:14])[0]
    if eth_type == 0x0800:
        if frame[23] != 6:
            return None
        tcp = frame[14 + (frame[14] & 0xF) * 4:]
    elif eth_type == 0x86DD:
        if frame[20] != 6:
            return None
        tcp = frame[54:]
    else:
        return None
    sport, dport, seq, ack = struct.unpack("!HHII", tcp[:12])
    doff = (tcp[12] >> 4) * 4
    return sport, dport, tcp[13], seq, ack, parse_options(tcp[20:doff])


def parse_options(raw):
    opts, i = [], 0
    while i < len(raw):
        kind = raw[i]
        if kind == 0:
            break
        if kind == 1:
            i += 1
            continue
        if i + 1 >= len(raw) or raw[i + 1] < 2:
            break
        opts.append((kind, bytes(raw[i + 2:i + raw[i + 1]])))
        i += raw[i + 1]
    return opts


def our_option(opts):
    """Our option decoded, None if absent; any kind 254 with our ExID counts."""
    for kind, body in opts:
        if kind == lib.SBP_OPT_KIND and len(body) >= 2 and struct.unpack("!H", body[:2])[0] == EXID:
            assert len(body) == lib.SBP_OPT_LEN - 2, body
            ver_caps, st, slot, gen, region = struct.unpack("!BBHIQ", body[2:])
            return {"version": ver_caps >> 4, "caps": ver_caps & 0xF, "status": st,
                    "slot": slot, "gen": gen, "region_id": region}
    return None


SYN, ACK = 0x02, 0x10


def handshake(segs, client_port):
    """(SYN options, SYN-ACK options) of the connection from client_port."""
    syn = [o for sp, dp, f, *_, o in segs if sp == client_port and f & (SYN | ACK) == SYN]
    synack = [o for sp, dp, f, *_, o in segs if dp == client_port and f & (SYN | ACK) == SYN | ACK]
    assert syn and synack, segs
    return syn[0], synack[0]


def test_reason_names_come_from_one_table():
    """bpf/bypass.h's SBP_REASONS names every reason once (sbp_reason_name in
    C and through cffi); status shows those names, none for a bypassed row."""
    names = [ffi.string(lib.sbp_reason_name(r)).decode() for r in range(lib.SBP_REASON__MAX)]
    assert all(names) and lib.sbp_reason_name(lib.SBP_REASON__MAX) == ffi.NULL
    assert status.REASONS == {r: "" if r == lib.SBP_REASON_NONE else n for r, n in enumerate(names)}
    assert names[lib.SBP_REASON_AWAITING_PEER] == names[lib.SBP_REASON_PEER_NOT_CAPABLE] \
        == "peer-not-capable"
    assert names[lib.SBP_REASON_DRAINING] == "shutting-down"


# -- both ends marked ------------------------------------------------------------

@pytest.mark.parametrize("family,host,connect_host", [
    (socket.AF_INET, None, None),
    (socket.AF_INET6, None, None),
    (socket.AF_INET6, "::", "::ffff:127.0.0.1"),  # v4-mapped on a dual-stack listener
])
def test_both_marked_shm_with_crossed_slots(neg, marker, family, host, connect_host):
    cap = Capture()
    try:
        ls = listen(family, marker, host)
        assert slots.listeners(neg), "a marked listener is recorded"
        c, s = connect(ls, marker, connect_host)
        # A control connection of unmarked sockets, captured at the same time.
        ls2 = listen(family)
        c2, s2 = connect(ls2)
        before = status.counters(neg)["msg_redirect"]
        echo(c, s)
        # Not in the kernel tier's redirect path: its data goes on TCP here
        # (the ring, once the interposer is there).
        assert status.counters(neg)["msg_redirect"] == before
        echo(c2, s2)
        time.sleep(0.1)
        segs = cap.segments({ls.getsockname()[1], ls2.getsockname()[1]})
    finally:
        cap.close()

    a, b = marker.state(c), marker.state(s)
    region = slots.config(neg)["region_id"]
    assert a["vm"] == b["vm"] == 1, (a, b)
    assert a["tier"] == b["tier"] == SHM, (a, b)
    assert a["reason"] == b["reason"] == 0
    assert a["tx_slot"] == b["rx_slot"] and a["rx_slot"] == b["tx_slot"], (a, b)
    assert a["tx_slot"] != a["rx_slot"]
    assert a["tx_gen"] == b["rx_gen"] and a["rx_gen"] == b["tx_gen"], (a, b)
    assert a["tx_gen"] >= 1 and a["rx_gen"] >= 1
    assert a["region_id"] == b["region_id"] == region
    assert a["held"] == b["held"] == lib.SBP_HELD_TX | lib.SBP_HELD_RX
    # Two references on each of the two slots, nothing else taken.
    st = slots.slot_states(neg)
    assert st[a["tx_slot"]] == (a["tx_gen"], 2) and st[a["rx_slot"]] == (a["rx_gen"], 2)
    assert row(neg, c) == ("shm", "") and row(neg, s) == ("shm", "")
    assert row(neg, c2) == ("kernel", "")
    # What the interposer is told (SBP_SO_INFO): the slots of the handshake.
    for sock, st, role in ((c, a, lib.SBP_ROLE_ACTIVE), (s, b, lib.SBP_ROLE_PASSIVE)):
        i = ask.info(sock)
        assert (i.tier, i.reason, i.role, i.mem) == (SHM, 0, role, lib.SBP_MEM_SLOTS)
        assert (i.tx_slot, i.tx_gen, i.rx_slot, i.rx_gen, i.region_id) == (
            st["tx_slot"], st["tx_gen"], st["rx_slot"], st["rx_gen"], region)
        assert i.peer_cookie == 0  # across VMs neither kernel knows the other end

    syn, synack = handshake(segs, c.getsockname()[1])
    o_syn, o_synack = our_option(syn), our_option(synack)
    assert o_syn == {"version": 1, "caps": lib.SBP_CAP_SHM_HOST, "status": 0,
                     "slot": a["tx_slot"], "gen": a["tx_gen"], "region_id": region}
    assert o_synack == {"version": 1, "caps": lib.SBP_CAP_SHM_HOST, "status": 0,
                        "slot": b["tx_slot"], "gen": b["tx_gen"], "region_id": region}
    # Only the handshake carries it (header callbacks are off once established).
    later = [seg for seg in segs if c.getsockname()[1] in seg[:2] and not seg[2] & SYN]
    assert later and not any(our_option(seg[5]) for seg in later)
    # Unmarked sockets: no option on any of their segments.
    ctl = [seg for seg in segs if c2.getsockname()[1] in seg[:2]]
    assert ctl and not any(our_option(seg[5]) for seg in ctl)

    for x in (c, s, c2, s2, ls, ls2):
        x.close()
    assert_pool_full(neg)
    wait_for(lambda: conns_empty(neg), "conns map empty")
    assert not slots.listeners(neg), "closing the listener forgets it"
    assert not slots.reservations(neg)


def test_no_option_toward_an_address_not_a_peer_vm(neg, marker):
    """Both ends ask, but the remote address is no peer VM: nothing on the
    wire, no slot taken, and BPF pairs them from its own state (one host)."""
    cap = Capture()
    try:
        ls = listen(mark=marker, host=NOT_A_PEER)
        c = marker(socket.socket())
        c.bind((NOT_A_PEER, 0))  # both ends see NOT_A_PEER as the remote address
        c.connect(ls.getsockname())
        s, _ = ls.accept()
        echo(c, s)
        segs = cap.segments({ls.getsockname()[1]})
    finally:
        cap.close()
    assert segs and not any(our_option(seg[5]) for seg in segs), segs
    a, b = marker.state(c), marker.state(s)
    assert a["vm"] == b["vm"] == 0 and a["held"] == b["held"] == 0, (a, b)
    assert row(neg, c) == ("shm", "") and row(neg, s) == ("shm", "")
    assert_one_host_pair(c, s)
    assert len(slots.free_slots(neg)) == slots.config(neg)["slot_count"]
    assert not slots.reservations(neg)
    for x in (c, s, ls):
        x.close()
    assert_pool_full(neg)


# -- one end unmarked ------------------------------------------------------------

def test_listener_unmarked_no_answer_kernel_tier(neg, marker):
    cap = Capture()
    try:
        ls = listen(mark=None)
        c, s = connect(ls, marker)
        echo(c, s)
        segs = cap.segments({ls.getsockname()[1]})
    finally:
        cap.close()
    syn, synack = handshake(segs, c.getsockname()[1])
    assert our_option(syn)["status"] == 0, "the marked client offers"
    assert our_option(synack) is None, "an unmarked listener never answers"
    a = marker.state(c)
    assert a["tier"] == TCP and a["reason"] == lib.SBP_REASON_PEER_NOT_CAPABLE and a["held"] == 0
    assert row(neg, c) == ("kernel", "peer-not-capable")
    assert row(neg, s)[0] == "kernel"
    assert status.counters(neg)["msg_redirect"] > 0, "the kernel tier carries it"
    for x in (c, s, ls):
        x.close()
    assert_pool_full(neg)
    assert not slots.reservations(neg)


def test_client_unmarked_sees_no_option(neg, marker):
    cap = Capture()
    try:
        ls = listen(mark=marker)
        c, s = connect(ls, mark=None)
        echo(c, s)
        segs = cap.segments({ls.getsockname()[1]})
    finally:
        cap.close()
    syn, synack = handshake(segs, c.getsockname()[1])
    assert our_option(syn) is None and our_option(synack) is None
    b = marker.state(s)  # the accepted socket inherited the listener's request
    assert b["asked"] == lib.SBP_ASK_SHM and b["vm"] == 1
    assert b["tier"] == TCP and b["reason"] == lib.SBP_REASON_PEER_NOT_CAPABLE
    assert b["held"] == 0
    assert row(neg, s) == ("kernel", "peer-not-capable")
    assert row(neg, c) == ("kernel", "")
    for x in (c, s, ls):
        x.close()
    assert_pool_full(neg)
    assert not slots.reservations(neg)


def test_retransmitted_syn_carries_the_same_slot(neg, marker):
    """A full accept queue drops the SYN; its retransmissions offer the same
    slot and generation, and the connection lands in shm once accepted."""
    cap = Capture()
    try:
        ls = socket.socket()
        ls.bind(("127.0.0.1", 0))
        marker(ls)
        ls.listen(0)  # room for one connection in the accept queue
        port = ls.getsockname()[1]
        first = marker(socket.socket())
        first.connect(("127.0.0.1", port))
        c = marker(socket.socket())
        c.setblocking(False)
        assert c.connect_ex(("127.0.0.1", port)) == errno.EINPROGRESS

        def syns():
            return [our_option(o) for sp, dp, f, *_, o in seen
                    if sp == c.getsockname()[1] and f & (SYN | ACK) == SYN]
        seen = []

        def retransmitted():
            seen.extend(cap.segments({port}))
            return len(syns()) >= 2
        wait_for(retransmitted, "the SYN retransmitted (accept queue full)")
        s_first, _ = ls.accept()
        _, w, _ = select.select([], [c], [], 60)
        assert w and c.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
        s, _ = ls.accept()
        seen.extend(cap.segments({port}))
    finally:
        cap.close()
    a = marker.state(c)
    assert a["tier"] == marker.state(s)["tier"] == SHM
    offers = syns()
    assert len(offers) >= 2 and all(o == offers[0] for o in offers), offers
    assert (offers[0]["slot"], offers[0]["gen"]) == (a["tx_slot"], a["tx_gen"])
    c.setblocking(True)
    echo(c, s)
    for x in (c, s, first, s_first, ls):
        x.close()
    assert_pool_full(neg)


def test_refused_connect_gives_its_slot_back(neg, marker):
    """The SYN took a slot; the RST (nobody listening) brings it back."""
    ls = listen()
    port = ls.getsockname()[1]
    ls.close()
    for _ in range(3):
        c = marker(socket.socket())
        with pytest.raises(ConnectionRefusedError):
            c.connect(("127.0.0.1", port))
        c.close()
    assert_pool_full(neg)


# -- pool exhaustion -------------------------------------------------------------

@pytest.mark.parametrize("neg", [4], indirect=True)
def test_pool_exhausted_falls_back(neg, marker):
    """4 slots = 2 connections; the third gets pool-exhausted on both ends
    and holds no slot. Across VMs it would stay on TCP; here both ends are
    on one host and asked, so it is paired without slots (the one-host shm
    tier: each interposer brings its memory)."""
    ls = listen(mark=marker)
    pairs = [connect(ls, marker) for _ in range(3)]
    for c, s in pairs[:2]:
        assert marker.state(c)["tier"] == marker.state(s)["tier"] == SHM
        assert ask.info(c).mem == ask.info(s).mem == lib.SBP_MEM_SLOTS
    c, s = pairs[2]
    a, b = marker.state(c), marker.state(s)
    assert a["vm"] == b["vm"] == 1
    assert a["tier"] == b["tier"] == TCP
    assert a["reason"] == b["reason"] == lib.SBP_REASON_POOL_EXHAUSTED, (a, b)
    assert a["held"] == b["held"] == 0
    assert row(neg, c) == ("shm", "") and row(neg, s) == ("shm", "")
    assert_one_host_pair(c, s)
    for cc, ss in pairs:
        echo(cc, ss)
    assert slots.free_slots(neg) == []
    # One closes: its two slots come back and the next connection gets them.
    for x in pairs[0]:
        x.close()
    wait_for(lambda: len(slots.free_slots(neg)) == 2, "two slots back")
    c4, s4 = connect(ls, marker)
    assert marker.state(c4)["tier"] == SHM
    for x in [c4, s4, ls] + [x for p in pairs[1:] for x in p]:
        x.close()
    assert_pool_full(neg)


@pytest.mark.parametrize("neg", [3], indirect=True)
def test_pool_exhausted_on_the_passive_side(neg, marker):
    """The client takes the last slot, the listener has none: the SYN-ACK
    declines, the client gives its slot back, both record pool-exhausted."""
    cap = Capture()
    try:
        ls = listen(mark=marker)
        first = connect(ls, marker)
        c, s = connect(ls, marker)
        segs = cap.segments({ls.getsockname()[1]})
    finally:
        cap.close()
    _, synack = handshake(segs, c.getsockname()[1])
    assert our_option(synack)["status"] == lib.SBP_REASON_POOL_EXHAUSTED
    a, b = marker.state(c), marker.state(s)
    assert a["reason"] == b["reason"] == lib.SBP_REASON_POOL_EXHAUSTED
    assert a["held"] == b["held"] == 0
    assert len(slots.free_slots(neg)) == 1
    assert_one_host_pair(c, s)
    echo(c, s)
    for x in (c, s, ls) + first:
        x.close()
    assert_pool_full(neg)
    assert not slots.reservations(neg)


# -- different regions -----------------------------------------------------------

def test_different_region_declined_both_ends_agree():
    """Two instances = two regions: the client's group and the listener's group
    differ, the SYN-ACK declines with different-region, nobody holds a slot."""
    a_inst, b_inst = bring_up(), bring_up()
    ma = mb = None
    try:
        ma, mb = Marker(a_inst), Marker(b_inst)
        with InGroup(b_inst):
            ls = listen(mark=mb)
        with InGroup(a_inst):
            cap = Capture()
            try:
                c, s = connect(ls, ma)
                segs = cap.segments({ls.getsockname()[1]})
            finally:
                cap.close()
        echo(c, s)
        _, synack = handshake(segs, c.getsockname()[1])
        assert our_option(synack) == {"version": 1, "caps": lib.SBP_CAP_SHM_HOST,
                                      "status": lib.SBP_REASON_DIFFERENT_REGION,
                                      "slot": 0, "gen": 0, "region_id": 0}
        assert ma.state(c)["reason"] == lib.SBP_REASON_DIFFERENT_REGION
        assert mb.state(s)["reason"] == lib.SBP_REASON_DIFFERENT_REGION
        assert ma.state(c)["tier"] == mb.state(s)["tier"] == TCP
        # Different groups: no kernel tier either.
        assert row(a_inst, c)[0] == "tcp" and row(b_inst, s)[0] == "tcp"
        for x in (c, s, ls):
            x.close()
        assert_pool_full(a_inst)
        assert_pool_full(b_inst)
    finally:
        for m in (ma, mb):
            if m:
                m.close()
        errors = [take_down(i) for i in (a_inst, b_inst)]
    assert not any(errors), errors


# -- crashes and churn -----------------------------------------------------------

CHILD = r"""
import socket, sys, time
from shmbypass import ask  # in the group: started by a process in it
port = int(sys.argv[1])
keep = []
for _ in range(3):
    c = socket.socket(); ask.ask(c); c.connect(("127.0.0.1", port)); keep.append(c)
ls = socket.socket(); ls.bind(("127.0.0.1", 0)); ask.ask(ls); ls.listen()
for _ in range(2):
    c = socket.socket(); ask.ask(c); c.connect(ls.getsockname())
    s, _ = ls.accept(); keep += [c, s]
    c.sendall(b"unread")  # makes the kill send an RST on one end
print("ready", flush=True)
time.sleep(600)
"""


def test_kill9_child_leaks_no_slot(neg, marker):
    ls = listen(mark=marker)
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(ls.getsockname()[1])],
                             stdout=subprocess.PIPE, text=True, cwd=ROOT,
                             env=dict(os.environ, PYTHONPATH=ROOT))
    try:
        assert child.stdout.readline().strip() == "ready"
        accepted = [ls.accept()[0] for _ in range(3)]
        for s in accepted:
            assert marker.state(s)["tier"] == SHM
        n = slots.config(neg)["slot_count"]
        assert len(slots.free_slots(neg)) == n - 2 * 5
        child.kill()
        child.wait()
        accepted[0].sendall(b"x" * 1000)  # one peer writes into the dead socket
        for s in accepted:
            s.close()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        child.stdout.close()
    ls.close()
    assert_pool_full(neg, timeout=60)
    wait_for(lambda: conns_empty(neg), "conns map empty")


def test_1000_connections_return_every_slot(neg, marker):
    ls = listen(mark=marker)
    gens_before = slots.slot_states(neg)
    for i in range(1000):
        c, s = connect(ls, marker)
        if i % 100 == 0:
            assert marker.state(c)["tier"] == SHM
            echo(c, s)
        # alternate who closes first
        for x in ((c, s) if i % 2 else (s, c)):
            x.close()
    ls.close()
    assert_pool_full(neg)
    wait_for(lambda: conns_empty(neg), "conns map empty")
    assert not slots.reservations(neg)
    assert not slots.listeners(neg)
    gens = slots.slot_states(neg)
    # 2000 pops spread over the pool, each one a new generation.
    assert sum(g for g, _ in gens.values()) - sum(g for g, _ in gens_before.values()) == 2000


# -- a SYN-ACK that never completes ----------------------------------------------

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


class InNetns:
    """This thread inside a network namespace for a block (sockets made
    there stay there); the mount namespace, and so /sys/fs/bpf, is unchanged."""

    def __init__(self, name):
        self.name = name

    def __enter__(self):
        self.home = os.open("/proc/self/ns/net", os.O_RDONLY)
        fd = os.open(f"/var/run/netns/{self.name}", os.O_RDONLY)
        try:
            if _libc.setns(fd, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns")
        finally:
            os.close(fd)
        return self

    def __exit__(self, *exc):
        if _libc.setns(self.home, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns back")
        os.close(self.home)


@pytest.fixture
def dead_end_ns():
    """A namespace whose sbtv0 (10.214.0.1/24) leads nowhere: 10.214.0.5 has a
    static neighbour entry, so packets to it leave through sbtv0 and are
    dropped by its veth peer (not addressed to it): no ARP, no RST."""
    name = f"sbt-neg-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    netns.create(name)
    try:
        with NetNS(name) as ns:
            ns.link("set", index=ns.link_lookup(ifname="lo")[0], state="up")
            ns.link("add", ifname="sbtv0", kind="veth", peer="sbtv1")
            idx = ns.link_lookup(ifname="sbtv0")[0]
            ns.addr("add", index=idx, address="10.214.0.1", prefixlen=24)
            ns.link("set", index=idx, state="up")
            ns.link("set", index=ns.link_lookup(ifname="sbtv1")[0], state="up")
            ns.neigh("add", dst="10.214.0.5", lladdr="02:00:00:00:00:05", ifindex=idx,
                     state=0x80)  # NUD_PERMANENT
        with InNetns(name):
            # One SYN-ACK retransmission, then the request sock gives up.
            with open("/proc/sys/net/ipv4/tcp_synack_retries", "w") as f:
                f.write("1")
        yield name
    finally:
        netns.remove(name)


def checksum(data):
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def raw_syn(src, dst, sport, dport, isn, option):
    tcp = struct.pack("!HHIIBBHHH", sport, dport, isn, 0, (20 + len(option)) // 4 << 4,
                      SYN, 65535, 0, 0) + option
    pseudo = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!BBH", 0, 6, len(tcp))
    tcp = tcp[:16] + struct.pack("!H", checksum(pseudo + tcp)) + tcp[18:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 0, 0, 64, 6, 0,
                     socket.inet_aton(src), socket.inet_aton(dst))
    return ip + tcp


def our_syn_option(region_id, slot, gen=7):
    return struct.pack("!BBHBBHIQ", lib.SBP_OPT_KIND, lib.SBP_OPT_LEN, EXID,
                       lib.SBP_OPT_VERSION << 4 | lib.SBP_CAP_SHM_HOST, 0, slot, gen, region_id)


def test_declined_syns_cannot_fill_the_reservations(neg, marker, dead_end_ns):
    """Issue 10.8: SYNs carrying our option that are declined (here another
    region; in SYN-cookie mode every one is) keep their reason in an LRU map
    of their own. 9,000 of them, more than the 8,192 reservations there are,
    leave the reservation table empty, and the next good SYN still gets a
    slot."""
    slots.set_vm_peers(neg, ["10.214.0.5"])
    n = slots.config(neg)["slot_count"]
    region = slots.config(neg)["region_id"]
    with InNetns(dead_end_ns):
        flooded = listen(mark=marker, host="10.214.0.1")
        good = listen(mark=marker, host="10.214.0.1")
        raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    declined = bpf.Map.pinned(neg.pin("declined"), "struct sbp_resv_key", "uint32_t")
    try:
        port = flooded.getsockname()[1]
        for i in range(9000):
            raw.sendto(raw_syn("10.214.0.5", "10.214.0.1", 20000 + i, port,
                               random.getrandbits(32), our_syn_option(region ^ 1, i % n)),
                       ("10.214.0.1", 0))
        wait_for(lambda: len(list(declined.items())) >= 1000, "the declines recorded")
        assert 0 < len(list(declined.items())) <= 4096
        assert not slots.reservations(neg)
        raw.sendto(raw_syn("10.214.0.5", "10.214.0.1", 40000, good.getsockname()[1],
                           random.getrandbits(32), our_syn_option(region, 4242 % n)),
                   ("10.214.0.1", 0))
        wait_for(lambda: len(slots.reservations(neg)) == 1, "a reservation for the good SYN")
        (r,) = slots.reservations(neg)
        assert r["state"] == lib.SBP_RESV_RESERVED and r["peer_slot"] == 4242 % n
    finally:
        declined.close()
        raw.close()
        flooded.close()
        good.close()


def test_abandoned_synack_returns_its_slot(neg, marker, dead_end_ns):
    """A SYN carrying our option whose sender never ACKs (a crashed client, a
    SYN flood): the SYN-ACK reserves a slot, every (re)transmitted SYN-ACK
    carries the same one, and the reservation's timer returns it."""
    # Longer than the 1 s between the SYN-ACK and its retransmission, so one
    # reservation lives through both (as the 180 s default outlives any
    # request sock).
    slots.set_config(neg, resv_ttl_ns=int(2.5e9))
    slots.set_vm_peers(neg, ["10.214.0.5"])  # the raw SYN's sender is a "peer VM"
    n = slots.config(neg)["slot_count"]
    region = slots.config(neg)["region_id"]
    opt = struct.pack("!BBHBBHIQ", lib.SBP_OPT_KIND, lib.SBP_OPT_LEN, EXID,
                      lib.SBP_OPT_VERSION << 4 | lib.SBP_CAP_SHM_HOST, 0, 4242 % n, 7, region)
    with InNetns(dead_end_ns):
        ls = listen(mark=marker, host="10.214.0.1")
        port = ls.getsockname()[1]
        cap = Capture("sbtv0")
        raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    try:
        isn, sport = random.getrandbits(32), 40000 + random.randrange(1000)
        pkt = raw_syn("10.214.0.5", "10.214.0.1", sport, port, isn, opt)
        raw.sendto(pkt, ("10.214.0.1", 0))
        wait_for(lambda: len(slots.reservations(neg)) == 1, "a reservation for the SYN-ACK")
        (r,) = slots.reservations(neg)
        assert r["state"] == lib.SBP_RESV_RESERVED and r["peer_slot"] == 4242 % n and r["peer_gen"] == 7
        assert len(slots.free_slots(neg)) == n - 1
        raw.sendto(pkt, ("10.214.0.1", 0))  # the same SYN again: same answer
        # The slot comes back once the timer runs out after the last SYN-ACK.
        assert_pool_full(neg, timeout=60)
        assert not slots.reservations(neg)
        synacks = [our_option(o) for sp, dp, f, *_, o in cap.segments({port})
                   if sp == port and f & (SYN | ACK) == SYN | ACK]
    finally:
        cap.close()
        raw.close()
        ls.close()
    # the first, the answer to the repeated SYN, and the timer's retransmission
    assert len(synacks) >= 2, synacks
    assert all(o == {"version": 1, "caps": lib.SBP_CAP_SHM_HOST, "status": 0, "slot": r["slot"],
                     "gen": r["gen"], "region_id": region} for o in synacks), synacks
    assert status.counters(neg)["resv_expired"] >= 1
