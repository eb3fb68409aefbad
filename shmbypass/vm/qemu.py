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
    if os.getppid() == 1:
        os._exit(1)     # the launcher died before the prctl: nobody would kill us


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def _qemu_names():
    """{pid: the -name of each qemu-system process} (read from /proc)."""
    found = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if argv and os.path.basename(argv[0]).startswith(b"qemu-system") and b"-name" in argv:
            i = argv.index(b"-name")
            if i + 1 < len(argv):
                found[int(d)] = argv[i + 1].decode(errors="replace")
    return found


def kill_guests(match):
    """SIGKILL every QEMU whose -name match(name) accepts, and wait until it
    is gone (it need not be our child: a launcher that died left it to
    init). Teardown reaps what its bookkeeping may have missed."""
    pids = [pid for pid, name in _qemu_names().items() if match(name)]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(os.path.exists(f"/proc/{p}") for p in pids):
        for p in pids:
            try:
                os.waitpid(p, os.WNOHANG)   # ours: reap it
            except ChildProcessError:
                pass
        time.sleep(0.02)
    return pids


def _launcher_dead(name):
    pid = name[len(RUN_PREFIX):].split("-", 1)[0]
    return pid.isdigit() and not _pid_alive(int(pid))


def sweep_stale():
    """Remove what launchers that were killed left: QEMUs (PDEATHSIG kills
    them with their launcher's thread, but not one started in a race with
    its death), region files and run dirs. Names carry the launcher's pid."""
    kill_guests(lambda n: n.startswith(RUN_PREFIX) and _launcher_dead(n))
    for base in ("/dev/shm", "/run"):
        try:
            names = os.listdir(base)
        except OSError:
            continue
        for n in names:
            if n.startswith(RUN_PREFIX) and _launcher_dead(n):
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
