"""QEMU as the VM pair runs it: processes that die with their launcher, the
KVM probe, and the sweep of what killed launchers left (region files and
run directories named after their pid)."""
import ctypes
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time

from shmbypass.vm.image import BUILD_DIR

QBOOT = "/usr/share/qemu/qboot.rom"
RUN_PREFIX = "sbvm-"  # /dev/shm/sbvm-<pid>-<n>, /run/sbvm-<pid>-<n>/


def set_pdeathsig():
    # QEMU dies with the launcher, even when the launcher is SIGKILLed.
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def sweep_stale():
    """Remove region files and run dirs left by launchers that were killed
    (their QEMUs died with them through PDEATHSIG). Names carry the pid."""
    for base in ("/dev/shm", "/run"):
        try:
            names = os.listdir(base)
        except OSError:
            continue
        for n in names:
            if not n.startswith(RUN_PREFIX):
                continue
            pid = n[len(RUN_PREFIX):].split("-", 1)[0]
            if pid.isdigit() and not _pid_alive(int(pid)):
                p = os.path.join(base, n)
                if os.path.isdir(p) and not os.path.islink(p):
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    try:
                        os.unlink(p)
                    except OSError:
                        pass


def prune_logs(keep=12):
    """Console logs live in build/vm/logs/<pair>-<guest>.log; keep the newest few."""
    d = os.path.join(BUILD_DIR, "logs")
    try:
        logs = sorted((os.path.join(d, n) for n in os.listdir(d)), key=os.path.getmtime, reverse=True)
    except OSError:
        return
    for p in logs[keep:]:
        try:
            os.unlink(p)
        except OSError:
            pass


_KVM_PROBE = os.path.join(BUILD_DIR, "kvm-probe.json")


def kvm_usable(image, timeout=6.0):
    """Does a KVM guest get as far as the kernel's first console line?

    On this kind of host /dev/kvm only runs PVM guests and a normal guest
    hangs in KVM_RUN, so the probe runs under a timeout; its verdict is
    cached per host kernel release.
    """
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False
    key = os.uname().release
    try:
        with open(_KVM_PROBE) as f:
            cache = json.load(f)
        if key in cache:
            return cache[key]
    except (OSError, ValueError):
        cache = {}
    with tempfile.TemporaryDirectory(prefix=RUN_PREFIX + f"{os.getpid()}-kvm", dir="/run") as d:
        log = os.path.join(d, "console")
        proc = subprocess.Popen(
            ["qemu-system-x86_64", "-accel", "kvm", "-nodefaults", "-no-user-config", "-display", "none",
             "-m", "128", "-kernel", image.kernel, "-append", "console=ttyS0 earlyprintk=ttyS0 panic=-1",
             "-chardev", f"file,id=con,path={log}", "-serial", "chardev:con", "-no-reboot"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True, preexec_fn=set_pdeathsig)
        ok = False
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with open(log, "rb") as f:
                    if b"Linux version" in f.read():
                        ok = True
                        break
            except OSError:
                pass
            time.sleep(0.1)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    cache[key] = ok
    os.makedirs(BUILD_DIR, exist_ok=True)
    with open(_KVM_PROBE, "w") as f:
        json.dump(cache, f)
    return ok
