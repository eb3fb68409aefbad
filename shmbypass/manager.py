"""Bring the bypass up and down, and run programs inside it.

`up`: mount bpffs if needed, create the bypass cgroup, load bpf/bypass.bpf.o,
pin its maps and programs under /sys/fs/bpf/<instance>, attach sk_msg to the
sockhash and sockops to the cgroup (through a pinned link).
`down`: stop redirecting, let the kernel queues drain, then unpin everything
and remove the cgroup. Live connections carry on over plain TCP.
"""
import glob
import os
import re
import shutil
import signal
import subprocess
import time

from shmbypass import bpf, broker, drain, launch, features, paths, policy, programs, region, shmtier, slots
from shmbypass._native import lib
from shmbypass.capture import control as capture
from shmbypass.errors import ShmbypassError

MAPS = ("sock_hash", "conns", "pending", "counters", "settings", "errors", "sk_state",
        *policy.MAPS, *slots.MAPS)
LINK = "link_sockops"
# In a guest of the VM pair, the other guest's address(es), comma-separated
# (the pair sets it for every command: shmbypass/vm/pair.py): what `up
# --backend ivshmem` takes as its peer VMs when none are given.
VM_PEER_ENV = "SHMBYPASS_VM_PEER"
# Where each optional program goes when the kernel took it: pinned (the
# drain iterators, run by `down`), or attached to the cgroup through a
# pinned link (the ask programs).
OPTIONAL_PINS = {"sbp_drain": drain.PIN_SOCKMAP, "sbp_drain_tcp": drain.PIN_TCP}
OPTIONAL_LINKS = {"sbp_setsockopt": ("link_setsockopt", lib.BPF_CGROUP_SETSOCKOPT),
                  "sbp_getsockopt": ("link_getsockopt", lib.BPF_CGROUP_GETSOCKOPT)}


def is_up(inst: paths.Instance) -> bool:
    return os.path.exists(inst.pin(LINK)) and all(os.path.exists(inst.pin(m)) for m in MAPS)


def _make_region(inst: paths.Instance, backend: str, slot_count: int | None,
                 part: int | None = None) -> dict:
    """A VM pair's region: in a guest, the host's (ivshmem, our part); on one
    host (the VM path tested without VMs), a POSIX one of slot_count slots."""
    if backend == "ivshmem":  # VM pairs: join the host's region, use our part
        return region.ivshmem_state(slot_count, part)
    note = ""
    region.remove(inst.name)  # a killed run's leftovers
    r = region.format(backend, instance=inst.name, slot_count=slot_count,
                      slot_size=region.SLOT_SIZE_DEFAULT)
    try:
        path = r.name
        rid = r.region_id
    finally:
        r.close()
    return {"backend": backend, "path": path, "region_id": rid, "slot_count": slot_count,
            "note": note}


def _load_optional(inst: paths.Instance, cgroup: str) -> dict:
    """Load each optional program the kernel takes, then pin or attach it;
    the feature lines (ok or why not) go to the instance state."""
    out = {}
    pins = {m: inst.pin(m) for m in MAPS}
    for p in programs.OPTIONAL_PROGRAMS:
        obj, feat = programs.load_optional(p, pins)
        if obj and p.on_demand:
            obj.close()  # the command that uses it loads its own (shmbypass capture)
        elif obj:
            with obj:
                for prog in p.progs:
                    if prog in OPTIONAL_PINS:
                        bpf.pin(obj.prog_fd(prog), inst.pin(OPTIONAL_PINS[prog]))
                    else:
                        pin, attach_type = OPTIONAL_LINKS[prog]
                        _attach_to_cgroup(obj.prog_fd(prog), cgroup, attach_type, inst.pin(pin))
        out[p.name] = feat.as_dict()
    return out


def _attach_to_cgroup(prog_fd: int, cgroup: str, attach_type: int, pin: str) -> None:
    """Attach through a bpf_link kept alive by its pin (unpinned: detached)."""
    cg_fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
    try:
        link = bpf.link_create(prog_fd, cg_fd, attach_type)
    finally:
        os.close(cg_fd)
    try:
        bpf.pin(link, pin)
    finally:
        os.close(link)


def up(inst: paths.Instance, cgroup: str | None = None, slot_count: int | None = None,
       backend: str | None = None, part: int | None = None,
       allow: "policy.Policy | None" = None, vm_peers: tuple[str, ...] = ()) -> bool:
    """Bring the bypass up; False if it already was."""
    features.require_root()
    root = features.require_cgroup2()
    features.ensure_bpffs()
    programs.turned_off()  # a bad SHMBYPASS_WITHOUT fails before anything is made
    if not os.path.exists(paths.bpf_object(programs.CORE_OBJECT)):
        raise ShmbypassError(f"{paths.bpf_object(programs.CORE_OBJECT)} is missing: build first "
                             "(make setup)")
    if is_up(inst):
        capture.reset_if_stale(inst)  # a capture that was killed left its flags on
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
        with programs.load_core() as obj:
            for m in MAPS:
                bpf.pin(obj.map_fd(m), inst.pin(m))
            bpf.pin(obj.prog_fd("sbp_msg"), inst.pin("prog_msg"))
            policy.apply(inst, allow or policy.Policy())
            state["policy"] = (allow or policy.Policy()).as_dict()
            state["features"] = _load_optional(inst, cgroup)
            # A VM pair's region and slot pool (before sockops runs). One
            # host needs neither: each pair of processes brings its memory.
            if backend == "ivshmem" or vm_peers:
                n = slots.DEFAULT_SLOTS if slot_count is None else slot_count
                if backend == "ivshmem":  # the host set the geometry: our part unless --slots
                    state["region"] = _make_region(inst, backend, slot_count, part)
                    n = state["region"]["slot_count"]
                    vm_peers = vm_peers or tuple(
                        a.strip() for a in os.environ.get(VM_PEER_ENV, "").split(",") if a.strip())
                    if not state["region"]["region_id"]:
                        # No usable region: no VM path. Our sockets carry no
                        # option and our listeners answer none, so the peer
                        # VM sees what we are: a host that does not ask
                        # (peer-not-capable).
                        vm_peers = ()
                    elif not vm_peers:
                        state["region"]["note"] = (
                            f"no peer VM address (--vm-peer, or ${VM_PEER_ENV}): the ivshmem "
                            "region is not used")
                else:
                    state["region"] = _make_region(inst, backend or "posix", max(n, 1))
                state["vm_peers"] = slots.set_vm_peers(inst, vm_peers)
                inst.save_state(state)
                slots.setup(inst, n, state["region"]["region_id"],
                            first_slot=state["region"].get("first_slot", 0))
            inst.save_state(state)
            # The pinned sockhash keeps the sk_msg attachment alive.
            bpf.prog_attach(obj.prog_fd("sbp_msg"), obj.map_fd("sock_hash"), lib.BPF_SK_MSG_VERDICT)
            _attach_to_cgroup(obj.prog_fd("sbp_sockops"), cgroup, lib.BPF_CGROUP_SOCK_OPS,
                              inst.pin(LINK))
        _publish(inst)
        if allow and (allow.any_user or allow.users or allow.groups):
            state["broker_pid"] = broker.start(inst)
            inst.save_state(state)
    except BaseException:
        broker.stop(state.get("broker_pid"))
        _remove_pins(inst)
        _remove_region(inst)
        _remove_cgroup(state)
        shutil.rmtree(inst.run_dir, ignore_errors=True)
        raise
    return True


def _publish(inst: paths.Instance) -> None:
    """What programs of every user need under the run directory: the inbox
    directory (anyone may create an entry and send to one whose name they
    know; nobody may list it or remove another's: mode 1733), the preload
    libraries and the non-root launcher (readable by all, root's)."""
    os.chmod(inst.run_dir, 0o755)
    os.chmod(inst.state_file, 0o644)
    inbox = os.path.join(inst.run_dir, "inbox")
    os.makedirs(inbox, exist_ok=True)
    os.chmod(inbox, 0o1733)
    capture.publish(inst)
    for sub, files in (("lib", [paths.tool(n) for n in ("libshmbypass-preload.so",
                                                           "libshmbypass-guard.so")]),
                       ("bin", [os.path.join(paths.PKG_DIR, "launch.py")])):
        d = os.path.join(inst.run_dir, sub)
        os.makedirs(d, exist_ok=True)
        os.chmod(d, 0o755)
        for src in files:
            dst = os.path.join(d, "shmbypass-run" if src.endswith("launch.py") else os.path.basename(src))
            shutil.copyfile(src, dst + ".tmp")
            os.chmod(dst + ".tmp", 0o755)
            os.replace(dst + ".tmp", dst)


def _remove_region(inst: paths.Instance) -> None:
    region.remove(inst.name)


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


def _wait_for_queues(inst: paths.Instance, drain_timeout: float, force: bool) -> str:
    """Wait until the kernel tier's sockets have read what was redirected to
    them; the line says how it checked (or that it could not). While it
    waits, sk_msg sends new data over TCP and new connections stay out."""
    set_draining(inst, True)
    time.sleep(0.05)  # sends already inside sk_msg finish their redirect
    start = time.monotonic()
    while True:
        q = drain.queues(inst)
        busy = q.busy
        if not busy and not q.unchecked:
            waited = time.monotonic() - start
            return (f"every redirected byte was read (checked with {q.how}, {waited:.1f} s)"
                    if q.how else "no kernel-tier connection was live")
        if q.unchecked and not q.how:
            why = "; ".join(f"{n}: {f['detail']}" for n, f in inst.load_state().get("features", {}).items()
                            if n in OPTIONAL_PINS and not f["ok"])
            what = (f"{q.unchecked} kernel-tier connection(s) are live and this kernel lets "
                    f"shmbypass check no socket's unread redirected bytes ({why})")
        elif q.unchecked and not busy:
            what = (f"{q.unchecked} kernel-tier connection(s) in other network namespaces could not "
                    f"be checked ({q.how})")
        else:
            what = (f"{len(busy)} connection(s) hold {sum(busy.values())} redirected bytes their "
                    f"programs have not read yet")
        if time.monotonic() - start > drain_timeout or (q.unchecked and not busy):
            if force:
                return what + "; --force: whatever they held unread is dropped"
            raise ShmbypassError(
                f"{what}; the bypass stays up and they keep working. Run `shmbypass down` "
                f"again once they have read it (or closed), or `down --force` to drop it")
        time.sleep(0.02)


def down(inst: paths.Instance, drain_timeout: float = 10.0, force: bool = False) -> str | None:
    """Take the bypass down; None if nothing was up, else how the kernel
    tier's queues were drained.

    Removing a socket from the sockhash discards bytes redirected to it and
    not read yet, so first stop redirecting and wait for those queues to
    empty. If they do not within drain_timeout, or cannot be checked, keep
    the maps (the connections keep working) and say so, unless force."""
    features.require_root()
    state = inst.load_state()
    if not os.path.isdir(inst.pin_dir) and not state:
        return None
    how = "nothing was attached"
    if os.path.exists(inst.pin("settings")) and os.path.exists(inst.pin("conns")):
        # sockops stays attached while we wait: it forgets the sockets that close
        try:
            how = _wait_for_queues(inst, drain_timeout, force)
        except ShmbypassError:
            set_draining(inst, False)  # a refused down changes nothing
            raise
    broker.stop(state.get("broker_pid"))
    _remove_pins(inst)  # the link first: no new connection enters the bypass
    _remove_region(inst)
    _remove_cgroup(state)
    shutil.rmtree(inst.run_dir, ignore_errors=True)
    return how


def join_cgroup(inst: paths.Instance, pid: int = 0) -> None:
    cg = inst.cgroup
    with open(os.path.join(cg, "cgroup.procs"), "w") as f:
        f.write(str(pid))


def run(inst: paths.Instance, argv: list[str], tier: str = "shm") -> int:
    """Run argv inside the bypass group and return its exit status."""
    if not argv:
        raise ShmbypassError("run: no command given (shmbypass run -- CMD ARGS...)")
    if os.geteuid() != 0:
        # An administrator brought the instance up; the broker lets us in.
        try:
            launch.join(inst.name)
        except SystemExit as e:
            raise ShmbypassError(str(e).removeprefix("shmbypass: error: ")) from None
        child_env = launch.environment(inst.name, tier)
        return _wait_child(argv, child_env, None)
    up(inst)
    env = dict(os.environ, SHMBYPASS_INSTANCE=inst.name)
    if tier == "shm":
        env.update(shmtier.preload_env(inst))
    # Every tier gets the guard against tcp_bpf's spurious EAGAIN
    # (native/guard.c); statically linked programs go without it.
    preload = [p for p in (env.get("LD_PRELOAD", ""), paths.tool("libshmbypass-guard.so")) if p]
    env["LD_PRELOAD"] = " ".join(preload)
    procs = os.path.join(inst.cgroup, "cgroup.procs")

    def enter_group():
        with open(procs, "w") as f:
            f.write("0")

    return _wait_child(argv, env, enter_group)


def _wait_child(argv: list[str], env: dict, preexec) -> int:
    try:
        child = subprocess.Popen(argv, env=env, preexec_fn=preexec)
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
    names = set()
    for pattern in (os.path.join(paths.BPFFS, prefix + "*"), f"/run/{prefix}*",
                    os.path.join(paths.cgroup2_root() or "/nonexistent", prefix + "*")):
        names.update(os.path.basename(p) for p in glob.glob(pattern))
    names.update(re.sub(r"-region$", "", os.path.basename(p))
                 for p in glob.glob(f"/dev/shm/{prefix}*"))
    gone = []
    for name in sorted(names):
        m = re.search(r"-(\d+)(?:-|$)", name[len(prefix) - 1:])
        if not m or os.path.exists(f"/proc/{m.group(1)}"):
            continue  # not ours to judge, or its owner still runs
        down(paths.Instance(name), drain_timeout=0.5, force=True)
        region.remove(name)
        gone.append(name)
    return gone
