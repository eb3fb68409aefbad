"""Records to pcap flows: which socket is which end of which connection,
whether it is bypassed at all, and its packets in time order."""
import errno
import ipaddress
import struct
from dataclasses import dataclass, field

from shmbypass import pcap
from shmbypass._native import ffi, lib
from shmbypass.capture.rings import REC, ProcRing
from shmbypass.errors import ShmbypassError

CONN = struct.Struct("<16s16sIIHHI8I")  # struct sbp_cap_conn
DEFAULT_MSS = 1460          # for connections whose handshake the capture did not see
TCP_ESTABLISHED, TCP_FIN_WAIT1, TCP_CLOSE, TCP_CLOSE_WAIT, TCP_LAST_ACK = 1, 4, 7, 8, 9
assert CONN.size == ffi.sizeof("struct sbp_cap_conn")


@dataclass
class Conn:
    """One socket, as a capture knows it."""
    key: tuple          # a_ip, b_ip (16 bytes each), a_port, b_port, a_isn, b_isn
    active: bool
    tier: int
    mss: int = 0
    uid: int = 0
    bytes_tx: int = 0


def _ip(raw: bytes) -> str:
    ip = ipaddress.IPv6Address(raw)
    return str(ip.ipv4_mapped) if ip.ipv4_mapped else str(ip)


@dataclass
class Flow:
    key: tuple
    tier: int | None = None      # None: not known yet whether it is bypassed
    tcp: pcap.TcpFlow | None = None
    pending: list = field(default_factory=list)
    shown: bool = False
    opened: bool = False
    closes: int = 0
    mss: int = 0
    before: tuple = (0, 0)
    sending: dict = field(default_factory=dict)  # direction -> the send being put together


class Filter:
    """host ADDR, port N, tier kernel|shm (all must hold; `and` is allowed
    between them)."""

    def __init__(self, words: list[str]):
        self.hosts, self.ports, self.tiers = set(), set(), set()
        it = iter(w for w in words if w != "and")
        for w in it:
            arg = next(it, None)
            if arg is None:
                raise ShmbypassError(f"capture: filter `{w}` needs a value")
            if w == "host":
                try:
                    ip = ipaddress.ip_address(arg.strip("[]"))
                except ValueError:
                    raise ShmbypassError(f"capture: host {arg}: not an IP address") from None
                mapped = getattr(ip, "ipv4_mapped", None)
                self.hosts.add(str(mapped or ip))
            elif w == "port":
                if not arg.isdigit() or not 0 < int(arg) < 65536:
                    raise ShmbypassError(f"capture: port {arg}: not a port number")
                self.ports.add(int(arg))
            elif w == "tier":
                tiers = {"kernel": lib.SBP_TIER_KERNEL, "shm": lib.SBP_TIER_SHM}
                if arg not in tiers:
                    raise ShmbypassError(f"capture: tier {arg}: kernel or shm")
                self.tiers.add(tiers[arg])
            else:
                raise ShmbypassError(f"capture: unknown filter `{w}` (host ADDR, port N, "
                                     "tier kernel|shm)")

    def match(self, flow: Flow) -> bool:
        a_ip, b_ip, a_port, b_port = flow.key[:4]
        return ((not self.hosts or bool(self.hosts & {_ip(a_ip), _ip(b_ip)}))
                and (not self.ports or bool(self.ports & {a_port, b_port}))
                and (not self.tiers or flow.tier in self.tiers))


@dataclass
class Stats:
    packets: int = 0
    flows: int = 0
    kernel_dropped: int = 0          # records the capture program could not write
    kernel_dropped_bytes: int = 0
    shm_dropped: int = 0             # records interposers found no room for, or we skipped
    shm_dropped_bytes: int = 0
    refused: int = 0                 # records that do not belong where they came from
    unknown: int = 0                 # records of connections the capture never learned
    unknown_bytes: int = 0


class Flows:
    """Turns records into packets: per socket, its connection; per
    connection, a pcap.TcpFlow fed in time order."""

    def __init__(self, filt: Filter, emit, stats: Stats, lookup, mono_to_real: int):
        self.filter, self.emit, self.stats, self.lookup = filt, emit, stats, lookup
        self.clock = mono_to_real
        self.conns: dict[int, Conn] = {}
        self.flows: dict[tuple, Flow] = {}

    # -- what is known about sockets
    def know(self, cookie: int, c: Conn) -> Flow:
        self.conns[cookie] = c
        flow = self.flows.get(c.key)
        if flow is None:
            flow = self.flows[c.key] = Flow(c.key)
        if c.mss:
            flow.mss = c.mss
        # The passive end's tier is the connection's (pairing happens at
        # PASSIVE_ESTABLISHED); an active end's says so only once paired.
        if flow.tier is None and (not c.active or c.tier != lib.SBP_TIER_TCP):
            self.decide(flow, c.tier)
        return flow

    def conn(self, cookie: int) -> Conn | None:
        c = self.conns.get(cookie)
        if c is None:
            c = self.lookup(cookie)
            if c is not None:
                self.know(cookie, c)
        return c

    def decide(self, flow: Flow, tier: int) -> None:
        flow.tier = tier
        if tier == lib.SBP_TIER_TCP:
            flow.pending.clear()  # on the wire: tcpdump sees it, we have nothing of it
            return
        flow.shown = self.filter.match(flow)
        if flow.shown:
            a_ip, b_ip, a_port, b_port, a_isn, b_isn = flow.key
            flow.tcp = pcap.TcpFlow((_ip(a_ip), a_port), (_ip(b_ip), b_port),
                                    (a_isn - 1) & 0xFFFFFFFF, (b_isn - 1) & 0xFFFFFFFF,
                                    mss=min(flow.mss or DEFAULT_MSS, 65495), before=flow.before)
            self.stats.flows += 1
        pending, flow.pending = flow.pending, []
        for ev in pending:
            self._feed(flow, ev)

    def _feed(self, flow: Flow, ev) -> None:
        if flow.tier is None:
            flow.pending.append(ev)
        elif flow.shown:
            try:
                self.emit(flow.tcp.feed(ev))
            except ValueError:
                self.stats.refused += 1  # data after its FIN: not what TCP would do

    # -- records
    def record(self, body: bytes, ring: ProcRing | None) -> None:
        if len(body) < REC.size:
            self.stats.refused += 1
            return
        ts, cookie, offset, n, kind, flags = REC.unpack_from(body)
        ts += self.clock
        if n != len(body) - REC.size:
            self.stats.refused += 1
        elif kind == lib.SBP_CAP_DATA:
            self._data(ts, cookie, offset, flags, body[REC.size:], ring)
        elif ring is not None:
            self.stats.refused += 1  # an interposer speaks for data only
        elif kind in (lib.SBP_CAP_OPEN, lib.SBP_CAP_STATE) and n == CONN.size:
            self._event(ts, cookie, offset, kind, flags, CONN.unpack_from(body, REC.size))
        else:
            self.stats.refused += 1

    def _data(self, ts, cookie, offset, flags, payload, ring) -> None:
        c = self.conn(cookie)
        if c is None:
            self.stats.unknown += 1
            self.stats.unknown_bytes += len(payload)
            return
        flow = self.flows[c.key]
        if ring is not None:
            # An interposer's ring speaks only for shm-tier connections its
            # own user asked for. (An active end's own record may say tcp:
            # it was written before its peer paired; the flow knows.)
            tier = flow.tier
            if tier is None:
                row = self.lookup(cookie)
                tier = row.tier if row else None
            if tier != lib.SBP_TIER_SHM or c.uid != ring.uid:
                self.stats.refused += 1
                return
        if flow.tier is None:
            self.decide(flow, lib.SBP_TIER_SHM if ring else lib.SBP_TIER_KERNEL)
        d = pcap.C2S if c.active else pcap.S2C
        if flags & lib.SBP_CAP_F_RX:
            d = 1 - d
        # One send comes in records of SBP_CAP_CHUNK bytes: put it back
        # together (its segments then end where the application's send
        # did), unless a record of it was lost.
        part = flow.sending.get(d)
        if part and part[1] + sum(map(len, part[2])) != offset:
            self._send(flow, d, push=False)
            part = None
        if part is None:
            part = flow.sending[d] = [ts, offset, []]
        part[2].append(payload)
        if flags & lib.SBP_CAP_F_PUSH:
            self._send(flow, d, push=True)

    def _send(self, flow: Flow, d: int, push: bool) -> None:
        ts, offset, pieces = flow.sending.pop(d)
        self._feed(flow, pcap.Data(d, b"".join(pieces), ts, offset, push))

    def flush(self, flow: Flow | None = None) -> None:
        """Sends still being put together go out as they are (before a FIN,
        and at the end of the capture)."""
        for f in [flow] if flow else list(self.flows.values()):
            for d in list(f.sending):
                self._send(f, d, push=False)

    def _event(self, ts, cookie, offset, kind, flags, f) -> None:
        a_ip, b_ip, a_isn, b_isn, a_port, b_port, _, active, _, tier, mss, old, new, err, uid = f
        if flags & lib.SBP_CAP_F_NOKEY:
            c = self.conns.get(cookie)
            if c is None:
                return  # a socket the capture never saw data or a handshake of
        else:
            c = Conn((a_ip, b_ip, a_port, b_port, a_isn, b_isn), bool(active), tier, mss, uid)
        flow = self.know(cookie, c)
        self.flush(flow)
        d = pcap.C2S if c.active else pcap.S2C
        if kind == lib.SBP_CAP_OPEN:
            if not flow.opened:
                flow.opened = True
                self._feed(flow, pcap.Open(ts))
            return
        # The kernel tier counts what a socket sent, so its FIN goes where
        # its bytes ended even if records of them were lost.
        at = offset if flow.tier == lib.SBP_TIER_KERNEL and not flags & lib.SBP_CAP_F_NOKEY else None
        if new in (TCP_FIN_WAIT1, TCP_LAST_ACK):
            self._feed(flow, pcap.Close(d, ts, at))
        elif new == TCP_CLOSE:
            if err in (errno.ECONNRESET, errno.EPIPE):
                self._feed(flow, pcap.Reset(1 - d, ts))  # the peer reset it
            elif old in (TCP_ESTABLISHED, TCP_CLOSE_WAIT, TCP_FIN_WAIT1):
                self._feed(flow, pcap.Reset(d, ts))  # it aborted (unread data, linger 0)
            self.conns.pop(cookie, None)
            flow.closes += 1
            if flow.tier is None or flow.closes >= 2:
                self.flows.pop(flow.key, None)
