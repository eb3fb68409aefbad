"""Named probes of what this system offers, each with a concrete reason when
it is missing. Used by `shmbypass up`, `shmbypass doctor` and the tests'
skip reasons."""
import ctypes
import os
from dataclasses import dataclass

from shmbypass import paths
from shmbypass.errors import FeatureMissing, NotRoot


@dataclass
class Probe:
    name: str
    ok: bool
    detail: str


def require_root() -> None:
    if os.geteuid() != 0:
        raise NotRoot("shmbypass must run as root (it loads BPF programs and manages cgroups)")


def cgroup2() -> Probe:
    root = paths.cgroup2_root()
    if root:
        return Probe("cgroup2", True, f"mounted at {root}")
    return Probe("cgroup2", False, "cgroup v2 is not mounted (mount -t cgroup2 none /sys/fs/cgroup/unified)")


def require_cgroup2() -> str:
    p = cgroup2()
    if not p.ok:
        raise FeatureMissing(p.detail)
    return paths.cgroup2_root()


def bpffs_mounted(path: str = paths.BPFFS) -> bool:
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            if fields[4] == path and fields[sep + 1] == "bpf":
                return True
    return False


def ensure_bpffs(path: str = paths.BPFFS) -> None:
    """Mount bpffs at path if it is not mounted yet."""
    if bpffs_mounted(path):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise FeatureMissing(f"cannot mount bpffs at {path}: {e.strerror}") from None
    if libc.mount(b"bpf", path.encode(), b"bpf", 0, b"mode=0711") != 0:
        err = ctypes.get_errno()
        raise FeatureMissing(f"cannot mount bpffs at {path}: {os.strerror(err)}")


def kernel_release() -> str:
    return os.uname().release


def btf() -> Probe:
    ok = os.path.exists("/sys/kernel/btf/vmlinux")
    return Probe("btf", ok, "kernel BTF at /sys/kernel/btf/vmlinux" if ok
                 else "kernel has no BTF (/sys/kernel/btf/vmlinux): CO-RE programs cannot load")


def all_probes() -> list[Probe]:
    from shmbypass import manager  # loading the programs is the real probe
    probes = [Probe("root", os.geteuid() == 0, "running as root" if os.geteuid() == 0 else "not root"),
              cgroup2(), btf()]
    probes.append(manager.probe_programs())
    try:
        from shmbypass import region
        ok, why = region.arena_supported()
        probes.append(Probe("arena", ok, why))
    except ImportError:
        probes.append(Probe("arena", False, "region support not built"))
    return probes
