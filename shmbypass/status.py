"""What is attached, and one row per TCP connection of the bypass group."""
import ipaddress
import json
import os
import socket

from shmbypass import bpf, manager, paths, region
from shmbypass._native import ffi, lib

TIERS = {lib.SBP_TIER_TCP: "tcp", lib.SBP_TIER_KERNEL: "kernel", lib.SBP_TIER_SHM: "shm"}
# The names come from the one table of reasons (bpf/bypass.h, SBP_REASONS);
# a row that is bypassed shows none.
REASONS = {r: ffi.string(lib.sbp_reason_name(r)).decode() for r in range(lib.SBP_REASON__MAX)}
REASONS[lib.SBP_REASON_NONE] = ""
# Stable reason codes (docs/REASONS.md): one per reason, never renumbered,
# never reused. The high byte is the class (1 the peer, 2 timing, 3 a
# resource, 4 the administrator, 5 trust domains), the next the reason in
# its class; the low 16 bits stay 0 (room for details).
REASON_CODES = {
    "": 0x00000000,
    "peer-not-capable": 0x01010000,
    "remote-host": 0x01020000,
    "peer-closed": 0x01030000,
    "handshake-race": 0x02010000,
    "table-full": 0x03010000,
    "pool-exhausted": 0x03020000,
    "no-option-space": 0x03030000,
    "memory-cap": 0x03040000,
    "shutting-down": 0x04010000,
    "policy": 0x04020000,
    "different-region": 0x05010000,
}
# A reason this version has no name for (shown as reason-N): 0x7F0000NN.
UNKNOWN_REASON = 0x7F000000


def reason_code(reason: str) -> int:
    if reason in REASON_CODES:
        return REASON_CODES[reason]
    if reason.startswith("reason-") and reason[7:].isdigit():
        return UNKNOWN_REASON | (int(reason[7:]) & 0xFFFF)
    return UNKNOWN_REASON | 0xFFFF


COUNTERS = {
    lib.SBP_CNT_ESTABLISHED: "established",
    lib.SBP_CNT_PAIRED: "paired",
    lib.SBP_CNT_UNPAIRED_PASSIVE: "unpaired_passive",
    lib.SBP_CNT_CLOSED: "closed",
    lib.SBP_CNT_MSG_REDIRECT: "msg_redirect",
    lib.SBP_CNT_MSG_PASS: "msg_pass",
    lib.SBP_CNT_BYTES_REDIRECT: "bytes_redirect",
    lib.SBP_CNT_REDIRECT_FAILED: "redirect_failed",
    lib.SBP_CNT_HANDSHAKE_RACE: "handshake_race",
    lib.SBP_CNT_TABLE_FULL: "table_full",
    lib.SBP_CNT_SHM: "shm",
    lib.SBP_CNT_SHM_FALLBACK: "shm_fallback",
    lib.SBP_CNT_RESV_EXPIRED: "resv_expired",
    lib.SBP_CNT_SLOT_PARKED: "slot_parked",
    lib.SBP_CNT_CAPTURE_DROPPED: "capture_dropped",
    lib.SBP_CNT_CAPTURE_DROPPED_BYTES: "capture_dropped_bytes",
}


def _addr(ip_words, port: int, family: int) -> str:
    raw = b"".join(int(w).to_bytes(4, "little") for w in ip_words)
    ip = ipaddress.IPv6Address(raw)
    if family == socket.AF_INET and ip.ipv4_mapped:
        return f"{ip.ipv4_mapped}:{port}"
    return f"[{ip}]:{port}"


def _local_addresses() -> set[str]:
    """Addresses of this network namespace (to tell a remote peer apart)."""
    from pyroute2 import IPRoute
    with IPRoute() as ipr:
        return {a.get_attr("IFA_ADDRESS") for a in ipr.get_addr()}


def connections(inst: paths.Instance) -> list[dict]:
    rows = []
    if not os.path.exists(inst.pin("conns")):
        return rows
    local = None
    with bpf.Map.pinned(inst.pin("conns"), "uint64_t", "struct sbp_conn") as m:
        for cookie, c in m.items():
            k = c.key
            a = _addr(k.a_ip, k.a_port, c.family)
            b = _addr(k.b_ip, k.b_port, c.family)
            tier = TIERS.get(c.tier, "tcp")
            reason = REASONS.get(c.reason, f"reason-{c.reason}")
            kept = c.kept
            if tier == "shm" and kept:
                # the interposer kept it on TCP (memory-cap): both rows say so
                tier, reason = "tcp", REASONS.get(kept, f"reason-{kept}")
            if tier != "shm" and c.shm_reason:
                # It asked for the shm tier: why it did not get it says more
                # (e.g. pool-exhausted) than the kernel tier's own reason.
                reason = REASONS.get(c.shm_reason, f"reason-{c.shm_reason}")
            elif tier == "tcp" and reason == "peer-not-capable":
                local = local if local is not None else _local_addresses()
                remote_ip = (b if c.active else a).rsplit(":", 1)[0].strip("[]")
                mapped = ipaddress.ip_address(remote_ip)
                if getattr(mapped, "ipv4_mapped", None):
                    remote_ip = str(mapped.ipv4_mapped)
                if not ipaddress.ip_address(remote_ip).is_loopback and remote_ip not in local:
                    reason = "remote-host"
            rows.append({
                "cookie": cookie,
                "local": a if c.active else b,
                "remote": b if c.active else a,
                "tier": tier,
                "reason": reason,
                "reason_code": reason_code(reason),
                "bytes_tx": c.bytes_tx,
                "bytes_rx": 0,  # kernel tier: the peer's bytes_tx, below
                "netns": c.netns,
                "peer": c.peer,
            })
            rows[-1].update(tx_queued=None, rx_queued=None, ring_size=None)  # shm rows: below
            if tier == "shm" and c.tx_gen:  # a VM pair's slots
                rows[-1]["rings"] = (c.tx_slot, c.tx_gen, c.rx_slot, c.rx_gen)
            elif tier == "shm":
                rows[-1]["pair"] = c.owner.tgid  # (who asked: BPF's word)
            if kept:
                rows[-1]["kept"] = True
    kept = {r["cookie"]: r["reason"] for r in rows if r.pop("kept", False)}
    for r in rows:
        if r["tier"] == "shm" and r["peer"] in kept:
            r.update(tier="tcp", reason=kept[r["peer"]], reason_code=reason_code(kept[r["peer"]]))
            r.pop("pair", None)
    sent = {r["cookie"]: r["bytes_tx"] for r in rows}
    for r in rows:
        if r["tier"] == "kernel":
            r["bytes_rx"] = sent.get(r["peer"], 0)
    rows.sort(key=lambda r: (r["local"], r["remote"]))
    _ring_bytes(inst, [r for r in rows if "rings" in r])
    _pair_bytes(inst, {r["cookie"]: r.pop("pair") for r in rows if "pair" in r}, rows)
    return rows


def _cgroup_pids(inst: paths.Instance) -> list[int]:
    """The processes in the instance's cgroup and below (only they can
    hold shm-tier connections)."""
    top, pids = inst.cgroup, []
    if not top or not os.path.isdir(top):
        return pids
    for d, _, files in os.walk(top):
        if "cgroup.procs" in files:
            try:
                with open(os.path.join(d, "cgroup.procs")) as f:
                    pids += [int(x) for x in f.read().split()]
            except OSError:
                pass
    return pids


def _pair_bytes(inst: paths.Instance, owners: dict[int, int], rows: list[dict]) -> None:
    """Byte counts of one-host shm-tier connections (owners: cookie -> the
    pid that asked for its socket), read from the pair regions their
    processes map (region/pair.py); 0 when not readable."""
    if not owners:
        return
    from shmbypass.region import pair
    counts = pair.ring_counts(_cgroup_pids(inst), owners)
    for row in rows:
        if row["cookie"] in owners:
            row.update(counts.get(row["cookie"], {}))


def _ring_bytes(inst: paths.Instance, rows: list[dict]) -> None:
    """Byte counts of shm-tier connections, read from their rings: bytes_tx
    is what this end wrote into its ring, bytes_rx what it read from its
    peer's (both monotonic, kept in the ring header)."""
    spec = inst.load_state().get("region") or {}
    if not rows or spec.get("backend") != "posix":
        return
    try:
        reg = region.open("posix", instance=inst.name)
    except (OSError, ValueError):
        return  # counts stay 0; the tier is still right
    with reg:
        for row in rows:
            tx_slot, tx_gen, rx_slot, rx_gen = row.pop("rings")
            row["bytes_tx"] = _ring_word(reg, tx_slot, tx_gen, "head")
            row["bytes_rx"] = _ring_word(reg, rx_slot, rx_gen, "tail")
            # Fill levels, like ss's Send-Q/Recv-Q: written, not read yet.
            row["tx_queued"], row["ring_size"] = _ring_fill(reg, tx_slot, tx_gen)
            row["rx_queued"], _ = _ring_fill(reg, rx_slot, rx_gen)


def _ring_word(reg, slot: int, gen: int, field: str) -> int:
    """head or tail of a slot's ring (struct sbp_ring_hdr), 0 if the slot
    moved on to another connection."""
    try:
        hdr = reg.ring_header(slot)
    except (IndexError, ValueError):
        return 0
    return getattr(hdr, field) if hdr.generation == gen else 0


def _ring_fill(reg, slot: int, gen: int) -> tuple[int | None, int | None]:
    """(bytes written and not read yet, capacity) of a slot's ring; None
    when the slot moved on. Read from shared memory while both ends move:
    clamped to what the ring can hold."""
    try:
        hdr = reg.ring_header(slot)
    except (IndexError, ValueError):
        return None, None
    if hdr.generation != gen:
        return None, None
    cap = reg.info.ring_capacity  # ours, not the header's (shared memory)
    tail = hdr.tail  # tail first: the head read after it is never behind it
    head = hdr.head
    return max(0, min(head - tail, cap)), cap


def counters(inst: paths.Instance) -> dict[str, int]:
    if not os.path.exists(inst.pin("counters")):
        return {}
    with bpf.Map.pinned(inst.pin("counters"), "uint32_t", "uint64_t", percpu=True) as m:
        return {name: sum(m.lookup(idx) or [0]) for idx, name in COUNTERS.items()}


def errors(inst: paths.Instance) -> dict[int, dict]:
    """BPF-side errors by source line of bpf/bypass.bpf.c."""
    if not os.path.exists(inst.pin("errors")):
        return {}
    with bpf.Map.pinned(inst.pin("errors"), "uint32_t", "struct sbp_error") as m:
        return {line: {"err": e.err, "count": e.count} for line, e in m.items()}


def add_owners(rows: list[dict]) -> None:
    """pid and command of the process holding each row's socket (the lowest
    pid when several do: fork), and all of them in "owners"; None when no
    process holds it (TIME_WAIT, an orphan) or it cannot be seen."""
    from shmbypass import owners
    try:
        held = owners.by_cookie({r["cookie"]: r["netns"] for r in rows})
    except (OSError, owners.NetlinkError):
        held = {}  # no sock_diag here (e.g. a minimal guest kernel): owners unknown
    for r in rows:
        who = held.get(r["cookie"], [])
        r["pid"] = who[0]["pid"] if who else None
        r["command"] = who[0]["command"] if who else None
        r["owners"] = who


def status(inst: paths.Instance, with_owners: bool = True) -> dict:
    """Everything `status` shows; with_owners=False skips the owning
    processes (a walk of /proc: the metrics exporter does not need it)."""
    state = inst.load_state()
    conns = connections(inst)
    if with_owners:
        add_owners(conns)
    return {
        "instance": inst.name,
        "attached": manager.is_up(inst),
        "cgroup": state.get("cgroup"),
        "connections": conns,
        "counters": counters(inst),
        "errors": {str(k): v for k, v in errors(inst).items()},
        "features": state.get("features", {}),
    }


def _port(addr: str) -> int:
    return int(addr.rsplit(":", 1)[1])


def select(st: dict, tier: str | None = None, port: int | None = None,
           pid: int | None = None) -> dict:
    """The status with only the rows that match every filter given: tier,
    local or remote port, a pid among the socket's owners."""
    rows = [r for r in st["connections"]
            if (tier is None or r["tier"] == tier)
            and (port is None or port in (_port(r["local"]), _port(r["remote"])))
            and (pid is None or any(o["pid"] == pid for o in r.get("owners") or ()))]
    return {**st, "connections": rows}


def _process(c: dict) -> str:
    if not c.get("owners"):
        return "-"
    more = len(c["owners"]) - 1
    return f"{c['pid']}/{c['command']}" + (f" (+{more})" if more else "")


def _reason(c: dict) -> str:
    code = c.get("reason_code", reason_code(c["reason"]))
    return f"{c['reason']} (0x{code:08x})" if c["reason"] else ""


def _queued(c: dict, d: str) -> str:
    n = c.get(f"{d}_queued")
    return "-" if n is None else str(n)


def render(st: dict) -> str:
    lines = [f"instance {st['instance']}: " + (
        f"attached to cgroup {st['cgroup']}" if st["attached"] else "not attached")]
    conns = st["connections"]
    if conns:
        w = max(len(c["local"]) for c in conns)
        v = max(len(c["remote"]) for c in conns)
        p = max(len("PROCESS"), *(len(_process(c)) for c in conns))
        lines.append(f"{'LOCAL':<{w}}  {'REMOTE':<{v}}  TIER    {'TX':>12} {'RX':>12} "
                     f"{'SEND-Q':>8} {'RECV-Q':>8}  {'PROCESS':<{p}}  REASON")
        for c in conns:
            lines.append(f"{c['local']:<{w}}  {c['remote']:<{v}}  {c['tier']:<6}  "
                         f"{c['bytes_tx']:>12} {c['bytes_rx']:>12} {_queued(c, 'tx'):>8} "
                         f"{_queued(c, 'rx'):>8}  {_process(c):<{p}}  {_reason(c)}".rstrip())
    elif st["attached"]:
        lines.append("no connections")
    off = {n: f["detail"] for n, f in st.get("features", {}).items() if not f["ok"]}
    for name, why in off.items():
        lines.append(f"optional feature off: {name}: {why}")
    if st["counters"]:
        lines.append("counters: " + " ".join(f"{k}={v}" for k, v in st["counters"].items()))
    if st["errors"]:
        lines.append("BPF errors (line: errno x count): " + " ".join(
            f"{k}: {e['err']} x{e['count']}" for k, e in st["errors"].items()))
    return "\n".join(lines)


def to_json(st: dict) -> str:
    return json.dumps(st, indent=2)
