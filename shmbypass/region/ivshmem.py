"""The ``ivshmem`` region backend: one region shared by the two VMs of a
pair, the BAR2 of an ivshmem-plain PCI device in each guest (a file in
/dev/shm on the host).

The HOST formats the region file before the guests boot (the VM pair does
it): a header with one *part* per guest, so each guest's kernel hands out
slots only from its own range and the two kernels never race for a slot.
Each part's owner field holds the guest's name in ASCII ("A" = 0x41), which
is how a guest finds its part (SHMBYPASS_GUEST, or an explicit part number).
A guest never writes the region header; it only maps BAR2 and checks it.
"""
import errno
import mmap
import os
import secrets

from shmbypass._native import ffi, lib
from shmbypass.errors import ShmbypassError
from shmbypass.region.core import (HDR_SIZE, SLOT_SIZE_DEFAULT, Region, RegionCorrupt, RegionError,
                                   RegionVersionMismatch)

IVSHMEM_VENDOR = 0x1AF4
IVSHMEM_DEVICE = 0x1110
PCI_DEVICES = "/sys/bus/pci/devices"
GUESTS = ("A", "B")


class IvshmemNotFound(ShmbypassError, FileNotFoundError):
    """This machine has no ivshmem PCI device (or it has no BAR2)."""


class RegionNotFormatted(RegionCorrupt):
    """The region is all zeros: nobody formatted it (the host should have)."""


class RegionNoPart(RegionError):
    """The region has no part for this guest."""


# -- guest side: the PCI device ----------------------------------------------

def find_ivshmem(pci_root=PCI_DEVICES):
    """sysfs paths of every ivshmem PCI device (vendor 0x1af4, device 0x1110)."""
    found = []
    try:
        names = sorted(os.listdir(pci_root))
    except FileNotFoundError:
        return found
    for n in names:
        d = os.path.join(pci_root, n)
        try:
            with open(os.path.join(d, "vendor")) as f:
                vendor = int(f.read(), 16)
            with open(os.path.join(d, "device")) as f:
                device = int(f.read(), 16)
        except (OSError, ValueError):
            continue
        if (vendor, device) == (IVSHMEM_VENDOR, IVSHMEM_DEVICE):
            found.append(d)
    return found


def open_ivshmem_bar(writable=True, pci_root=PCI_DEVICES):
    """Map BAR2 (the shared memory) of the guest's ivshmem device.

    Returns (mmap, size, sysfs device path). No driver is needed: sysfs
    exposes the BAR as resource2 (root only). Raises IvshmemNotFound when the
    guest has no such device, PermissionError when not root.
    """
    devs = find_ivshmem(pci_root)
    if not devs:
        raise IvshmemNotFound(
            f"no ivshmem PCI device (vendor {IVSHMEM_VENDOR:#06x}, device {IVSHMEM_DEVICE:#06x}) in "
            f"{pci_root}: not a guest started with -device ivshmem-plain")
    dev = devs[0]
    res = os.path.join(dev, "resource2")
    if not os.path.exists(res):
        raise IvshmemNotFound(f"{dev}: ivshmem device without BAR2 (resource2)")
    # Memory decoding may be off when no driver has claimed the device.
    try:
        with open(os.path.join(dev, "enable")) as f:
            enabled = f.read().strip() != "0"
        if not enabled:
            with open(os.path.join(dev, "enable"), "w") as f:
                f.write("1")
    except OSError:
        pass
    flags = os.O_RDWR if writable else os.O_RDONLY
    try:
        fd = os.open(res, flags | os.O_CLOEXEC)
    except PermissionError:
        raise PermissionError(f"{res}: mapping the ivshmem BAR needs root") from None
    try:
        size = os.fstat(fd).st_size
        if size <= 0:
            raise IvshmemNotFound(f"{res}: BAR2 has size 0")
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        m = mmap.mmap(fd, size, mmap.MAP_SHARED, prot)
    finally:
        os.close(fd)
    return m, size, dev


# -- parts and their owners -----------------------------------------------------

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
    try:
        name = raw.decode("ascii")
    except UnicodeDecodeError:
        return None
    return name if name and name.isprintable() else None


def _map_file(path):
    """(mmap, size) of a whole file, read-write."""
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        return mmap.mmap(fd, size), size
    finally:
        os.close(fd)


def format_ivshmem_file(path, guests=GUESTS, slot_size=SLOT_SIZE_DEFAULT, region_id=None):
    """Host side: format the (existing, sized) file behind an ivshmem region
    with one part per guest, slots split evenly. Returns its RegionInfo."""
    mm, size = _map_file(path)
    reg = Region("ivshmem", size, path)
    reg.adopt_mmap(mm)
    try:
        reg.format_header(slot_size, region_id if region_id is not None else secrets.randbits(64) | 1)
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
        reg.check()
        return reg.info
    finally:
        reg.close()


def open_ivshmem(path=None):
    """Guest side: map the ivshmem BAR2 (``path`` = its sysfs resource2 file;
    None: find the device) and check the header. Raises IvshmemNotFound (no
    device), RegionNotFormatted, RegionCorrupt, RegionVersionMismatch, each
    with a one-line message naming the file."""
    if path is None:
        mm, size, dev = open_ivshmem_bar()
        path = os.path.join(dev, "resource2")
    else:
        try:
            mm, size = _map_file(path)
        except FileNotFoundError:
            raise IvshmemNotFound(f"{path}: no such ivshmem BAR") from None
    reg = Region("ivshmem", size, path)
    reg.adopt_mmap(mm)
    try:
        if size >= HDR_SIZE and not any(mm[:HDR_SIZE]):
            raise RegionNotFormatted(errno.EPROTO, f"ivshmem region {path} is not formatted (all zeros): "
                                     "the host formats it before boot")
        try:
            reg.check()
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
