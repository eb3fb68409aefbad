"""The IVSHMEM VM pair: guest image, two-guest launcher, guest agent client,
BAR2 access inside a guest, and the host's read-only view of a region.

Host side::

    with VMPair() as pair:                 # boots guests A and B (TCG)
        pair.run("A", "ip -br addr")       # -> Result(rc, out, err)
        job = pair.start("B", "python3 server.py")   # runs concurrently
        pair.region_path                   # /dev/shm/sbvm-<pid>-<n>: the shared region

Guest side: ``open_ivshmem_bar()`` maps BAR2 of the ivshmem-plain PCI device.

The guests share the host's filesystem read-only over virtio-9p (so they run
the host's Python, the project's venv and its built binaries in place) with
tmpfs on the writable directories; see vm/README.md. Only the standard library
is imported at module level: ``shmbypass.cli`` imports this module for every
command, and the guest helpers must work before anything is built.

CLI: ``python -m shmbypass.vm build|launch|status`` and ``shmbypass vm ...``.
"""
import atexit
import base64
import ctypes
import dataclasses
import gzip
import hashlib
import io
import itertools
import json
import mmap
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import weakref

from shmbypass.errors import ShmbypassError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILD_DIR = os.path.join(ROOT, "build", "vm")
AGENT_PY = os.path.join(ROOT, "vm", "agent.py")

IVSHMEM_VENDOR = 0x1AF4
IVSHMEM_DEVICE = 0x1110
PCI_DEVICES = "/sys/bus/pci/devices"

KERNEL_META_PKG = "linux-image-amd64"
BUSYBOX = "/bin/busybox"  # from Debian's busybox-static
# What the guest needs from the kernel deb (dependencies are added from each
# module's .modinfo, in load order): the virtio PCI transport, the NIC, the
# agent's serial port, 9p for the root filesystem, and TCP socket diagnostics
# (`ss`, pyroute2's inet_diag, which `shmbypass status` uses).
GUEST_MODULES = ["virtio_pci", "virtio_net", "virtio_console", "9pnet_virtio", "9p", "tcp_diag"]
IMAGE_FORMAT = 2  # bump when the initramfs recipe changes in a way the hash can't see

GUESTS = {  # name -> (guest-internal address on the pair's private link, MAC)
    "A": ("10.77.0.1/24", "52:54:00:77:00:01"),
    "B": ("10.77.0.2/24", "52:54:00:77:00:02"),
}
AGENT_PORT_NAME = "sbvm.agent"
QBOOT = "/usr/share/qemu/qboot.rom"
RUN_PREFIX = "sbvm-"  # /dev/shm/sbvm-<pid>-<n>, /run/sbvm-<pid>-<n>/


class VMError(ShmbypassError):
    """A VM-pair failure; str() is a one-line message."""


class GuestDied(VMError):
    pass


class IvshmemNotFound(VMError, FileNotFoundError):
    pass


# --------------------------------------------------------------------------
# Guest image: kernel + initramfs, from Debian packages only
# --------------------------------------------------------------------------

INIT_SCRIPT = r"""#!/bin/busybox sh
# sbvm guest init: PID 1 in the initramfs. Loads the modules, mounts the
# host's root read-only over virtio-9p at /newroot with tmpfs on the writable
# directories, configures eth0, then hands over to busybox init, which keeps
# the agent (vm/agent.py, run with the host's Python inside a chroot) alive
# and reaps orphans.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
say() { echo "sbvm-init: [$(cut -d' ' -f1 /proc/uptime)] $*" > /dev/console; }
fail() { say "FATAL: $*"; exec sh; }

for m in $(cat /etc/modules.order); do
    insmod /lib/modules/$m.ko || say "insmod $m failed"
done
say "modules loaded"

NAME=guest; IP=; PY=; AGENT=; CWD=/; REPO=
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        sbvm.name=*) NAME=${arg#*=} ;;
        sbvm.ip=*) IP=${arg#*=} ;;
        sbvm.python=*) PY=${arg#*=} ;;
        sbvm.agent=*) AGENT=${arg#*=} ;;
        sbvm.cwd=*) CWD=${arg#*=} ;;
        sbvm.repo=*) REPO=${arg#*=} ;;
    esac
done
hostname "sbvm-$NAME"

R=/newroot
mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose,msize=512000 hostroot $R \
    || fail "cannot mount the host root over 9p"
mount -t proc proc $R/proc
mount -t sysfs sysfs $R/sys
mount -t devtmpfs devtmpfs $R/dev
mkdir -p $R/dev/pts $R/dev/shm
mount -t devpts -o mode=620,ptmxmode=666 devpts $R/dev/pts
mount -t tmpfs -o mode=1777 tmpfs $R/dev/shm
for d in /tmp /var/tmp; do mount -t tmpfs -o mode=1777 tmpfs $R$d; done
for d in /run /mnt; do mount -t tmpfs -o mode=755 tmpfs $R$d; done
mount -t tmpfs -o mode=755 cgroup $R/sys/fs/cgroup
# The project has a share of its own: a checkout under /tmp or /run (CI's
# clone, say) would be hidden by the tmpfs above.
if [ -n "$REPO" ]; then
    mkdir -p $R$REPO 2>/dev/null
    mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose,msize=512000 repo $R$REPO \
        || fail "cannot mount the project at $REPO over 9p"
fi
mkdir $R/sys/fs/cgroup/unified
mount -t cgroup2 cgroup2 $R/sys/fs/cgroup/unified
mount -t bpf -o mode=0700 bpf $R/sys/fs/bpf
mount -t tracefs tracefs $R/sys/kernel/tracing 2>/dev/null
mount -t debugfs debugfs $R/sys/kernel/debug 2>/dev/null

ip link set lo up
if [ -n "$IP" ] && [ -e /sys/class/net/eth0 ]; then
    ip addr add "$IP" dev eth0
    ip link set eth0 up
fi

PORT=
for p in /sys/class/virtio-ports/*; do
    [ "$(cat $p/name 2>/dev/null)" = "@PORTNAME@" ] && PORT=/dev/${p##*/}
done
[ -n "$PORT" ] || fail "no virtio-serial port named @PORTNAME@"
chroot $R /bin/sh -c "[ -x '$PY' ]" || fail "no python at $PY in the host root"
cat > /etc/inittab <<EOF
::respawn:/bin/chroot $R $PY $AGENT --port $PORT --name $NAME --cwd $CWD
::ctrlaltdel:/bin/poweroff -f
EOF
say "root mounted, network up, starting the agent on $PORT"
exec /bin/busybox init
""".replace("@PORTNAME@", AGENT_PORT_NAME)


@dataclasses.dataclass
class GuestImage:
    dir: str
    kernel: str
    initrd: str
    package: str
    version: str
    kernel_release: str


def _apt_field(args, prefix):
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        line = line.strip()
        if line.startswith(prefix):
            return line[len(prefix):].strip()
    raise VMError(f"{' '.join(args)}: no '{prefix}' line")


def kernel_package():
    """(package, version) of the kernel linux-image-amd64 points at, from apt's cache."""
    pkg = _apt_field(["apt-cache", "depends", KERNEL_META_PKG], "Depends: ")
    ver = _apt_field(["apt-cache", "show", "--no-all-versions", pkg], "Version: ")
    return pkg, ver


def _recipe_hash():
    h = hashlib.sha256()
    h.update(f"{IMAGE_FORMAT}\n{INIT_SCRIPT}\n{GUEST_MODULES}\n".encode())
    with open(BUSYBOX, "rb") as f:
        h.update(hashlib.sha256(f.read()).digest())
    return h.hexdigest()[:10]


def _modinfo(path):
    """key -> [values] from a kernel module's .modinfo ELF section."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:4] != b"\x7fELF" or data[4] != 2:
        raise VMError(f"{path}: not an ELF64 module")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)

    def section(i):
        name, _type, _flags, _addr, off, size = struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize)
        return name, off, size
    _, stroff, _ = section(shstrndx)
    info = {}
    for i in range(shnum):
        name, off, size = section(i)
        if data[stroff + name:data.index(b"\0", stroff + name)] == b".modinfo":
            for item in data[off:off + size].split(b"\0"):
                if b"=" in item:
                    k, v = item.decode(errors="replace").split("=", 1)
                    info.setdefault(k, []).append(v)
    return info


def _module_closure(moddir, wanted):
    """Module paths for `wanted` and everything they depend on, in load order."""
    index = {}
    for dirpath, _dirs, files in os.walk(moddir):
        for fn in files:
            if fn.endswith(".ko"):
                index[fn[:-3].replace("-", "_")] = os.path.join(dirpath, fn)
    order, seen = [], set()

    def visit(name):
        name = name.replace("-", "_")
        if name in seen:
            return
        seen.add(name)
        if name not in index:
            raise VMError(f"module {name} not in the kernel package (built in? then drop it)")
        for dep in _modinfo(index[name]).get("depends", [""])[0].split(","):
            if dep:
                visit(dep)
        order.append(name)
    for w in wanted:
        visit(w)
    return [(n, index[n]) for n in order]


class _Cpio:
    """A newc cpio archive written in memory, with fixed mtimes (repeatable)."""

    def __init__(self):
        self.buf = io.BytesIO()
        self.ino = itertools.count(1)

    def _entry(self, name, mode, data=b"", rdev=(0, 0)):
        name_b = name.encode() + b"\0"
        hdr = "070701" + "".join(f"{v:08x}" for v in (
            next(self.ino), mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(name_b), 0))
        self.buf.write(hdr.encode() + name_b)
        self.buf.write(b"\0" * (-(110 + len(name_b)) % 4))
        self.buf.write(data)
        self.buf.write(b"\0" * (-len(data) % 4))

    def dir(self, name):
        self._entry(name, 0o040755)

    def file(self, name, data, mode=0o644):
        self._entry(name, 0o100000 | mode, data)

    def chardev(self, name, major, minor):
        self._entry(name, 0o020600, rdev=(major, minor))

    def finish(self):
        self._entry("TRAILER!!!", 0)
        return self.buf.getvalue()


def _find_image():
    """The newest image already built (for hosts where apt can't answer)."""
    best = None
    if os.path.isdir(BUILD_DIR):
        for d in os.listdir(BUILD_DIR):
            man = os.path.join(BUILD_DIR, d, "manifest.json")
            if os.path.exists(man) and (best is None or os.path.getmtime(man) > os.path.getmtime(best)):
                best = man
    return best


def _extract_pvh_vmlinux(d):
    """Unpack the kernel ELF from the xz-compressed bzImage, when the kernel
    can boot through PVH (QEMU then loads the ELF directly). Under TCG this
    skips the in-guest xz decompression: seconds per boot."""
    with open(os.path.join(d, "config")) as f:
        if "CONFIG_PVH=y\n" not in f.read():
            return False
    with open(os.path.join(d, "vmlinuz"), "rb") as f:
        bz = f.read()
    import lzma
    at = bz.find(b"\xfd7zXZ\x00")
    if at < 0:
        return False
    dec = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
    try:
        elf = dec.decompress(bz[at:])
    except lzma.LZMAError:
        return False
    if not dec.eof or elf[:4] != b"\x7fELF":
        return False
    with open(os.path.join(d, "vmlinux"), "wb") as f:
        f.write(elf)
    return True


def _load_image(manifest):
    with open(manifest) as f:
        m = json.load(f)
    d = os.path.dirname(manifest)
    return GuestImage(d, os.path.join(d, m.get("boot_kernel", "vmlinuz")), os.path.join(d, "initrd.img"),
                      m["package"], m["version"], m["kernel_release"])


def build_image(force=False, log=None):
    """Build (or find in the cache) the guest kernel + initramfs; return a GuestImage.

    Cached in build/vm/<package>_<version>-<recipe hash>/; a second call only
    asks apt's local cache which kernel package is current.
    """
    log = log or (lambda msg: None)
    if not os.path.exists(BUSYBOX):
        raise VMError(f"{BUSYBOX} missing: install Debian's busybox-static (scripts/setup.sh does)")
    try:
        try:
            pkg, ver = kernel_package()
        except (subprocess.CalledProcessError, VMError):
            # no package lists yet (a fresh machine whose packages were all present)
            subprocess.run(["apt-get", "update", "-qq"], check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            pkg, ver = kernel_package()
    except (OSError, subprocess.CalledProcessError, VMError) as e:
        found = _find_image()
        if found and not force:
            return _load_image(found)
        raise VMError(f"cannot ask apt for the kernel package ({e})") from None
    out = os.path.join(BUILD_DIR, f"{pkg}_{ver}-{_recipe_hash()}")
    manifest = os.path.join(out, "manifest.json")
    if os.path.exists(manifest) and not force:
        return _load_image(manifest)

    os.makedirs(BUILD_DIR, exist_ok=True)
    work = tempfile.mkdtemp(prefix=".work-", dir=BUILD_DIR)
    try:
        log(f"downloading {pkg} {ver}")
        # apt's sandbox user can't write into root's build dir: that is only a warning
        subprocess.run(["apt-get", "download", "-q", f"{pkg}={ver}"], cwd=work, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deb, = [f for f in os.listdir(work) if f.endswith(".deb")]
        x = os.path.join(work, "x")
        subprocess.run(["dpkg-deb", "-x", os.path.join(work, deb), x], check=True)
        kernel, = [f for f in os.listdir(os.path.join(x, "boot")) if f.startswith("vmlinuz-")]
        krel = kernel[len("vmlinuz-"):]
        mods = _module_closure(os.path.join(x, "lib", "modules", krel), GUEST_MODULES)
        log(f"kernel {krel}; modules: {' '.join(n for n, _ in mods)}")

        cpio = _Cpio()
        for d in ("bin", "dev", "etc", "proc", "sys", "newroot", "lib", "lib/modules", "tmp"):
            cpio.dir(d)
        cpio.chardev("dev/console", 5, 1)
        cpio.chardev("dev/null", 1, 3)
        with open(BUSYBOX, "rb") as f:
            cpio.file("bin/busybox", f.read(), 0o755)
        cpio.file("init", INIT_SCRIPT.encode(), 0o755)
        cpio.file("etc/modules.order", "".join(f"{n}\n" for n, _ in mods).encode())
        for name, path in mods:
            with open(path, "rb") as f:
                cpio.file(f"lib/modules/{name}.ko", f.read())
        stage = os.path.join(work, "out")
        os.makedirs(stage)
        with open(os.path.join(stage, "initrd.img"), "wb") as f:
            f.write(gzip.compress(cpio.finish(), compresslevel=6, mtime=0))
        shutil.copy(os.path.join(x, "boot", kernel), os.path.join(stage, "vmlinuz"))
        shutil.copy(os.path.join(x, "boot", f"config-{krel}"), os.path.join(stage, "config"))
        boot_kernel = "vmlinuz"
        if _extract_pvh_vmlinux(stage):
            boot_kernel = "vmlinux"
        log(f"boots {boot_kernel}")
        with open(os.path.join(stage, "manifest.json"), "w") as f:
            json.dump({"package": pkg, "version": ver, "kernel_release": krel, "boot_kernel": boot_kernel,
                       "modules": [n for n, _ in mods], "recipe": _recipe_hash()}, f, indent=1)
        if os.path.exists(out):
            shutil.rmtree(out)
        os.rename(stage, out)
        for d in os.listdir(BUILD_DIR):  # images of older recipes or kernels
            old = os.path.join(BUILD_DIR, d)
            if old != out and os.path.exists(os.path.join(old, "manifest.json")):
                shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log(f"image in {out}")
    return _load_image(manifest)


# --------------------------------------------------------------------------
# Launcher: two guests, one ivshmem region, one private link, one agent each
# --------------------------------------------------------------------------

@dataclasses.dataclass
class Result:
    rc: int
    out: str
    err: str
    timed_out: bool = False
    cmd: str = ""
    guest: str = ""

    @property
    def ok(self):
        return self.rc == 0 and not self.timed_out

    def check(self):
        if not self.ok:
            what = "timed out" if self.timed_out else f"exit {self.rc}"
            raise VMError(f"guest {self.guest}: `{self.cmd}` {what}\n--- stdout\n{self.out}\n--- stderr\n{self.err}")
        return self


class Job:
    """A command running in a guest; wait() returns its Result."""

    def __init__(self, agent, rid, cmd):
        self.agent, self.id, self.cmd = agent, rid, cmd
        self._done = threading.Event()
        self._result = None

    def _finish(self, result):
        self._result = result
        self._done.set()

    def done(self):
        return self._done.is_set()

    def wait(self, timeout=None):
        if not self._done.wait(timeout):
            raise TimeoutError(f"guest {self.agent.name}: `{self.cmd}` still running after {timeout}s")
        if isinstance(self._result, Exception):
            raise self._result
        return self._result

    def kill(self):
        """SIGKILL the command's process group in the guest."""
        if not self._done.is_set():
            self.agent.send({"op": "kill", "id": self.id})


class _AgentClient:
    """Host end of one guest's agent channel (a unix socket QEMU listens on)."""

    def __init__(self, name, path):
        self.name, self.path = name, path
        self.sock = None
        self.wlock = threading.Lock()
        self.jobs = {}
        self.ids = itertools.count(1)
        self.hello = threading.Event()
        self.hello_info = None
        self.closed = None  # exception once the channel is gone

    def connect(self, deadline):
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                s.connect(self.path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                s.close()
                if time.monotonic() > deadline:
                    raise VMError(f"guest {self.name}: QEMU never opened {self.path}") from None
                time.sleep(0.02)
        self.sock = s
        threading.Thread(target=self._reader, name=f"sbvm-agent-{self.name}", daemon=True).start()

    def send(self, obj):
        if self.closed:
            raise self.closed
        data = (json.dumps(obj) + "\n").encode()
        with self.wlock:
            self.sock.sendall(data)

    def _reader(self):
        buf = b""
        try:
            while True:
                chunk = self.sock.recv(1 << 16)
                if not chunk:
                    break
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    try:
                        msg = json.loads(line)
                    except ValueError:
                        continue
                    self._dispatch(msg)
        except OSError:
            pass
        self.closed = GuestDied(f"guest {self.name}: agent channel closed (guest gone)")
        for job in list(self.jobs.values()):
            job._finish(self.closed)
        self.jobs.clear()

    def _dispatch(self, msg):
        if msg.get("op") == "hello":
            self.hello_info = msg
            self.hello.set()
        elif msg.get("op") == "result":
            job = self.jobs.pop(msg.get("id"), None)
            if job is not None:
                job._finish(Result(
                    rc=msg["rc"], out=base64.b64decode(msg["out"]).decode(errors="replace"),
                    err=base64.b64decode(msg["err"]).decode(errors="replace"),
                    timed_out=msg.get("timed_out", False), cmd=job.cmd, guest=self.name))

    def wait_hello(self, deadline, alive, fatal):
        """Ping until the agent answers (pings sent before the guest opened
        its port are lost); alive() is False once QEMU has exited, fatal()
        returns the init's FATAL line if it gave up."""
        while not self.hello.wait(0.5):
            if self.closed or not alive():
                raise GuestDied(f"guest {self.name}: QEMU exited during boot")
            msg = fatal()
            if msg:
                raise VMError(f"guest {self.name}: {msg}")
            if time.monotonic() > deadline:
                raise VMError(f"guest {self.name}: no agent after boot timeout")
            self.send({"op": "ping"})
        return self.hello_info

    def start(self, cmd, timeout=None, stdin=b"", env=None, cwd=None):
        rid = next(self.ids)
        job = Job(self, rid, cmd)
        self.jobs[rid] = job
        req = {"op": "exec", "id": rid, "cmd": cmd, "timeout": timeout,
               "stdin": base64.b64encode(stdin).decode()}
        if env:
            req["env"] = env
        if cwd:
            req["cwd"] = cwd
        try:
            self.send(req)
        except Exception:
            self.jobs.pop(rid, None)
            raise
        return job

    def close(self):
        if self.sock is not None:
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self.sock.close()


def _set_pdeathsig():
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


def _prune_logs(keep=12):
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
            start_new_session=True, preexec_fn=_set_pdeathsig)
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


class _Guest:
    def __init__(self, name, proc, agent, log):
        self.name, self.proc, self.agent, self.log = name, proc, agent, log
        self.boot_seconds = None
        self.killed = False

    def alive(self):
        return self.proc.poll() is None


_live_pairs = weakref.WeakSet()
_seq = itertools.count(1)


def _close_all():
    for p in list(_live_pairs):
        p.close()


atexit.register(_close_all)


class VMPair:
    """Two QEMU guests, A and B, sharing one ivshmem-plain region.

    region_size     bytes of the region file (/dev/shm/sbvm-<pid>-<n>)
    region_init     bytes written at the start of the region file before boot
                    (e.g. garbage, for the refusal tests), or None for zeros
    region_format   format the region before boot (the default): a shmbypass
                    region header with one part per guest (part 0 = A, part
                    1 = B) and a random region id (pair.region_id), which each
                    guest's `shmbypass up --backend ivshmem` joins. False:
                    all zeros (an unformatted region). Ignored when
                    region_init is given (those bytes are the point).
    ivshmem         guests that get the ivshmem device (("A",) for the
                    "region absent from one guest" case)
    accel           "tcg" (default), "kvm" or "auto" (KVM if kvm_usable())
    mem_mb, boot_timeout
    cwd             default working directory of guest commands (the repo)
    qemu_args       extra QEMU arguments for both guests

    Always torn down by close() (context manager exit, atexit, SIGTERM/SIGHUP
    in the main thread); QEMU also dies with the launching process
    (PR_SET_PDEATHSIG), and sweep_stale() removes files a killed launcher left.
    """

    def __init__(self, region_size=64 << 20, region_init=None, ivshmem=("A", "B"), accel="tcg",
                 mem_mb=512, boot_timeout=120.0, cwd=ROOT, python=None, image=None, log=None,
                 qemu_args=(), region_format=True):
        self.region_size = region_size
        self.region_init = region_init
        self.region_format = region_format and not region_init
        self.region_id = None
        self.ivshmem = tuple(ivshmem)
        self.accel = accel
        self.mem_mb = mem_mb
        self.boot_timeout = boot_timeout
        self.cwd = cwd
        self.python = python or os.path.join(ROOT, ".venv", "bin", "python")
        self.image = image
        self.logfn = log or (lambda msg: None)
        self.qemu_args = list(qemu_args)
        self.name = f"{RUN_PREFIX}{os.getpid()}-{next(_seq)}"
        self.region_path = os.path.join("/dev/shm", self.name)
        self.run_dir = os.path.join("/run", self.name)
        self.log_dir = os.path.join(BUILD_DIR, "logs")
        self.guests = {}
        self.boot_seconds = None
        self._closed = False
        self._old_handlers = {}

    # -- lifecycle ---------------------------------------------------------
    def __enter__(self):
        try:
            self.boot()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc):
        self.close()

    def _install_signal_handlers(self):
        if threading.current_thread() is not threading.main_thread():
            return

        def handler(signum, frame):
            self.close()
            raise SystemExit(128 + signum)
        for sig in (signal.SIGTERM, signal.SIGHUP):
            if signal.getsignal(sig) in (signal.SIG_DFL, None):
                self._old_handlers[sig] = signal.signal(sig, handler)

    def _restore_signal_handlers(self):
        if threading.current_thread() is not threading.main_thread():
            return
        for sig, h in self._old_handlers.items():
            signal.signal(sig, h)
        self._old_handlers.clear()

    def _qemu_argv(self, name, image, accel):
        ip, mac = GUESTS[name]
        append = " ".join([
            "console=ttyS0", "quiet", "loglevel=3", "panic=-1", "random.trust_cpu=on",
            "mitigations=off", "tsc=reliable", f"sbvm.name={name}", f"sbvm.ip={ip}",
            f"sbvm.python={self.python}", f"sbvm.agent={AGENT_PY}", f"sbvm.cwd={self.cwd}",
            f"sbvm.repo={ROOT}"])
        rd = self.run_dir
        # qboot (from qemu-system-data) skips most of SeaBIOS's work: ~2 s less per boot under TCG
        bios = ["-bios", QBOOT] if os.path.exists(QBOOT) else []
        argv = [
            "qemu-system-x86_64", "-name", f"{self.name}-{name}", *bios,
            "-nodefaults", "-no-user-config", "-display", "none", "-vga", "none", "-no-reboot",
            "-machine", "pc", "-accel", accel, "-cpu", "max" if accel == "tcg" else "host",
            "-smp", "1", "-m", str(self.mem_mb),
            "-kernel", image.kernel, "-initrd", image.initrd, "-append", append,
            "-chardev", f"file,id=con,path={os.path.join(self.log_dir, self.name + '-' + name + '.log')}",
            "-serial", "chardev:con",
            # the host's root, read-only: the guest runs the host's Python and the built tree
            "-fsdev", "local,id=hostroot,path=/,security_model=none,readonly=on,multidevs=remap",
            "-device", "virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot",
            "-fsdev", f"local,id=repo,path={ROOT},security_model=none,readonly=on,multidevs=remap",
            "-device", "virtio-9p-pci,fsdev=repo,mount_tag=repo",
            # the private link: A listens, B connects; nothing else is on it
            "-netdev", (f"stream,id=net0,server={'on' if name == 'A' else 'off'},"
                        f"addr.type=unix,addr.path={os.path.join(rd, 'net.sock')}"),
            "-device", f"virtio-net-pci,netdev=net0,mac={mac},romfile=",  # no PXE ROM: kernel boot
            "-device", "virtio-serial-pci",
            "-chardev", f"socket,id=agent,path={os.path.join(rd, name + '.agent')},server=on,wait=off",
            "-device", f"virtserialport,chardev=agent,name={AGENT_PORT_NAME}",
        ]
        if name in self.ivshmem:
            argv += ["-object", (f"memory-backend-file,id=region,share=on,mem-path={self.region_path},"
                                 f"size={self.region_size}"),
                     "-device", "ivshmem-plain,memdev=region"]
        return argv + self.qemu_args

    def _start_guest(self, name, image, accel):
        argv = self._qemu_argv(name, image, accel)
        log = os.path.join(self.log_dir, f"{self.name}-{name}.log")
        errlog = open(os.path.join(self.run_dir, f"{name}.qemu-stderr"), "wb")
        env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}  # e.g. `make test`'s guard
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=errlog, stderr=errlog, env=env,
                                start_new_session=True, preexec_fn=_set_pdeathsig)
        errlog.close()
        agent = _AgentClient(name, os.path.join(self.run_dir, name + ".agent"))
        g = self.guests[name] = _Guest(name, proc, agent, log)
        try:
            agent.connect(time.monotonic() + 10)
        except VMError:
            raise VMError(f"guest {name}: QEMU failed to start: {self._qemu_stderr(name)}") from None
        return g

    def _qemu_stderr(self, name):
        try:
            with open(os.path.join(self.run_dir, f"{name}.qemu-stderr"), errors="replace") as f:
                return f.read().strip()[-2000:] or "(nothing on stderr)"
        except OSError:
            return "(no stderr)"

    def _init_fatal(self, name):
        try:
            with open(self.guests[name].log, "rb") as f:
                for line in f:
                    if b"sbvm-init: FATAL" in line:
                        return line.decode(errors="replace").strip()
        except OSError:
            pass
        return None

    def console_tail(self, name, n=30):
        try:
            with open(self.guests[name].log, errors="replace") as f:
                return "".join(f.readlines()[-n:])
        except (OSError, KeyError):
            return ""

    def boot(self):
        if shutil.which("qemu-system-x86_64") is None:
            raise VMError("qemu-system-x86_64 missing: install Debian's qemu-system-x86 (scripts/setup.sh does)")
        if not os.path.exists(self.python):
            raise VMError(f"{self.python} missing: the guests run the host's venv (bash scripts/setup.sh)")
        sweep_stale()
        _prune_logs()
        _live_pairs.add(self)
        self._install_signal_handlers()
        image = self.image or build_image(log=self.logfn)
        self.image = image
        accel = self.accel
        if accel == "auto":
            accel = "kvm" if kvm_usable(image) else "tcg"
        self.accel_used = accel
        os.makedirs(self.log_dir, exist_ok=True)
        os.mkdir(self.run_dir, 0o700)
        # The region file: created here (so we own and remove it), mode 0600.
        fd = os.open(self.region_path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, self.region_size)
            if self.region_init:
                os.pwrite(fd, self.region_init[:self.region_size], 0)
        finally:
            os.close(fd)
        if self.region_format:
            self.region_id = format_region_file(self.region_path)["region_id"]

        t0 = time.monotonic()
        deadline = t0 + self.boot_timeout
        self._start_guest("A", image, accel)
        net = os.path.join(self.run_dir, "net.sock")
        while not os.path.exists(net):  # B connects to A's listening link socket
            if not self.guests["A"].alive():
                raise VMError(f"guest A: QEMU exited: {self._qemu_stderr('A')}")
            if time.monotonic() > deadline:
                raise VMError("guest A: link socket never appeared")
            time.sleep(0.02)
        self._start_guest("B", image, accel)
        for name, g in self.guests.items():
            try:
                info = g.agent.wait_hello(deadline, g.alive, lambda: self._init_fatal(name))
            except VMError as e:
                raise VMError(f"{e}; QEMU stderr: {self._qemu_stderr(name)}; console:\n"
                              f"{self.console_tail(name)}") from None
            g.boot_seconds = time.monotonic() - t0
            self.logfn(f"guest {name} up after {g.boot_seconds:.1f}s (guest uptime {info['uptime']:.1f}s)")
        self.boot_seconds = time.monotonic() - t0
        return self

    def close(self):
        """Kill both guests, remove the region file and the run dir. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for g in self.guests.values():
            try:
                os.killpg(g.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            try:
                g.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
            g.agent.close()
        for path in (self.region_path,):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        shutil.rmtree(self.run_dir, ignore_errors=True)
        self._restore_signal_handlers()
        _live_pairs.discard(self)

    # -- using the guests -----------------------------------------------------
    def start(self, guest, cmd, timeout=None, stdin=b"", env=None, cwd=None):
        """Start `cmd` (a /bin/sh command line) in guest A or B; returns a Job.
        timeout: the guest kills the command's process group after that many seconds."""
        g = self.guests[guest]
        if g.killed:
            raise GuestDied(f"guest {guest} was killed")
        if isinstance(stdin, str):
            stdin = stdin.encode()
        return g.agent.start(cmd, timeout=timeout, stdin=stdin, env=env, cwd=cwd)

    def run(self, guest, cmd, timeout=60, check=False, stdin=b"", env=None, cwd=None):
        """Run `cmd` in a guest and wait: Result(rc, out, err, timed_out)."""
        job = self.start(guest, cmd, timeout=timeout, stdin=stdin, env=env, cwd=cwd)
        res = job.wait(None if timeout is None else timeout + 30)
        return res.check() if check else res

    def kill(self, guest):
        """SIGKILL one guest's QEMU (a crash, as far as the other guest can tell)."""
        g = self.guests[guest]
        g.killed = True
        try:
            os.killpg(g.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        g.proc.wait()

    def alive(self, guest):
        return self.guests[guest].alive()

    def qemu_pids(self):
        return [g.proc.pid for g in self.guests.values()]


# --------------------------------------------------------------------------
# Guest side: BAR2 of the ivshmem PCI device
# --------------------------------------------------------------------------

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


# --------------------------------------------------------------------------
# Host view: what a region file holds (read-only, never writes)
# --------------------------------------------------------------------------
# Layout from native/region.h and native/ring.h (the ring helper's contract).

REGION_MAGIC = b"SHMBYPRG"
REGION_VERSION = 1
REGION_HDR_SIZE = 4096
REGION_MIN_SLOT = 8192
REGION_MAX_SLOT = 4096 + (1 << 30)
REGION_MAX_PARTS = 16
_REGION_HDR = struct.Struct("<8sIIIIQQQIIII")  # up to nparts; parts follow at 64
_REGION_PART = struct.Struct("<IIQ")
RING_MAGIC = 0x474E495259424D53  # "SMBYRING"
RING_HDR_SIZE = 4096
_RING_CL0 = struct.Struct("<QQQIII")  # magic, generation, capacity, version, flags, reset_reason
RING_FLAGS = {0x1: "writer-closed", 0x2: "reader-closed", 0x4: "reset"}
BACKENDS = {0: "anon", 1: "shm", 2: "arena", 3: "ivshmem"}


def ring_capacity_for(slot_size):
    room = slot_size - RING_HDR_SIZE
    if room < 4096:
        return 0
    return 1 << (room.bit_length() - 1)


def inspect_region(buf):
    """Parse a region image (bytes-like, read-only use). Returns a dict:
    {"state": "ok"|"empty"|"garbage"|"version-mismatch", "problem": str|None,
     "header": {...}, "parts": [...], "channels": [...]}"""
    rep = {"state": "ok", "problem": None, "size": len(buf), "header": None, "parts": [], "channels": []}
    if len(buf) < _REGION_HDR.size + REGION_MAX_PARTS * _REGION_PART.size:
        return dict(rep, state="garbage", problem=f"too short for a region header ({len(buf)} bytes)")
    (magic, version, hdr_size, slot_count, slot_size, region_size, region_id, map_addr,
     backend, flags, owner_uid, nparts) = _REGION_HDR.unpack_from(buf, 0)
    if magic != REGION_MAGIC:
        if not any(bytes(buf[:REGION_HDR_SIZE])):
            return dict(rep, state="empty", problem="not formatted (header page is all zeros)")
        return dict(rep, state="garbage", problem=f"bad magic {magic!r} (want {REGION_MAGIC!r})")
    hdr = {"magic": magic.decode(), "version": version, "hdr_size": hdr_size, "slot_count": slot_count,
           "slot_size": slot_size, "region_size": region_size, "region_id": f"{region_id:016x}",
           "map_addr": f"{map_addr:#x}", "backend": BACKENDS.get(backend, str(backend)),
           "flags": flags, "owner_uid": owner_uid, "nparts": nparts}
    rep["header"] = hdr
    if version != REGION_VERSION:
        return dict(rep, state="version-mismatch", problem=f"version {version}, this build reads {REGION_VERSION}")
    problems = []
    if hdr_size != REGION_HDR_SIZE:
        problems.append(f"header size {hdr_size} != {REGION_HDR_SIZE}")
    if slot_size % 4096 or not REGION_MIN_SLOT <= slot_size <= REGION_MAX_SLOT:
        problems.append(f"bad slot size {slot_size}")
    if slot_count == 0 or hdr_size + slot_count * slot_size > min(region_size, len(buf)):
        problems.append(f"{slot_count} slots of {slot_size} do not fit in {min(region_size, len(buf))} bytes")
    if region_size > len(buf):
        problems.append(f"region_size {region_size} > mapping {len(buf)}")
    if nparts > REGION_MAX_PARTS:
        problems.append(f"{nparts} parts > {REGION_MAX_PARTS}")
    if problems:
        return dict(rep, state="garbage", problem="; ".join(problems))
    for i in range(nparts):
        first, count, owner = _REGION_PART.unpack_from(buf, 64 + i * _REGION_PART.size)
        if first + count > slot_count:
            return dict(rep, state="garbage", problem=f"part {i} [{first}, +{count}) outside {slot_count} slots")
        rep["parts"].append({"part": i, "first_slot": first, "slot_count": count, "owner": f"{owner:#x}",
                             "guest": _tag_guest(owner)})
    cap = ring_capacity_for(slot_size)
    for s in range(slot_count):
        off = hdr_size + s * slot_size
        rmagic, gen, rcap, rver, rflags, reason = _RING_CL0.unpack_from(buf, off)
        if rmagic != RING_MAGIC:
            continue
        head, writer_waiting = struct.unpack_from("<QI", buf, off + 64)
        tail, reader_waiting = struct.unpack_from("<QI", buf, off + 128)
        part = next((p["part"] for p in rep["parts"]
                     if p["first_slot"] <= s < p["first_slot"] + p["slot_count"]), None)
        # A slot is written by its part's owner and, in a pair, read by the other guest.
        writer = rep["parts"][part]["guest"] if part is not None else None
        others = [p["guest"] for p in rep["parts"] if p["part"] != part]
        reader = others[0] if part is not None and len(others) == 1 else None
        names = [n for bit, n in RING_FLAGS.items() if rflags & bit]
        if tail > head or head - tail > cap or rcap != cap:
            state = "corrupt"
        elif rflags & 0x4:
            state = "reset"
        elif rflags & 0x3 == 0x3:
            state = "closed"
        elif rflags & 0x1:
            state = "fin"
        elif rflags & 0x2:
            state = "reader-closed"
        else:
            state = "live"
        rep["channels"].append({
            "slot": s, "part": part, "writer": writer, "reader": reader,
            "generation": gen, "capacity": cap, "head": head, "tail": tail,
            "queued": (head - tail) if head >= tail else None, "flags": names,
            "reset_reason": reason, "writer_waiting": writer_waiting,
            "reader_waiting": reader_waiting, "state": state})
    return rep


def _tag_guest(owner):
    """A part's owner as a guest name: the host writes the name's ASCII
    bytes ("A" = 0x41; shmbypass.region.guest_tag), else None."""
    raw = owner.to_bytes(8, "little").rstrip(b"\0")
    try:
        name = raw.decode("ascii")
    except UnicodeDecodeError:
        return None
    return name if name and name.isprintable() else None


# States of a channel a host can see (the ring's flags, then who is alive):
#   live           both directions open
#   fin            the writer closed (FIN); the reader may still drain it
#   reader-closed  the reader is gone; the writer gets EPIPE
#   closed         both ends closed: history until the slot is reused
#   reset          reset (RST, a peer that died and was noticed, corruption)
#   dead           not closed, and the writer's or the reader's guest is gone
#   corrupt        head/tail/capacity make no sense
LIVE_STATES = ("live", "fin", "reader-closed")


def region_mappers(path):
    """Who maps the region file now: {guest name: pid} of the QEMU processes
    whose mappings include it (the guest is the last '-' field of QEMU's
    -name, as VMPair names them), plus {"?<pid>": pid} for other mappers.
    Reads /proc only."""
    try:
        st = os.stat(path)
    except OSError:
        return {}
    base = os.path.basename(path)
    found = {}
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == os.getpid():
            continue
        try:
            hit = False
            with open(f"/proc/{d}/maps") as f:
                for line in f:  # addr perms offset dev inode path
                    fields = line.split(None, 5)
                    if (len(fields) == 6 and fields[4] == str(st.st_ino)
                            and os.path.basename(fields[5].rstrip("\n").removesuffix(" (deleted)")) == base):
                        hit = True
                        break
            if not hit:
                continue
            with open(f"/proc/{d}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            continue
        name = None
        if b"-name" in args[:-1]:
            name = args[args.index(b"-name") + 1].decode(errors="replace").rsplit("-", 1)[-1]
        found[name if name else f"?{d}"] = int(d)
    return found


def apply_liveness(rep, mappers):
    """Mark channels whose writer or reader guest is not mapping the region
    any more as dead. Without any mapper (the pair is gone, or this is a
    copy of a region) liveness is unknown and nothing changes."""
    rep["mapped_by"] = {k: v for k, v in sorted(mappers.items())}
    if not mappers:
        for p in rep["parts"]:
            p["alive"] = None
        return rep
    for p in rep["parts"]:
        p["alive"] = p["guest"] in mappers if p["guest"] else None
    for c in rep["channels"]:
        gone = [g for g in (c["writer"], c["reader"]) if g and g not in mappers]
        if gone and c["state"] not in ("closed", "corrupt"):
            c["ring_state"] = c["state"]
            c["state"] = "dead"
            c["dead"] = gone
    return rep


def format_region_file(path, guests=("A", "B"), region_id=None):
    """Host side: format an ivshmem region file (sized already, guests not
    running yet) with one part per guest. Returns region_status(path)."""
    from shmbypass import region  # the native region code: the one format
    region.format_ivshmem_file(path, guests=guests, region_id=region_id)
    rep = region_status(path, liveness=False)
    rep["region_id"] = int(rep["header"]["region_id"], 16)
    return rep


def _native_verdict(rep, buf):
    """Cross-check with the C checker (sbp_region_check, the one the runtime
    trusts) when the native module is built; it has the last word."""
    try:
        from shmbypass._native import ffi, lib
        check = lib.sbp_region_check
    except (ImportError, AttributeError):
        return rep
    out = ffi.new("struct sbp_region_info *")
    rc = check(ffi.from_buffer(buf), len(buf), out)
    if rc < 0 and rep["state"] == "ok":
        rep = dict(rep, state="garbage", problem=f"the native region check refuses it ({rc})", channels=[])
    return rep


def region_status(path, liveness=True):
    """inspect_region() of a region file, mapped read-only (never written),
    with liveness: which guests still map it, channels of a gone guest dead."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return {"state": "garbage", "problem": "empty file", "size": 0, "header": None,
                    "parts": [], "channels": [], "path": path}
        m = mmap.mmap(f.fileno(), size, mmap.MAP_SHARED, mmap.PROT_READ)
    try:
        with memoryview(m) as view:
            rep = _native_verdict(inspect_region(view), view)
    finally:
        m.close()
    rep["path"] = path
    if liveness:
        apply_liveness(rep, region_mappers(path))
    return rep


def render_status(rep):
    lines = [f"region {rep['path']}: {rep['size']} bytes, {rep['state']}"
             + (f": {rep['problem']}" if rep["problem"] else "")]
    h = rep["header"]
    if h:
        lines.append(f"  version {h['version']}  id {h['region_id']}  backend {h['backend']}  "
                     f"{h['slot_count']} slots x {h['slot_size']} B  region_size {h['region_size']}  "
                     f"owner uid {h['owner_uid']}")
    for p in rep["parts"]:
        alive = {True: ", mapped", False: ", GONE", None: ""}[p.get("alive")]
        who = f"guest {p['guest']}" if p.get("guest") else f"owner {p['owner']}"
        lines.append(f"  part {p['part']}: slots {p['first_slot']}..{p['first_slot'] + p['slot_count'] - 1}"
                     f"  {who}{alive}")
    if rep["state"] == "ok":
        live = sum(c["state"] in LIVE_STATES for c in rep["channels"])
        dead = sum(c["state"] == "dead" for c in rep["channels"])
        lines.append(f"  {live} live channel(s)" + (f", {dead} dead" if dead else "")
                     + f", {len(rep['channels'])} ring(s) formatted")
        if rep["channels"]:
            lines.append(f"  {'slot':>5} {'part':>4} {'dir':>4} {'generation':>10} {'head':>14} "
                         f"{'tail':>14} {'queued':>10}  {'state':<13} flags")
            for c in rep["channels"]:
                q = "?" if c["queued"] is None else c["queued"]
                part = "-" if c["part"] is None else c["part"]
                d = f"{c['writer'] or '?'}>{c['reader'] or '?'}" if c.get("writer") else "-"
                lines.append(f"  {c['slot']:>5} {part:>4} {d:>4} {c['generation']:>#10x} {c['head']:>14} "
                             f"{c['tail']:>14} {q:>10}  {c['state']:<13} {','.join(c['flags']) or '-'}")
    return "\n".join(lines)


# --------------------------------------------------------------------------
# Benchmark: guest-to-guest over the virtual NIC's TCP vs the IVSHMEM bypass
# --------------------------------------------------------------------------
# Both transports in one run of one pair: the same sbp-pingpong client in A
# and server in B; "tcp" runs them plainly (virtio-net, the link between the
# two QEMUs), "shm" under `shmbypass run --tier shm` after `up --backend
# ivshmem` in both guests. Under TCG absolute times mean little: the ratios
# are the result. Each figure is the median of `reps` repetitions.

BENCH_INSTANCE = "sbvm-bench"
BENCH_TESTS = (("rtt", 64), ("rtt", 16384), ("stream", 65536))
# issue 4: the bypass's 64 B RTT at least 5x lower, 64 KiB stream at least 3x
BENCH_TARGETS = {"rtt_64": 5.0, "stream_65536": 3.0}


def _spin_cap_ns():
    try:
        from shmbypass._native import lib
        return int(lib.SBP_RING_SPIN_DOORBELL_MAX_NS)
    except (ImportError, AttributeError):
        return 0

# Runs in guest A: drive one sbp-pingpong client over its stdin, look at the
# connection's tier after the first exchange, print one JSON line per result.
_BENCH_DRIVER = r"""
import json, subprocess, sys, time
addr, seconds, reps, wrap = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
tests = [("rtt", 64), ("rtt", 16384), ("stream", 65536)]
pp = "@PINGPONG@"
for _ in range(300):  # the server may still be starting
    c = subprocess.Popen(wrap + [pp, "client", addr, "--stdin"], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    c.stdin.write("rtt 64 0.2 10\n"); c.stdin.flush()
    first = c.stdout.readline()
    if first:
        break
    c.wait(); time.sleep(0.2)
else:
    sys.exit("no connection to " + addr)
tiers = []
try:
    from shmbypass import paths, status
    port = addr.rsplit(":", 1)[1]
    tiers = [r["tier"] + (":" + r["reason"] if r["reason"] else "")
             for r in status.connections(paths.Instance.current()) if r["remote"].endswith(":" + port)]
except Exception as e:  # not up: plain TCP
    tiers = ["status: %s" % e]
print(json.dumps({"tiers": tiers}), flush=True)
for rep in range(reps):
    for kind, size in tests:
        c.stdin.write("%s %d %s\n" % (kind, size, seconds)); c.stdin.flush()
        line = c.stdout.readline()
        if not line:
            sys.exit("client ended early")
        r = json.loads(line); r["rep"] = rep
        print(json.dumps(r), flush=True)
c.stdin.write("quit\n"); c.stdin.close(); c.wait()
"""


def _median(xs):
    xs = sorted(xs)
    n = len(xs)
    return None if not n else xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2


def bench_pair(seconds=2.0, reps=3, pair=None, log=None):
    """Guest-to-guest 64 B and 16 KiB RTT and 64 KiB stream throughput over
    the pair's TCP and through the IVSHMEM bypass, in one run. Boots its own
    pair unless given one (with a formatted region). Returns a report dict
    with per-transport medians and the shm/tcp ratios."""
    log = log or (lambda m: None)
    own = pair is None
    if own:
        pair = VMPair(log=log)
        pair.boot()
    py = pair.python
    pingpong = os.path.join(ROOT, "shmbypass", "_bin", "sbp-pingpong")
    shm = [py, "-m", "shmbypass", "run", "--tier", "shm", "--"]
    env = {"SHMBYPASS_INSTANCE": BENCH_INSTANCE}
    for var in ("SHMBYPASS_BPF_DIR", "SHMBYPASS_PRELOAD", "SHMBYPASS_SPIN_NS"):  # other builds, tuning
        if os.environ.get(var):
            env[var] = os.environ[var]
    rep = {"when": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
           "host": {"kernel": os.uname().release, "cpus": os.cpu_count(),
                    "loadavg_start": os.getloadavg()},
           "seconds": seconds, "reps": reps, "accel": getattr(pair, "accel_used", None),
           "spin_ns": env.get("SHMBYPASS_SPIN_NS"),
           "spin": (f"SHMBYPASS_SPIN_NS={env['SHMBYPASS_SPIN_NS']}" if env.get("SHMBYPASS_SPIN_NS")
                    else "doorbell mode default: calibrated to the doorbell's cost, "
                         "at most %d us" % (_spin_cap_ns() // 1000)),
           "preload": env.get("SHMBYPASS_PRELOAD"), "bpf_dir": env.get("SHMBYPASS_BPF_DIR"),
           "boot_seconds": pair.boot_seconds,
           "transports": {}, "ratios": {}, "targets": dict(BENCH_TARGETS), "met": {},
           "rows": [], "warnings": []}
    try:
        ups = [pair.start(g, f"{py} -m shmbypass up --backend ivshmem", env=env, timeout=180) for g in "AB"]
        for g, job in zip("AB", ups):
            r = job.wait(240)
            rep.setdefault("up", {})[g] = (r.out + r.err).strip()
            if r.rc:
                rep["warnings"].append(f"up in guest {g} failed: {r.err.strip()}")
        for i, (name, wrap) in enumerate((("tcp", []), ("shm", shm))):
            port = 7300 + i
            log(f"{name}: server in B, client in A, {reps} x {len(BENCH_TESTS)} figures of {seconds} s")
            server = pair.start("B", " ".join(wrap + [pingpong, "server", f"{GUESTS['B'][0].split('/')[0]}:{port}"]),
                                env=env, timeout=600)
            driver = _BENCH_DRIVER.replace("@PINGPONG@", pingpong)
            res = pair.run("A", " ".join([py, "-", f"{GUESTS['B'][0].split('/')[0]}:{port}", str(seconds),
                                          str(reps)] + wrap), stdin=driver, env=env,
                           timeout=120 + 3 * reps * len(BENCH_TESTS) * seconds * 4)
            server.kill()
            rows = [json.loads(ln) for ln in res.out.splitlines() if ln.startswith("{")]
            rep["rows"] += [dict(r, transport=name) for r in rows if "op" in r]
            t = rep["transports"][name] = {"tiers": next((r["tiers"] for r in rows if "tiers" in r), None),
                                           "rc": res.rc, "error": res.err.strip()[-500:] if res.rc else None}
            for kind, size in BENCH_TESTS:
                rs = [r for r in rows if r.get("op") == kind and r.get("size") == size]
                key = f"{kind}_{size}"
                if kind == "rtt":
                    t[key] = {"p50_us": _median([r["p50_ns"] / 1e3 for r in rs]),
                              "p99_us": _median([r["p99_ns"] / 1e3 for r in rs]),
                              "cpu_us_per_op": _median([(r["client_cpu_s"] + r["server_cpu_s"]) * 1e6 / r["iters"]
                                                        for r in rs if r.get("iters")])}
                else:
                    t[key] = {"GBps": _median([r["gbps"] for r in rs])}  # sbp-pingpong: 1e9 bytes/s
            if name == "shm" and not all(str(x).startswith("shm") for x in t["tiers"] or ["none"]):
                rep["warnings"].append(f"the IVSHMEM bypass did not engage: A's status shows {t['tiers']}; "
                                       "its figures are TCP's")
                t["engaged"] = False
            elif name == "shm":
                t["engaged"] = True
        tcp, shmt = rep["transports"].get("tcp", {}), rep["transports"].get("shm", {})
        for kind, size in BENCH_TESTS:
            key = f"{kind}_{size}"
            a, b = tcp.get(key) or {}, shmt.get(key) or {}
            if not shmt.get("engaged"):
                continue  # TCP against TCP: no ratio
            if kind == "rtt" and a.get("p50_us") and b.get("p50_us"):
                rep["ratios"][key] = a["p50_us"] / b["p50_us"]   # > 1: the bypass is faster
            elif kind == "stream" and a.get("GBps") and b.get("GBps"):
                rep["ratios"][key] = b["GBps"] / a["GBps"]
        for key, want in BENCH_TARGETS.items():
            got = rep["ratios"].get(key)
            rep["met"][key] = got is not None and got >= want
        rep["host"]["loadavg_end"] = os.getloadavg()
    finally:
        if own:
            pair.close()
    return rep


def _bench_cells(rep):
    """Per figure: (key, kind, size, TCP text, bypass text, ratio or None)."""
    tcp, shmt = rep["transports"].get("tcp", {}), rep["transports"].get("shm", {})
    for kind, size in BENCH_TESTS:
        key = f"{kind}_{size}"
        a, b = tcp.get(key) or {}, shmt.get(key) or {}
        if kind == "rtt":
            fa = f"{a['p50_us']:.1f} us" if a.get("p50_us") else "-"
            fb = f"{b['p50_us']:.1f} us" if b.get("p50_us") else "-"
        else:
            fa = f"{a['GBps'] * 8:.3f} Gbit/s" if a.get("GBps") else "-"
            fb = f"{b['GBps'] * 8:.3f} Gbit/s" if b.get("GBps") else "-"
        yield key, kind, size, fa, fb, rep["ratios"].get(key)


def render_bench_markdown(rep):
    """The report as Markdown (vm-bench.md): the table, the targets, the set-up."""
    out = ["# shmbypass vm bench", "",
           f"Run of {rep.get('when', '?')}: guest A (client) to guest B (server), "
           f"{rep.get('accel') or '?'}, median of {rep['reps']} x {rep['seconds']} s per figure; "
           f"host kernel {rep.get('host', {}).get('kernel', '?')}, "
           f"{rep.get('host', {}).get('cpus', '?')} CPUs, load "
           f"{' '.join(f'{x:.1f}' for x in rep.get('host', {}).get('loadavg_start', ()))} at the start. "
           f"Spin: {rep.get('spin') or rep.get('spin_ns') or 'default'}.", "",
           "| figure | TCP (virtio-net) | IVSHMEM bypass | ratio | target |",
           "|---|---|---|---|---|"]
    tcp, shmt = rep["transports"].get("tcp", {}), rep["transports"].get("shm", {})
    for key, kind, size, fa, fb, r in _bench_cells(rep):
        label = f"{size} B RTT p50" if kind == "rtt" else f"{size >> 10} KiB stream"
        want = rep.get("targets", {}).get(key)
        tgt = "-" if want is None else f">= {want:g}x: {'met' if rep.get('met', {}).get(key) else 'NOT met'}"
        out.append(f"| {label} | {fa} | {fb} | {f'{r:.1f}x' if r else '-'} | {tgt} |")
    out.append("")
    for kind, size in BENCH_TESTS:
        if kind != "rtt":
            continue
        key = f"{kind}_{size}"
        a, b = tcp.get(key) or {}, shmt.get(key) or {}
        if a.get("p99_us") and b.get("p99_us"):
            out.append(f"- {size} B RTT p99: TCP {a['p99_us']:.1f} us, bypass {b['p99_us']:.1f} us; "
                       f"CPU per round trip (both programs): TCP {a.get('cpu_us_per_op') or 0:.1f} us, "
                       f"bypass {b.get('cpu_us_per_op') or 0:.1f} us")
    for name in ("tcp", "shm"):
        t = rep["transports"].get(name, {})
        out.append(f"- {name}: connection tiers seen in A: {t.get('tiers')}"
                   + (f"; error: {t['error']}" if t.get("error") else ""))
    out += [f"- warning: {w}" for w in rep["warnings"]]
    out += ["", "Ratios: TCP p50 / bypass p50 for RTT, bypass / TCP for the stream (> 1: the "
            "bypass wins). Under TCG absolute times mean little; the ratios are the result.", ""]
    return "\n".join(out)


def write_bench_outputs(rep, out_dir):
    """vm-bench.json and vm-bench.md in out_dir; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths_ = {"json": os.path.join(out_dir, "vm-bench.json"), "markdown": os.path.join(out_dir, "vm-bench.md")}
    with open(paths_["json"], "w") as f:
        json.dump(rep, f, indent=1)
    with open(paths_["markdown"], "w") as f:
        f.write(render_bench_markdown(rep))
    return paths_


def render_bench(rep):
    lines = [f"guest-to-guest, {rep.get('accel') or '?'}; median of {rep['reps']} x {rep['seconds']} s; "
             f"spin {rep.get('spin_ns') or 'default'} ns",
             f"{'figure':<16} {'TCP (virtio-net)':>18} {'IVSHMEM bypass':>18} {'ratio':>8}"]
    for key, kind, size, fa, fb, r in _bench_cells(rep):
        label = f"RTT {size} B p50" if kind == "rtt" else f"stream {size >> 10} KiB"
        lines.append(f"{label:<16} {fa:>18} {fb:>18} {f'{r:.1f}x' if r else '-':>8}")
    for name in ("tcp", "shm"):
        t = rep["transports"].get(name, {})
        lines.append(f"{name}: tiers seen {t.get('tiers')}" + (f"; error: {t['error']}" if t.get("error") else ""))
    lines += [f"warning: {w}" for w in rep["warnings"]]
    return "\n".join(lines)


# --------------------------------------------------------------------------
# CLI: `shmbypass vm ...` and `python -m shmbypass.vm ...`
# --------------------------------------------------------------------------

def bar_status():
    """inspect_region() of this guest's ivshmem BAR2, mapped read-only."""
    m, size, dev = open_ivshmem_bar(writable=False)
    try:
        with memoryview(m) as view:
            rep = _native_verdict(inspect_region(view), view)
    finally:
        m.close()
    rep["path"] = os.path.join(dev, "resource2")
    return rep


def _cmd_status(args):
    try:
        rep = bar_status() if args.region == "ivshmem" else region_status(args.region)
    except OSError as e:
        print(f"shmbypass vm status: {args.region}: {e.strerror or e}", file=sys.stderr)
        return 1
    print(json.dumps(rep, indent=1) if args.json else render_status(rep))
    return 0 if rep["state"] in ("ok", "empty") else 2


def _cmd_format(args):
    rep = format_region_file(args.region, guests=tuple(g.strip() for g in args.guests.split(",")),
                             region_id=args.region_id)
    print(render_status(rep))
    return 0


def _cmd_bench(args):
    if args.spin_ns is not None:
        os.environ["SHMBYPASS_SPIN_NS"] = str(args.spin_ns)
    rep = bench_pair(seconds=args.seconds, reps=args.reps,
                     log=lambda m: print(f"vm bench: {m}", file=sys.stderr))
    print(render_bench(rep))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rep, f, indent=1)
    if args.out:
        for kind, path in write_bench_outputs(rep, args.out).items():
            print(f"vm bench: {kind}: {path}", file=sys.stderr)
    engaged = rep["transports"].get("shm", {}).get("engaged")
    return 0 if engaged else 1


def _cmd_build(args):
    img = build_image(force=args.force, log=lambda m: print(f"vm build: {m}", file=sys.stderr))
    print(f"kernel {img.kernel}\ninitrd {img.initrd}\npackage {img.package} {img.version}")
    return 0


def _cmd_launch(args):
    def log(m):
        print(f"vm: {m}", file=sys.stderr)
    init = os.urandom(args.garbage) if args.garbage else None
    ivs = tuple(args.ivshmem.split(",")) if args.ivshmem else ("A", "B")
    with VMPair(region_size=args.region_mb << 20, region_init=init, ivshmem=ivs,
                accel=args.accel, log=log, region_format=not args.no_format) as pair:
        log(f"pair up in {pair.boot_seconds:.1f}s ({pair.accel_used}); region {pair.region_path}"
            + (f" (id {pair.region_id:016x}, part 0 = A, part 1 = B)" if pair.region_id else ""))
        rc = 0
        for spec in args.exec or []:
            guest, _, cmd = spec.partition(":")
            res = pair.run(guest.strip(), cmd, timeout=args.timeout)
            sys.stdout.write(res.out)
            sys.stderr.write(res.err)
            log(f"{guest}: exit {res.rc}{' (timed out)' if res.timed_out else ''}")
            rc = rc or res.rc
        if args.exec:
            return rc
        log("type 'A: cmd' or 'B: cmd' (Ctrl-D tears the pair down)")
        for line in sys.stdin:
            guest, sep, cmd = line.partition(":")
            if not sep or guest.strip() not in GUESTS:
                log("format: A: command")
                continue
            try:
                res = pair.run(guest.strip(), cmd.strip(), timeout=args.timeout)
            except VMError as e:
                log(str(e))
                continue
            sys.stdout.write(res.out)
            sys.stderr.write(res.err)
            log(f"exit {res.rc}")
    return 0


def _add_vm_commands(sub):
    p = sub.add_parser("status", help="show a region file's header and live channels (read-only)")
    p.add_argument("region", help="region file, e.g. /dev/shm/sbvm-<pid>-<n>; "
                   "'ivshmem' in a guest: the ivshmem BAR")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_status)

    p = sub.add_parser("build", help="build (or find cached) the guest kernel + initramfs")
    p.add_argument("--force", action="store_true", help="rebuild even if cached")
    p.set_defaults(func=_cmd_build)

    p = sub.add_parser("launch", help="boot the two-guest pair, run commands, tear it down")
    p.add_argument("--exec", "-e", action="append", metavar="G:CMD",
                   help="run CMD in guest G (A or B); repeatable; without it, read 'G: CMD' lines from stdin")
    p.add_argument("--timeout", type=float, default=120, help="per command (default 120 s)")
    p.add_argument("--accel", choices=["tcg", "kvm", "auto"], default="tcg")
    p.add_argument("--region-mb", type=int, default=64)
    p.add_argument("--ivshmem", help="guests with the region, e.g. 'A' (default A,B)")
    p.add_argument("--garbage", type=int, metavar="BYTES", help="fill the region's first BYTES with random bytes")
    p.add_argument("--no-format", action="store_true",
                   help="leave the region all zeros (default: a shmbypass region, one part per guest)")
    p.set_defaults(func=_cmd_launch)

    p = sub.add_parser("format", help="format a region file for a pair (before its guests boot)")
    p.add_argument("region", help="the region file (its size stays)")
    p.add_argument("--guests", default="A,B", help="one part per guest, in order (default A,B)")
    p.add_argument("--region-id", type=lambda v: int(v, 16), metavar="HEX", help="default: random")
    p.set_defaults(func=_cmd_format)

    p = sub.add_parser("bench", help="guest-to-guest RTT and throughput: virtual NIC TCP vs the IVSHMEM bypass")
    p.add_argument("--seconds", type=float, default=2.0, help="per figure (default 2)")
    p.add_argument("--reps", type=int, default=3, help="repetitions per figure (default 3; the median counts)")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    p.add_argument("--out", metavar="DIR",
                   help="write DIR/vm-bench.json and DIR/vm-bench.md (the saved run: bench/results)")
    p.add_argument("--spin-ns", type=int, metavar="NS",
                   help="SHMBYPASS_SPIN_NS for the bypassed programs (the interposer's spin budget "
                        "before a doorbell; TCG guests are ~30x slower than the host)")
    p.set_defaults(func=_cmd_bench)


def add_parser(subparsers):
    """Hook for shmbypass.cli: `shmbypass vm status|build|launch`."""
    p = subparsers.add_parser("vm", help="IVSHMEM VM pair: guest image, launcher, region status")
    _add_vm_commands(p.add_subparsers(dest="vm_cmd", required=True))
    return p


def main(argv=None):
    import argparse
    ap = argparse.ArgumentParser(prog="python -m shmbypass.vm", description=__doc__.splitlines()[0])
    _add_vm_commands(ap.add_subparsers(dest="vm_cmd", required=True))
    args = ap.parse_args(argv)
    try:
        return args.func(args)
    except VMError as e:
        print(f"shmbypass vm: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
