"""TCP flows rebuilt from what bypassed connections carried, written as
pcapng (or classic pcap) that tcpdump and Wireshark/tshark read like a
capture on `lo`.

A bypassed connection's payload never crosses the TCP stack, so no packet
of it exists to capture. What the BPF programs and the interposer can
record is the connection (addresses, ports, both ISNs) and each send
(direction, bytes, time); this module turns that into the packets TCP
would have sent: the handshake, data segments split at the MSS with
sequence and acknowledgment numbers continuing from the real ISNs, PSH on
the last segment of each send, and FIN or RST. tshark's "follow TCP stream"
then gives back exactly the bytes the applications exchanged.

Pure functions build the packets (`TcpFlow.packets`, `merge`); `write`
puts them in a file. Frames are Ethernet with zero MAC addresses, as Linux
shows loopback traffic.

    flow = TcpFlow(("127.0.0.1", 40000), ("127.0.0.1", 6379), client_isn=..., server_isn=...)
    pkts = flow.packets([Open(t0), Data(C2S, b"PING\\r\\n", t1), Data(S2C, b"+PONG\\r\\n", t2),
                         Close(C2S, t3), Close(S2C, t4)])
    write("out.pcapng", pkts)
"""
import ipaddress
import os
import struct
from dataclasses import dataclass, field
from typing import BinaryIO, Iterable, Iterator

C2S, S2C = 0, 1  # directions: from the connecting end (client), from the accepting end

# One event of a connection, as the capture records it; `ts` is in ns since the epoch.


@dataclass(frozen=True)
class Open:
    """The three-way handshake (SYN, SYN-ACK, ACK)."""
    ts: int


@dataclass(frozen=True)
class Data:
    """One send: `payload` from `direction`, split at the MSS. `offset`:
    bytes that direction sent before it (its sequence number is ISN + 1 +
    offset; None: right after the previous one), so a capture that lost a
    record leaves a gap where the bytes were, not a shift. `push`: PSH on
    the last segment (the end of the application's send)."""
    direction: int
    payload: bytes
    ts: int
    offset: int | None = None
    push: bool = True


@dataclass(frozen=True)
class Close:
    """A FIN from `direction` (acknowledged by the other end); `offset`:
    bytes that direction sent before it, as for Data."""
    direction: int
    ts: int
    offset: int | None = None


@dataclass(frozen=True)
class Reset:
    """An RST from `direction`: the connection ends there."""
    direction: int
    ts: int
    offset: int | None = None


@dataclass(frozen=True)
class Packet:
    ts: int      # ns since the epoch
    frame: bytes  # Ethernet frame


FIN, SYN, RST, PSH, ACK = 0x01, 0x02, 0x04, 0x08, 0x10
WINDOW = 65535
ACK_EVERY = 32768  # bytes; half the window
ETH_ZERO = bytes(12)


def _checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071). The one's complement sum of the
    16-bit words is the data as one big number modulo 0xFFFF (2^16 = 1
    there), which Python computes 3-4x faster than a sum of the words."""
    if len(data) % 2:
        data += b"\0"
    n = int.from_bytes(data, "big")
    s = n % 0xFFFF
    if s == 0 and n:
        s = 0xFFFF  # the sum of non-zero words never folds to 0
    return ~s & 0xFFFF


def _ip(addr: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    ip = ipaddress.ip_address(addr.strip("[]"))
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        return ip.ipv4_mapped  # what a v4-mapped socket put on the wire
    return ip


@dataclass
class TcpFlow:
    """One TCP connection. client/server: (address, port); ISNs as the
    kernel chose them (the SYN's and the SYN-ACK's sequence numbers).
    `before`: bytes each direction (client's, server's) sent before the
    capture began, so later bytes keep their real sequence numbers."""
    client: tuple[str, int]
    server: tuple[str, int]
    client_isn: int
    server_isn: int
    mss: int = 1460
    before: tuple[int, int] = (0, 0)
    _ipid: list = field(default_factory=lambda: [0, 0], repr=False)

    def __post_init__(self):
        self.ips = (_ip(self.client[0]), _ip(self.server[0]))
        if self.ips[0].version != self.ips[1].version:
            raise ValueError(f"one flow, two IP versions: {self.client} {self.server}")
        if not 0 < self.mss <= 65495:
            raise ValueError(f"mss {self.mss} out of range")
        self.ports = (self.client[1], self.server[1])

    def _segment(self, ts: int, d: int, seq: int, ack: int, flags: int, payload: bytes = b"",
                 mss_option: bool = False) -> Packet:
        src, dst = self.ips[d], self.ips[1 - d]
        sport, dport = self.ports[d], self.ports[1 - d]
        opts = struct.pack("!BBH", 2, 4, self.mss) if mss_option else b""
        off = (20 + len(opts)) // 4
        tcp = struct.pack("!HHIIBBHHH", sport, dport, seq & 0xFFFFFFFF,
                          ack & 0xFFFFFFFF if flags & ACK else 0, off << 4, flags, WINDOW, 0, 0)
        tcp += opts + payload
        if src.version == 4:
            pseudo = src.packed + dst.packed + struct.pack("!BBH", 0, 6, len(tcp))
        else:
            pseudo = src.packed + dst.packed + struct.pack("!IxxxB", len(tcp), 6)
        tcp = tcp[:16] + struct.pack("!H", _checksum(pseudo + tcp)) + tcp[18:]
        if src.version == 4:
            self._ipid[d] = (self._ipid[d] + 1) & 0xFFFF
            hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), self._ipid[d], 0x4000,
                              64, 6, 0, src.packed, dst.packed)
            hdr = hdr[:10] + struct.pack("!H", _checksum(hdr)) + hdr[12:]
            ethertype = 0x0800
        else:
            hdr = struct.pack("!IHBB16s16s", 6 << 28, len(tcp), 6, 64, src.packed, dst.packed)
            ethertype = 0x86DD
        return Packet(ts, ETH_ZERO + struct.pack("!H", ethertype) + hdr + tcp)

    def start(self) -> None:
        """Back to before the first event (feed() starts here by itself)."""
        # next sequence number per direction
        self._nxt = [self.client_isn + 1 + self.before[0], self.server_isn + 1 + self.before[1]]
        self._acked = list(self._nxt)  # the highest ACK each direction's data got
        self._closed = [False, False]
        self._reset = False

    def feed(self, ev) -> list[Packet]:
        """The packets of one more event (a capture feeds events as they
        come). Data before Open is written as if the handshake had been
        seen (sequence numbers start at ISN + 1 either way); nothing
        follows a Reset."""
        if not hasattr(self, "_nxt"):
            self.start()
        nxt, acked, closed = self._nxt, self._acked, self._closed
        out = []

        def emit(ts, d, flags, payload=b""):
            out.append(self._segment(ts, d, nxt[d], nxt[1 - d], flags, payload))
            acked[1 - d] = nxt[1 - d]

        if self._reset:
            return out
        if isinstance(ev, Open):
            c, s = self.client_isn, self.server_isn
            out.append(self._segment(ev.ts, C2S, c, 0, SYN, mss_option=True))
            out.append(self._segment(ev.ts, S2C, s, c + 1, SYN | ACK, mss_option=True))
            out.append(self._segment(ev.ts, C2S, c + 1, s + 1, ACK))
        elif isinstance(ev, Data):
            d = ev.direction
            if closed[d]:
                raise ValueError(f"data from direction {d} after its FIN")
            self._place(ev)
            for off in range(0, len(ev.payload), self.mss):
                chunk = ev.payload[off:off + self.mss]
                last = off + self.mss >= len(ev.payload)
                emit(ev.ts, d, ACK | (PSH if last and ev.push else 0), chunk)
                nxt[d] += len(chunk)
                # The receiver acknowledges every ACK_EVERY bytes (its
                # own segments carry the ACK otherwise), so no more
                # than the window is ever in flight.
                if (nxt[d] - acked[d]) & 0xFFFFFFFF >= ACK_EVERY:
                    emit(ev.ts, 1 - d, ACK)
        elif isinstance(ev, Close):
            d = ev.direction
            if not closed[d]:
                self._place(ev)
                emit(ev.ts, d, FIN | ACK)
                nxt[d] += 1  # the FIN takes one sequence number
                closed[d] = True
                emit(ev.ts, 1 - d, ACK)
        elif isinstance(ev, Reset):
            self._place(ev)
            emit(ev.ts, ev.direction, RST | ACK)
            self._reset = True
        else:
            raise TypeError(f"not a flow event: {ev!r}")
        return out

    def _place(self, ev) -> None:
        if ev.offset is not None:
            self._nxt[ev.direction] = (self.client_isn, self.server_isn)[ev.direction] + 1 + ev.offset

    def packets(self, events: Iterable) -> list[Packet]:
        """The packets of these events, in order, from the start."""
        self.start()
        return [p for ev in events for p in self.feed(ev)]


def merge(*flows: list[Packet]) -> list[Packet]:
    """Packets of several flows in time order (stable: a flow's own order
    is kept for equal times)."""
    return sorted((p for f in flows for p in f), key=lambda p: p.ts)


# -- files ------------------------------------------------------------------------

LINKTYPE_ETHERNET = 1
SNAPLEN = 262144


def _block(btype: int, body: bytes) -> bytes:
    body += bytes(-len(body) % 4)
    n = len(body) + 12
    return struct.pack("<II", btype, n) + body + struct.pack("<I", n)


def _option(code: int, value: bytes) -> bytes:
    return struct.pack("<HH", code, len(value)) + value + bytes(-len(value) % 4)


def pcapng_header(app: str = "shmbypass") -> bytes:
    """Section header and one Ethernet interface with ns timestamps."""
    shb = struct.pack("<IHHq", 0x1A2B3C4D, 1, 0, -1) + _option(4, app.encode()) + _option(0, b"")
    idb = (struct.pack("<HHI", LINKTYPE_ETHERNET, 0, SNAPLEN) + _option(2, b"shmbypass")
           + _option(9, bytes([9])) + _option(0, b""))  # if_name, if_tsresol = 10^-9
    return _block(0x0A0D0D0A, shb) + _block(1, idb)


def pcapng_packet(p: Packet) -> bytes:
    n = len(p.frame)
    return _block(6, struct.pack("<IIIII", 0, p.ts >> 32, p.ts & 0xFFFFFFFF, n, n) + p.frame)


def pcap_header() -> bytes:
    """Classic pcap, nanosecond variant (magic a1b23c4d)."""
    return struct.pack("<IHHiIII", 0xA1B23C4D, 2, 4, 0, 0, SNAPLEN, LINKTYPE_ETHERNET)


def pcap_packet(p: Packet) -> bytes:
    n = len(p.frame)
    return struct.pack("<IIII", p.ts // 10**9, p.ts % 10**9, n, n) + p.frame


def stream(packets: Iterable[Packet], fmt: str = "pcapng") -> Iterator[bytes]:
    """The file's bytes, block by block (for a capture that writes as it goes)."""
    if fmt not in ("pcapng", "pcap"):
        raise ValueError(f"format {fmt!r}: pcapng or pcap")
    yield pcapng_header() if fmt == "pcapng" else pcap_header()
    enc = pcapng_packet if fmt == "pcapng" else pcap_packet
    for p in packets:
        yield enc(p)


def write(path_or_file: str | BinaryIO, packets: Iterable[Packet], fmt: str = "pcapng") -> None:
    """Write the packets to a file (a path is written whole, then renamed
    into place)."""
    if not isinstance(path_or_file, str):
        for b in stream(packets, fmt):
            path_or_file.write(b)
        return
    tmp = f"{path_or_file}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            for b in stream(packets, fmt):
                f.write(b)
        os.replace(tmp, path_or_file)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
