"""What this system offers: named probes of the infrastructure (root,
cgroup v2, bpffs, BTF) and the one place that turns the kernel's refusals
into one-line reasons. Used by `up`, `doctor`, `status` and the tests' skip
reasons."""
import ctypes
import errno
import os
import re
from dataclasses import dataclass

from shmbypass import paths
from shmbypass.errors import FeatureMissing, NotRoot

ENOTSUPP = 524  # the kernel's own "not supported", not in errno


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


def bpffs() -> Probe:
    if bpffs_mounted():
        return Probe("bpffs", True, f"mounted at {paths.BPFFS}")
    return Probe("bpffs", True, f"not mounted at {paths.BPFFS} yet; `up` mounts it (mode 0711)")


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


def btf() -> Probe:
    ok = os.path.exists("/sys/kernel/btf/vmlinux")
    return Probe("btf", ok, "kernel BTF at /sys/kernel/btf/vmlinux" if ok
                 else "kernel has no BTF (/sys/kernel/btf/vmlinux): CO-RE programs cannot load")


# Capability numbers to names (linux/capability.h), for "this process lacks X".
_CAPS = ("CHOWN DAC_OVERRIDE DAC_READ_SEARCH FOWNER FSETID KILL SETGID SETUID SETPCAP "
         "LINUX_IMMUTABLE NET_BIND_SERVICE NET_BROADCAST NET_ADMIN NET_RAW IPC_LOCK IPC_OWNER "
         "SYS_MODULE SYS_RAWIO SYS_CHROOT SYS_PTRACE SYS_PACCT SYS_ADMIN SYS_BOOT SYS_NICE "
         "SYS_RESOURCE SYS_TIME SYS_TTY_CONFIG MKNOD LEASE AUDIT_WRITE AUDIT_CONTROL SETFCAP "
         "MAC_OVERRIDE MAC_ADMIN SYSLOG WAKE_ALARM BLOCK_SUSPEND AUDIT_READ PERFMON BPF "
         "CHECKPOINT_RESTORE").split()


def missing_capabilities() -> list[str]:
    """Capabilities the kernel knows that this process does not have."""
    try:
        with open("/proc/self/status") as f:
            eff = int(next(ln for ln in f if ln.startswith("CapEff:")).split()[1], 16)
        with open("/proc/sys/kernel/cap_last_cap") as f:
            last = int(f.read())
    except (OSError, StopIteration, ValueError):
        return []
    return [f"CAP_{_CAPS[i]}" if i < len(_CAPS) else f"capability {i}"
            for i in range(last + 1) if not eff >> i & 1]


def verifier_ran(log: str) -> bool:
    m = re.search(r"processed (\d+) insns", log)
    return bool(m and int(m.group(1)) > 0)


def refused_by_policy(err: int, log: str = "") -> bool:
    """EPERM before the verifier ran: the kernel's policy, not our code."""
    return err == errno.EPERM and not verifier_ran(log)


def _last_log_line(log: str) -> str:
    lines = [ln.strip() for ln in log.splitlines()
             if ln.strip() and not ln.startswith("libbpf:") and not ln.startswith("--")
             and not ln.startswith("processed ")]
    return lines[-1] if lines else ""


def explain_refusal(err: int, log: str, what: str) -> str:
    """One line: what the kernel refused, its errno, and what that means here.
    err is positive; log is libbpf's (with the verifier's) or empty."""
    name = "ENOTSUPP" if err == ENOTSUPP else errno.errorcode.get(err, str(err))
    if refused_by_policy(err, log):
        who = "as root" if os.geteuid() == 0 else f"as uid {os.geteuid()}"
        lacking = missing_capabilities()
        caps = f"; this process lacks {', '.join(lacking)}" if lacking else ""
        if os.geteuid() != 0 and not lacking:
            caps = "; unprivileged BPF is disabled (kernel.unprivileged_bpf_disabled)"
        return (f"the kernel refused {what} before verification ({name}, {who}): its policy "
                f"(lockdown, a BPF LSM, or a capability) forbids it here{caps}")
    if err in (errno.EOPNOTSUPP, ENOTSUPP, errno.ENOSYS) or "unknown prog type" in log.lower():
        return f"this kernel does not support {what} ({name}: {os.strerror(err)})"
    line = _last_log_line(log)
    if verifier_ran(log) or line:
        return f"the verifier rejected {what} ({name}): {line or 'no log'}"
    return f"the kernel refused {what} ({name}: {os.strerror(err)})"
