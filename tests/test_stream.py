"""Pair memory and the streams in it (native/pairmem.c, native/stream.c):
a direction that grows into larger ring areas when its reader falls behind,
shrinks back when idle, hands the rest of the stream to TCP, and whose
reader follows every move with continuous stream positions. The headers
are shared memory: a hostile writer's links are checked, never followed
blindly."""
import hashlib
import mmap
import os
import random

import pytest

from shmbypass._native import ffi, lib

GO_NEXT = lib.SBP_RING_GO_NEXT
A2P = lib.SBP_DIR_A2P


class Region:
    """A pair region of n blocks in anonymous shared memory."""

    def __init__(self, nblocks=2, region_id=0x1234):
        self.size = lib.sbp_pair_region_size(nblocks)
        self.mm = mmap.mmap(-1, self.size, mmap.MAP_SHARED)
        self.base = ffi.from_buffer(self.mm)
        assert lib.sbp_pair_format(self.base, self.size, region_id, nblocks) == 0
        self.info = ffi.new("struct sbp_pair_info *")
        assert lib.sbp_pair_check(self.base, self.size, self.info) == 0

    def areas(self, block, direction):
        a = ffi.new("struct sbp_stream_areas *")
        assert lib.sbp_stream_areas_pair(a, self.info, self.base, block, direction) == 0
        return a

    def writer(self, block=0, gen=1, start=0, direction=A2P):
        s = ffi.new("struct sbp_stream *")
        g = lib.sbp_stream_gen(gen, direction)
        assert lib.sbp_stream_writer_open(s, self.areas(block, direction), g, start) == 0
        return s

    def reader(self, block=0, gen=1, direction=A2P):
        s = ffi.new("struct sbp_stream *")
        g = lib.sbp_stream_gen(gen, direction)
        rc = lib.sbp_stream_reader_open(s, self.areas(block, direction), g)
        return s if rc == 0 else rc

    def area_hdr(self, block, direction, area):
        return ffi.cast("struct sbp_ring_hdr *",
                        lib.sbp_pair_area(self.info, self.base, block, direction, area))


def write(s, data):
    buf = ffi.from_buffer(data)
    return lib.sbp_ring_write(ffi.addressof(s.ring), buf, len(data))


def read(s, n):
    buf = ffi.new("char[]", n)
    iov = ffi.new("struct iovec *", {"iov_base": buf, "iov_len": n})
    got = lib.sbp_stream_readv(s, iov, 1, 0)
    return got if got < 0 else ffi.buffer(buf, got)[:]


def fill(s, data):
    """Write all of data, growing whenever the ring is full."""
    off = 0
    while off < len(data):
        n = write(s, data[off:off + (1 << 20)])
        if n == -11:  # EAGAIN: full
            assert lib.sbp_stream_grow(s) == 1, f"no larger area at {off} bytes"
            continue
        assert n > 0, n
        off += n
    return off


def test_layout_and_header_checks():
    r = Region(3)
    assert r.info.block_count == 3
    caps = [lib.sbp_area_cap(k) for k in range(lib.SBP_AREAS)]
    assert caps == [16 << 10, 256 << 10, 1 << 20, 8 << 20]
    # a largest area that holds what loopback TCP buffers before a writer blocks
    assert sum(caps) > 4 << 20
    bad = ffi.new("struct sbp_pair_info *")
    hdr = ffi.cast("struct sbp_pair_hdr *", r.base)
    assert lib.sbp_pair_check(r.base, r.size - 4096, bad) == -71      # size lies
    hdr.block_count = 10 ** 6
    assert lib.sbp_pair_check(r.base, r.size, bad) == -71
    hdr.block_count = 3
    assert lib.sbp_pair_area(r.info, r.base, 3, A2P, 0) == ffi.NULL  # block out of range
    assert lib.sbp_pair_area(r.info, r.base, 0, 2, 0) == ffi.NULL    # no direction 2
    assert lib.sbp_pair_area(r.info, r.base, 0, A2P, lib.SBP_AREAS) == ffi.NULL


def test_ring_part_starts_where_tcp_stopped():
    r = Region()
    w = r.writer(start=1000)                 # 1000 bytes went over TCP first
    rd = r.reader()
    assert lib.sbp_ring_tail_pos(ffi.addressof(rd.ring)) == 1000
    assert write(w, b"abc") == 3
    assert read(rd, 10) == b"abc"
    assert lib.sbp_ring_tail_pos(ffi.addressof(rd.ring)) == 1003


def test_grow_when_behind_and_read_across_every_move():
    r = Region()
    w, rd = r.writer(), r.reader()
    data = random.Random(1).randbytes(6 << 20)
    assert fill(w, data) == len(data)        # nobody read: it grew instead of blocking
    assert w.area == 3
    got = bytearray()
    while len(got) < len(data):
        chunk = read(rd, 1 << 20)
        assert isinstance(chunk, bytes), chunk
        got += chunk
    assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
    assert rd.area == 3
    # the areas the reader left are marked so the writer may use them again
    for a in range(3):
        assert r.area_hdr(0, A2P, a).flags & lib.SBP_RING_READER_MOVED


def test_shrink_when_idle_gives_memory_back():
    r = Region()
    w, rd = r.writer(), r.reader()
    big = os.urandom(600 << 10)
    fill(w, big)
    while read(rd, 1 << 20) != -11:
        pass
    assert w.area == 2          # 16 KiB, 256 KiB, then 1 MiB
    assert lib.sbp_stream_shrink(w) == 1 and w.area == 0
    data2 = b"after shrink"
    assert write(w, data2) == len(data2)
    assert read(rd, 100) == data2 and rd.area == 0
    # the 1 MiB area's data pages are no longer resident
    hdr = lib.sbp_pair_area(r.info, r.base, 0, A2P, 2)
    data = int(ffi.cast("uintptr_t", hdr)) + lib.SBP_RING_HDR_SIZE
    assert _resident_pages(data, lib.sbp_area_cap(2)) == 0
    # nothing to shrink when already smallest, or when not empty
    assert lib.sbp_stream_shrink(w) == 0


def _resident_pages(addr, size):
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    vec = (ctypes.c_ubyte * (size // 4096))()
    assert libc.mincore(ctypes.c_void_p(addr), ctypes.c_size_t(size), vec) == 0
    return sum(v & 1 for v in vec)


def test_hand_over_to_tcp():
    r = Region()
    w, rd = r.writer(), r.reader()
    write(w, b"last ring bytes")
    lib.sbp_stream_to_tcp(w, 3)
    assert write(w, b"x") == -32              # EPIPE: the ring takes nothing more
    assert read(rd, 100) == b"last ring bytes"
    assert read(rd, 100) == GO_NEXT
    bells = ffi.new("uint64_t *")
    assert lib.sbp_stream_tcp_bells(rd, bells) == 0 and bells[0] == 3


def test_hostile_links_are_refused():
    for case in ("area", "same", "start", "kind", "unformatted"):
        r = Region()
        w, rd = r.writer(), r.reader()
        write(w, b"12345")
        assert read(rd, 5) == b"12345"
        h = r.area_hdr(0, A2P, 0)
        h.next_kind = lib.SBP_NEXT_RING
        h.next_area = {"area": 99, "same": 0}.get(case, 1)
        h.next_start = 5 if case != "start" else 4
        if case == "kind":
            h.next_kind = 77
        if case != "unformatted":
            # a well-formed area 1 so that only the link itself is wrong
            assert lib.sbp_ring_format_at(lib.sbp_pair_area(r.info, r.base, 0, A2P, 1),
                                          lib.sbp_pair_area_slot_size(1), w.gen, 5) == 0
        h.flags |= lib.SBP_RING_LINKED
        assert read(rd, 10) == -71, case       # EPROTO, never a wild read


def test_a_region_slot_is_a_stream_that_never_moves():
    mm = mmap.mmap(-1, 4096 + 65536, mmap.MAP_SHARED)
    a = ffi.new("struct sbp_stream_areas *")
    lib.sbp_stream_areas_slot(a, ffi.from_buffer(mm), len(mm))
    w, rd = ffi.new("struct sbp_stream *"), ffi.new("struct sbp_stream *")
    assert lib.sbp_stream_writer_open(w, a, 5, 0) == 0
    assert lib.sbp_stream_reader_open(rd, a, 5) == 0
    assert write(w, b"x" * 70000) == 65536
    assert lib.sbp_stream_grow(w) == 0                  # nowhere to go
    assert read(rd, 100) == b"x" * 100


def test_another_connections_block_is_not_attached():
    r = Region()
    r.writer(gen=1)
    assert r.reader(gen=2) == -11            # the slot's generation is not ours yet
    r.writer(gen=2)
    assert not isinstance(r.reader(gen=2), int)


def test_two_processes_stream_through_moves():
    """A writer that grows and shrinks under a reader in another process."""
    r = Region()
    w, rd = r.writer(), r.reader()
    total = 32 << 20
    pid = os.fork()
    if pid == 0:
        try:
            rng = random.Random(7)
            sent, h = 0, hashlib.sha256()
            while sent < total:
                chunk = rng.randbytes(min(total - sent, rng.choice([100, 5000, 70000, 300000])))
                off = 0
                while off < len(chunk):
                    n = write(w, chunk[off:])
                    if n == -11:
                        if lib.sbp_stream_grow(w) != 1:
                            lib.sbp_ring_wait_writable(ffi.addressof(w.ring), 10 ** 9)
                        continue
                    off += n
                h.update(chunk)
                sent += len(chunk)
                if rng.random() < 0.05:
                    lib.sbp_stream_shrink(w)
            os.write(1, b"")
            os._exit(0 if sent == total else 1)
        except BaseException:
            os._exit(2)
    got = hashlib.sha256()
    n = 0
    rng = random.Random(7)
    while n < total:
        chunk = read(rd, 1 << 16)
        if chunk == -11:
            lib.sbp_ring_wait_readable(ffi.addressof(rd.ring), 10 ** 9)
            continue
        assert isinstance(chunk, bytes), chunk
        got.update(chunk)
        n += len(chunk)
    _, status = os.waitpid(pid, 0)
    assert status == 0
    want = hashlib.sha256()
    sent = 0
    while sent < total:
        chunk = rng.randbytes(min(total - sent, rng.choice([100, 5000, 70000, 300000])))
        want.update(chunk)
        sent += len(chunk)
        rng.random()
    assert got.digest() == want.digest()
