"""Regions: one shared mapping holding a header page and a pool of slots; each
slot holds one ring (shmbypass.ring). The header layout and checks are C
(native/region.c); this module owns the backends:

``shm``    a POSIX shared-memory segment ``/<instance>-region`` (posix_ipc).
           Its file mode and owner decide who may map it (0600 by default).
``arena``  a ``BPF_MAP_TYPE_ARENA`` created with a raw bpf(2) call (libbpf
           1.1 cannot set the 64-bit map_extra), pinned at
           ``<pin dir>/arena`` and mmapped. The arena is created with
           map_extra = the user address, so every process maps it at that same
           address (MAP_FIXED_NOREPLACE; the kernel refuses any other) and
           learns it from the map info before reading the header, which keeps
           it too. Pages are pre-faulted from user space: BPF programs cannot
           fault arena pages in. FUTEX_WAIT fails with EFAULT on arena memory,
           so the rings' futex words live in a companion shm segment
           ``/<instance>-wake`` (same mode); :meth:`Region.ring` wires them.
           A forked child does not inherit an arena mapping (the kernel does
           not copy the VMA): Region maps it again at the same address in the
           child (os.register_at_fork).
``anon``   an anonymous MAP_SHARED mapping, shared with children by fork
           (tests and the raw benchmark).

    reg = Region.format("shm", instance="sbt-1", slot_count=16)
    w = reg.ring(3, generation=42, create=True)
    ...
    reg.destroy()          # unmaps and removes the segment / pin
"""
import errno
import mmap
import os
import secrets
import weakref
from dataclasses import dataclass

import posix_ipc

from . import features, paths
from ._native import ffi, lib
from .ring import Ring

__all__ = [
    "Region", "RegionInfo", "RegionError", "RegionCorrupt", "RegionVersionMismatch",
    "RegionExists", "RegionNotFound", "RegionMapError", "ArenaUnsupported",
    "arena_supported", "default_backend", "remove", "BACKENDS", "SLOT_SIZE_DEFAULT",
]

BACKENDS = ("arena", "shm", "anon")
SLOT_SIZE_DEFAULT = lib.SBP_SLOT_SIZE_DEFAULT
HDR_SIZE = lib.SBP_REGION_HDR_SIZE
PAGE = 4096
_BACKEND_IDS = {"anon": lib.SBP_BACKEND_ANON, "shm": lib.SBP_BACKEND_SHM,
                "arena": lib.SBP_BACKEND_ARENA, "ivshmem": lib.SBP_BACKEND_IVSHMEM}


class RegionError(OSError):
    """Base of every region error."""


class RegionCorrupt(RegionError):
    """The header is garbage, short, or its geometry does not fit the mapping."""


class RegionVersionMismatch(RegionError):
    """The header has our magic but another layout version."""


class RegionExists(RegionError, FileExistsError):
    pass


class RegionNotFound(RegionError, FileNotFoundError):
    pass


class RegionMapError(RegionError):
    """The mapping could not be made (e.g. the arena's address is taken here)."""


class ArenaUnsupported(RegionError):
    pass


@dataclass(frozen=True)
class RegionInfo:
    """The geometry of a checked header (a process-local, trusted copy)."""
    version: int
    slot_count: int
    slot_size: int
    region_size: int
    region_id: int
    map_addr: int
    backend: int
    owner_uid: int
    ring_capacity: int
    parts: tuple  # ((first_slot, slot_count, owner), ...)


class ArenaProbe:
    """Result of :func:`arena_supported`: truthy when usable; unpacks as
    ``ok, reason``."""

    def __init__(self, ok, reason):
        self.ok, self.reason = ok, reason

    def __bool__(self):
        return self.ok

    def __iter__(self):
        return iter((self.ok, self.reason))

    def __repr__(self):
        return f"ArenaProbe(ok={self.ok}, reason={self.reason!r})"


def _arena_errno_reason(e):
    if e in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUPP if hasattr(errno, "ENOTSUPP") else 524):
        return (f"kernel {os.uname().release} has no BPF arena maps "
                f"(BPF_MAP_TYPE_ARENA needs Linux 6.9 or later; map create: {os.strerror(e)})")
    if e == errno.EPERM:
        return features.explain_refusal(e, "", "BPF_MAP_TYPE_ARENA map creation")
    if e == errno.ENOSYS:
        return "this kernel has no bpf() system call"
    if e == errno.ENOMEM:
        return "BPF arena creation failed: out of memory (or memlock limit)"
    return f"BPF arena map create failed: {os.strerror(e)}"


def arena_supported():
    """Can this kernel (and this process) use the arena backend? Creates a
    one-page arena, maps it, touches it and throws it away."""
    fd = lib.sbp_arena_create(1, 0)
    if fd < 0:
        return ArenaProbe(False, _arena_errno_reason(-fd))
    try:
        err = ffi.new("int *")
        p = lib.sbp_map_shared(fd, 0, PAGE, err)
        if p == ffi.NULL:
            return ArenaProbe(False, f"BPF arena cannot be mmapped: {os.strerror(err[0])}")
        lib.sbp_prefault(p, PAGE)
        lib.sbp_unmap(p, PAGE)
    finally:
        os.close(fd)
    return ArenaProbe(True, f"BPF arena maps work on kernel {os.uname().release}")


def default_backend():
    """``arena`` where the kernel supports it, else ``shm``; with the reason."""
    probe = arena_supported()
    return ("arena", probe.reason) if probe else ("shm", probe.reason + "; using POSIX shm")


def _names(instance, pin_dir):
    inst = paths.Instance(instance or paths.default_instance())
    return (f"/{inst.name}-region", f"/{inst.name}-wake",
            pin_dir or inst.pin_dir)


def _region_size(slot_count, slot_size):
    if slot_count < 1:
        raise ValueError("slot_count must be at least 1")
    if lib.sbp_ring_capacity_for(slot_size) == 0 or slot_size % PAGE or \
            slot_size < lib.SBP_REGION_MIN_SLOT or slot_size > lib.SBP_REGION_MAX_SLOT:
        raise ValueError(f"bad slot_size {slot_size}: a multiple of 4096, "
                         f"{lib.SBP_REGION_MIN_SLOT}..{lib.SBP_REGION_MAX_SLOT}")
    return HDR_SIZE + slot_count * slot_size


def _shm_create(name, size, mode, uid, gid):
    try:
        shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=mode, size=size)
    except posix_ipc.ExistentialError:
        raise RegionExists(errno.EEXIST, f"shm segment {name} already exists") from None
    try:
        os.fchmod(shm.fd, mode)  # shm_open applied our umask
        if uid is not None or gid is not None:
            os.fchown(shm.fd, -1 if uid is None else uid, -1 if gid is None else gid)
        mm = mmap.mmap(shm.fd, size)
    except BaseException:
        shm.close_fd()
        shm.unlink()
        raise
    shm.close_fd()
    return mm


def _shm_open(name):
    try:
        shm = posix_ipc.SharedMemory(name)
    except posix_ipc.ExistentialError:
        raise RegionNotFound(errno.ENOENT, f"no shm segment {name}") from None
    except posix_ipc.PermissionsError as e:
        raise RegionError(errno.EACCES, f"shm segment {name}: {e}") from None
    try:
        size = os.fstat(shm.fd).st_size
        if size < HDR_SIZE:
            raise RegionCorrupt(errno.EPROTO, f"shm segment {name} is {size} bytes: no region header")
        return mmap.mmap(shm.fd, size)
    finally:
        shm.close_fd()


def _shm_unlink(name):
    try:
        posix_ipc.unlink_shared_memory(name)
        return True
    except posix_ipc.ExistentialError:
        return False


def _bpf_rc(rc):
    """libbpf 1.x returns -errno; older modes return -1 and set errno."""
    return -ffi.errno if rc == -1 and ffi.errno else rc


class Region:
    """One mapped region. Make one with :meth:`format`, :meth:`open` or
    :meth:`anonymous`; every slot access is bounds-checked against the
    checked (local) geometry."""

    def __init__(self, backend, size, name=None):
        self.backend = backend
        self.size = size
        self.name = name           # shm name or pin path
        self._mm = None            # mmap object (shm, anon)
        self._keep = None          # cffi view holding the mmap export
        self._ptr = ffi.NULL       # base address
        self._fd = -1              # arena map fd
        self._wake_mm = self._wake_keep = None
        self._wake_name = None
        self._made_dir = None
        self._rings = weakref.WeakSet()
        self.info = None

    # -- construction -----------------------------------------------------
    def _adopt_mmap(self, mm):
        self._mm = mm
        self._keep = ffi.from_buffer(mm, require_writable=True)
        self._ptr = ffi.cast("void *", self._keep)

    def _format_header(self, slot_size, region_id, map_addr=0):
        rid = region_id if region_id is not None else secrets.randbits(64)
        rc = lib.sbp_region_format(self._ptr, self.size, slot_size, rid)
        if rc < 0:
            raise ValueError(f"cannot format a region of {self.size} bytes with slot size {slot_size}")
        lib.sbp_region_set_backend(self._ptr, _BACKEND_IDS[self.backend], map_addr, os.geteuid())
        self._check()

    def _check(self):
        out = ffi.new("struct sbp_region_info *")
        rc = lib.sbp_region_check(self._ptr, self.size, out)
        if rc == -errno.EPROTONOSUPPORT:
            raise RegionVersionMismatch(errno.EPROTONOSUPPORT,
                                        f"region {self.name or self.backend}: header version "
                                        f"{ffi.cast('struct sbp_region_hdr *', self._ptr).version}, "
                                        f"this build speaks {lib.SBP_REGION_VERSION}")
        if rc < 0:
            raise RegionCorrupt(errno.EPROTO, f"region {self.name or self.backend}: bad header "
                                "(magic, geometry or size)")
        self.info = RegionInfo(
            version=out.version, slot_count=out.slot_count, slot_size=out.slot_size,
            region_size=out.region_size, region_id=out.region_id, map_addr=out.map_addr,
            backend=out.backend, owner_uid=out.owner_uid, ring_capacity=out.ring_capacity,
            parts=tuple((out.parts[i].first_slot, out.parts[i].slot_count, out.parts[i].owner)
                        for i in range(out.nparts)))
        self._cinfo = out

    @classmethod
    def anonymous(cls, slot_count=4, slot_size=SLOT_SIZE_DEFAULT, region_id=None):
        """A MAP_SHARED anonymous region: shared with processes forked later."""
        size = _region_size(slot_count, slot_size)
        self = cls("anon", size)
        self._adopt_mmap(mmap.mmap(-1, size, flags=mmap.MAP_SHARED))
        self._format_header(slot_size, region_id)
        return self

    @classmethod
    def format(cls, backend, *, instance=None, slot_count=64, slot_size=SLOT_SIZE_DEFAULT,
               mode=0o600, uid=None, gid=None, pin_dir=None, region_id=None):
        """Create and format a new region for ``instance``. Raises
        RegionExists if one is there already (remove it first)."""
        if backend == "anon":
            return cls.anonymous(slot_count, slot_size, region_id)
        size = _region_size(slot_count, slot_size)
        shm_name, wake_name, pdir = _names(instance, pin_dir)
        if backend == "shm":
            self = cls("shm", size, shm_name)
            self._adopt_mmap(_shm_create(shm_name, size, mode, uid, gid))
            try:
                self._format_header(slot_size, region_id)
            except BaseException:
                self.destroy()
                raise
            return self
        if backend == "arena":
            return cls._arena_format(size, slot_size, slot_count, mode, uid, gid, pdir,
                                     wake_name, region_id)
        raise ValueError(f"unknown region backend {backend!r} (one of {', '.join(BACKENDS)})")

    @classmethod
    def _arena_format(cls, size, slot_size, slot_count, mode, uid, gid, pdir, wake_name, region_id):
        if size > (1 << 32):
            raise ValueError("an arena region is at most 4 GiB")
        path = os.path.join(pdir, "arena")
        if os.path.exists(path):
            raise RegionExists(errno.EEXIST, f"arena pin {path} already exists")
        probe = arena_supported()
        if not probe:
            raise ArenaUnsupported(errno.EOPNOTSUPP, probe.reason)
        self = cls("arena", size, path)
        try:
            if pdir.startswith(paths.BPFFS + "/"):
                features.ensure_bpffs(paths.BPFFS)
            if not os.path.isdir(pdir):
                os.makedirs(pdir)
                self._made_dir = pdir
            err = ffi.new("int *")
            for _ in range(8):  # the picked address can be taken before we map it
                addr = lib.sbp_arena_pick_addr(size)
                fd = lib.sbp_arena_create(size // PAGE, addr)
                if fd < 0:
                    raise ArenaUnsupported(-fd, _arena_errno_reason(-fd))
                p = lib.sbp_map_shared(fd, addr, size, err)
                if p != ffi.NULL:
                    break
                os.close(fd)
                if err[0] != errno.EEXIST:
                    raise RegionMapError(err[0], f"mmap arena: {os.strerror(err[0])}")
            else:
                raise RegionMapError(errno.EEXIST, "no free address range for the arena")
            self._fd, self._ptr = fd, p
            self._remap_at_fork()
            lib.sbp_prefault(p, size)   # BPF programs cannot fault arena pages in
            self._format_header(slot_size, region_id, map_addr=addr)
            self._wake_name = wake_name
            self._wake_mm = _shm_create(wake_name, lib.sbp_region_wake_size(slot_count), mode, uid, gid)
            self._wake_keep = ffi.from_buffer(self._wake_mm, require_writable=True)
            rc = _bpf_rc(lib.bpf_obj_pin(fd, path.encode()))
            if rc < 0:
                raise RegionError(-rc, f"pin arena at {path}: {os.strerror(-rc)}")
            os.chmod(path, mode)
            if uid is not None or gid is not None:
                os.chown(path, -1 if uid is None else uid, -1 if gid is None else gid)
        except BaseException:
            self.destroy()
            raise
        return self

    @classmethod
    def open(cls, backend, *, instance=None, pin_dir=None):
        """Map an existing region and check its header."""
        shm_name, wake_name, pdir = _names(instance, pin_dir)
        if backend == "shm":
            self = cls("shm", 0, shm_name)
            mm = _shm_open(shm_name)
            self.size = len(mm)
            self._adopt_mmap(mm)
        elif backend == "arena":
            self = cls("arena", 0, os.path.join(pdir, "arena"))
            self._arena_open(wake_name)
        else:
            raise ValueError(f"cannot open a {backend!r} region by name")
        try:
            self._check()
            if backend == "arena" and self.info.map_addr != int(ffi.cast("uintptr_t", self._ptr)):
                raise RegionCorrupt(errno.EPROTO, f"{self.name}: header says address "
                                    f"{self.info.map_addr:#x}, arena is at {int(ffi.cast('uintptr_t', self._ptr)):#x}")
        except BaseException:
            self.close()
            raise
        return self

    def _arena_open(self, wake_name):
        if not os.path.exists(self.name):
            raise RegionNotFound(errno.ENOENT, f"no arena pinned at {self.name}")
        fd = _bpf_rc(lib.bpf_obj_get(self.name.encode()))
        if fd < 0:
            raise RegionError(-fd, f"open arena pin {self.name}: {os.strerror(-fd)}")
        self._fd = fd
        try:
            t, n, extra, fl = (ffi.new("uint32_t *"), ffi.new("uint32_t *"),
                               ffi.new("uint64_t *"), ffi.new("uint32_t *"))
            rc = lib.sbp_map_query(fd, t, n, extra, fl)
            if rc < 0:
                raise RegionError(-rc, f"query {self.name}: {os.strerror(-rc)}")
            if t[0] != lib.SBP_BPF_MAP_TYPE_ARENA or extra[0] == 0:
                raise RegionCorrupt(errno.EPROTO, f"{self.name} is not a shmbypass arena "
                                    f"(map type {t[0]}, map_extra {extra[0]:#x})")
            self.size = n[0] * PAGE
            err = ffi.new("int *")
            p = lib.sbp_map_shared(fd, extra[0], self.size, err)
            if p == ffi.NULL:
                why = ("that address is already in use in this process" if err[0] == errno.EEXIST
                       else os.strerror(err[0]))
                raise RegionMapError(err[0], f"map arena {self.name} at {extra[0]:#x}: {why}")
            self._ptr = p
            self._remap_at_fork()
            lib.sbp_prefault(p, self.size)
            self._wake_name = wake_name
            self._wake_mm = _shm_open(wake_name)
            self._wake_keep = ffi.from_buffer(self._wake_mm, require_writable=True)
        except BaseException:
            self.close()
            raise

    def _remap_at_fork(self):
        ref = weakref.ref(self)

        def remap():
            reg = ref()
            if reg is None or reg._fd < 0 or reg._ptr == ffi.NULL:
                return
            err = ffi.new("int *")
            addr = int(ffi.cast("uintptr_t", reg._ptr))
            if lib.sbp_map_shared(reg._fd, addr, reg.size, err) == ffi.NULL:
                reg._ptr = ffi.NULL    # unusable here; calls raise "closed"
        os.register_at_fork(after_in_child=remap)

    # -- slots and rings ------------------------------------------------------
    @property
    def region_id(self):
        return self.info.region_id

    @property
    def geometry(self):
        """(slot_count, slot_size, ring_capacity)."""
        return self.info.slot_count, self.info.slot_size, self.info.ring_capacity

    @property
    def slot_count(self):
        return self.info.slot_count

    def slot_ptr(self, index):
        """``void *`` of slot ``index``; IndexError if out of range."""
        if self._ptr == ffi.NULL:
            raise ValueError("region is closed")
        if not isinstance(index, int) or index < 0 or index >= self.info.slot_count:
            raise IndexError(f"slot {index} out of range (0..{self.info.slot_count - 1})")
        p = lib.sbp_region_slot(self._cinfo, self._ptr, index)
        if p == ffi.NULL:
            raise IndexError(f"slot {index} out of range")
        return p

    def slot(self, index):
        """A writable memoryview of slot ``index`` (bounds-checked)."""
        p = self.slot_ptr(index)
        if self._mm is not None:
            off = HDR_SIZE + index * self.info.slot_size
            return memoryview(self._mm)[off:off + self.info.slot_size]
        return memoryview(ffi.buffer(p, self.info.slot_size))

    def wait_words(self, index):
        """(reader, writer) futex words for slot ``index`` outside the slot,
        or (NULL, NULL) where the ring header's own words work."""
        if self._wake_keep is None:
            return ffi.NULL, ffi.NULL
        self.slot_ptr(index)  # bounds
        base, size = ffi.cast("void *", self._wake_keep), len(self._wake_keep)
        rw = lib.sbp_region_wake_word(base, size, index, 0)
        ww = lib.sbp_region_wake_word(base, size, index, 1)
        if rw == ffi.NULL or ww == ffi.NULL:
            raise RegionCorrupt(errno.EPROTO, f"wake segment too small for slot {index}")
        return rw, ww

    def ring(self, index, generation, create=False):
        """A :class:`Ring` view of slot ``index``: formatted first if
        ``create`` (writer side), else attached."""
        p = self.slot_ptr(index)
        size = self.info.slot_size
        r = Ring.create(p, generation, size) if create else Ring.attach(p, generation, size)
        rw, ww = self.wait_words(index)
        if rw != ffi.NULL:
            r.set_wait_words(rw, ww)
            if create:
                rw[0] = ww[0] = 0
        self._rings.add(r)
        return r

    # -- teardown ---------------------------------------------------------------
    def close(self):
        """Unmap (rings made by :meth:`ring` are closed first). Idempotent."""
        for r in list(self._rings):
            r.close()
        self._rings = weakref.WeakSet()
        if self._keep is not None:
            ffi.release(self._keep)
            self._keep = None
        if self._mm is not None:
            self._mm.close()   # BufferError if a slot() view is still alive
            self._mm = None
        elif self._ptr != ffi.NULL:
            lib.sbp_unmap(self._ptr, self.size)
        self._ptr = ffi.NULL
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._wake_keep is not None:
            ffi.release(self._wake_keep)
            self._wake_keep = None
        if self._wake_mm is not None:
            self._wake_mm.close()
            self._wake_mm = None

    def destroy(self):
        """Close and remove the segment / pin so nothing is left behind."""
        self.close()
        if self.backend == "shm" and self.name:
            _shm_unlink(self.name)
        elif self.backend == "arena":
            if self.name and os.path.exists(self.name):
                os.unlink(self.name)
            if self._wake_name:
                _shm_unlink(self._wake_name)
            if self._made_dir:
                try:
                    os.rmdir(self._made_dir)
                except OSError:
                    pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        geo = f"{self.info.slot_count}x{self.info.slot_size}" if self.info else "?"
        return f"<Region {self.backend} {self.name or ''} {geo} id={self.info.region_id if self.info else 0:#x}>"


def remove(instance=None, pin_dir=None):
    """Remove whatever region objects ``instance`` left (for ``down`` and
    test sweeps): the shm segments and the arena pin. Returns what went."""
    shm_name, wake_name, pdir = _names(instance, pin_dir)
    gone = [n for n in (shm_name, wake_name) if _shm_unlink(n)]
    pin = os.path.join(pdir, "arena")
    if os.path.exists(pin):
        os.unlink(pin)
        gone.append(pin)
    return gone


# ---------------------------------------------------------------------------
# ivshmem: one region shared by two VMs (BAR2 of an ivshmem-plain device)
# ---------------------------------------------------------------------------
# The HOST formats the region file before the guests boot (VMPair does it):
# a header with one *part* per guest, so each guest's kernel hands out slots
# only from its own range and the two kernels never race for a slot. Each
# part's owner field holds the guest's name in ASCII ("A" = 0x41), which is
# how a guest finds its part (SHMBYPASS_GUEST, or an explicit part number).
# A guest never writes the region header; it only maps BAR2 and checks it.

IVSHMEM_GUESTS = ("A", "B")
IVSHMEM_SLOT_SIZE = 4096 + (256 << 10)  # as the manager's one-host default


class RegionNotFormatted(RegionCorrupt):
    """The region is all zeros: nobody formatted it (the host should have)."""


class RegionNoPart(RegionError):
    """The region has no part for this guest."""


def guest_tag(name):
    """A part owner value for a guest name: its ASCII bytes, little-endian
    ("A" -> 0x41)."""
    raw = name.encode()
    if not 0 < len(raw) <= 8:
        raise ValueError(f"guest name {name!r}: 1..8 ASCII characters")
    return int.from_bytes(raw, "little")


def tag_guest(owner):
    """The guest name a part owner value stands for, or None."""
    raw = owner.to_bytes(8, "little").rstrip(b"\0")
    return raw.decode() if raw and raw.isascii() and raw.decode().isprintable() else None


def format_ivshmem_file(path, guests=IVSHMEM_GUESTS, slot_size=IVSHMEM_SLOT_SIZE, region_id=None):
    """Host side: format the (existing, sized) file behind an ivshmem region
    with one part per guest, slots split evenly. Returns its RegionInfo."""
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        mm = mmap.mmap(fd, size)
    finally:
        os.close(fd)
    reg = Region("ivshmem", size, path)
    reg._adopt_mmap(mm)
    try:
        reg._format_header(slot_size, region_id if region_id is not None else secrets.randbits(64) | 1)
        n, total = len(guests), reg.info.slot_count
        if not 0 < n <= lib.SBP_REGION_MAX_PARTS or total < n:
            raise ValueError(f"cannot split {total} slots among {n} guests")
        parts = ffi.new("struct sbp_region_part[]", n)
        per = total // n
        for i, g in enumerate(guests):
            parts[i].first_slot = i * per
            parts[i].slot_count = per
            parts[i].owner = guest_tag(g)
        if lib.sbp_region_set_parts(reg._ptr, size, parts, n) < 0:
            raise RegionError(errno.EINVAL, f"{path}: the parts table was refused")
        reg._check()
        return reg.info
    finally:
        reg.close()


def open_ivshmem(path=None):
    """Guest side: map the ivshmem BAR2 (``path`` = its sysfs resource2 file;
    None: find the device) and check the header. Raises IvshmemNotFound (no
    device), RegionNotFormatted, RegionCorrupt, RegionVersionMismatch, each
    with a one-line message naming the file."""
    from . import vm
    if path is None:
        mm, size, dev = vm.open_ivshmem_bar()
        path = os.path.join(dev, "resource2")
    else:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise vm.IvshmemNotFound(f"{path}: no such ivshmem BAR") from None
        try:
            size = os.fstat(fd).st_size
            mm = mmap.mmap(fd, size)
        finally:
            os.close(fd)
    reg = Region("ivshmem", size, path)
    reg._adopt_mmap(mm)
    try:
        if size >= HDR_SIZE and not any(mm[:HDR_SIZE]):
            raise RegionNotFormatted(errno.EPROTO, f"ivshmem region {path} is not formatted (all zeros): "
                                     "the host formats it before boot")
        try:
            reg._check()
        except RegionVersionMismatch:
            raise
        except RegionCorrupt:
            raise RegionCorrupt(errno.EPROTO, f"ivshmem region {path} holds garbage (bad magic, "
                                "geometry or size): not a shmbypass region") from None
        if not reg.info.parts:
            raise RegionNoPart(errno.EPROTO, f"ivshmem region {path} has no parts")
    except BaseException:
        reg.close()
        raise
    return reg


def pick_part(info, guest=None, part=None):
    """(index, first_slot, slot_count) of the part this guest allocates from:
    ``part`` if given, else the part whose owner is ``guest`` (default
    $SHMBYPASS_GUEST)."""
    parts = info.parts
    if part is not None:
        if not 0 <= part < len(parts):
            raise RegionNoPart(errno.ENOENT, f"ivshmem region has {len(parts)} part(s); no part {part}")
        return (part, parts[part][0], parts[part][1])
    guest = guest or os.environ.get("SHMBYPASS_GUEST")
    names = [tag_guest(o) for _, _, o in parts]
    if not guest:
        raise RegionNoPart(errno.ENOENT, "which part of the ivshmem region is ours? set SHMBYPASS_GUEST "
                           f"(parts are owned by {', '.join(str(n) for n in names)}) or pass --part N")
    if guest not in names:
        raise RegionNoPart(errno.ENOENT, f"the ivshmem region has no part for guest {guest} "
                           f"(parts are owned by {', '.join(str(n) for n in names)}); pass --part N")
    i = names.index(guest)
    return (i, parts[i][0], parts[i][1])


def ivshmem_state(slot_count=None, part=None, path=None):
    """What `up --backend ivshmem` records as state["region"]: map BAR2,
    check the header, pick this guest's part, close it again. A missing
    device or a refused region is not an error: region id 0 and no slots
    (the instance comes up for TCP and the kernel tier, BPF never offers
    shm) and `note` says why in one line."""
    def refused(why, device=None):
        return {"backend": "ivshmem", "path": None, "device": device, "region_id": 0,
                "slot_count": 0, "first_slot": 0, "part": None,
                "note": f"{why}; the shm tier is off here (connections use TCP or the kernel tier)"}
    from .errors import ShmbypassError
    try:
        r = open_ivshmem(path)
    except (OSError, ShmbypassError) as e:
        return refused(getattr(e, "strerror", None) or str(e), path)
    try:
        try:
            index, first, count = pick_part(r.info, part=part)
        except RegionNoPart as e:
            return refused(e.strerror, r.name)
        n = count if slot_count is None else max(0, min(slot_count, count))
        return {"backend": "ivshmem", "path": r.name, "region_id": r.region_id, "slot_count": n,
                "first_slot": first, "part": index, "part_slots": count,
                "guest": tag_guest(r.info.parts[index][2]), "note": ""}
    finally:
        r.close()
