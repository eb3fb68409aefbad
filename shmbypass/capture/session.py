"""One capture: what it sets up (the capture programs, the flags, the
interposers' generation), the loop that reads and writes, and how it is all
undone, even when the command is killed (the kernel's side: fds)."""
import fcntl
import mmap
import os
import select
import signal
import sys
import time

from shmbypass import bpf, memword, paths, pcap, programs
from shmbypass._native import lib
from shmbypass.capture import control
from shmbypass.capture.flows import Conn, Filter, Flow, Flows, Stats
from shmbypass.capture.rings import REC, KernelRing, ProcRings
from shmbypass.errors import ShmbypassError

DEFAULT_BUFFER_KIB = 16 << 10  # the kernel tier's ring buffer
HOLD_NS = 100_000_000       # records wait this long to be put in time order
LEASE_NS = 3 * 10**9        # interposers stop writing this long after the last renewal
FEATURE = next(p for p in programs.OPTIONAL_PROGRAMS if p.name == "capture")


class Output:
    """pcapng or pcap, written as packets come; stops at `count`."""

    def __init__(self, path: str, fmt: str, count: int | None):
        if path == "-":
            if sys.stdout.isatty():
                raise ShmbypassError("capture: will not write a pcap to a terminal (-w FILE, or "
                                     "pipe it: shmbypass capture | tcpdump -r -)")
            self.f, self.close_f = sys.stdout.buffer, False
        else:
            self.f, self.close_f = open(path, "wb"), True
        self.fmt, self.count, self.n = fmt, count, 0
        self.f.write(pcap.pcapng_header() if fmt == "pcapng" else pcap.pcap_header())
        self.enc = pcap.pcapng_packet if fmt == "pcapng" else pcap.pcap_packet

    def full(self) -> bool:
        return self.count is not None and self.n >= self.count

    def write(self, packets: list) -> None:
        for p in packets:
            if self.full():
                return
            self.f.write(self.enc(p))
            self.n += 1

    def close(self) -> None:
        self.f.flush()
        if self.close_f:
            self.f.close()


def _conn_from_row(row) -> Conn:
    k = row.key
    ip = lambda words: b"".join(int(w).to_bytes(4, "little") for w in words)  # noqa: E731
    return Conn((ip(k.a_ip), ip(k.b_ip), k.a_port, k.b_port, k.a_isn, k.b_isn), bool(row.active),
                row.tier, 0, row.owner.uid, row.bytes_tx)


class Session:
    """One capture: what it set up, and how it is undone."""

    def __init__(self, inst: paths.Instance, buffer_kib: int):
        self.inst = inst
        self.undo = []
        try:
            self._start(buffer_kib)
        except BaseException:
            self.stop()
            raise

    def _start(self, buffer_kib: int) -> None:
        inst = self.inst
        if not all(os.path.exists(inst.pin(p)) for p in ("prog_msg", "conns", "settings")):
            raise ShmbypassError(f"instance {inst.name} is not up (shmbypass up)")
        try:
            self.lock = os.open(control.ctl_path(inst), os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise ShmbypassError(f"{control.ctl_path(inst)} is missing: bring the instance up again "
                                 "with this version (shmbypass down; shmbypass up)") from None
        self.undo.append(lambda: os.close(self.lock))
        try:
            fcntl.flock(self.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ShmbypassError(f"another capture of instance {inst.name} is running") from None
        control.reset(inst, self.lock)
        size = 1 << max(16, (max(buffer_kib, 64) * 1024 - 1).bit_length())  # a power of two

        pins = {m: inst.pin(m) for m in FEATURE.reuse}
        obj, feat = programs.load_optional(FEATURE, pins, size={"capture_ring": size})
        if obj is None:
            raise ShmbypassError(f"capture is not available here: {feat.detail}")
        self.undo.append(obj.close)
        self.ring = KernelRing(obj.map_fd("capture_ring"), size)
        self.undo.append(self.ring.close)
        # Held open: the counts stay readable if the instance goes down first.
        self.counters = bpf.Map.pinned(inst.pin("counters"), "uint32_t", "uint64_t", percpu=True)
        self.undo.append(self.counters.close)
        self.counters0 = self._counters()
        self.conns = bpf.Map.pinned(inst.pin("conns"), "uint64_t", "struct sbp_conn")
        self.undo.append(self.conns.close)

        # The interposers: a new generation, on, with a lease we renew.
        self.ctl = mmap.mmap(self.lock, control.CTL.size)
        self.undo.append(self.ctl.close)
        gen = (control.CTL.unpack_from(self.ctl)[3] + 1) & 0xFFFFFFFF or 1
        self.procs = ProcRings(inst, gen)
        self.undo.append(lambda: self.procs.close(remove=True))
        # Each process's ring: a quarter of the kernel tier's buffer, at
        # most control.RING_BYTES (there may be many processes).
        per_proc = max(lib.SBP_CAPRING_MIN, min(control.RING_BYTES, size // 4))
        # One store per word: interposers read them while we write.
        memword.store_u32(self.ctl, control.OFF_GENERATION, gen)
        memword.store_u64(self.ctl, control.OFF_RING_BYTES, per_proc)
        memword.store_u64(self.ctl, control.OFF_LEASE, time.monotonic_ns() + LEASE_NS)
        memword.store_u32(self.ctl, control.OFF_ON, 1)
        self.undo.append(lambda: memword.store_u32(self.ctl, control.OFF_ON, 0))

        # Handshakes, FINs and RSTs: next to the core's sockops, for as
        # long as our link fd lives.
        cg = os.open(inst.load_state()["cgroup"], os.O_RDONLY | os.O_DIRECTORY)
        try:
            link = bpf.link_create(obj.prog_fd("sbp_capture_ops"), cg, lib.BPF_CGROUP_SOCK_OPS)
        finally:
            os.close(cg)
        self.undo.append(lambda: os.close(link))
        # Sends: into the core's program array, through an fd of our own.
        core = bpf.get_pinned(inst.pin("prog_msg"))
        try:
            self.progs = bpf.Map(bpf.prog_map_fd(core, "capture_msg"), "uint32_t", "uint32_t")
        finally:
            os.close(core)
        self.undo.append(self.progs.close)
        self.progs.update(0, obj.prog_fd("sbp_capture_msg"))
        self.undo.append(lambda: self.progs.delete(0))
        control.set_kernel_flag(inst, True)
        self.undo.append(lambda: control.set_kernel_flag(inst, False))

    def renew(self) -> None:
        memword.store_u64(self.ctl, control.OFF_LEASE, time.monotonic_ns() + LEASE_NS)

    def _counters(self) -> tuple[int, int]:
        m = self.counters
        return (sum(m.lookup(lib.SBP_CNT_CAPTURE_DROPPED) or [0]),
                sum(m.lookup(lib.SBP_CNT_CAPTURE_DROPPED_BYTES) or [0]))

    def kernel_dropped(self) -> tuple[int, int]:
        now = self._counters()
        return now[0] - self.counters0[0], now[1] - self.counters0[1]

    def conns_row(self, cookie: int) -> Conn | None:
        row = self.conns.lookup(cookie)
        return _conn_from_row(row) if row is not None else None

    def conns_rows(self) -> dict[int, Conn]:
        return {cookie: _conn_from_row(row) for cookie, row in self.conns.items()}

    def stop(self) -> None:
        """Undo in reverse: flag off, program array emptied, link closed,
        interposers off, rings read for the last time by the caller first."""
        while self.undo:
            try:
                self.undo.pop()()
            except (OSError, ValueError):
                pass


def run(inst: paths.Instance, out_path: str = "-", fmt: str | None = None, count: int | None = None,
        duration: float | None = None, filter_words: list[str] | None = None,
        buffer_kib: int = DEFAULT_BUFFER_KIB, ready=None) -> Stats:
    """Capture until `count` packets, `duration` seconds, or SIGINT/SIGTERM.
    ready(): called once the capture is on (tests start their traffic)."""
    filt = Filter(filter_words or [])
    fmt = fmt or ("pcap" if out_path.endswith(".pcap") else "pcapng")
    if fmt not in ("pcap", "pcapng"):
        raise ShmbypassError(f"capture: format {fmt}: pcap or pcapng")
    stopping = []
    old = {s: signal.signal(s, lambda *_: stopping.append(1)) for s in (signal.SIGINT, signal.SIGTERM)}
    stats = Stats()
    out = Output(out_path, fmt, count)
    try:
        session = Session(inst, buffer_kib)
        try:
            _loop(session, out, filt, stats, duration, stopping, ready)
        finally:
            session.stop()
    finally:
        out.close()
        for s, h in old.items():
            signal.signal(s, h)
    stats.packets = out.n
    return stats


def _loop(session: Session, out: Output, filt: Filter, stats: Stats, duration, stopping, ready):
    clock = time.time_ns() - time.monotonic_ns()
    flows = Flows(filt, out.write, stats, session.conns_row, clock)
    # Connections open before the capture: their sockets, and the bytes the
    # kernel tier moved so far (sequence numbers go on from there).
    rows = session.conns_rows()
    sent = {}
    for cookie, c in rows.items():
        sent[(c.key, c.active)] = c.bytes_tx
    for cookie, c in rows.items():
        flow = flows.flows.get(c.key) or flows.flows.setdefault(c.key, Flow(c.key))
        flow.before = (sent.get((c.key, True), 0), sent.get((c.key, False), 0))
        flows.know(cookie, c)
    if ready:
        ready()
    ep = select.epoll()
    ep.register(session.ring.fd, select.EPOLLIN)
    end = time.monotonic() + duration if duration is not None else None
    held, seq, last_scan = [], 0, 0
    try:
        while True:
            done = bool(stopping) or out.full() or (end is not None and time.monotonic() >= end)
            ep.poll(0 if done else 0.05)
            now = time.monotonic_ns()
            if now - last_scan > 100_000_000 or done:
                session.procs.scan()
                session.renew()
                last_scan = now
            got = []
            session.ring.read(got)
            held.extend((REC.unpack_from(b)[0], (seq := seq + 1), None, b) for b in got
                        if len(b) >= REC.size)
            stats.refused += sum(1 for b in got if len(b) < REC.size)
            got = []
            session.procs.read(got, now)
            for ring, b in got:
                if len(b) >= REC.size:
                    seq += 1
                    held.append((REC.unpack_from(b)[0], seq, ring, b))
                else:
                    stats.refused += 1
            held.sort(key=lambda h: (h[0], h[1]))
            cut = len(held) if done else next((i for i, h in enumerate(held)
                                                if h[0] > now - HOLD_NS), len(held))
            for _, _, ring, body in held[:cut]:
                flows.record(body, ring)
                if out.full():
                    break
            del held[:cut]
            if done:
                flows.flush()
                break
    finally:
        ep.close()
    stats.kernel_dropped, stats.kernel_dropped_bytes = session.kernel_dropped()
    for r in session.procs.rings.values():
        recs, nbytes = r.dropped()
        stats.shm_dropped += recs + r.lost
        stats.shm_dropped_bytes += nbytes + r.lost_bytes
    stats.shm_dropped += session.procs.refused


def summary(stats: Stats, out_path: str) -> str:
    where = "stdout" if out_path == "-" else out_path
    line = f"{stats.packets} packets of {stats.flows} connection(s) written to {where}"
    lost = []
    if stats.kernel_dropped:
        lost.append(f"{stats.kernel_dropped} kernel-tier records ({stats.kernel_dropped_bytes} "
                    "bytes: ring buffer full, or a send longer than "
                    f"{lib.SBP_CAP_MAX_CHUNKS * lib.SBP_CAP_CHUNK >> 20} MiB)")
    if stats.shm_dropped:
        lost.append(f"{stats.shm_dropped} shm-tier records ({stats.shm_dropped_bytes} bytes: "
                    "a process's capture ring was full)")
    if stats.unknown:
        lost.append(f"{stats.unknown} records ({stats.unknown_bytes} bytes) of connections that "
                    "closed before the capture learned them")
    if stats.refused:
        lost.append(f"{stats.refused} records refused (malformed, or not their writer's)")
    return line + ("; dropped: " + "; ".join(lost) if lost else "; nothing dropped")
