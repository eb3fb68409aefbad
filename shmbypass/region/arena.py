"""The ``arena`` region backend: a ``BPF_MAP_TYPE_ARENA`` created with a raw
bpf(2) call (libbpf 1.1 cannot set the 64-bit map_extra), pinned at
``<pin dir>/arena`` and mmapped.

The arena is created with map_extra = the user address, so every process
maps it at that same address (MAP_FIXED_NOREPLACE; the kernel refuses any
other) and learns it from the map info before reading the header, which
keeps it too. Pages are pre-faulted from user space: BPF programs cannot
fault arena pages in. FUTEX_WAIT fails with EFAULT on arena memory, so the
rings' futex words live in a companion POSIX shm segment
``/<instance>-wake`` (same mode); :meth:`ArenaRegion.wait_words` hands them
out. A forked child does not inherit an arena mapping (the kernel does not
copy the VMA): the region maps it again at the same address in the child
(os.register_at_fork)."""
import errno
import os
import weakref

from shmbypass import features, paths
from shmbypass._native import ffi, lib
from shmbypass.region import posix
from shmbypass.region.core import (PAGE, Region, RegionCorrupt, RegionError, RegionExists,
                                   RegionMapError, RegionNotFound, region_size)


class ArenaUnsupported(RegionError):
    pass


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


def _errno_reason(e):
    if e in (errno.EINVAL, errno.EOPNOTSUPP, features.ENOTSUPP):
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
        return ArenaProbe(False, _errno_reason(-fd))
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


def pin_path(pin_dir):
    return os.path.join(pin_dir, "arena")


def wake_name(instance):
    """The companion segment holding the rings' futex words."""
    return f"/{instance or paths.default_instance()}-wake"


def _bpf_rc(rc):
    """libbpf 1.x returns -errno; older modes return -1 and set errno."""
    return -ffi.errno if rc == -1 and ffi.errno else rc


class ArenaRegion(Region):
    """A region in a pinned BPF arena, mapped at the address its map_extra
    names, with its futex words in a companion shm segment."""

    def __init__(self, size, path):
        super().__init__("arena", size, path)
        self._fd = -1              # arena map fd
        self._wake_mm = self._wake_keep = None
        self._wake_name = None
        self._made_dir = None

    @classmethod
    def format(cls, *, instance=None, pin_dir=None, slot_count, slot_size, mode=0o600, uid=None,
               gid=None, region_id=None):
        size = region_size(slot_count, slot_size)
        if size > (1 << 32):
            raise ValueError("an arena region is at most 4 GiB")
        pdir = pin_dir or paths.Instance(instance or paths.default_instance()).pin_dir
        path = pin_path(pdir)
        if os.path.exists(path):
            raise RegionExists(errno.EEXIST, f"arena pin {path} already exists")
        probe = arena_supported()
        if not probe:
            raise ArenaUnsupported(errno.EOPNOTSUPP, probe.reason)
        self = cls(size, path)
        try:
            if pdir.startswith(paths.BPFFS + "/"):
                features.ensure_bpffs(paths.BPFFS)
            if not os.path.isdir(pdir):
                os.makedirs(pdir)
                self._made_dir = pdir
            addr = self._create_and_map(size)
            lib.sbp_prefault(self._ptr, size)   # BPF programs cannot fault arena pages in
            self.format_header(slot_size, region_id, map_addr=addr)
            self._wake_name = wake_name(instance)
            self._adopt_wake(posix.create_segment(self._wake_name, lib.sbp_region_wake_size(slot_count),
                                                  mode, uid, gid))
            rc = _bpf_rc(lib.bpf_obj_pin(self._fd, path.encode()))
            if rc < 0:
                raise RegionError(-rc, f"pin arena at {path}: {os.strerror(-rc)}")
            os.chmod(path, mode)
            if uid is not None or gid is not None:
                os.chown(path, -1 if uid is None else uid, -1 if gid is None else gid)
        except BaseException:
            self.destroy()
            raise
        return self

    def _create_and_map(self, size):
        """Create the arena at a free address and map it there; the address."""
        err = ffi.new("int *")
        for _ in range(8):  # the picked address can be taken before we map it
            addr = lib.sbp_arena_pick_addr(size)
            fd = lib.sbp_arena_create(size // PAGE, addr)
            if fd < 0:
                raise ArenaUnsupported(-fd, _errno_reason(-fd))
            p = lib.sbp_map_shared(fd, addr, size, err)
            if p != ffi.NULL:
                self._fd, self._ptr = fd, p
                self._remap_at_fork()
                return addr
            os.close(fd)
            if err[0] != errno.EEXIST:
                raise RegionMapError(err[0], f"mmap arena: {os.strerror(err[0])}")
        raise RegionMapError(errno.EEXIST, "no free address range for the arena")

    @classmethod
    def open(cls, *, instance=None, pin_dir=None):
        pdir = pin_dir or paths.Instance(instance or paths.default_instance()).pin_dir
        self = cls(0, pin_path(pdir))
        try:
            self._map_pinned()
            self._wake_name = wake_name(instance)
            self._adopt_wake(posix.open_segment(self._wake_name))
            self.check()
            here = int(ffi.cast("uintptr_t", self._ptr))
            if self.info.map_addr != here:
                raise RegionCorrupt(errno.EPROTO, f"{self.name}: header says address "
                                    f"{self.info.map_addr:#x}, arena is at {here:#x}")
        except BaseException:
            self.close()
            raise
        return self

    def _map_pinned(self):
        """Map the pinned arena at the address its map_extra names."""
        if not os.path.exists(self.name):
            raise RegionNotFound(errno.ENOENT, f"no arena pinned at {self.name}")
        fd = _bpf_rc(lib.bpf_obj_get(self.name.encode()))
        if fd < 0:
            raise RegionError(-fd, f"open arena pin {self.name}: {os.strerror(-fd)}")
        self._fd = fd
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

    def _adopt_wake(self, mm):
        self._wake_mm = mm
        self._wake_keep = ffi.from_buffer(mm, require_writable=True)

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

    def wait_words(self, index):
        if self._wake_keep is None:
            return super().wait_words(index)
        self.slot_ptr(index)  # bounds
        base, size = ffi.cast("void *", self._wake_keep), len(self._wake_keep)
        rw = lib.sbp_region_wake_word(base, size, index, 0)
        ww = lib.sbp_region_wake_word(base, size, index, 1)
        if rw == ffi.NULL or ww == ffi.NULL:
            raise RegionCorrupt(errno.EPROTO, f"wake segment too small for slot {index}")
        return rw, ww

    def _unmap(self):
        if self._ptr != ffi.NULL:  # mapped by address, not by an mmap object
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
        self.close()
        if self.name and os.path.exists(self.name):
            os.unlink(self.name)
        if self._wake_name:
            posix.unlink_segment(self._wake_name)
        if self._made_dir:
            try:
                os.rmdir(self._made_dir)
            except OSError:
                pass
