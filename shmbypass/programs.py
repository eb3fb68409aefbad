"""The BPF programs shmbypass loads: the core, without which no tier works,
and optional programs, each loaded on its own so that a kernel that refuses
one loses only what that one gives (docs/ARCHITECTURE.md, "Kernels differ").

A refusal is explained from the kernel's own answer: the errno, and whether
the verifier ran at all (an EPERM "before verification" is policy, not a
bug of ours)."""
import os
from dataclasses import dataclass

from shmbypass import bpf, features, paths
from shmbypass.errors import FeatureMissing, ShmbypassError

CORE_OBJECT = "bypass"
CORE_PROGRAMS = ("sbp_sockops", "sbp_msg")

# Operators (and tests) may turn optional features off by name, as if the
# kernel had refused them: SHMBYPASS_WITHOUT=drain,drain-tcp or `up --without`.
WITHOUT_ENV = "SHMBYPASS_WITHOUT"


@dataclass(frozen=True)
class OptionalProgram:
    name: str               # the feature's name (status, doctor, --without)
    obj: str                # bpf/<obj>.bpf.c
    progs: tuple[str, ...]  # the programs in it that make the feature
    kind: str               # their section(s), as the kernel knows them
    gives: str              # what is lost without it
    reuse: tuple[str, ...] = ()  # core maps the object shares (by pin name)
    on_demand: bool = False  # loaded by the command that uses it, only probed at `up`


OPTIONAL_PROGRAMS = (
    OptionalProgram("drain", "drain", ("sbp_drain",), "iter/sockmap",
                    "`down` checks every kernel-tier socket's unread redirected bytes"),
    OptionalProgram("drain-tcp", "drain", ("sbp_drain_tcp",), "iter/tcp",
                    "`down` checks unread redirected bytes in its own network namespace"),
    OptionalProgram("ask", "ask", ("sbp_setsockopt", "sbp_getsockopt"),
                    "cgroup/setsockopt + cgroup/getsockopt",
                    "programs ask for the shm tier and learn its answer (without it: no shm tier)",
                    reuse=("sk_state", "conns", "policy", "allowed", "counters", "errors")),
    OptionalProgram("capture", "capture", ("sbp_capture_msg", "sbp_capture_ops"),
                    "sk_msg + sockops with a ring buffer and bpf_loop",
                    "`shmbypass capture` (a pcap of bypassed connections)",
                    reuse=("sk_state", "conns", "policy", "allowed", "counters", "errors"),
                    on_demand=True),
)
OPTIONAL_NAMES = tuple(p.name for p in OPTIONAL_PROGRAMS)


@dataclass
class Feature:
    """One named feature and the kernel's answer about it."""
    name: str
    ok: bool
    detail: str
    core: bool = False

    def as_dict(self) -> dict:
        return {"ok": self.ok, "detail": self.detail, "core": self.core}


def turned_off() -> set[str]:
    """Optional features the operator turned off (SHMBYPASS_WITHOUT)."""
    names = {n.strip() for n in os.environ.get(WITHOUT_ENV, "").split(",") if n.strip()}
    unknown = names - set(OPTIONAL_NAMES)
    if unknown:
        raise ShmbypassError(f"{WITHOUT_ENV}: unknown feature {', '.join(sorted(unknown))} "
                             f"(optional features: {', '.join(OPTIONAL_NAMES)})")
    return names


def _load_error(e: bpf.LoadError) -> ShmbypassError:
    why = features.explain_refusal(e.errno, e.log, "the core programs (sockops, sk_msg)")
    if features.refused_by_policy(e.errno, e.log):
        return ShmbypassError(why)
    return FeatureMissing(f"this kernel cannot run the bypass programs: {why}")


def load_core() -> bpf.BpfObject:
    """The core object, loaded; raises with the one-line reason if refused."""
    path = paths.bpf_object(CORE_OBJECT)
    if not os.path.exists(path):
        raise ShmbypassError(f"{path} is missing: build first (make setup)")
    obj = bpf.BpfObject(path)
    try:
        obj.load()
    except bpf.LoadError as e:
        obj.close()
        raise _load_error(e) from None
    return obj


def load_optional(p: OptionalProgram, pins: dict[str, str] | None = None,
                  size: dict[str, int] | None = None) -> tuple[bpf.BpfObject | None, Feature]:
    """(the loaded object, or None; and the feature line saying why).
    pins: name -> pinned path of the core maps to share (p.reuse); without
    them (a probe) the object makes its own. size: map -> max_entries."""
    if p.name in turned_off():
        return None, Feature(p.name, False, f"{p.kind}: turned off ({WITHOUT_ENV})")
    path = paths.bpf_object(p.obj)
    if not os.path.exists(path):
        return None, Feature(p.name, False, f"{path} is missing: build first (make setup)")
    others = tuple(q for o in OPTIONAL_PROGRAMS if o.obj == p.obj and o is not p
                   for q in o.progs if q not in p.progs)
    try:
        obj = bpf.BpfObject(path, skip_programs=others)
        for name in p.reuse if pins else ():
            obj.reuse_map(name, pins[name])
        for name, n in (size or {}).items():
            obj.set_max_entries(name, n)
    except (OSError, KeyError) as e:
        return None, Feature(p.name, False, f"{p.kind}: cannot open {path}: {e}")
    try:
        obj.load()
    except bpf.LoadError as e:
        obj.close()
        return None, Feature(p.name, False, features.explain_refusal(e.errno, e.log, p.kind))
    return obj, Feature(p.name, True, f"{p.kind} loads: {p.gives}")


def probe_core() -> Feature:
    """Load (and drop) the core programs: the only honest probe."""
    try:
        load_core().close()
        return Feature("core", True, "sockops and sk_msg load (both tiers' negotiation and "
                                     "the kernel tier's redirect)", core=True)
    except ShmbypassError as e:
        return Feature("core", False, str(e), core=True)


def probe_optional() -> list[Feature]:
    out = []
    for p in OPTIONAL_PROGRAMS:
        obj, feat = load_optional(p)
        if obj:
            obj.close()
        out.append(feat)
    return out
