"""Reading the rings a capture's records come through: the kernel tier's BPF
ring buffer (KernelRing) and each interposed process's ring (ProcRing)."""
import mmap
import os
import re
import struct

from shmbypass import memword, paths
from shmbypass._native import ffi, lib
from shmbypass.capture.control import RING_DIR

REC = struct.Struct("<QQQIHH")  # struct sbp_cap_rec
MAX_RINGS = 4096                # interposer rings one capture reads at most
assert REC.size == ffi.sizeof("struct sbp_cap_rec")


RINGBUF_BUSY, RINGBUF_DISCARD, RINGBUF_HDR = 1 << 31, 1 << 30, 8


class KernelRing:
    """A BPF ring buffer map read through its mmap, as libbpf's ring_buffer
    does: the consumer position page (ours, read-write), then the producer
    position page and the data, mapped twice so a record never wraps."""

    def __init__(self, fd: int, size: int):
        self.fd, self.size, self.page = fd, size, mmap.PAGESIZE
        self.cons = mmap.mmap(fd, self.page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.prod = mmap.mmap(fd, self.page + 2 * size, mmap.MAP_SHARED, mmap.PROT_READ,
                              offset=self.page)

    def read(self, out: list) -> None:
        cons = struct.unpack_from("<Q", self.cons)[0]
        prod = struct.unpack_from("<Q", self.prod)[0]
        mask = self.size - 1
        while cons < prod:
            at = self.page + (cons & mask)
            n = struct.unpack_from("<I", self.prod, at)[0]
            if n & RINGBUF_BUSY:
                break
            if not n & RINGBUF_DISCARD:
                out.append(self.prod[at + RINGBUF_HDR:at + RINGBUF_HDR + (n & 0x3FFFFFFF)])
            cons += (RINGBUF_HDR + (n & 0x3FFFFFFF) + 7) & ~7
        memword.store_u64(self.cons, 0, cons)  # the kernel reads it meanwhile

    def close(self) -> None:
        self.cons.close()
        self.prod.close()


SLOT = struct.Struct("<IIQ")   # struct sbp_cap_slot
assert SLOT.size == ffi.sizeof("struct sbp_cap_slot")
SLOT_POS = ffi.offsetof("struct sbp_cap_slot", "pos")
OFF_HEAD = ffi.offsetof("struct sbp_cap_ring", "head")
OFF_TAIL = ffi.offsetof("struct sbp_cap_ring", "tail")
RING_HDR = struct.Struct("<IIIIQQQ")  # magic, version, generation, pid, size, dropped, dropped_bytes
STALL_NS = 1_000_000_000  # a record reserved and never written (its writer died)


class ProcRing:
    """One interposed process's ring (bpf/capture.h, struct sbp_cap_ring).
    The file is its writer's: every value read from it is checked, and a
    bad one costs only this ring's records (counted)."""

    def __init__(self, path: str, generation: int):
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            st = os.fstat(fd)
            size = st.st_size - lib.SBP_CAPRING_DATA
            if (not os.path.isfile(path) or st.st_nlink != 1 or size < lib.SBP_CAPRING_MIN
                    or size > lib.SBP_CAPRING_MAX or size & (size - 1)):
                raise ValueError(f"{path}: not a capture ring")
            self.mm = mmap.mmap(fd, st.st_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        self.path, self.uid, self.size = path, st.st_uid, size
        magic, version, gen, self.pid, hsize, _, _ = RING_HDR.unpack_from(self.mm)
        if (magic, version, gen, hsize) != (lib.SBP_CAPRING_MAGIC, lib.SBP_CAP_VERSION, generation,
                                            size):
            self.mm.close()
            raise ValueError(f"{path}: not ready or not of this capture")
        self.pos = 0  # a ring is made for one capture: its first record is at 0
        self.stuck_since = 0
        self.lost = self.lost_bytes = 0  # what this reader skipped

    def _get(self, pos: int, n: int) -> bytes:
        """n bytes of the data area at ring position pos (wrapping)."""
        base, at = lib.SBP_CAPRING_DATA, pos & (self.size - 1)
        first = min(n, self.size - at)
        b = self.mm[base + at:base + at + first]
        return b + self.mm[base:base + n - first] if first < n else b

    def read(self, out: list, now: int) -> None:
        head = struct.unpack_from("<Q", self.mm, OFF_HEAD)[0]
        pos = self.pos
        if head < pos or head - pos > self.size:
            self._skip(head, "its head moved backwards or past its tail")
            return
        while pos < head:
            # The position word first: its writer stores it last (a
            # length read before it could be the previous lap's).
            spos = struct.unpack("<Q", self._get(pos + SLOT_POS, 8))[0]
            if spos != pos:  # not written yet
                if not self.stuck_since:
                    self.stuck_since = now
                elif now - self.stuck_since > STALL_NS:
                    self.pos = pos
                    self._skip(head, "a record reserved and never written")
                    return
                break
            self.stuck_since = 0
            n = struct.unpack("<I", self._get(pos, 4))[0]
            if n < REC.size or SLOT.size + n > head - pos:
                self.pos = pos
                self._skip(head, "a record longer than what was written")
                return
            out.append(self._get(pos + SLOT.size, n))
            pos += (SLOT.size + n + 7) & ~7
        self.pos = pos
        memword.store_u64(self.mm, OFF_TAIL, pos)  # room for the writers

    def _skip(self, head: int, why: str) -> None:
        if head > self.pos and head - self.pos <= self.size:
            self.lost += 1
            self.lost_bytes += head - self.pos
        else:
            self.lost += 1
        self.pos = max(head, self.pos)
        memword.store_u64(self.mm, OFF_TAIL, self.pos)

    def dropped(self) -> tuple[int, int]:
        """(records, bytes) its writers found no room for, as they say."""
        _, _, _, _, _, recs, nbytes = RING_HDR.unpack_from(self.mm)
        return recs, nbytes

    def close(self) -> None:
        self.mm.close()


class ProcRings:
    """Every interposer ring of this capture's generation, found as they
    appear in /run/<instance>/capture.d/."""

    NAME = re.compile(r"(\d+)-(\d+)-[0-9a-f]{1,16}")

    def __init__(self, inst: paths.Instance, generation: int):
        self.dir = os.path.join(inst.run_dir, RING_DIR)
        self.generation = generation
        self.rings: dict[str, ProcRing] = {}
        self.refused = 0

    def scan(self) -> None:
        try:
            names = os.listdir(self.dir)
        except FileNotFoundError:
            return
        for name in names:
            m = self.NAME.fullmatch(name)
            if name in self.rings or not m or int(m.group(2)) != self.generation:
                continue
            if len(self.rings) >= MAX_RINGS:
                self.refused += 1
                continue
            try:
                self.rings[name] = ProcRing(os.path.join(self.dir, name), self.generation)
            except (OSError, ValueError):
                pass  # not initialized yet, or not a ring: looked at again next time

    def read(self, out: list, now: int) -> None:
        for r in self.rings.values():
            n = len(out)
            r.read(out, now)
            for i in range(n, len(out)):
                out[i] = (r, out[i])

    def close(self, remove: bool) -> None:
        for r in self.rings.values():
            r.close()
        if remove:  # every ring of every capture: none is read any more
            for name in os.listdir(self.dir) if os.path.isdir(self.dir) else ():
                if self.NAME.fullmatch(name):
                    try:
                        os.unlink(os.path.join(self.dir, name))
                    except OSError:
                        pass
