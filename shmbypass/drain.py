"""How many redirected bytes the kernel tier's sockets still hold unread
(bpf/drain.bpf.c). `down` waits for them to be read before it drops the
sockhash, because dropping a socket from it discards that queue.

Two optional iterators, either of which a kernel may refuse: iter/sockmap
sees every socket of the sockhash; iter/tcp sees the TCP sockets of this
process's network namespace only, so connections in other namespaces stay
unchecked. Without either, nothing can be checked, and `down` says so."""
import os
import socket
from dataclasses import dataclass, field

from shmbypass import bpf, paths
from shmbypass._native import ffi, lib

SO_NETNS_COOKIE = 71
PIN_SOCKMAP = "prog_drain"       # iter/sockmap (feature "drain")
PIN_TCP = "prog_drain_tcp"       # iter/tcp (feature "drain-tcp")


@dataclass
class Queues:
    queued: dict[int, int] = field(default_factory=dict)  # cookie -> unread bytes
    unchecked: int = 0          # live kernel-tier sockets no iterator could see
    how: str = ""               # which iterator looked, "" if none could

    @property
    def busy(self) -> dict[int, int]:
        return {c: q for c, q in self.queued.items() if q}


def _records(raw: bytes) -> dict[int, int]:
    size = ffi.sizeof("struct sbp_drain_rec")
    n = len(raw) // size
    recs = ffi.from_buffer(f"struct sbp_drain_rec[{n}]", raw[:n * size])
    return {recs[i].cookie: recs[i].queued for i in range(n)}


def _own_netns_cookie() -> int:
    with socket.socket() as s:
        return int.from_bytes(s.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8), "little")


def _sockhash_members(inst: paths.Instance) -> dict[int, int]:
    """Cookie -> netns cookie of every socket in the kernel tier's sockhash
    (their `conns` rows: the sockhash itself cannot be listed from user
    space). An active end awaiting its peer is in it unless BPF expects the
    shm tier for it (`unhashed`)."""
    with bpf.Map.pinned(inst.pin("conns"), "uint64_t", "struct sbp_conn") as conns:
        return {cookie: c.netns for cookie, c in conns.items()
                if c.tier == lib.SBP_TIER_KERNEL
                or (c.reason == lib.SBP_REASON_AWAITING_PEER and not c.unhashed)}


def queues(inst: paths.Instance) -> Queues:
    if os.path.exists(inst.pin(PIN_SOCKMAP)):
        prog = bpf.get_pinned(inst.pin(PIN_SOCKMAP))
        hmap = bpf.get_pinned(inst.pin("sock_hash"))
        try:
            return Queues(_records(bpf.iter_read(prog, hmap)), 0, "iter/sockmap")
        finally:
            os.close(prog)
            os.close(hmap)
    members = _sockhash_members(inst)
    if not os.path.exists(inst.pin(PIN_TCP)):
        return Queues({}, len(members), "")
    prog = bpf.get_pinned(inst.pin(PIN_TCP))
    try:
        seen = _records(bpf.iter_read(prog))
    finally:
        os.close(prog)
    here = _own_netns_cookie()
    return Queues({c: seen.get(c, 0) for c, ns in members.items() if ns == here},
                  sum(1 for ns in members.values() if ns != here),
                  "iter/tcp, this network namespace only")
