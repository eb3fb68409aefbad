"""`shmbypass doctor`: every feature, available or not, with the kernel's own
answer. Required lines decide the exit status; optional ones only inform."""
import os
import subprocess
from dataclasses import dataclass

from shmbypass import features, paths, programs, shmtier
from shmbypass.region import ivshmem


@dataclass
class Line:
    name: str
    ok: bool
    detail: str
    required: bool

    def render(self) -> str:
        mark = "ok" if self.ok else ("MISSING" if self.required else "off")
        kind = "" if self.required else " (optional)"
        return f"{mark:<8} {self.name:<10} {self.detail}{kind}"


def _preloads(path: str, what: str) -> tuple[bool, str]:
    """Does the dynamic loader take this library? (It runs /bin/true with it.)"""
    if not os.path.exists(path):
        return False, f"{path} is not built (make setup)"
    r = subprocess.run(["/bin/true"], env=dict(os.environ, LD_PRELOAD=path, SHMBYPASS_DISABLE="1"),
                       capture_output=True, text=True, timeout=10)
    err = r.stderr.strip().splitlines()
    if r.returncode != 0 or err:
        return False, f"{path} does not preload: {(err or ['exit %d' % r.returncode])[-1]}"
    return True, f"{path} preloads ({what})"


def check() -> list[Line]:
    root = os.geteuid() == 0
    out = [Line("root", root, "running as root" if root else
                "not root: `up`, `down` and loading BPF need root", True)]
    for p in (features.cgroup2(), features.bpffs(), features.btf()):
        out.append(Line(p.name, p.ok, p.detail, True))
    core = programs.probe_core()
    out.append(Line("core", core.ok, core.detail, True))
    for f in programs.probe_optional():
        out.append(Line(f.name, f.ok, f.detail, False))
    devs = ivshmem.find_ivshmem()
    out.append(Line("ivshmem", bool(devs), f"ivshmem PCI device at {devs[0]}" if devs else
                    "no ivshmem PCI device (only a VM of an IVSHMEM pair has one)", False))
    ok, why = _preloads(paths.tool("libshmbypass-guard.so"),
                        "works around the kernel tier's spurious EAGAIN")
    out.append(Line("guard", ok, why, True))
    ok, why = _preloads(shmtier.library_path(), "the shm tier's interposer")
    out.append(Line("interposer", ok, why, True))
    return out
