"""The shm tier's slot pool as the BPF programs see it (docs/NEGOTIATION.md).

At `up` the manager calls setup(): the free list (a BPF queue) gets the slot
ids 0..N-1 and the `region` map gets the region id, the slot count and the
life of an unclaimed SYN-ACK reservation. From then on only BPF moves slots:
sockops pops one per marked connecting socket and per answered SYN, and
pushes it back when both ends have reached TCP_CLOSE.

The manager passes the region header's id and slot count. A VM pair's
region is split into *parts* (one per guest kernel): each instance's free
list holds only its own part's slot ids, [first_slot, first_slot + N), so the
two kernels never hand out the same slot (docs/NEGOTIATION.md, "VM pairs").
"""
import os

from shmbypass import bpf, paths
from shmbypass._native import ffi, lib
from shmbypass.errors import ShmbypassError

# The pool of one instance: 128 slots, two per connection (64 connections
# in the shm tier at once; `up --slots N` changes it).
DEFAULT_SLOTS = 128
# Longer than any request socket can live after its last SYN-ACK
# (TCP_RTO_MAX is 120 s): a reservation must not expire while the peer may
# still complete the handshake with it.
DEFAULT_RESV_TTL = 180.0

# `sweeper` holds a bpf_timer: a map with timers must be pinned (a user
# reference), or bpf_timer_init() fails with EPERM.
MAPS = ("free_slots", "slot_state", "region", "ports", "reservations", "declined", "sweeper",
        "vm_peers")


def _region_map(inst: paths.Instance) -> bpf.Map:
    return bpf.Map.pinned(inst.pin("region"), "uint32_t", "struct sbp_region_cfg")


def setup(inst: paths.Instance, slot_count: int | None = None, region_id: int | None = None,
          resv_ttl: float | None = None, first_slot: int = 0) -> dict:
    """Fill the free list (slots first_slot .. first_slot + slot_count - 1) and
    the region config of a freshly loaded instance. region_id 0 = no region:
    BPF never offers shm."""
    n = DEFAULT_SLOTS if slot_count is None else slot_count
    if not 0 <= n <= lib.SBP_MAX_SLOTS:
        raise ShmbypassError(f"slot count {n} out of range (0..{lib.SBP_MAX_SLOTS})")
    if first_slot < 0 or first_slot + n > lib.SBP_MAX_SLOTS:
        raise ShmbypassError(f"slots {first_slot}..{first_slot + n - 1} out of range "
                             f"(slot ids travel as 16 bits: 0..{lib.SBP_MAX_SLOTS - 1})")
    if region_id is None:
        region_id = int.from_bytes(os.urandom(8), "little") | 1  # never 0: 0 means "no region"
    ttl = DEFAULT_RESV_TTL if resv_ttl is None else resv_ttl
    fd = bpf.get_pinned(inst.pin("free_slots"))
    try:
        val = ffi.new("uint32_t *")
        for slot in range(first_slot, first_slot + n):
            val[0] = slot
            if lib.bpf_map_update_elem(fd, ffi.NULL, val, 0) < 0:
                raise OSError(ffi.errno, f"push slot {slot} on the free list: {os.strerror(ffi.errno)}")
    finally:
        os.close(fd)
    cfg = {"region_id": region_id, "resv_ttl_ns": int(ttl * 1e9), "slot_count": n,
           "first_slot": first_slot}
    _write_config(inst, cfg)
    return cfg


def _write_config(inst: paths.Instance, cfg: dict) -> None:
    val = ffi.new("struct sbp_region_cfg *", {k: cfg[k] for k in ("region_id", "resv_ttl_ns",
                                                                   "slot_count", "first_slot")})
    with _region_map(inst) as m:
        m.update(0, val)


def config(inst: paths.Instance) -> dict:
    with _region_map(inst) as m:
        c = m.lookup(0)
        return {"region_id": c.region_id, "resv_ttl_ns": c.resv_ttl_ns, "slot_count": c.slot_count,
                "first_slot": c.first_slot}


def set_config(inst: paths.Instance, **changes) -> None:
    """Change region_id or resv_ttl_ns of a live instance (tests; wiring regions)."""
    cfg = config(inst)
    cfg.update(changes)
    _write_config(inst, cfg)


def free_slots(inst: paths.Instance) -> list[int]:
    """The pool's slots that no connection holds, in id order: the ones on
    the free list (BPF pushes a slot back when its last reference goes).
    Read from slot_state, so the free list itself is left alone."""
    return sorted(s for s, (_, refs) in slot_states(inst).items() if refs == 0)


def slot_states(inst: paths.Instance, count: int | None = None) -> dict[int, tuple[int, int]]:
    """Slot -> (generation, references) for the instance's slots (its part:
    first_slot onwards), the first `count` of them if given."""
    cfg = config(inst)
    n = cfg["slot_count"] if count is None else count
    first = cfg["first_slot"]
    with bpf.Map.pinned(inst.pin("slot_state"), "uint32_t", "uint64_t") as m:
        return {s: ((w >> 32), w & 0xFFFFFFFF) for s in range(first, first + n) for w in [m.lookup(s)]}


def reservations(inst: paths.Instance) -> list[dict]:
    """SYN-ACK answers not claimed (or expired) yet."""
    rows = []
    with bpf.Map.pinned(inst.pin("reservations"), "struct sbp_resv_key", "struct sbp_resv") as m:
        for _, r in m.items():
            rows.append({"state": r.state, "slot": r.slot, "gen": r.gen,
                         "peer_slot": r.peer_slot, "peer_gen": r.peer_gen})
    return rows


def listeners(inst: paths.Instance) -> dict[tuple[int, int], int]:
    """(netns cookie, port) -> number of marked listening sockets."""
    with bpf.Map.pinned(inst.pin("ports"), "struct sbp_listen_key", "struct sbp_port_count") as m:
        return {(k.netns, k.port): v.marked for k, v in m.items() if v.marked}


def set_vm_peers(inst: paths.Instance, addrs) -> list[str]:
    """The peer VM's addresses: only toward these does a socket that asked
    carry the TCP option (vm_peers map). Returns them as written."""
    import ipaddress
    out = []
    with bpf.Map.pinned(inst.pin("vm_peers"), "struct sbp_vm_peer", "uint8_t") as m:
        for a in addrs:
            ip = ipaddress.ip_address(a)
            if ip.version == 4:
                ip = ipaddress.IPv6Address("::ffff:" + str(ip))
            key = ffi.new("struct sbp_vm_peer *")
            raw = ip.packed
            for i in range(4):
                key.ip[i] = int.from_bytes(raw[4 * i:4 * i + 4], "little")
            m.update(key, 1)
            out.append(str(a))
    return out


def sk_state(inst: paths.Instance, sock) -> dict | None:
    with bpf.Map.pinned(inst.pin("sk_state"), "int", "struct sbp_sk") as m:
        v = m.lookup(sock.fileno())
        if v is None:
            return None
        return {f: getattr(v, f) for f in ("vm", "tier", "reason", "tx_slot", "rx_slot", "held",
                                           "tx_gen", "rx_gen", "region_id", "cookie")}
