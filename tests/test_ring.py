"""Ring conformance suite, run over every region backend (anon, posix),
plus region header checks and the C API under ASan/UBSan.

No timed assertions: the idle-CPU checks compare the sleeping process's CPU
time with the wall time it slept (it must be a small fraction), which checks
that the waiter really sleeps, not how fast anything is.
"""
import errno
import hashlib
import os
import random
import struct
import subprocess
import time

import pytest

import ring_conformance as rc
from shmbypass import region as regmod
from shmbypass._native import ffi, lib
from shmbypass.region import RegionCorrupt, RegionExists, RegionNotFound, \
    RegionVersionMismatch
from shmbypass.ring import (READER_CLOSED, RESET, WRITER_CLOSED, Ring, RingClosed, RingCorrupt,
                            RingEmpty, RingFull, RingNotReady, RingReset, capacity_for)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BACKENDS = ["anon", "posix"]
OFF = {f: ffi.offsetof("struct sbp_ring_hdr", f)
       for f in ("magic", "generation", "capacity", "version", "flags", "reset_reason",
                 "head", "tail", "writer_waiting", "reader_waiting")}
CAP = capacity_for(rc.SMALL_SLOT)


def setup_module():
    if os.geteuid() != 0:
        pytest.fail("the ring suite must run as root (/dev/shm)")
    rc.sweep_leftovers()


@pytest.fixture(params=BACKENDS)
def be(request):
    b = rc.Backend(request.param)
    try:
        yield b
    finally:
        b.cleanup()
        assert not b.leftovers(), f"left behind: {b.leftovers()}"


def pair(be, slot=0, gen=1):
    """Writer view (formats) and reader view of one slot, one process."""
    w = be.region.ring(slot, gen, create=True)
    r = be.region.ring(slot, gen)
    return w, r


# -- single-process conformance ------------------------------------------------

def test_empty(be):
    w, r = pair(be)
    assert r.readable == 0 and w.writable == CAP == w.capacity
    with pytest.raises(RingEmpty):
        r.read()
    assert r.wait_readable(timeout=0) is False
    assert w.wait_writable(timeout=0) is True
    assert r.flags == 0 and not r.corrupt


def test_one_byte(be):
    w, r = pair(be)
    assert w.write(b"x") == 1
    assert r.readable == 1 and w.writable == CAP - 1
    assert r.wait_readable(timeout=0) is True
    assert r.read(10) == b"x"
    with pytest.raises(RingEmpty):
        r.read()


def test_many(be):
    w, r = pair(be)
    rnd = random.Random(7)
    sent, got = hashlib.sha256(), hashlib.sha256()
    nsent = ngot = 0
    for _ in range(3000):
        if rnd.random() < 0.55:
            data = rnd.randbytes(rnd.randint(1, 3000))
            try:
                n = w.write(data)
            except RingFull:
                continue
            sent.update(data[:n])
            nsent += n
        else:
            try:
                data = r.read(rnd.randint(1, 5000))
            except RingEmpty:
                continue
            got.update(data)
            ngot += len(data)
    rest = r.read(CAP) if r.readable else b""
    got.update(rest)
    assert ngot + len(rest) == nsent > CAP
    assert got.digest() == sent.digest()


def test_exactly_full(be):
    w, r = pair(be)
    data = os.urandom(CAP)
    assert w.write(data) == CAP
    assert w.writable == 0 and r.readable == CAP
    with pytest.raises(RingFull):
        w.write(b"y")
    assert w.wait_writable(timeout=0) is False
    assert r.read(CAP + 10) == data
    assert w.writable == CAP


def test_short_write(be):
    w, r = pair(be)
    w.write(b"a" * (CAP - 10))
    assert w.write(b"b" * 100) == 10
    assert r.read(CAP) == b"a" * (CAP - 10) + b"b" * 10


def test_wrap_around(be):
    w, r = pair(be)
    for start in (1, CAP // 2, CAP - 1, CAP - 7):
        w.write(b"\0" * start)
        r.read(start)
        data = os.urandom(CAP)                # spans the end of the data area
        assert w.write(data) == CAP
        assert r.read(CAP) == data


def test_writev_readv(be):
    w, r = pair(be)
    w.write(b"\0" * (CAP - 100))
    r.read(CAP)                               # positions near the end: iovecs wrap
    parts = [b"abc", b"", os.urandom(500), memoryview(b"0123456789"), bytearray(b"xyz")]
    total = sum(len(p) for p in parts)
    assert w.writev(parts) == total
    bufs = [bytearray(5), bytearray(0), bytearray(600)]
    assert r.readv(bufs) == total
    assert bytes(bufs[0] + bufs[2])[:total] == b"".join(bytes(p) for p in parts)
    # writev stops where the ring is full
    assert w.writev([b"q" * CAP, b"never"]) == CAP
    with pytest.raises(RingFull):
        w.writev([b"z"])
    assert w.writev([]) == 0


def test_peek(be):
    w, r = pair(be)
    w.write(b"hello world")
    assert r.read(5, peek=True) == b"hello"
    assert r.read(100, peek=True) == b"hello world"
    assert r.readable == 11
    assert r.read(5) == b"hello"
    assert r.read(100, peek=True) == b" world"
    assert r.read() == b" world"


def test_eof_after_writer_close(be):
    w, r = pair(be)
    w.write(b"last words")
    w.close_writer()
    assert r.flags & WRITER_CLOSED
    assert r.wait_readable(timeout=0)
    assert r.read(4) == b"last"
    assert r.read() == b" words"
    assert r.read() == b""                    # EOF, and it stays EOF
    assert r.read() == b""
    with pytest.raises(RingClosed):
        w.write(b"more")


def test_epipe_after_reader_close(be):
    w, r = pair(be)
    w.write(b"unread")
    r.close_reader()
    assert w.flags & READER_CLOSED
    assert w.wait_writable(timeout=0)         # ready: the write will fail
    with pytest.raises(RingClosed) as ei:
        w.write(b"x")
    assert ei.value.errno == errno.EPIPE
    assert w.writable == 0


def test_reset(be):
    w, r = pair(be)
    w.write(b"before")
    r.reset(reason=0x123)
    assert w.flags & RESET and r.reset_reason == 0x123
    with pytest.raises(RingReset):
        w.write(b"x")
    assert r.read() == b"before"              # what was sent before the reset
    with pytest.raises(RingReset) as ei:
        r.read()
    assert ei.value.errno == errno.ECONNRESET
    assert r.wait_readable(timeout=0) and w.wait_writable(timeout=0)


def test_generation_mismatch_refuses_attach(be):
    w, r = pair(be, gen=5)
    with pytest.raises(RingNotReady):
        be.region.ring(0, 6)
    with pytest.raises(RingNotReady):
        be.region.ring(0, 4)
    w.write(b"old connection")
    # the slot is reused for the next connection: stale views stop at once
    w2 = be.region.ring(0, 6, create=True)
    for call in (lambda: r.read(), lambda: w.write(b"x")):
        with pytest.raises(RingCorrupt):
            call()
    w.close_writer()                          # must not touch the new ring
    w.reset()
    assert w2.flags == 0
    r2 = be.region.ring(0, 6)
    with pytest.raises(RingEmpty):
        r2.read()


def test_attach_unformatted_and_garbage(be):
    view = be.region.slot(1)
    view[:4096] = bytes(4096)
    with pytest.raises(RingNotReady):
        be.region.ring(1, 1)
    view[:8] = b"NOTARING"
    with pytest.raises(RingCorrupt):
        be.region.ring(1, 1)
    del view


def test_doorbell(be):
    w, r = pair(be)
    assert r.arm_readable() is False          # empty: armed
    w.write(b"a")
    assert w.peer_waiting                     # the writer's caller rings the doorbell
    w.write(b"b")
    assert not w.peer_waiting                 # once
    assert r.arm_readable() is True           # data there: not armed
    r.read()
    r.doorbell_mode(True)
    r.set_spin(0)
    assert r.wait_readable(timeout=1) is False  # armed, returns at once
    w.write(b"c")
    assert w.peer_waiting


def test_readable_min(be):
    """SO_RCVLOWAT and MSG_PEEK|MSG_WAITALL: readable only once min bytes
    are there, or once nothing more can come."""
    w, r = pair(be)
    w.write(b"a" * 50)
    assert r.wait_readable(timeout=0, min=100) is False
    assert r.arm_readable(min=100) is False   # armed: the next write rings
    w.write(b"b" * 60)
    assert w.peer_waiting
    assert r.wait_readable(timeout=0, min=100) is True
    assert r.wait_readable(timeout=0, min=1 << 40) is False  # capped at a full ring
    w.write(b"c" * (r.capacity - 110))
    assert r.wait_readable(timeout=0, min=1 << 40) is True
    r.read(r.capacity)
    w.write(b"d")
    w.close_writer()
    assert r.wait_readable(timeout=0, min=100) is True       # EOF: no more can come


# -- two processes ----------------------------------------------------------------

def test_concurrent_256mib(be):
    total = 256 << 20
    be.region.ring(0, 9, create=True)
    consumer = be.spawn("consume", slot=0, generation=9)
    producer = be.spawn("produce", slot=0, generation=9, total=total, seed=3)
    sent = producer.result(timeout=300)
    got = consumer.result(timeout=300)
    assert sent["bytes"] == got["bytes"] == total
    assert got["sha256"] == sent["sha256"]


def _idle_cpu(peer, window=0.5):
    """CPU seconds the peer used while we slept for window seconds."""
    time.sleep(0.05)                          # let its bounded spin run out
    c0 = peer.cpu_seconds()
    time.sleep(window)
    return peer.cpu_seconds() - c0


def test_forked_child_uses_region(be):
    """A forked child keeps using the parent's Region."""
    w = be.region.ring(3, 21, create=True)
    peer = be.spawn("consume", fork=True, slot=3, generation=21)
    w.send_all(b"from the parent" * 1000)
    w.close_writer()
    res = peer.result()
    assert res["sha256"] == hashlib.sha256(b"from the parent" * 1000).hexdigest()


def _sleeping_peer(be, op, slot, generation, who):
    """A peer process that waits on the ring, once it is seen asleep."""
    peer = be.spawn(op, slot=slot, generation=generation)
    assert peer.line() == "ready"
    idle = _idle_cpu(peer)
    assert idle < 0.1, f"waiting {who} used {idle:.3f} s CPU in 0.5 s: it does not sleep"
    assert peer.state() == "S"
    return peer


def test_futex_wakes_sleeping_reader(be):
    w = be.region.ring(1, 3, create=True)
    peer = _sleeping_peer(be, "wait_read", 1, 3, "reader")
    w.write(b"wake up")
    res = peer.result(timeout=60)
    assert res == {"woke": True, "data": b"wake up".hex(), "futex_broken": 0}


def test_futex_wakes_sleeping_writer(be):
    r = be.region.ring(2, 4, create=True)
    peer = _sleeping_peer(be, "wait_write", 2, 4, "writer")
    assert len(r.read(100)) == 100            # room: wakes the writer
    res = peer.result(timeout=60)
    assert res["woke"] and res["filled"] == CAP and res["wrote"] == 4
    assert res["futex_broken"] == 0           # slept on a real futex
    assert r.read(CAP)[-4:] == b"MARK"


# -- hostile header -----------------------------------------------------------------

def _poke(view, field, fmt, value):
    struct.pack_into(fmt, view, OFF[field], value)


def _hostile_slot(be, gen):
    """(the third mapping or None, slot 1 as it sees it (to write garbage
    into), a writer and a reader on slot 1), with canaries in slots 0 and 2.
    The caller closes the third mapping."""
    other = be.open_again()
    src = other if other is not None else be.region
    for s in (0, 2):
        be.region.slot(s)[:] = bytes([0x5A]) * be.region.info.slot_size
    w, r = pair(be, slot=1, gen=gen)
    return other, src.slot(1), w, r


def test_hostile_header(be):
    """A third mapping writes garbage into the header: every call returns a
    named error (RingCorrupt for inconsistent positions) and nothing outside
    the slot changes (neighbouring slots hold canaries)."""
    other, hostile, w, r = _hostile_slot(be, gen=77)
    w.write(b"z" * 1000)
    r.read(10)

    fixed = [("magic", "<Q", 0x4141414141414141), ("generation", "<Q", 78),
             ("capacity", "<Q", 1 << 40), ("capacity", "<Q", CAP * 2),
             ("head", "<Q", 2 ** 64 - 1), ("tail", "<Q", 2 ** 63),
             ("head", "<Q", 10 + CAP + 1),          # head - tail > capacity
             ("tail", "<Q", 5000),                  # tail > head
             ("head", "<Q", 500)]                   # head went backwards
    for field, fmt, value in fixed:
        saved = bytes(hostile[:256])
        _poke(hostile, field, fmt, value)
        assert r.corrupt and w.corrupt, field
        assert r.readable == 0 and w.writable == 0
        with pytest.raises(RingCorrupt):
            r.read()
        with pytest.raises(RingCorrupt):
            w.write(b"x")
        assert r.wait_readable(timeout=0) and w.wait_writable(timeout=0)  # ready: go see the error
        hostile[:256] = saved
        assert not r.corrupt, field

    # random garbage in every header word and the data area
    rnd = random.Random(1234)
    big = [0, 1, CAP - 1, CAP, CAP + 1, 2 ** 31, 2 ** 32 - 1, 2 ** 63, 2 ** 64 - 1]
    for i in range(3000):
        field = rnd.choice(list(OFF))
        fmt = "<Q" if field in ("magic", "generation", "capacity", "head", "tail") else "<I"
        lim = 2 ** 64 - 1 if fmt == "<Q" else 2 ** 32 - 1
        value = rnd.choice(big + [rnd.randint(0, lim)]) & lim
        _poke(hostile, field, fmt, value)
        if i % 7 == 0:
            off = rnd.randrange(4096, len(hostile) - 8)
            hostile[off:off + 8] = rnd.randbytes(8)
        for op in (lambda: w.write(b"q" * rnd.randint(1, 3 * CAP)),
                   lambda: r.read(rnd.randint(1, 3 * CAP)),
                   lambda: r.read(100, peek=True),
                   lambda: w.writev([b"a" * 100, b"b" * CAP]),
                   lambda: r.readv([bytearray(50), bytearray(CAP)]),
                   lambda: r.wait_readable(timeout=0),
                   lambda: w.wait_writable(timeout=0)):
            try:
                op()
            except (RingCorrupt, RingReset, RingClosed, RingEmpty, RingFull):
                pass
        if i % 100 == 0:                      # now and then, a sane header again
            lib.sbp_ring_format(be.region.slot_ptr(1), be.region.info.slot_size, 77)
            w, r = pair(be, slot=1, gen=77)
    for s in (0, 2):
        assert bytes(be.region.slot(s)) == bytes([0x5A]) * be.region.info.slot_size
    assert bytes(be.region.slot(0)) and be.region.slot(3)  # geometry untouched
    del hostile
    if other is not None:
        other.close()


# -- regions -------------------------------------------------------------------------

def test_region_geometry_and_bounds(be):
    reg = be.region
    n, size, cap = reg.geometry
    assert (n, size, cap) == (4, rc.SMALL_SLOT, CAP)
    assert reg.info.region_size == 4096 + n * size and reg.region_id != 0
    assert len(reg.slot(n - 1)) == size
    for bad in (-1, n, 2 ** 32, 2 ** 64):
        with pytest.raises(IndexError):
            reg.slot(bad)
    with pytest.raises(IndexError):
        reg.ring(n, 1, create=True)


def test_region_header_checks(be):
    hdr = be.region.slot_ptr(0)  # bounds-checked address, we want the header
    base = ffi.cast("struct sbp_region_hdr *", ffi.cast("char *", hdr) - 4096)
    size = be.region.size
    info = ffi.new("struct sbp_region_info *")
    assert lib.sbp_region_check(base, size, info) == 0 and info.slot_count == 4
    assert lib.sbp_region_check(base, 4095, info) == -errno.EPROTO          # short mapping
    assert lib.sbp_region_check(base, size - 1, info) == -errno.EPROTO
    saved = ffi.buffer(base, 4096)[:]
    try:
        base.version = 99
        with pytest.raises(RegionVersionMismatch):
            be.region.check()
        ffi.buffer(base, 4096)[:] = saved
        for field, value in (("slot_count", 10 ** 6), ("slot_size", 12345), ("region_size", 1),
                             ("hdr_size", 0), ("nparts", 99)):
            setattr(base, field, value)
            with pytest.raises(RegionCorrupt):
                be.region.check()
            ffi.buffer(base, 4096)[:] = saved
        base.parts[0].slot_count = 5                                        # past the end
        assert lib.sbp_region_check(base, size, info) == -errno.EPROTO
        ffi.buffer(base, 4096)[:] = saved
        base.magic = b"GARBAGE!"
        with pytest.raises(RegionCorrupt):
            be.region.check()
    finally:
        ffi.buffer(base, 4096)[:] = saved
    be.region.check()
    parts = ffi.new("struct sbp_region_part[2]", [(0, 2, 1), (2, 2, 2)])
    assert lib.sbp_region_set_parts(base, size, parts, 2) == 0
    be.region.check()
    assert be.region.info.parts == ((0, 2, 1), (2, 2, 2))
    overlap = ffi.new("struct sbp_region_part[2]", [(0, 3, 1), (2, 2, 2)])
    assert lib.sbp_region_set_parts(base, size, overlap, 2) == -errno.EINVAL


@pytest.mark.parametrize("be", ["posix"], indirect=True)
def test_region_open_by_name(be):
    with pytest.raises(RegionExists):
        regmod.format(be.kind, instance=be.instance, slot_count=4, slot_size=rc.SMALL_SLOT)
    w = be.region.ring(3, 11, create=True)
    w.write(b"across processes")
    # a peer process opens it by name and reads
    peer = be.spawn("consume", slot=3, generation=11)
    w.close_writer()
    res = peer.result()
    assert res["bytes"] == 16 and res["sha256"] == hashlib.sha256(b"across processes").hexdigest()


def test_region_destroy_leaves_nothing():
    b = rc.Backend("posix")
    assert b.leftovers()
    b.cleanup()
    assert not b.leftovers()
    with pytest.raises(RegionNotFound):
        regmod.open("posix", instance=b.instance)


def test_ring_on_plain_buffer():
    """The Python API works on any writable buffer (here a bytearray)."""
    buf = bytearray(4096 + 8192)
    w = Ring.create(buf, 1)
    r = Ring.attach(buf, 1)
    assert w.write(b"x" * 20000) == 8192
    assert r.recv_exact(8192, timeout=1) == b"x" * 8192
    w.close(), r.close()
    with pytest.raises(ValueError):
        Ring.create(bytearray(4096 + 100), 1)   # too small for a ring


# -- the C API under AddressSanitizer / UBSan ---------------------------------------

def test_c_api_under_asan(tmp_path):
    exe = tmp_path / "ring_asan"
    src = os.path.join(ROOT, "native")
    subprocess.run(["gcc", "-fsanitize=address,undefined", "-fno-sanitize-recover=all",
                    "-g", "-O1", "-Wall", "-Wextra", "-Werror", "-D_GNU_SOURCE", f"-I{src}",
                    "-o", str(exe), os.path.join(src, "tests", "ring_asan.c"),
                    os.path.join(src, "ring.c"), os.path.join(src, "ring_wait.c"),
                    os.path.join(src, "region.c"), os.path.join(src, "pairmem.c"),
                    os.path.join(src, "stream.c"), "-lpthread"],
                   check=True)
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}  # ASan's runtime must come first
    env.update(ASAN_OPTIONS="detect_leaks=1:abort_on_error=0",
               UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1")
    res = subprocess.run([str(exe)], capture_output=True, text=True, timeout=240, env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]
    assert "ring_asan: ok" in res.stdout


# -- zero-copy access (sbp_ring_reserve/commit, peek_iov/consume) -------------------
# The C API only (the interposer's sendfile/splice use it); called through cffi.

def _reserve(ring, mx):
    iov = ffi.new("struct iovec[2]")
    n = lib.sbp_ring_reserve(ring._r, iov, mx)
    return n, iov


def _peek(ring, mx):
    iov = ffi.new("struct iovec[2]")
    n = lib.sbp_ring_peek_iov(ring._r, iov, mx)
    return n, iov


def _pieces(iov):
    return [(iov[i].iov_base, iov[i].iov_len) for i in range(2) if iov[i].iov_len]


def _fill(iov, data):
    off = 0
    for base, ln in _pieces(iov):
        ffi.memmove(base, data[off:off + ln], ln)
        off += ln
    return off


def _gather(iov, n):
    out = b""
    for base, ln in _pieces(iov):
        out += ffi.buffer(base, min(ln, n - len(out)))[:]
    return out[:n]


def _in_data_area(be, slot, iov):
    lo = int(ffi.cast("uintptr_t", be.region.slot_ptr(slot))) + lib.SBP_RING_HDR_SIZE
    for base, ln in _pieces(iov):
        a = int(ffi.cast("uintptr_t", base))
        if not (lo <= a and a + ln <= lo + CAP):
            return False
    return True


def test_reserve_commit(be):
    w, r = pair(be)
    n, iov = _reserve(w, 1 << 40)
    assert n == CAP and len(_pieces(iov)) == 1 and _in_data_area(be, 0, iov)
    data = os.urandom(CAP)
    _fill(iov, data)
    assert r.readable == 0                          # nothing published before commit
    assert lib.sbp_ring_commit(w._r, 1000) == 1000
    assert r.read(CAP) == data[:1000]
    # the rest of the reservation is stale now: reserve again, wrapping
    pos = 1000
    for start in (1, CAP // 2, CAP - 1):
        w.write(b"\0" * start)
        r.read(start)
        pos += start
        n, iov = _reserve(w, CAP)
        assert n == CAP and _in_data_area(be, 0, iov)
        pieces = _pieces(iov)
        assert len(pieces) == 2 and pieces[1][1] == pos % CAP, (start, pieces)
        data = os.urandom(CAP)
        assert _fill(iov, data) == CAP
        assert lib.sbp_ring_commit(w._r, CAP) == CAP
        assert w.writable == 0 and r.read(CAP) == data
        pos += CAP
    # max bounds the reservation; 0 is a no-op; more than there is room for is refused
    n, iov = _reserve(w, 10)
    assert n == 10 and sum(ln for _, ln in _pieces(iov)) == 10
    assert lib.sbp_ring_commit(w._r, 0) == 0
    assert lib.sbp_ring_commit(w._r, CAP + 1) == -errno.EINVAL
    assert r.readable == 0


def test_reserve_full_closed_reset(be):
    w, r = pair(be)
    w.write(os.urandom(CAP))
    n, iov = _reserve(w, 100)
    assert n == -errno.EAGAIN and not _pieces(iov)
    assert _reserve(w, 0)[0] == 0
    r.read(10)
    assert _reserve(w, 100)[0] == 10
    lib.sbp_ring_close_reader(r._r)
    assert _reserve(w, 100)[0] == -errno.EPIPE
    assert lib.sbp_ring_commit(w._r, 5) == -errno.EPIPE
    w2, r2 = pair(be, slot=1, gen=5)
    lib.sbp_ring_reset(r2._r, 1)
    assert _reserve(w2, 100)[0] == -errno.ECONNRESET


def test_peek_iov_consume(be):
    w, r = pair(be)
    assert _peek(r, 100)[0] == -errno.EAGAIN
    assert _peek(r, 0)[0] == 0
    for start in (0, 7, CAP - 3):
        w.write(b"\0" * start)
        r.read(start)
        data = os.urandom(CAP)
        w.write(data)
        n, iov = _peek(r, 1 << 40)
        assert n == CAP and _in_data_area(be, 0, iov) and _gather(iov, n) == data
        assert lib.sbp_ring_consume(r._r, CAP + 1) == -errno.EINVAL
        assert lib.sbp_ring_consume(r._r, 100) == 100
        assert w.writable == 100
        n, iov = _peek(r, 50)
        assert n == 50 and _gather(iov, 50) == data[100:150]
        assert lib.sbp_ring_consume(r._r, CAP - 100) == CAP - 100
        assert r.readable == 0
    w.write(b"end")
    w.close_writer()
    n, iov = _peek(r, 100)
    assert n == 3 and _gather(iov, 3) == b"end"
    assert lib.sbp_ring_consume(r._r, 3) == 3
    assert _peek(r, 100)[0] == 0                     # EOF


def test_zero_copy_wakes_sleepers(be):
    """commit/consume report an armed doorbell waiter like write/read do."""
    w, r = pair(be)
    assert lib.sbp_ring_arm_readable(r._r) == 0
    n, iov = _reserve(w, 10)
    _fill(iov, b"0123456789")
    assert lib.sbp_ring_commit(w._r, 10) == 10
    assert lib.sbp_ring_peer_waiting(w._r) == 1
    w.write(b"x" * (CAP - 10))
    assert lib.sbp_ring_arm_writable(w._r) == 0
    n, iov = _peek(r, 4)
    assert lib.sbp_ring_consume(r._r, 4) == 4
    assert lib.sbp_ring_peer_waiting(r._r) == 1


def test_zero_copy_hostile_header(be):
    """Positions moved between reserve and commit (or peek and consume) by
    someone else: refused, nothing published. Garbage headers: every
    described piece still lies inside the slot's data area, and the
    neighbouring slots are untouched."""
    other, hostile, w, r = _hostile_slot(be, gen=9)
    w.write(b"a" * 1000)
    n, iov = _reserve(w, 100)
    assert n == 100
    _poke(hostile, "head", "<Q", 1000 + 50)         # someone else "wrote"
    assert lib.sbp_ring_commit(w._r, 100) == -errno.EPROTO
    assert struct.unpack_from("<Q", hostile, OFF["head"])[0] == 1050
    lib.sbp_ring_format(be.region.slot_ptr(1), be.region.info.slot_size, 9)
    w, r = pair(be, slot=1, gen=9)
    w.write(b"b" * 1000)
    n, iov = _peek(r, 100)
    assert n == 100
    _poke(hostile, "tail", "<Q", 10)                # someone else "read"
    assert lib.sbp_ring_consume(r._r, 100) == -errno.EPROTO
    assert struct.unpack_from("<Q", hostile, OFF["tail"])[0] == 10

    rnd = random.Random(99)
    big = [0, 1, CAP - 1, CAP, CAP + 1, 2 ** 31, 2 ** 32 - 1, 2 ** 63, 2 ** 64 - 1]
    lib.sbp_ring_format(be.region.slot_ptr(1), be.region.info.slot_size, 9)
    w, r = pair(be, slot=1, gen=9)
    for i in range(3000):
        field = rnd.choice(list(OFF))
        fmt = "<Q" if field in ("magic", "generation", "capacity", "head", "tail") else "<I"
        lim = 2 ** 64 - 1 if fmt == "<Q" else 2 ** 32 - 1
        _poke(hostile, field, fmt, rnd.choice(big + [rnd.randint(0, lim)]) & lim)
        n, iov = _reserve(w, rnd.randint(0, 3 * CAP))
        if n > 0:
            assert _in_data_area(be, 1, iov), (n, _pieces(iov))
            _fill(iov, b"w" * n)
            lib.sbp_ring_commit(w._r, rnd.randint(0, 2 * n))
        lib.sbp_ring_arm_writable_min(w._r, rnd.randint(0, 2 * CAP))
        n, iov = _peek(r, rnd.randint(0, 3 * CAP))
        if n > 0:
            assert _in_data_area(be, 1, iov), (n, _pieces(iov))
            _gather(iov, n)
            lib.sbp_ring_consume(r._r, rnd.randint(0, 2 * n))
        if i % 100 == 0:
            lib.sbp_ring_format(be.region.slot_ptr(1), be.region.info.slot_size, 9)
            w, r = pair(be, slot=1, gen=9)
    for s in (0, 2):
        assert bytes(be.region.slot(s)) == bytes([0x5A]) * be.region.info.slot_size
    del hostile
    if other is not None:
        other.close()


def test_arm_writable_min(be):
    """A writer armed for a minimum of room is rung only once that much is
    free; a plain arm (or a drained ring, whatever the wish) rings at once."""
    w, r = pair(be)
    w.write(os.urandom(CAP))
    assert lib.sbp_ring_arm_writable_min(w._r, 16 << 10) == 0
    r.read(8 << 10)
    assert lib.sbp_ring_peer_waiting(r._r) == 0       # 8 KiB free: not yet
    r.read(4 << 10)
    assert lib.sbp_ring_peer_waiting(r._r) == 0
    r.read(4 << 10)
    assert lib.sbp_ring_peer_waiting(r._r) == 1       # 16 KiB: ring the writer
    # already enough room: not armed, ready
    assert lib.sbp_ring_arm_writable_min(w._r, 16 << 10) == 1
    w.write(os.urandom(16 << 10))
    # a wish above the capacity is the capacity: rung when the ring is empty
    assert lib.sbp_ring_arm_writable_min(w._r, 1 << 40) == 0
    r.read(CAP - 1)
    assert lib.sbp_ring_peer_waiting(r._r) == 0
    r.read(1)
    assert lib.sbp_ring_peer_waiting(r._r) == 1
    # the zero-copy consume honours the wish too
    w.write(os.urandom(CAP))
    assert lib.sbp_ring_arm_writable_min(w._r, 8 << 10) == 0
    assert lib.sbp_ring_peek_iov(r._r, ffi.new("struct iovec[2]"), 1 << 20) == CAP
    assert lib.sbp_ring_consume(r._r, 4 << 10) == 4 << 10
    assert lib.sbp_ring_peer_waiting(r._r) == 0
    assert lib.sbp_ring_peek_iov(r._r, ffi.new("struct iovec[2]"), 1 << 20) == CAP - (4 << 10)
    assert lib.sbp_ring_consume(r._r, 4 << 10) == 4 << 10
    assert lib.sbp_ring_peer_waiting(r._r) == 1
    # a closed reader makes it ready at once
    w.write(os.urandom(8 << 10))
    lib.sbp_ring_close_reader(r._r)
    assert lib.sbp_ring_arm_writable_min(w._r, 16 << 10) == 1
