"""The capture's flag files and flags: /run/<instance>/capture (struct
sbp_cap_ctl, bpf/capture.h), which every interposed process maps read-only,
and the `capture` word of the core's settings map."""
import fcntl
import mmap
import os
import struct

from shmbypass import bpf, memword, paths
from shmbypass._native import ffi, lib

CTL_FILE = "capture"        # /run/<instance>/capture: struct sbp_cap_ctl
RING_DIR = "capture.d"      # the interposers' rings
CTL = struct.Struct("<IIIIQQ")  # struct sbp_cap_ctl
RING_BYTES = 4 << 20        # each process's ring (shm tier), at most
assert CTL.size == ffi.sizeof("struct sbp_cap_ctl")
OFF_ON, OFF_GENERATION, OFF_RING_BYTES, OFF_LEASE = (
    ffi.offsetof("struct sbp_cap_ctl", f) for f in ("on", "generation", "ring_bytes", "lease_ns"))


def ctl_path(inst: paths.Instance) -> str:
    return os.path.join(inst.run_dir, CTL_FILE)


def publish(inst: paths.Instance) -> None:
    """At `up`: the control file every interposed process maps (off), and
    the directory their rings go in (anyone may create an entry; nobody may
    list it or remove another's: 1733, like the inbox)."""
    tmp = ctl_path(inst) + ".tmp"
    with open(tmp, "wb") as f:
        f.write(CTL.pack(lib.SBP_CAPCTL_MAGIC, lib.SBP_CAP_VERSION, 0, 0, RING_BYTES, 0))
    os.chmod(tmp, 0o644)
    os.replace(tmp, ctl_path(inst))
    d = os.path.join(inst.run_dir, RING_DIR)
    os.makedirs(d, exist_ok=True)
    os.chmod(d, 0o1733)


def set_kernel_flag(inst: paths.Instance, on: bool) -> None:
    with bpf.Map.pinned(inst.pin("settings"), "uint32_t", "struct sbp_config") as m:
        cfg = m.lookup(0)
        m.update(0, {"draining": cfg.draining if cfg else 0, "capture": int(on)})


def reset_if_stale(inst: paths.Instance) -> bool:
    """Turn off the flags of a capture that was killed (True if there were
    any). A running capture holds the control file's lock."""
    try:
        fd = os.open(ctl_path(inst), os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # a capture runs
        return reset(inst, fd)
    finally:
        os.close(fd)


def reset(inst: paths.Instance, ctl_fd: int) -> bool:
    """Both flags off (the caller holds the lock); True if one was on."""
    with mmap.mmap(ctl_fd, CTL.size) as m:
        stale = CTL.unpack_from(m)[2] != 0
        memword.store_u32(m, OFF_ON, 0)
    if os.path.exists(inst.pin("settings")):
        with bpf.Map.pinned(inst.pin("settings"), "uint32_t", "struct sbp_config") as s:
            cfg = s.lookup(0)
            stale |= bool(cfg and cfg.capture)
        set_kernel_flag(inst, False)
    return stale
