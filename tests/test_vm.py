"""The IVSHMEM VM pair: two TCG guests sharing one region and one private link.

One pair is booted for the module (about 10 s here); the test that kills
guest B runs last. Everything (QEMU processes, the region file, sockets) is
checked gone afterwards, and a launcher killed with SIGKILL leaves nothing
behind either.
"""
import json
import os
import subprocess
import sys
import time

import pytest

from shmbypass import paths
from shmbypass._native import ffi, lib
from shmbypass.errors import GuestDied
from shmbypass.region import ivshmem
from shmbypass.vm import qemu
from shmbypass.vm import status as vmstatus
from shmbypass.vm.pair import VMPair
from guest_echo import ECHO_SERVER, SINK_SERVER

pytestmark = pytest.mark.vm

PY = os.path.join(paths.ROOT, ".venv", "bin", "python")  # the project's venv, seen by the guests over 9p
GARBAGE = b"\xa5not a region\x5a" * 4096  # 64 KiB of garbage at offset 0, written before boot
BAR_OFFSET = 8 << 20  # where the BAR test writes: past the garbage


def _qemu_pids(pair_name):
    """QEMU processes of one pair (named sbvm-<launcher pid>-<n>-A/B): other
    people's VMs on this machine are none of our business."""
    pids = set()
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                with open(f"/proc/{p}/cmdline", "rb") as f:
                    args = f.read().split(b"\0")
            except OSError:
                continue
            if args and args[0].endswith(b"qemu-system-x86_64") and any(
                    a.startswith(pair_name.encode() + b"-") for a in args):
                pids.add(int(p))
    return pids


def _wait_gone(pids, limit=30.0):
    """Poll (not a timed assertion: the limit only stops a hang) until none of pids is alive."""
    end = time.monotonic() + limit
    while time.monotonic() < end:
        left = {p for p in pids if os.path.exists(f"/proc/{p}") and _state(p) != "Z"}
        if not left:
            return set()
        time.sleep(0.1)
    return left


def _state(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


@pytest.fixture(scope="module")
def pair():
    p = VMPair(region_init=GARBAGE)
    try:
        p.boot()
        yield p
    finally:
        pids = p.qemu_pids()
        p.close()
        # nothing left: processes, region file, sockets/run dir
        assert not _wait_gone(pids), "QEMU still running after close()"
        assert not os.path.exists(p.region_path)
        assert not os.path.exists(p.run_dir)


# -- host-only ----------------------------------------------------------------

def test_status_of_zero_and_short_files(tmp_path):
    zero = tmp_path / "zero"
    zero.write_bytes(bytes(1 << 20))
    rep = vmstatus.region_status(str(zero))
    assert rep["state"] == "empty"
    short = tmp_path / "short"
    short.write_bytes(b"SHMBYPRG")
    assert vmstatus.region_status(str(short))["state"] == "garbage"


def test_status_reads_a_formatted_region(tmp_path):
    """A header + one live ring laid out as native/region.h and ring.h say."""
    import struct
    slot = 4096 + (1 << 20)
    buf = bytearray(4096 + 3 * slot)
    struct.pack_into("<8sIIIIQQIIII", buf, 0, b"SHMBYPRG", lib.SBP_REGION_VERSION, 4096, 3, slot,
                     len(buf), 0x1234ABCD, 3, 0, 0, 2)
    parts = ffi.offsetof("struct sbp_region_hdr", "parts")
    struct.pack_into("<IIQ", buf, parts, 0, 2, 0xA)
    struct.pack_into("<IIQ", buf, parts + 16, 2, 1, 0xB)
    off = 4096 + 2 * slot
    struct.pack_into("<QQQIII", buf, off, lib.SBP_RING_MAGIC, 7, 1 << 20, 1, 0x1, 0)
    struct.pack_into("<Q", buf, off + 64, 5000)
    struct.pack_into("<Q", buf, off + 128, 1000)
    f = tmp_path / "region"
    f.write_bytes(bytes(buf))
    rep = vmstatus.region_status(str(f))
    assert rep["state"] == "ok", rep["problem"]
    assert rep["header"]["region_id"] == "000000001234abcd"
    assert [c["slot"] for c in rep["channels"]] == [2]
    c = rep["channels"][0]
    assert (c["part"], c["generation"], c["queued"], c["state"]) == (1, 7, 4000, "fin")
    text = vmstatus.render_status(rep)
    assert "1 live channel" in text and "ivshmem" in text


def test_status_agrees_with_the_native_ring(tmp_path):
    """A region and a ring made by the real C code (region.py/ring.py), read
    back by the host view."""
    region = pytest.importorskip("shmbypass.region", reason="native ring/region part not built")
    reg = region.anonymous(slot_count=3, region_id=0xFEED)
    try:
        r = reg.ring(1, generation=42, create=True)
        r.write(b"x" * 5000)
        reader = reg.ring(1, generation=42)
        assert len(reader.read(1000)) == 1000
        r.close_writer()
        f = tmp_path / "region"
        f.write_bytes(bytes(reg._mm))
    finally:
        reg.close()
    rep = vmstatus.region_status(str(f))
    assert rep["state"] == "ok", rep["problem"]
    assert rep["header"]["region_id"] == f"{0xFEED:016x}"
    (c,) = rep["channels"]
    assert (c["slot"], c["generation"], c["head"], c["tail"], c["state"]) == (1, 42, 5000, 1000, "fin")
    # one byte of garbage in the geometry: both checkers refuse it
    raw = bytearray(f.read_bytes())
    raw[20] ^= 0x10  # slot_size
    f.write_bytes(bytes(raw))
    assert vmstatus.region_status(str(f))["state"] == "garbage"


def test_open_ivshmem_bar_without_device(tmp_path):
    with pytest.raises(ivshmem.IvshmemNotFound, match="no ivshmem PCI device"):
        ivshmem.open_ivshmem_bar(pci_root=str(tmp_path))


def test_killed_launcher_leaves_nothing():
    """SIGKILL the launcher mid-boot: its QEMUs die with it (PDEATHSIG) and
    the next launcher's sweep removes the region file and run dir."""
    code = "from shmbypass.vm.pair import VMPair; import time; VMPair().boot(); time.sleep(600)"
    launcher = subprocess.Popen([sys.executable, "-c", code], cwd=paths.ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    name = f"{qemu.RUN_PREFIX}{launcher.pid}-1"
    region = f"/dev/shm/{name}"
    try:
        end = time.monotonic() + 60
        while not _qemu_pids(name) and time.monotonic() < end:
            time.sleep(0.05)
        started = _qemu_pids(name)
        assert started, "the launcher never started QEMU"
    finally:
        launcher.kill()
        launcher.wait()
    assert not _wait_gone(started), "QEMU outlived its launcher"
    qemu.sweep_stale()
    assert not os.path.exists(region)
    assert not os.path.exists(f"/run/{name}")


# -- the pair -------------------------------------------------------------------

def test_status_reports_garbage(pair):
    """The region was filled with garbage before boot: the host says so, and
    so does each guest looking at its BAR."""
    res = subprocess.run([sys.executable, "-m", "shmbypass", "vm", "status", pair.region_path],
                         capture_output=True, text=True, cwd=paths.ROOT)
    assert res.returncode == 2, res.stderr
    assert "garbage" in res.stdout and "bad magic" in res.stdout
    for g in "AB":
        r = pair.run(g, f"{PY} -m shmbypass.vm status --json ivshmem", timeout=60)
        assert r.rc == 2, r
        assert json.loads(r.out)["state"] == "garbage"


def test_both_guests_see_ivshmem(pair):
    for g in "AB":
        r = pair.run(g, f"{PY} -c 'from shmbypass.region import ivshmem; m, size, dev = ivshmem.open_ivshmem_bar(); "
                        f"print(size, dev)'", timeout=60, check=True)
        size, dev = r.out.split()
        assert int(size) == pair.region_size
        assert dev.startswith("/sys/bus/pci/devices/")


def test_bar_bytes_cross_guests_and_host(pair):
    token = os.urandom(16).hex()
    pair.run("A", f"{PY} -c 'from shmbypass.region import ivshmem; m, _, _ = ivshmem.open_ivshmem_bar(); "
                  f"m[{BAR_OFFSET}:{BAR_OFFSET + 32}] = b\"{token}\"'", timeout=60, check=True)
    r = pair.run("B", f"{PY} -c 'from shmbypass.region import ivshmem; m, _, _ = ivshmem.open_ivshmem_bar(); "
                      f"print(m[{BAR_OFFSET}:{BAR_OFFSET + 32}].decode())'", timeout=60, check=True)
    assert r.out.strip() == token
    with open(pair.region_path, "rb") as f:
        f.seek(BAR_OFFSET)
        assert f.read(32).decode() == token


ECHO_CLIENT = """
import hashlib, os, socket, sys, threading, time
data = os.urandom(1 << 20)
for i in range(300):  # the server may still be starting
    try:
        s = socket.create_connection(("10.77.0.2", int(sys.argv[1])), timeout=60)
        break
    except ConnectionRefusedError:
        time.sleep(0.1)
def send():
    s.sendall(data)
    s.shutdown(socket.SHUT_WR)
t = threading.Thread(target=send); t.start()
h, n = hashlib.sha256(), 0
while True:
    b = s.recv(65536)
    if not b:
        break
    h.update(b); n += len(b)
t.join()
print(len(data), hashlib.sha256(data).hexdigest(), n, h.hexdigest())
"""


def test_tcp_between_guests_sha256(pair):
    server = pair.start("B", f"{PY} - 7001", stdin=ECHO_SERVER, timeout=120)
    client = pair.run("A", f"{PY} - 7001", stdin=ECHO_CLIENT, timeout=120, check=True)
    srv = server.wait(150).check()
    sent_n, sent_h, back_n, back_h = client.out.split()
    got_n, got_h = srv.out.split()[-2:]
    assert int(sent_n) == int(got_n) == int(back_n) == 1 << 20
    assert sent_h == got_h == back_h


def test_project_python_in_guest(pair):
    r = pair.run("A", f"{PY} -c 'import shmbypass, sys; print(shmbypass.__file__, sys.prefix)'",
                 timeout=60, check=True)
    path, prefix = r.out.split()
    assert path == os.path.join(paths.ROOT, "shmbypass", "__init__.py")
    assert prefix == os.path.join(paths.ROOT, ".venv")


def test_region_absent_from_one_guest():
    """A pair where only A gets the ivshmem device, left unformatted: A
    sees an empty region, B says it has none, and the link still works."""
    with VMPair(ivshmem=("A",), region_size=16 << 20, region_format=False) as p:
        a = p.run("A", f"{PY} -m shmbypass.vm status ivshmem", timeout=60)
        assert a.rc == 0 and "not formatted" in a.out, a  # a zero-filled region: empty
        b = p.run("B", f"{PY} -m shmbypass.vm status ivshmem", timeout=60)
        assert b.rc == 1 and "no ivshmem PCI device" in b.err, b
        assert p.run("B", "busybox ping -c 1 -W 10 10.77.0.1", timeout=60).ok


# Sends until the connection breaks. TCP_USER_TIMEOUT turns "the peer's
# machine vanished" into an error after a few seconds; the socket timeout
# only stops a hang, and is reported as such.
STREAM_CLIENT = """
import errno, socket, sys, time
for i in range(300):
    try:
        s = socket.create_connection(("10.77.0.2", int(sys.argv[1])), timeout=60)
        break
    except ConnectionRefusedError:
        time.sleep(0.1)
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, 3000)
s.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
s.settimeout(60)
chunk, sent = b"x" * 65536, 0
try:
    while True:
        sent += s.send(chunk)
except OSError as e:  # socket.timeout is TimeoutError, as is ETIMEDOUT: tell them apart by errno
    if e.errno is None:
        print("HANG", "-", sent)
    else:
        print("ERROR", errno.errorcode.get(e.errno, e.errno), sent)
"""


def test_kill_guest_b_mid_transfer(pair):
    """Runs last: guest B dies while A streams to it. A's program must see its
    connection fail (reset/timeout/EPIPE), not hang."""
    sink = pair.start("B", f"{PY} - 7002", stdin=SINK_SERVER)
    client = pair.start("A", f"{PY} - 7002", stdin=STREAM_CLIENT, timeout=150)
    for _ in range(600):  # until B has received 1 MiB
        if pair.run("B", "test -e /tmp/sink-started", timeout=30).rc == 0:
            break
        assert not client.done(), client.wait(0)
        time.sleep(0.2)
    else:
        pytest.fail("the transfer never started")
    pair.kill("B")
    assert not pair.alive("B")
    with pytest.raises(GuestDied):
        sink.wait(30)
    res = client.wait(200)
    assert res.rc == 0 and not res.timed_out, res
    verdict, what, sent = res.out.split()
    assert verdict == "ERROR", f"A's program hung: {res.out}"
    assert what in ("ETIMEDOUT", "ECONNRESET", "EPIPE"), res.out
    assert int(sent) >= 1 << 20
    # A is still fine
    assert pair.run("A", "true", timeout=30).ok
