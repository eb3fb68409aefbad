"""What every region backend shares: the errors, the checked geometry, and
:class:`Region`, one mapped region whose header (native/region.h) is checked
by the C code and whose slots and rings are reached only through that
checked, process-local copy."""
import errno
import os
import secrets
import weakref
from dataclasses import dataclass

from shmbypass._native import ffi, lib
from shmbypass.ring import Ring

# The shm tier's slots (one host and VM pairs; native/region.h): 256 KiB
# rings, so 128 slots (64 connections) take 33 MiB.
SLOT_SIZE_DEFAULT = lib.SBP_SLOT_SIZE_DEFAULT
HDR_SIZE = lib.SBP_REGION_HDR_SIZE
PAGE = 4096
# The backend ids kept in the header (SBP_BACKEND_*), by name.
BACKEND_IDS = {"anon": lib.SBP_BACKEND_ANON, "posix": lib.SBP_BACKEND_POSIX,
               "ivshmem": lib.SBP_BACKEND_IVSHMEM}
BACKEND_NAMES = {v: k for k, v in BACKEND_IDS.items()}


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
    """The mapping could not be made."""


@dataclass(frozen=True)
class RegionInfo:
    """The geometry of a checked header (a process-local, trusted copy)."""
    version: int
    slot_count: int
    slot_size: int
    region_size: int
    region_id: int
    backend: int
    owner_uid: int
    ring_capacity: int
    parts: tuple  # ((first_slot, slot_count, owner), ...)


def region_size(slot_count, slot_size):
    """Bytes of a region of slot_count slots; ValueError for a bad geometry."""
    if slot_count < 1:
        raise ValueError("slot_count must be at least 1")
    if lib.sbp_ring_capacity_for(slot_size) == 0 or slot_size % PAGE or \
            slot_size < lib.SBP_REGION_MIN_SLOT or slot_size > lib.SBP_REGION_MAX_SLOT:
        raise ValueError(f"bad slot_size {slot_size}: a multiple of 4096, "
                         f"{lib.SBP_REGION_MIN_SLOT}..{lib.SBP_REGION_MAX_SLOT}")
    return HDR_SIZE + slot_count * slot_size


def check_header(base, size):
    """sbp_region_check() of a mapping: (rc, struct sbp_region_info *)."""
    out = ffi.new("struct sbp_region_info *")
    return lib.sbp_region_check(base, size, out), out


class Region:
    """One mapped region. The backend modules make them (posix, anon,
    ivshmem); every slot access is bounds-checked against the checked
    (local) geometry. The mapping is an mmap object."""

    def __init__(self, backend, size, name=None):
        self.backend = backend
        self.size = size
        self.name = name           # shm name or file
        self._mm = None            # mmap object (posix, anon, ivshmem)
        self._keep = None          # cffi view holding the mmap export
        self._ptr = ffi.NULL       # base address
        self._rings = weakref.WeakSet()
        self._cinfo = None
        self.info = None

    # -- the header ---------------------------------------------------------
    def adopt_mmap(self, mm):
        """Use an mmap object (its whole length) as this region's mapping."""
        self._mm = mm
        self._keep = ffi.from_buffer(mm, require_writable=True)
        self._ptr = ffi.cast("void *", self._keep)

    def format_header(self, slot_size, region_id=None):
        """Write a fresh header over the whole mapping (as many slots as fit)."""
        rid = region_id if region_id is not None else secrets.randbits(64)
        rc = lib.sbp_region_format(self._ptr, self.size, slot_size, rid)
        if rc < 0:
            raise ValueError(f"cannot format a region of {self.size} bytes with slot size {slot_size}")
        lib.sbp_region_set_backend(self._ptr, BACKEND_IDS[self.backend], os.geteuid())
        self.check()

    def check(self):
        """Check the shared header (C) and keep the trusted copy in .info."""
        rc, out = check_header(self._ptr, self.size)
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
            region_size=out.region_size, region_id=out.region_id,
            backend=out.backend, owner_uid=out.owner_uid, ring_capacity=out.ring_capacity,
            parts=tuple((out.parts[i].first_slot, out.parts[i].slot_count, out.parts[i].owner)
                        for i in range(out.nparts)))
        self._cinfo = out

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

    def ring_header(self, index):
        """The ``struct sbp_ring_hdr *`` at the start of slot ``index``
        (shared memory: what it says is untrusted)."""
        return ffi.cast("struct sbp_ring_hdr *", self.slot_ptr(index))

    def ring(self, index, generation, create=False):
        """A :class:`Ring` view of slot ``index``: formatted first if
        ``create`` (writer side), else attached."""
        p = self.slot_ptr(index)
        size = self.info.slot_size
        r = Ring.create(p, generation, size) if create else Ring.attach(p, generation, size)
        self._rings.add(r)
        return r

    # -- teardown ---------------------------------------------------------------
    def close(self):
        """Unmap (rings made by :meth:`ring` are closed first). Idempotent."""
        for r in list(self._rings):
            r.close()
        self._rings = weakref.WeakSet()
        self._unmap()
        self._ptr = ffi.NULL

    def _unmap(self):
        if self._keep is not None:
            ffi.release(self._keep)
            self._keep = None
        if self._mm is not None:
            self._mm.close()   # BufferError if a slot() view is still alive
            self._mm = None

    def destroy(self):
        """Close and remove whatever names the region (a segment), so
        nothing is left behind. Here: nothing has a name."""
        self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        geo = f"{self.info.slot_count}x{self.info.slot_size}" if self.info else "?"
        return f"<Region {self.backend} {self.name or ''} {geo} id={self.info.region_id if self.info else 0:#x}>"
