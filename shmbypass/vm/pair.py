"""The VM pair: two QEMU guests, A and B, sharing one ivshmem region (a
file in /dev/shm, formatted here before boot, one part per guest) and one
private link, each with an agent that runs commands for the host.

    with VMPair() as pair:                 # boots guests A and B (TCG)
        pair.run("A", "ip -br addr")       # -> Result(rc, out, err)
        job = pair.start("B", "python3 server.py")   # runs concurrently
        pair.region_path                   # /dev/shm/sbvm-<pid>-<n>: the shared region

The guests share the host's filesystem read-only over virtio-9p (so they run
the host's Python, the project's venv and its built binaries in place) with
tmpfs on the writable directories; see vm/README.md."""
import atexit
import itertools
import os
import shutil
import signal
import subprocess
import threading
import time
import weakref

from shmbypass import paths
from shmbypass.errors import GuestDied, VMError
from shmbypass.region.ivshmem import format_ivshmem_file
from shmbypass.vm import qemu
from shmbypass.vm.agent import AgentClient
from shmbypass.vm.image import AGENT_PORT_NAME, BUILD_DIR, build_image

ROOT = paths.ROOT
AGENT_PY = os.path.join(ROOT, "vm", "agent.py")
GUESTS = {  # name -> (guest-internal address on the pair's private link, MAC)
    "A": ("10.77.0.1/24", "52:54:00:77:00:01"),
    "B": ("10.77.0.2/24", "52:54:00:77:00:02"),
}


def peer_address(guest: str) -> str:
    """The other guest's address: a guest's `shmbypass up --backend ivshmem`
    negotiates region slots toward it only (SHMBYPASS_VM_PEER, set for
    every command the pair runs)."""
    (other,) = [g for g in GUESTS if g != guest]
    return GUESTS[other][0].split("/")[0]


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
        self.name = f"{qemu.RUN_PREFIX}{os.getpid()}-{next(_seq)}"
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
        bios = ["-bios", qemu.QBOOT] if os.path.exists(qemu.QBOOT) else []
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
                                start_new_session=True, preexec_fn=qemu.set_pdeathsig)
        errlog.close()
        try:
            agent = AgentClient(name, os.path.join(self.run_dir, name + ".agent"))
        except BaseException:
            os.killpg(proc.pid, signal.SIGKILL)    # not in self.guests yet: close() would miss it
            proc.wait()
            raise
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
        qemu.sweep_stale()
        qemu.prune_logs()
        _live_pairs.add(self)
        self._install_signal_handlers()
        image = self.image or build_image(log=self.logfn)
        self.image = image
        accel = self.accel
        if accel == "auto":
            accel = "kvm" if qemu.kvm_usable(image) else "tcg"
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
            self.region_id = format_ivshmem_file(self.region_path).region_id

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
        # and any guest of this pair the table above missed (issue 10.9)
        qemu.kill_guests(lambda n: n.startswith(self.name + "-"))
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
        env = {"SHMBYPASS_VM_PEER": peer_address(guest), **(env or {})}
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
