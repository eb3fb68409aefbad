"""Regions: one shared mapping holding a header page and a pool of slots; each
slot holds one ring (shmbypass.ring). The header layout and its checks are C
(native/region.c); the backends are one module each:

``posix``    (posix.py) a POSIX shared-memory segment ``/<instance>-region``
``anon``     (anon.py) an anonymous MAP_SHARED mapping, shared by fork
``ivshmem``  (ivshmem.py) the BAR2 of an ivshmem PCI device, shared by the
             two VMs of a pair (formatted by the host, one part per guest)

core.py holds what they share (the Region class, its errors and geometry);
view.py reads a region image without writing it (`vm status`). One-host
connections use none of these: each pair of processes brings its own memory
(pair.py reads it for `status`).

    reg = region.format("posix", instance="sbt-1", slot_count=16)
    w = reg.ring(3, generation=42, create=True)
    ...
    reg.destroy()          # unmaps and removes the segment
"""
from shmbypass.region import posix
from shmbypass.region.anon import anonymous
from shmbypass.region.core import (HDR_SIZE, SLOT_SIZE_DEFAULT, Region, RegionCorrupt,
                                   RegionError, RegionExists, RegionInfo, RegionMapError,
                                   RegionNotFound, RegionVersionMismatch)
from shmbypass.region.ivshmem import (IvshmemNotFound, RegionNoPart, RegionNotFormatted,
                                      format_ivshmem_file, ivshmem_state, open_ivshmem, pick_part)

__all__ = [
    "Region", "RegionInfo", "RegionError", "RegionCorrupt", "RegionVersionMismatch",
    "RegionExists", "RegionNotFound", "RegionMapError",
    "RegionNotFormatted", "RegionNoPart", "IvshmemNotFound",
    "format", "open", "anonymous", "remove", "format_ivshmem_file", "open_ivshmem", "pick_part",
    "ivshmem_state", "BACKENDS", "HDR_SIZE", "SLOT_SIZE_DEFAULT",
]

# The backends a region can be made with by name (ivshmem's is the host's file).
BACKENDS = ("posix", "anon")


def format(backend, *, instance=None, slot_count=64, slot_size=SLOT_SIZE_DEFAULT,  # noqa: A001
           mode=0o600, uid=None, gid=None, region_id=None):
    """Create and format a new region for ``instance``. Raises RegionExists
    if one is there already (remove it first)."""
    if backend == "anon":
        return anonymous(slot_count, slot_size, region_id)
    if backend == "posix":
        return posix.PosixRegion.format(instance=instance, slot_count=slot_count, slot_size=slot_size,
                                        mode=mode, uid=uid, gid=gid, region_id=region_id)
    raise ValueError(f"unknown region backend {backend!r} (one of {', '.join(BACKENDS)})")


def open(backend, *, instance=None):  # noqa: A001
    """Map an existing region of ``instance`` and check its header."""
    if backend == "posix":
        return posix.PosixRegion.open(instance=instance)
    raise ValueError(f"cannot open a {backend!r} region by name")


def remove(instance=None):
    """Remove the region segment ``instance`` left (for ``down`` and test
    sweeps). Returns what went."""
    name = posix.segment_name(instance)
    return [name] if posix.unlink_segment(name) else []
