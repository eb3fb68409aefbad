"""The bypass between two VMs that share an IVSHMEM region (marked vm).

The host formats the region (one part per guest), each guest's
`shmbypass up --backend ivshmem` joins it and hands out slots of its own
part only; a region that is garbage, or absent, leaves the shm tier off with
a one-line message and connections on TCP. The host's `vm status` shows the
parts and the channels, live or dead.

One pair serves the module (booted with garbage in its region, which the
host formats after the refusal test); the "region absent from one guest"
case needs a pair of its own and runs before it. Tests that need the shm
tier end to end skip, with the reason, until the BPF programs know region
parts (bpf/bypass.h `sbp_region_cfg.first_slot`) and the interposer maps
`ivshmem:` regions (in doorbell mode, with keepalives on the control
connection: a dead peer VM sends nothing).
SHMBYPASS_BPF_DIR and SHMBYPASS_PRELOAD, when set here, are passed on to the guests.
"""
import errno
import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from shmbypass import paths, region, shmtier
from shmbypass._native import lib
from shmbypass.errors import GuestDied
from shmbypass.vm import status as vmstatus
from shmbypass.vm.pair import VMPair
from guest_echo import ECHO_SERVER, SINK_SERVER

pytestmark = pytest.mark.vm

PY = os.path.join(paths.ROOT, ".venv", "bin", "python")
INST = "sbt-vm"
ENV = {"SHMBYPASS_INSTANCE": INST}
for _var in ("SHMBYPASS_BPF_DIR", "SHMBYPASS_PRELOAD"):  # other builds, passed on to the guests
    if os.environ.get(_var):
        ENV[_var] = os.environ[_var]
GARBAGE = b"\x5a garbage, not a region \xa5" * 2048
B_IP = "10.77.0.2"
RUN_SHM = f"{PY} -m shmbypass run --tier shm -- "
RUN_KERNEL = f"{PY} -m shmbypass run --tier kernel -- "


def _bpf_has_parts():
    """Do the BPF programs know region parts? (sbp_region_cfg in the object's
    BTF has a first_slot member)."""
    bpftool = shutil.which("bpftool") or "/usr/sbin/bpftool"
    try:
        out = subprocess.run([bpftool, "btf", "dump", "file", paths.bpf_object("bypass")],
                             capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        return False
    members = out.split("STRUCT 'sbp_region_cfg'", 1)[-1].split("\n[", 1)[0]
    return "'first_slot'" in members


def _interposer_has_ivshmem():
    try:
        with open(shmtier.library_path(), "rb") as f:
            return b"ivshmem:" in f.read()
    except OSError:
        return False


BPF_PARTS = _bpf_has_parts()
SHM_READY = BPF_PARTS and _interposer_has_ivshmem()
needs_parts = pytest.mark.skipif(
    not BPF_PARTS, reason="bpf/bypass.bpf.c has no region parts (sbp_region_cfg.first_slot): across "
    "two kernels the peer's slot is not in this kernel's slot_state, so the handshake falls back")
needs_shm = pytest.mark.skipif(
    not SHM_READY, reason="the shm tier across VMs needs region parts in BPF and an interposer "
    "that maps SHMBYPASS_REGION=ivshmem:<BAR2> in doorbell mode")


def _wrap():
    """How the test programs run: under the interposer when it is built
    (an unusable region must leave it out of the way), else in the group."""
    return RUN_SHM if os.path.exists(shmtier.library_path()) else RUN_KERNEL


def _both(pair, cmd, timeout=180, env=ENV):
    """Run cmd in A and B at once (a guest's Python start-up costs seconds)."""
    jobs = {g: pair.start(g, cmd, timeout=timeout, env=env) for g in "AB"}
    return {g: j.wait(timeout + 60) for g, j in jobs.items()}


def _state(pair, g):
    r = pair.run(g, f"cat /run/{INST}/state.json", timeout=30, check=True)
    return json.loads(r.out)


# The rows `shmbypass status --json` prints, plus the shm reason BPF recorded
# for each connection (status shows the kernel tier's reason on TCP rows).
CONN_ROWS = r"""
import json, sys
from shmbypass import bpf, paths, status
inst = paths.Instance.current()
rows = status.connections(inst)
shm = {}
with bpf.Map.pinned(inst.pin("conns"), "uint64_t", "struct sbp_conn") as m:
    for cookie, c in m.items():
        shm[cookie] = status.REASONS.get(c.shm_reason, c.shm_reason)
for r in rows:
    r["shm_reason"] = shm.get(r["cookie"])
print(json.dumps(rows))
"""


def _rows(pair, port):
    """{guest: connections of its bypass group on port}: the rows `shmbypass
    status --json` prints under "connections" (status.connections(), one
    guest Python start instead of two), with `shm_reason` added."""
    jobs = {g: pair.start(g, f"{PY} -", stdin=CONN_ROWS, env=ENV, timeout=120) for g in "AB"}
    out = {}
    for g, job in jobs.items():
        rows = json.loads(job.wait(180).check().out)
        out[g] = [x for x in rows if x["local"].endswith(f":{port}") or x["remote"].endswith(f":{port}")]
    return out


# A plain blocking echo client (the server: tests/guest_echo.py), the
# unmodified programs. The client leaves /tmp/done-PORT once the data is back and closes only when
# /tmp/go-PORT appears, so the test can look at the live connection.
ECHO_CLIENT = """
import hashlib, os, socket, sys, time
port, size = int(sys.argv[1]), int(sys.argv[2])
data = os.urandom(size)
for i in range(300):  # the server may still be starting
    try:
        s = socket.create_connection(("10.77.0.2", port), timeout=120)
        break
    except ConnectionRefusedError:
        time.sleep(0.2)
h, n = hashlib.sha256(), 0
for off in range(0, size, 65536):  # one thread: send a piece, read its echo
    s.sendall(data[off:off + 65536])
    while n < min(off + 65536, size):
        b = s.recv(65536)
        if not b:
            break
        h.update(b); n += len(b)
open("/tmp/done-%d" % port, "w").close()
for i in range(1200):
    if os.path.exists("/tmp/go-%d" % port):
        break
    time.sleep(0.1)
s.shutdown(socket.SHUT_WR)
assert s.recv(1) == b""
s.close()
print(len(data), hashlib.sha256(data).hexdigest(), n, h.hexdigest())
"""


def _echo(pair, port, wrap, size=256 << 10):
    """Echo `size` random bytes from A through B and back with wrap (a
    command prefix) on both programs; returns the status rows of both guests
    taken while the connection is open. sha256 checked both ways."""
    server = pair.start("B", f"{wrap}{PY} - {port}", stdin=ECHO_SERVER, env=ENV, timeout=200)
    client = pair.start("A", f"{wrap}{PY} - {port} {size}", stdin=ECHO_CLIENT, env=ENV, timeout=200)
    for _ in range(600):  # a poll, not a timed assertion: the jobs' timeouts stop a hang
        if pair.run("A", f"test -e /tmp/done-{port}", timeout=30).rc == 0:
            break
        if client.done():
            pytest.fail(f"client ended early: {client.wait(0)}; server: {server.wait(60)}")
        time.sleep(0.2)
    rows = _rows(pair, port)
    pair.run("A", f"touch /tmp/go-{port}", timeout=30, check=True)
    cli = client.wait(260).check()
    srv = server.wait(260).check()
    sent_n, sent_h, back_n, back_h = cli.out.split()
    got_n, got_h = srv.out.split()[-2:]
    assert int(sent_n) == int(got_n) == int(back_n) == size
    assert sent_h == got_h == back_h
    return rows


# -- host only ------------------------------------------------------------------

def test_host_formats_one_part_per_guest(tmp_path):
    f = tmp_path / "region"
    f.write_bytes(bytes(16 << 20))
    rep = vmstatus.format_region_file(str(f), region_id=0x5EED)
    assert rep["state"] == "ok" and rep["header"]["backend"] == "ivshmem"
    assert rep["region_id"] == 0x5EED
    (pa, pb) = rep["parts"]
    assert (pa["guest"], pa["first_slot"]) == ("A", 0)
    assert (pb["guest"], pb["first_slot"]) == ("B", pa["slot_count"])
    assert pa["slot_count"] == pb["slot_count"] > 0
    # what each guest's `up --backend ivshmem` records
    a = region.ivshmem_state(path=str(f), part=0)
    os.environ["SHMBYPASS_GUEST"] = "B"
    try:
        b = region.ivshmem_state(path=str(f))
    finally:
        del os.environ["SHMBYPASS_GUEST"]
    assert (a["part"], a["first_slot"], a["region_id"], a["guest"]) == (0, 0, 0x5EED, "A")
    assert (b["part"], b["first_slot"], b["slot_count"], b["guest"]) == (1, pb["first_slot"], pb["slot_count"], "B")
    assert a["note"] == b["note"] == ""


@pytest.mark.parametrize("damage, words", [
    ("zeros", "not formatted (all zeros)"),
    ("garbage", "holds garbage"),
    ("version", "header version 99"),
    ("no-guest", "no part for guest C"),
])
def test_refused_regions_say_why_in_one_line(tmp_path, monkeypatch, damage, words):
    f = tmp_path / "region"
    f.write_bytes(bytes(8 << 20))
    if damage != "zeros":
        vmstatus.format_region_file(str(f))
    raw = bytearray(f.read_bytes())
    if damage == "garbage":
        raw[:len(GARBAGE)] = GARBAGE
    elif damage == "version":
        raw[8:12] = (99).to_bytes(4, "little")
    f.write_bytes(bytes(raw))
    monkeypatch.setenv("SHMBYPASS_GUEST", "C")
    st = region.ivshmem_state(path=str(f))
    assert (st["region_id"], st["slot_count"], st["path"]) == (0, 0, None)
    assert words in st["note"] and "\n" not in st["note"]
    assert st["note"].endswith("the shm tier is off here (connections use TCP or the kernel tier)")


def test_host_view_marks_channels_of_a_gone_guest_dead(tmp_path):
    """Rings laid out by the real C code in a host-formatted region; who maps
    the file decides live or dead."""
    f = tmp_path / "region"
    f.write_bytes(bytes(8 << 20))
    rep = vmstatus.format_region_file(str(f))
    first_b = rep["parts"][1]["first_slot"]
    reg = region.open_ivshmem(str(f))
    try:
        reg.ring(1, generation=3, create=True).write(b"a" * 100)      # A -> B
        w = reg.ring(first_b, generation=5, create=True)              # B -> A
        w.write(b"b" * 300)
        reg.ring(first_b, generation=5).read(100)
    finally:
        reg.close()
    rep = vmstatus.region_status(str(f))  # nobody maps it: liveness unknown
    chans = {c["slot"]: c for c in rep["channels"]}
    assert (chans[1]["writer"], chans[1]["reader"], chans[1]["state"]) == ("A", "B", "live")
    assert (chans[first_b]["writer"], chans[first_b]["head"], chans[first_b]["tail"]) == ("B", 300, 100)
    vmstatus.apply_liveness(rep, {"A": 1})  # only A's QEMU still maps it
    assert {c["state"] for c in rep["channels"]} == {"dead"}
    assert [p["alive"] for p in rep["parts"]] == [True, False]
    text = vmstatus.render_status(rep)
    assert "0 live channel(s), 2 dead" in text and "guest B, GONE" in text and "B>A" in text


def test_doorbell_spin_follows_the_doorbells_cost():
    """Doorbell mode's spin (native/ring.h, sbp_ring_set_bell_cost): about
    twice a doorbell's cost, at most the spin cap; lowered by a quick
    wake-up; short once waits run much longer than a doorbell (idle peer).
    Two views of one ring in a bytearray: logic, not timing."""
    from shmbypass.ring import Ring
    buf = bytearray(4096 + 65536)
    w, r = Ring.create(buf, 7), Ring.attach(buf, 7)
    cap = lib.SBP_RING_SPIN_DOORBELL_MAX_NS
    rr = r._r
    lib.sbp_ring_set_spin(rr, cap)
    assert lib.sbp_ring_spin_budget(rr) == cap            # not doorbell mode: the plain budget
    lib.sbp_ring_doorbell_mode(rr, 1)
    assert lib.sbp_ring_spin_budget(rr) == 2 * lib.SBP_RING_SPIN_DEFAULT_NS  # cost not known yet
    lib.sbp_ring_set_bell_cost(rr, 200000)
    assert lib.sbp_ring_spin_budget(rr) == 400000
    lib.sbp_ring_set_bell_cost(rr, 10 * cap)
    assert rr.bell_ns == cap and lib.sbp_ring_spin_budget(rr) == cap
    # a doorbell that came quickly (under the estimate) pulls the estimate down
    assert lib.sbp_ring_wait_readable(rr, -1) == -errno.EAGAIN  # spun, armed: sleep on the doorbell
    t0 = time.monotonic_ns()
    w.write(b"x")
    lib.sbp_ring_note_wakeup(rr)
    if time.monotonic_ns() - t0 < cap:  # (a machine this slow says nothing)
        assert cap // 2 <= rr.bell_ns < cap
    r.read()
    # an idle peer: waits far longer than a doorbell make the spin short
    lib.sbp_ring_set_bell_cost(rr, 100000)
    for _ in range(8):
        assert lib.sbp_ring_wait_readable(rr, -1) == -errno.EAGAIN
        time.sleep(0.02)
        w.write(b"y")
        lib.sbp_ring_note_wakeup(rr)
        r.read()
    assert rr.bell_ns == 100000                          # slow answers are not the doorbell's fault
    assert lib.sbp_ring_spin_budget(rr) == 100000 // 8
    w.close(); r.close()


# -- a pair without the region in B ------------------------------------------------

def test_region_absent_from_one_guest():
    """B has no ivshmem device: its manager says so and comes up for TCP;
    A joins the region. Their connection is plain TCP, data intact, and A
    records why not shm."""
    with VMPair(ivshmem=("A",), region_size=16 << 20) as p:
        ups = _both(p, f"{PY} -m shmbypass up --backend ivshmem")
        for g in "AB":
            assert ups[g].rc == 0, ups[g]
        assert "no ivshmem PCI device" in ups["B"].err and "the shm tier is off here" in ups["B"].err
        assert len(ups["B"].err.strip().splitlines()) == 1, ups["B"].err
        assert ups["A"].err.strip() == ""
        sa, sb = _state(p, "A"), _state(p, "B")
        a, b = sa["region"], sb["region"]
        assert a["region_id"] == p.region_id and a["part"] == 0 and a["slot_count"] > 0
        assert (b["region_id"], b["slot_count"], b["path"]) == (0, 0, None)
        # A negotiates toward B (the pair told it B's address); B, with no
        # region, toward nobody: it neither offers nor answers.
        assert (sa["vm_peers"], sb["vm_peers"]) == ([B_IP], []), (sa, sb)
        rows = _echo(p, 7010, _wrap())
        (ra,), (rb,) = rows["A"], rows["B"]
        assert ra["tier"] == rb["tier"] == "tcp"
        if SHM_READY:  # A asked for shm (B never answers): the reason is recorded
            assert ra["shm_reason"] == "peer-not-capable", ra


# -- the module's pair ----------------------------------------------------------------

@pytest.fixture(scope="module")
def pair():
    p = VMPair(region_init=GARBAGE)  # garbage before boot; formatted after the refusal test
    try:
        p.boot()
        yield p
    finally:
        p.close()
        assert not os.path.exists(p.region_path)


@pytest.fixture
def joined(pair):
    """The pair with the region formatted by the host and both guests' `up
    --backend ivshmem` on it: what test_host_formats_guests_join_their_parts
    checks, done here if it did not run (a -k selection), so no test needs
    an earlier one."""
    if not getattr(pair, "region_id", None):
        pair.region_id = vmstatus.format_region_file(pair.region_path)["region_id"]
        ups = _both(pair, f"{PY} -m shmbypass up --backend ivshmem")
        assert all(u.rc == 0 for u in ups.values()), ups
    return pair


def test_garbage_region_refused_tcp_still_works(pair):
    ups = _both(pair, f"{PY} -m shmbypass up --backend ivshmem")
    for g in "AB":
        r = ups[g]
        assert r.rc == 0, r
        (line,) = r.err.strip().splitlines()
        assert "holds garbage" in line and "the shm tier is off here" in line, line
        state = _state(pair, g)
        st = state["region"]
        assert (st["region_id"], st["slot_count"], st["path"]) == (0, 0, None)
        assert state["vm_peers"] == [], state  # no region: no VM path
    res = subprocess.run([sys.executable, "-m", "shmbypass", "vm", "status", pair.region_path],
                         capture_output=True, text=True, cwd=paths.ROOT)
    assert res.returncode == 2 and "garbage" in res.stdout, res
    try:
        rows = _echo(pair, 7020, _wrap())
        assert [r["tier"] for g in "AB" for r in rows[g]] == ["tcp", "tcp"], rows
    finally:
        downs = _both(pair, f"{PY} -m shmbypass down")
        for g in "AB":
            assert downs[g].rc == 0, downs[g]


def test_host_formats_guests_join_their_parts(pair):
    """The host formats the region (the guests run and have it mapped: the
    same memory); each guest's pool is exactly its own part."""
    rid = vmstatus.format_region_file(pair.region_path)["region_id"]
    pair.region_id = rid
    ups = _both(pair, f"{PY} -m shmbypass up --backend ivshmem")
    parts = {}
    for g, part in (("A", 0), ("B", 1)):
        assert ups[g].rc == 0 and ups[g].err.strip() == "", ups[g]
        st = _state(pair, g)["region"]
        assert (st["backend"], st["region_id"], st["part"], st["guest"]) == ("ivshmem", rid, part, g)
        assert st["path"].startswith("/sys/bus/pci/devices/") and st["path"].endswith("/resource2")
        # the other guest's address, from the pair (SHMBYPASS_VM_PEER)
        assert _state(pair, g)["vm_peers"] == [{"A": B_IP, "B": "10.77.0.1"}[g]]
        parts[g] = st
    assert parts["B"]["first_slot"] == parts["A"]["first_slot"] + parts["A"]["slot_count"]
    code = ("import json; from shmbypass import paths, slots; i = paths.Instance.current(); "
            "print(json.dumps([slots.config(i), sorted(slots.free_slots(i))]))")
    for g in "AB":
        cfg, free = json.loads(pair.run(g, f"{PY} -c '{code}'", env=ENV, timeout=120, check=True).out)
        first, n = parts[g]["first_slot"], parts[g]["slot_count"]
        assert free == list(range(first, first + n))
        assert (cfg["region_id"], cfg["slot_count"], cfg["first_slot"]) == (rid, n, first)
    rep = vmstatus.region_status(pair.region_path)
    assert rep["state"] == "ok"
    assert [(p["guest"], p["alive"]) for p in rep["parts"]] == [("A", True), ("B", True)]
    text = subprocess.run([sys.executable, "-m", "shmbypass", "vm", "status", pair.region_path],
                          capture_output=True, text=True, cwd=paths.ROOT, check=True).stdout
    assert f"id {rid:016x}" in text and "guest A, mapped" in text and "guest B, mapped" in text


# Sockets that ask (SBP_SO_ASK, what the interposer does), in the bypass
# group, toward the other guest (a peer VM: `up --backend ivshmem` took its
# address from the pair): the handshake alone decides; each side prints
# its sockets' sk_state, with what SBP_SO_INFO tells the interposer.
SK_INFO = r"""
def sk_info(inst, sock):
    st = slots.sk_state(inst, sock)
    i = ask.info(sock)
    st["info"] = {f: getattr(i, f) for f in ("tier", "mem", "tx_slot", "rx_slot", "tx_gen",
                                             "rx_gen", "region_id")}
    return st
"""

NEG_SERVER = r"""
import json, socket, sys
from shmbypass import ask, paths, slots
inst = paths.Instance.current()
""" + SK_INFO + r"""
ls = socket.socket()
ask.ask(ls)
ls.bind(("10.77.0.2", int(sys.argv[1]))); ls.listen(16)
out = []
for i in range(int(sys.argv[2])):
    c, _ = ls.accept()
    out.append(sk_info(inst, c))
    c.recv(1)
    c.close()
print(json.dumps(out))
"""

NEG_CLIENT = r"""
import json, socket, sys, time
from shmbypass import ask, paths, slots
inst = paths.Instance.current()
""" + SK_INFO + r"""
out = []
for i in range(int(sys.argv[2])):
    for _ in range(300):
        s = socket.socket()
        ask.ask(s)
        try:
            s.connect(("10.77.0.2", int(sys.argv[1])))
            break
        except ConnectionRefusedError:
            s.close(); time.sleep(0.2)
    out.append(sk_info(inst, s))
    s.send(b"x")
    s.recv(1)
    s.close()
time.sleep(1)  # the last FIN/ACKs: both ends reach TCP_CLOSE
print(json.dumps(out))
"""


@needs_parts
def test_negotiation_across_guests_uses_own_parts(joined):
    """Both ends of each connection land in the shm tier; each writes a
    slot of its own part and reads the other's; closed connections give
    every slot back to its owner's free list."""
    n = 8
    server = joined.start("B", f"{RUN_KERNEL}{PY} - 7030 {n}", stdin=NEG_SERVER, env=ENV, timeout=200)
    cli = joined.run("A", f"{RUN_KERNEL}{PY} - 7030 {n}", stdin=NEG_CLIENT, env=ENV, timeout=200, check=True)
    srv = server.wait(260).check()
    a_rows, b_rows = json.loads(cli.out), json.loads(srv.out.strip().splitlines()[-1])
    pa, pb = _state(joined, "A")["region"], _state(joined, "B")["region"]
    in_a = range(pa["first_slot"], pa["first_slot"] + pa["slot_count"])
    in_b = range(pb["first_slot"], pb["first_slot"] + pb["slot_count"])
    assert len(a_rows) == len(b_rows) == n
    for a, b in zip(a_rows, b_rows):
        assert a["vm"] == b["vm"] == 1, (a, b)
        assert a["tier"] == b["tier"] == 2, (a, b)  # SBP_TIER_SHM
        assert a["tx_slot"] in in_a and b["tx_slot"] in in_b
        assert (a["rx_slot"], a["rx_gen"]) == (b["tx_slot"], b["tx_gen"])
        assert (b["rx_slot"], b["rx_gen"]) == (a["tx_slot"], a["tx_gen"])
        assert a["region_id"] == b["region_id"] == joined.region_id
        for st in (a, b):  # what the interposer is told: these slots
            assert st["info"] == {"tier": 2, "mem": 2, "tx_slot": st["tx_slot"],  # SBP_MEM_SLOTS
                                  "rx_slot": st["rx_slot"], "tx_gen": st["tx_gen"],
                                  "rx_gen": st["rx_gen"], "region_id": joined.region_id}, st
    code = ("import json; from shmbypass import paths, slots; i = paths.Instance.current(); "
            "print(json.dumps([len(slots.free_slots(i)), sum(r for g, r in slots.slot_states(i).values())]))")
    for g, p in (("A", pa), ("B", pb)):
        free, refs = json.loads(joined.run(g, f"{PY} -c '{code}'", env=ENV, timeout=120, check=True).out)
        assert (free, refs) == (p["slot_count"], 0), g


@needs_shm
def test_unmodified_programs_in_the_shm_tier(joined):
    rows = _echo(joined, 7040, RUN_SHM, size=4 << 20)
    (ra,), (rb,) = rows["A"], rows["B"]
    assert ra["tier"] == rb["tier"] == "shm", rows
    rep = vmstatus.region_status(joined.region_path)
    dirs = {f"{c['writer']}>{c['reader']}" for c in rep["channels"] if c["head"] >= 4 << 20}
    assert dirs == {"A>B", "B>A"}, rep["channels"]


# A writer that closes before its peer VM has read anything: A sends and
# exits; B reads only when told to.
LATE_READER = """
import hashlib, os, socket, sys, time
port = int(sys.argv[1])
ls = socket.create_server(("10.77.0.2", port))
ls.settimeout(120)
for conn in range(2):
    c, _ = ls.accept()
    c.recv(1, socket.MSG_PEEK)  # the channel is set up (and its hello doorbell sent)
    open("/tmp/accepted-%d-%d" % (port, conn), "w").close()
    for i in range(1200):
        if os.path.exists("/tmp/read-%d-%d" % (port, conn)):
            break
        time.sleep(0.1)
    c.settimeout(120)
    h, n, err = hashlib.sha256(), 0, ""
    try:
        while True:
            b = c.recv(65536)
            if not b:
                break
            h.update(b); n += len(b)
    except ConnectionResetError:
        err = "reset"
    c.close()
    print(n, h.hexdigest(), err, flush=True)
"""

EARLY_CLOSER = """
import hashlib, os, socket, struct, sys, time
port, size = int(sys.argv[1]), int(sys.argv[2])
data = os.urandom(size)
for i in range(300):
    try:
        s = socket.create_connection(("10.77.0.2", port), timeout=120)
        break
    except ConnectionRefusedError:
        time.sleep(0.2)
s.sendall(data)
for i in range(1200):  # closes once B has set up its end (a doorbell byte arriving
    if os.path.exists("/tmp/close-%d" % port):  # after close() would make the kernel reset)
        break
    time.sleep(0.1)
if sys.argv[3:] == ["abort"]:  # SO_LINGER 0: RST, no FIN
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
s.close()
print(len(data), hashlib.sha256(data).hexdigest())
"""

# (free slots, references held, part size) of a guest's pool; with a
# timeout, polls (inside the guest) until the pool is whole or time is up.
POOL = """
import json, sys, time
from shmbypass import paths, slots
i = paths.Instance.current()
end = time.monotonic() + float(sys.argv[1])
while True:
    free, part = len(slots.free_slots(i)), slots.config(i)["slot_count"]
    refs = sum(r for g, r in slots.slot_states(i).values())
    if (free, refs) == (part, 0) or time.monotonic() >= end:
        break
    time.sleep(0.2)
print(json.dumps([free, refs, part]))
"""


def _pool(pair, g, wait=0):
    return tuple(json.loads(pair.run(g, f"{PY} - {wait}", stdin=POOL, env=ENV, timeout=120 + wait,
                                     check=True).out))


def _fin_acked(pair, port):
    """A's end of the connection to port has had its FIN acknowledged (no
    ESTAB/FIN-WAIT-1 left; an orphan in FIN-WAIT-2 or a time-wait sock)."""
    out = pair.run("A", f"ss -tanH '( dport = :{port} )'", timeout=30, check=True).out
    return not any(w in out for w in ("ESTAB", "FIN-WAIT-1", "SYN-SENT"))


@needs_shm
def test_closed_writers_slot_waits_for_the_peer_vm(joined):
    """A writes 100000 bytes and exits before B has read any. A's kernel
    alone counts A's slot (B's kernel cannot), and its socket's TCP_CLOSE
    used to come at the ACK of its FIN (the orphan became a time-wait sock):
    the slot went back on A's free list under B's unread bytes. Now the
    orphan stays in FIN-WAIT-2 until B closes (or 60 s), so the slot is
    held until then; B reads every byte; then the slot comes back."""
    port, size = 7045, 100000
    free0, refs0, part = _pool(joined, "A", wait=30)  # the last test's sockets are closing
    assert (free0, refs0) == (part, 0)
    server = joined.start("B", f"{RUN_SHM}{PY} - {port}", stdin=LATE_READER, env=ENV, timeout=300)

    def connection(n, *args):
        cli = joined.start("A", f"{RUN_SHM}{PY} - {port} {size} {' '.join(args)}", stdin=EARLY_CLOSER,
                         env=ENV, timeout=200)
        for _ in range(600):  # polls; the job timeouts stop a hang
            if joined.run("B", f"test -e /tmp/accepted-{port}-{n}", timeout=30).rc == 0:
                break
            assert not cli.done(), cli.wait(0)
            time.sleep(0.2)
        joined.run("A", f"touch /tmp/close-{port}", timeout=30, check=True)
        sent_n, sent_h = cli.wait(200).check().out.split()
        for _ in range(300):
            if _fin_acked(joined, port):
                break
            time.sleep(0.2)
        else:
            pytest.fail("A's FIN was never acknowledged")
        time.sleep(1)  # what used to give the slot back had every chance to
        return int(sent_n), sent_h

    try:
        sent_n, sent_h = connection(0)
        free, refs, _ = _pool(joined, "A")
        assert (free, refs) == (part - 1, 1), "A's slot left the pool while B had not read"
        chans = [c for c in vmstatus.region_status(joined.region_path)["channels"]
                 if c["writer"] == "A" and c["head"] == size]
        assert [(c["state"], c["queued"]) for c in chans] == [("fin", size)], chans
    finally:
        joined.run("B", f"touch /tmp/read-{port}-0", timeout=30, check=True)
    # B closed after reading: its FIN ends A's FIN-WAIT-2 at once (else 60 s would)
    assert _pool(joined, "A", wait=45)[:2] == (part, 0), "A's slot never came back"

    # An abortive close (RST) may come while B still reads: A's slot is parked
    # (60 s) in A's reservations table instead of going back at once.
    connection(1, "abort")
    joined.run("B", f"touch /tmp/read-{port}-1", timeout=30, check=True)
    lines = server.wait(260).check().out.split("\n")
    got_n, got_h = lines[0].split()[:2]
    assert (int(got_n), got_h) == (sent_n, sent_h) == (size, sent_h)
    code = ("import json; from shmbypass import paths, slots; i = paths.Instance.current(); "
            "print(json.dumps(slots.reservations(i)))")
    rows = json.loads(joined.run("A", f"{PY} -c '{code}'", env=ENV, timeout=120, check=True).out)
    parked = [r for r in rows if r["state"] == lib.SBP_RESV_PARKED]
    assert len(parked) == 1, rows
    assert _pool(joined, "A")[:2] == (part - 1, 1)


# A ring of each guest's part, written from Python straight into the BAR:
# the host view of live channels needs nothing else. Slots at the end of each
# part (the pool's FIFO reaches them last).
RAW_RING = r"""
import sys
from shmbypass import paths, region
st = __import__("json").load(open("/run/%s/state.json" % paths.Instance.current().name))["region"]
reg = region.open_ivshmem(st["path"])
slot = st["first_slot"] + st["slot_count"] - 1
reg.ring(slot, generation=0xABC, create=True).write(b"r" * int(sys.argv[1]))
print(slot)
"""

SHM_STREAM_CLIENT = """
import errno, socket, sys, time
for i in range(300):
    try:
        s = socket.create_connection(("10.77.0.2", int(sys.argv[1])), timeout=60)
        break
    except ConnectionRefusedError:
        time.sleep(0.2)
chunk, sent = b"x" * 65536, 0
t0 = time.monotonic()
try:
    while True:
        n = s.send(chunk)
        if n == 0:
            break
        sent += n
except OSError as e:  # socket.timeout (no errno) is the hang we must not see
    print("ERROR" if e.errno else "HANG", errno.errorcode.get(e.errno, e.errno), sent,
          round(time.monotonic() - t0, 1))
"""


def test_kill_guest_b_host_sees_channels_dead(joined):
    """Runs last. Channels written by A and by B show live on the host; B's
    QEMU is killed (mid-transfer when the shm tier works end to end: A's
    program gets an error, no hang); the host shows them dead."""
    jobs = {g: joined.start(g, f"{PY} - {size}", stdin=RAW_RING, env=ENV, timeout=120)
            for g, size in (("A", 1000), ("B", 3000))}
    slots_ = {g: int(job.wait(180).check().out) for g, job in jobs.items()}
    rep = vmstatus.region_status(joined.region_path)
    chans = {c["slot"]: c for c in rep["channels"]}
    assert (chans[slots_["A"]]["state"], chans[slots_["A"]]["writer"], chans[slots_["A"]]["head"]) == ("live", "A", 1000)
    assert (chans[slots_["B"]]["state"], chans[slots_["B"]]["writer"], chans[slots_["B"]]["head"]) == ("live", "B", 3000)
    client = None
    if SHM_READY:
        sink = joined.start("B", f"{RUN_SHM}{PY} - 7050", stdin=SINK_SERVER, env=ENV)
        client = joined.start("A", f"{RUN_SHM}{PY} - 7050", stdin=SHM_STREAM_CLIENT, env=ENV, timeout=150)
        for _ in range(600):
            if joined.run("B", "test -e /tmp/sink-started", timeout=30).rc == 0:
                break
            assert not client.done(), client.wait(0)
            time.sleep(0.2)
        else:
            pytest.fail("the transfer never started")
    joined.kill("B")
    rep = vmstatus.region_status(joined.region_path)
    chans = {c["slot"]: c for c in rep["channels"]}
    assert chans[slots_["A"]]["state"] == chans[slots_["B"]]["state"] == "dead"
    assert chans[slots_["B"]]["dead"] == ["B"] and rep["parts"][1]["alive"] is False
    if client is not None:
        res = client.wait(200)
        assert not res.timed_out and res.out.startswith("ERROR"), res  # reset/EPIPE/timeout, no hang
        with pytest.raises(GuestDied):
            sink.wait(30)
        live = [c for c in vmstatus.region_status(joined.region_path)["channels"] if c["state"] == "live"]
        assert not live, live
