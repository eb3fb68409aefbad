"""Bring the bypass up and down, and run programs inside it.

`up`: mount bpffs if needed, create the bypass cgroup, load bpf/bypass.bpf.o,
pin its maps and programs under /sys/fs/bpf/<instance>, attach sk_msg to the
sockhash and sockops to the cgroup (through a pinned link).
`down`: stop redirecting, let the kernel queues drain, then unpin everything
and remove the cgroup. Live connections carry on over plain TCP.
"""
import errno
import os
import shutil
import signal
import struct
import subprocess
import sys
import time

from shmbypass import bpf, features, paths, slots
from shmbypass._native import ffi, lib
from shmbypass.errors import FeatureMissing, ShmbypassError
from shmbypass.features import Probe

OBJECT = "bypass"
MAPS = ("sock_hash", "conns", "pending", "counters", "settings", "errors", "sk_state",
        *slots.MAPS)
PROGS = {"prog_msg": "sbp_msg", "prog_drain": "sbp_drain"}
LINK = "link_sockops"


def is_up(inst: paths.Instance) -> bool:
    return os.path.exists(inst.pin(LINK)) and all(os.path.exists(inst.pin(m)) for m in MAPS)


ENOTSUPP = 524  # the kernel's own "not supported", not in errno

# What the verifier says when the kernel lacks a program type or helper.
_MISSING_FEATURE = ("unknown func", "cannot use helper", "invalid func", "unknown prog type",
                    "program type", "not supported")


def _load_error(e: bpf.LoadError) -> ShmbypassError:
    log = e.log
    if any(s in log.lower() for s in _MISSING_FEATURE) or e.errno in (errno.EOPNOTSUPP, ENOTSUPP):
        return FeatureMissing("this kernel cannot run the bypass programs (sockops, sk_msg, "
                              f"sk_storage, sockmap iterator): {_first_line(log)}")
    return ShmbypassError(f"the kernel refused the BPF programs ({e.strerror}): {_first_line(log)}")


def _first_line(log: str) -> str:
    lines = [ln for ln in log.splitlines() if ln.strip() and not ln.startswith("libbpf: prog")]
    return lines[-1].strip() if lines else "no log"


def probe_programs() -> Probe:
    """Load (and immediately drop) the programs: the only honest probe."""
    try:
        with bpf.BpfObject(paths.bpf_object(OBJECT)) as obj:
            obj.load()
        return Probe("programs", True, "sockops, sk_msg and the sockmap iterator load")
    except FileNotFoundError as e:
        return Probe("programs", False, str(e))
    except bpf.LoadError as e:
        return Probe("programs", False, str(_load_error(e)))


# The shm tier's region, per instance: 128 rings of 256 KiB (33 MiB).
DEFAULT_SLOTS = 128
DEFAULT_SLOT_SIZE = 4096 + (256 << 10)


def _make_region(inst: paths.Instance, backend: str | None, slot_count: int | None,
                 part: int | None = None) -> dict:
    """Create the instance's region; an arena that this kernel cannot make
    falls back to POSIX shm, with the reason recorded."""
    from shmbypass import region
    if backend == "ivshmem":  # VM pairs: join the host's region, use our part
        return region.ivshmem_state(slot_count, part)
    note = ""
    if backend in (None, "arena"):
        probe = region.arena_supported()
        if not probe:
            note = f"arena backend unavailable ({probe.reason}); using POSIX shm"
            backend = "shm"
        else:
            backend = "arena"
    region.remove(inst.name, inst.pin_dir)  # a killed run's leftovers
    r = region.Region.format(backend, instance=inst.name, slot_count=slot_count,
                             slot_size=DEFAULT_SLOT_SIZE, pin_dir=inst.pin_dir)
    try:
        path = r.name
        rid = r.region_id
    finally:
        r.close()
    return {"backend": backend, "path": path, "region_id": rid, "slot_count": slot_count,
            "note": note}


def up(inst: paths.Instance, cgroup: str | None = None, slot_count: int | None = None,
       backend: str | None = None, part: int | None = None) -> bool:
    """Bring the bypass up; False if it already was."""
    features.require_root()
    root = features.require_cgroup2()
    features.ensure_bpffs()
    if not os.path.exists(paths.bpf_object(OBJECT)):
        raise ShmbypassError(f"{paths.bpf_object(OBJECT)} is missing: build first (make setup)")
    if is_up(inst):
        return False
    # Leftovers of an interrupted up/down: clear them and start over.
    _remove_pins(inst)

    cgroup = cgroup or os.path.join(root, inst.name)
    created = not os.path.isdir(cgroup)
    os.makedirs(cgroup, exist_ok=True)
    state = {"cgroup": cgroup, "created_cgroup": created}
    inst.save_state(state)

    os.makedirs(inst.pin_dir, exist_ok=True)
    try:
        with bpf.BpfObject(paths.bpf_object(OBJECT)) as obj:
            try:
                obj.load()
            except bpf.LoadError as e:
                raise _load_error(e) from None
            for m in MAPS:
                bpf.pin(obj.map_fd(m), inst.pin(m))
            for pin_name, prog in PROGS.items():
                bpf.pin(obj.prog_fd(prog), inst.pin(pin_name))
            # The shm tier's region and slot free list (before sockops runs).
            n = DEFAULT_SLOTS if slot_count is None else slot_count
            if backend == "ivshmem":  # the host set the geometry: our whole part unless --slots
                state["region"] = _make_region(inst, backend, slot_count, part)
                n = state["region"]["slot_count"]
            else:
                state["region"] = _make_region(inst, backend, max(n, 1))
            inst.save_state(state)
            slots.setup(inst, n, state["region"]["region_id"],
                        first_slot=state["region"].get("first_slot", 0))
            # The pinned sockhash keeps the sk_msg attachment alive.
            bpf.prog_attach(obj.prog_fd("sbp_msg"), obj.map_fd("sock_hash"), lib.BPF_SK_MSG_VERDICT)
            cg_fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
            try:
                link = bpf.link_create(obj.prog_fd("sbp_sockops"), cg_fd, lib.BPF_CGROUP_SOCK_OPS)
            finally:
                os.close(cg_fd)
            try:
                bpf.pin(link, inst.pin(LINK))
            finally:
                os.close(link)
    except BaseException:
        _remove_pins(inst)
        _remove_region(inst)
        _remove_cgroup(state)
        shutil.rmtree(inst.run_dir, ignore_errors=True)
        raise
    return True


def _remove_region(inst: paths.Instance) -> None:
    from shmbypass import region
    region.remove(inst.name, inst.pin_dir)


def _remove_pins(inst: paths.Instance) -> None:
    if not os.path.isdir(inst.pin_dir):
        return
    # The link first: that detaches sockops from the cgroup.
    for name in [LINK] + sorted(os.listdir(inst.pin_dir)):
        try:
            os.unlink(inst.pin(name))
        except FileNotFoundError:
            pass
    os.rmdir(inst.pin_dir)


def _remove_cgroup(state: dict) -> None:
    cg = state.get("cgroup")
    if not cg or not state.get("created_cgroup") or not os.path.isdir(cg):
        return
    # Processes still in the group move to the parent; they keep running.
    parent = os.path.dirname(cg)
    for _ in range(50):
        try:
            with open(os.path.join(cg, "cgroup.procs")) as f:
                pids = f.read().split()
        except FileNotFoundError:
            return
        for pid in pids:
            try:
                with open(os.path.join(parent, "cgroup.procs"), "w") as f:
                    f.write(pid)
            except (ProcessLookupError, OSError):
                pass
        try:
            os.rmdir(cg)
            return
        except OSError:
            time.sleep(0.02)
    raise ShmbypassError(f"cannot remove cgroup {cg}: it is still busy")


def set_draining(inst: paths.Instance, on: bool) -> None:
    with bpf.Map.pinned(inst.pin("settings"), "uint32_t", "struct sbp_config") as m:
        m.update(0, {"draining": 1 if on else 0})


def queued_bytes(inst: paths.Instance) -> dict[int, int]:
    """Socket cookie -> bytes redirected to it that its owner has not read."""
    prog = bpf.get_pinned(inst.pin("prog_drain"))
    hmap = bpf.get_pinned(inst.pin("sock_hash"))
    try:
        raw = bpf.iter_sockmap(prog, hmap)
    finally:
        os.close(prog)
        os.close(hmap)
    out = {}
    for off in range(0, len(raw) - len(raw) % 16, 16):
        cookie, queued, _ = struct.unpack_from("=QII", raw, off)
        out[cookie] = queued
    return out


def down(inst: paths.Instance, drain_timeout: float = 10.0, force: bool = False) -> bool:
    """Take the bypass down; False if nothing was up.

    Removing a socket from the sockhash discards bytes redirected to it and
    not read yet, so first stop redirecting and wait for those queues to
    empty. If they do not within drain_timeout, keep the maps (the
    connections keep working) and say so, unless force."""
    features.require_root()
    state = inst.load_state()
    if not os.path.isdir(inst.pin_dir) and not state:
        return False
    if os.path.exists(inst.pin(LINK)):
        os.unlink(inst.pin(LINK))  # no new connections enter the bypass
    if os.path.exists(inst.pin("settings")) and os.path.exists(inst.pin("prog_drain")):
        set_draining(inst, True)
        time.sleep(0.05)  # sends already inside sk_msg finish their redirect
        deadline = time.monotonic() + drain_timeout
        while True:
            busy = {c: q for c, q in queued_bytes(inst).items() if q}
            if not busy:
                break
            if time.monotonic() > deadline:
                if force:
                    break
                raise ShmbypassError(
                    f"{len(busy)} connection(s) hold {sum(busy.values())} redirected bytes their "
                    f"programs have not read yet; they keep working and new data goes over TCP. "
                    f"Run `shmbypass down` again once they read it, or `down --force` to drop it")
            time.sleep(0.02)
    _remove_pins(inst)
    _remove_region(inst)
    _remove_cgroup(state)
    shutil.rmtree(inst.run_dir, ignore_errors=True)
    return True


def join_cgroup(inst: paths.Instance, pid: int = 0) -> None:
    cg = inst.cgroup
    with open(os.path.join(cg, "cgroup.procs"), "w") as f:
        f.write(str(pid))


def run(inst: paths.Instance, argv: list[str], tier: str = "shm") -> int:
    """Run argv inside the bypass group and return its exit status."""
    if not argv:
        raise ShmbypassError("run: no command given (shmbypass run -- CMD ARGS...)")
    up(inst)
    env = dict(os.environ, SHMBYPASS_INSTANCE=inst.name)
    if tier == "shm":
        from shmbypass import shmtier
        env.update(shmtier.preload_env(inst))
    # Every tier gets the guard against tcp_bpf's spurious EAGAIN
    # (native/guard.c); statically linked programs go without it.
    preload = [p for p in (env.get("LD_PRELOAD", ""), paths.tool("libshmbypass-guard.so")) if p]
    env["LD_PRELOAD"] = " ".join(preload)
    procs = os.path.join(inst.cgroup, "cgroup.procs")

    def enter_group():
        with open(procs, "w") as f:
            f.write("0")

    try:
        child = subprocess.Popen(argv, env=env, preexec_fn=enter_group)
    except FileNotFoundError:
        raise ShmbypassError(f"run: command not found: {argv[0]}") from None
    # The child shares our terminal, so ^C reaches it directly; forward TERM.
    old_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
    old_term = signal.signal(signal.SIGTERM, lambda s, f: child.send_signal(s))
    try:
        rc = child.wait()
    finally:
        signal.signal(signal.SIGINT, old_int)
        signal.signal(signal.SIGTERM, old_term)
    return 128 - rc if rc < 0 else rc


def own_cgroup() -> str:
    """The cgroup v2 directory this process is in."""
    with open("/proc/self/cgroup") as f:
        for line in f:
            if line.startswith("0::"):
                return os.path.join(paths.cgroup2_root(), line[3:].strip().lstrip("/"))
    raise ShmbypassError("this process is in no cgroup v2 group")


class InGroup:
    """This whole process inside the instance's cgroup for a block (sockets
    it makes there are the bypass's), then back where it was. Tests and the
    bench use it in place of `shmbypass run`."""

    def __init__(self, instance: paths.Instance):
        self.instance = instance

    def __enter__(self):
        self.home = own_cgroup()
        join_cgroup(self.instance, os.getpid())
        return self

    def __exit__(self, *exc):
        with open(os.path.join(self.home, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))


def sweep_dead(prefix: str) -> list[str]:
    """Take down instances named <prefix>...<pid>... whose owner pid is gone
    (left by a killed test or bench run): pins, cgroup, run dir, region."""
    import glob
    import re
    from shmbypass import region
    names = set()
    for pattern in (os.path.join(paths.BPFFS, prefix + "*"), f"/run/{prefix}*",
                    os.path.join(paths.cgroup2_root() or "/nonexistent", prefix + "*")):
        names.update(os.path.basename(p) for p in glob.glob(pattern))
    names.update(re.sub(r"-(region|wake)$", "", os.path.basename(p))
                 for p in glob.glob(f"/dev/shm/{prefix}*"))
    gone = []
    for name in sorted(names):
        m = re.search(r"-(\d+)(?:-|$)", name[len(prefix) - 1:])
        if not m or os.path.exists(f"/proc/{m.group(1)}"):
            continue  # not ours to judge, or its owner still runs
        down(paths.Instance(name), drain_timeout=0.5, force=True)
        region.remove(name, paths.Instance(name).pin_dir)
        gone.append(name)
    return gone
