"""`shmbypass capture` (docs/CAPTURE.md): a pcap of what bypassed
connections carry, read back by the real tools.

The oracle is what the applications sent (sha256), and for redis the same
run over plain TCP captured by tcpdump on lo. Every test checks that the
traffic really was in the kernel tier (BPF counters), so none could pass
with the bypass off: a kernel-tier connection's payload is on no
interface, and a capture that saw none of it would have no bytes to give
back."""
import ctypes
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from shmbypass import bpf, manager, status
from shmbypass.ask import ask, info
from shmbypass.capture import control, session
from shmbypass._native import ffi, lib
from apps import SHMBYPASS, Server, free_port, need, nginx_conf, run_in, wait_port
from conftest import InGroup
from sockets import listener, recv_exact, sha
from test_pcap import expert_problems, follow, segments, tcpdump


class Capture:
    """`shmbypass capture -w PATH ARGS` in the background: on once entered,
    stopped with SIGINT (what ^C does) at exit; .summary is its last line."""

    def __init__(self, inst, path, *args):
        self.path, self.summary = str(path), None
        env = dict(os.environ, SHMBYPASS_INSTANCE=inst.name)
        self.proc = subprocess.Popen(SHMBYPASS + ["capture", "-w", self.path, *args], env=env,
                                     stderr=subprocess.PIPE, text=True)
        line = self.proc.stderr.readline()
        if "capturing" not in line:
            self.proc.kill()
            raise AssertionError(line + self.proc.stderr.read())

    def stop(self, sig=signal.SIGINT) -> str:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        rest = self.proc.stderr.read()
        assert self.proc.wait(60) == (0 if sig == signal.SIGINT else -sig), rest
        self.summary = rest.strip().splitlines()[-1] if rest.strip() else ""
        return self.summary

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.proc.poll() is None:
            self.stop()


class Tcpdump:
    """tcpdump on lo (the real packets), to a file or as text."""

    def __init__(self, expr, path=None):
        need("tcpdump")
        args = ["tcpdump", "-i", "lo", "-nn", "-S", "-U", "-l", "--immediate-mode", "-B", "65536"] + (["-w", str(path)] if path else [])
        self.proc = subprocess.Popen(args + [expr], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
        lines = []
        while not any("listening on" in ln for ln in lines):
            lines.append(self.proc.stderr.readline())
            assert lines[-1] and len(lines) < 5, lines

    def stop(self) -> list[str]:
        time.sleep(0.2)  # -U: packets are written as they come; let the last ones land
        self.proc.send_signal(signal.SIGINT)
        out, err = self.proc.communicate(timeout=30)
        self.complete = "0 packets dropped by kernel" in err.splitlines()
        return out.splitlines()


def streams(path) -> list[tuple[tuple[str, str], bytes, bytes]]:
    """Every TCP stream in the file: (nodes, client's bytes, server's bytes)."""
    segs = segments(path)
    return [follow(path, i) for i in range(max((s["stream"] for s in segs), default=-1) + 1)]


def kernel_bytes(inst) -> int:
    return status.counters(inst)["bytes_redirect"]


def test_kernel_tier_connection_reads_back_exactly(inst, tmp_path):
    """Sends of many sizes both ways (1 B to 3 MiB, the largest spans 768
    records), a half close, then close: tshark gives back each side's bytes
    exactly, with no expert warning; the handshake has the ISNs tcpdump saw
    on lo, and the data's sequence numbers continue from them."""
    rng = random.Random(13)
    path = tmp_path / "k.pcapng"
    sizes_c = [1, 7, 4095, 4096, 4097, 65536, 3 << 20, 100]
    sizes_s = [5, 12000, 1 << 20, 1]
    with InGroup(inst):
        ls = listener()
    port = ls.getsockname()[1]
    real = Tcpdump(f"tcp port {port} and tcp[tcpflags] & (tcp-syn|tcp-fin) != 0")  # few packets
    before = kernel_bytes(inst)
    with Capture(inst, path) as cap:
        with InGroup(inst):
            c = socket.create_connection(("127.0.0.1", port))
        s, _ = ls.accept()
        cport = c.getsockname()[1]
        sent = [bytearray(), bytearray()]
        for i in range(max(len(sizes_c), len(sizes_s))):
            for src, dst, sizes, buf in ((c, s, sizes_c, sent[0]), (s, c, sizes_s, sent[1])):
                if i < len(sizes):
                    data = rng.randbytes(sizes[i])
                    t = threading.Thread(target=src.sendall, args=(data,))
                    t.start()
                    assert recv_exact(dst, len(data)) == data
                    t.join()
                    buf += data
        rows = [r for r in status.connections(inst) if str(port) in r["local"] + r["remote"]]
        assert {r["tier"] for r in rows} == {"kernel"}, rows
        c.shutdown(socket.SHUT_WR)
        assert s.recv(1) == b""
        s.close()
        c.close()
        time.sleep(0.2)
        summary = cap.stop()
    ls.close()
    lines = real.stop()
    assert kernel_bytes(inst) - before == sum(map(len, sent))
    assert "nothing dropped" in summary, summary

    [(nodes, got_c, got_s)] = streams(path)
    assert nodes == (f"127.0.0.1:{cport}", f"127.0.0.1:{port}")
    assert sha(got_c) == sha(bytes(sent[0])) and sha(got_s) == sha(bytes(sent[1]))
    assert expert_problems(path) == []
    # The real handshake, as tcpdump saw it on lo: SYN, SYN-ACK (two lines).
    syn = next(ln for ln in lines if "Flags [S]," in ln)
    synack = next(ln for ln in lines if "Flags [S.]," in ln)
    client_isn = int(syn.split("seq ")[1].split(",")[0])
    server_isn = int(synack.split("seq ")[1].split(",")[0])
    segs = segments(path)
    assert (segs[0]["seq"], segs[0]["flags"]) == (client_isn, 0x02)
    assert (segs[1]["seq"], segs[1]["ack"]) == (server_isn, (client_isn + 1) % 2**32)
    data = [x for x in segs if x["len"]]
    first_c = next(x for x in data if x["sport"] != port)
    first_s = next(x for x in data if x["sport"] == port)
    assert first_c["seq"] == (client_isn + 1) % 2**32 and first_s["seq"] == (server_isn + 1) % 2**32
    fins = [x for x in segs if x["flags"] & 0x01]
    assert [x["seq"] for x in fins] == [(client_isn + 1 + len(sent[0])) % 2**32,
                                        (server_isn + 1 + len(sent[1])) % 2**32]
    # Segments end where the application's sends did (PSH), split at the MSS.
    pushed = [x for x in data if x["flags"] & 0x08]
    assert len(pushed) >= len(sizes_c) + len(sizes_s)
    assert len(tcpdump(path)) == len(segs)


def tier_took(inst, tier, before, n):
    """At least n connections took the tier since `before` (counters), and
    the other tier's path moved no byte: the capture saw the bypass."""
    after = status.counters(inst)
    if tier == "kernel":
        assert after["paired"] - before["paired"] >= n, (before, after)
    else:
        assert after["shm"] - before["shm"] >= n, (before, after)
        assert after["bytes_redirect"] == before["bytes_redirect"], (before, after)


@pytest.mark.parametrize("tier", ["kernel", "shm"])
def test_redis_benchmark_matches_plain_tcp(inst, tmp_path, tier):
    """redis-benchmark (one client, so every connection's bytes are the
    same in every run) against a fresh redis-server: once over plain TCP,
    captured by tcpdump on lo, once in the tier, captured by shmbypass (the
    shm tier's bytes by the interposers, TCP part and rings). The same
    streams, both directions, byte for byte."""
    need("redis-server", "redis-benchmark", "tshark")
    bench = ["-c", "1", "-n", "300", "-t", "ping,set,get,lpush,lrange_100", "-q"]

    def redis(port):
        return ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", str(tmp_path)]

    def digests(path):
        return sorted((len(a), len(b), sha(a), sha(b)) for _, a, b in streams(path))

    plain = tmp_path / "plain.pcap"
    for _ in range(5):  # tcpdump drops packets when the machine is busy: until it did not
        port = free_port()
        srv = subprocess.Popen(redis(port), stdout=subprocess.DEVNULL)
        try:
            wait_port(port, proc=srv)
            dump = Tcpdump(f"tcp port {port}", plain)
            r = subprocess.run(["redis-benchmark", "-p", str(port)] + bench, capture_output=True,
                               timeout=120)
            assert r.returncode == 0, r.stderr
            dump.stop()
        finally:
            srv.terminate()
            srv.wait(10)
        if dump.complete:
            break
    assert dump.complete, "tcpdump dropped packets of the plain TCP run five times"

    port = free_port()
    path = tmp_path / "bypass.pcapng"
    before = status.counters(inst)
    with Server(inst, redis(port), port, tier=tier):
        with Capture(inst, path, "port", str(port)) as cap:
            r = run_in(inst, ["redis-benchmark", "-p", str(port)] + bench, tier=tier, timeout=120)
            assert r.returncode == 0, r.stderr
            time.sleep(0.2)
            summary = cap.stop()
    tier_took(inst, tier, before, 5)
    assert "nothing dropped" in summary, summary
    want = digests(plain)
    assert len(want) >= 6
    # The Server's readiness probe connected too (no bytes either way).
    assert [d for d in digests(path) if d[:2] != (0, 0)] == want
    problems = expert_problems(path)
    if tier == "shm":
        # A client that closed as soon as it had read its last reply from
        # the ring could get the peer's doorbell byte after its close, and
        # the kernel answered that byte with RST (1 CI run in 4). The close
        # now waits for every doorbell the peer counted (control.c,
        # ctl_close_bells). Not seen here in 6 runs since, nor in 16 before
        # it (8 under CPU load): it stays tolerated until CI has not shown it
        # for a while.
        # The bytes above are whole either way.
        problems = [p for p in problems if p != "Connection reset (RST)"]
    assert problems == []
    tcpdump(path)


@pytest.mark.parametrize("tier", ["kernel", "shm"])
def test_nginx_sendfile_1mib(inst, tmp_path, tier):
    """nginx sends a 1 MiB file with sendfile (spliced pages in the kernel
    tier; pread into the ring in the shm tier) to curl: the response body
    in the capture is the file."""
    need("nginx", "curl", "tshark")
    port = free_port()
    www = tmp_path / "www"
    www.mkdir()
    body = os.urandom(1 << 20)
    (www / "f.bin").write_bytes(body)
    conf = nginx_conf(tmp_path, port, www, 64)
    path = tmp_path / "nginx.pcap"  # classic pcap, for a change
    before = status.counters(inst)
    with Server(inst, ["nginx", "-c", str(conf), "-p", str(tmp_path)], port, tier=tier):
        with Capture(inst, path, "host", "127.0.0.1", "and", "port", str(port)) as cap:
            r = run_in(inst, ["curl", "-sSf", "-o", str(tmp_path / "got"),
                              f"http://127.0.0.1:{port}/f.bin"], tier=tier, timeout=60)
            assert r.returncode == 0, r.stderr
            time.sleep(0.2)
            summary = cap.stop()
    assert (tmp_path / "got").read_bytes() == body
    tier_took(inst, tier, before, 1)
    if tier == "kernel":
        assert kernel_bytes(inst) - before["bytes_redirect"] > len(body)
    assert "nothing dropped" in summary, summary
    got = [(a, b) for _, a, b in streams(path) if a]
    assert len(got) == 1
    request, response = got[0]
    assert request.startswith(b"GET /f.bin HTTP/1.1\r\n")
    head, _, rest = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK") and b"Content-Length: 1048576" in head
    assert sha(rest) == sha(body)
    assert expert_problems(path) == []
    assert tcpdump(path)


def test_filter_and_tier(inst, tmp_path):
    """Two servers: `port A` keeps A's connection only; `tier shm` keeps
    none of them (they are in the kernel tier); a connection outside the
    group (plain TCP: tcpdump sees it) is never in a capture."""
    with InGroup(inst):
        la, lb = listener(), listener()
    lo = listener()  # outside the group
    pa, pb = la.getsockname()[1], lb.getsockname()[1]

    def traffic():
        for ls in (la, lb, lo):
            if ls is lo:
                c = socket.create_connection(ls.getsockname())
            else:
                with InGroup(inst):
                    c = socket.create_connection(ls.getsockname())
            s, _ = ls.accept()
            c.sendall(b"to %d" % ls.getsockname()[1])
            assert recv_exact(s, 8)
            c.close()
            s.close()
        time.sleep(0.2)

    got = {}
    try:
        for name, words in (("a", ["port", str(pa)]), ("shm", ["tier", "shm"]),
                            ("kernel", ["tier", "kernel", "and", "host", "::ffff:127.0.0.1"])):
            with Capture(inst, tmp_path / f"{name}.pcapng", *words) as cap:
                traffic()
                assert "nothing dropped" in cap.stop(), cap.summary
            got[name] = sorted(a for _, a, _ in streams(cap.path))
    finally:
        for ls in (la, lb, lo):
            ls.close()
    assert got["a"] == [b"to %d" % pa]
    assert got["shm"] == []
    assert got["kernel"] == sorted([b"to %d" % pa, b"to %d" % pb])


def test_full_ring_drops_are_counted_never_waited_for(inst, tmp_path):
    """A 1 MiB ring buffer and 64 MiB sent at once: the sender never waits
    for the capture, the summary counts what did not fit (and the status
    counters too), and the pcap has a gap where those bytes were, not a
    shift: every byte it has is at its own sequence number."""
    path = tmp_path / "drops.pcapng"
    data = os.urandom(1 << 20) * 64
    with Capture(inst, path, "-B", "1024") as cap:
        with InGroup(inst):
            ls = listener()
            c = socket.create_connection(ls.getsockname())
        s, _ = ls.accept()
        t = threading.Thread(target=c.sendall, args=(data,))
        t.start()
        assert sha(recv_exact(s, len(data))) == sha(data)
        t.join()
        c.close()
        s.close()
        ls.close()
        time.sleep(0.2)
        summary = cap.stop()
    assert "kernel-tier records" in summary, summary
    lost = int(summary.split("dropped: ")[1].split()[0])
    assert lost > 0
    assert status.counters(inst)["capture_dropped"] >= lost
    need("tshark")
    out = subprocess.run(["tshark", "-r", str(path), "-Y", "tcp.len > 0", "-T", "fields",
                          "-e", "tcp.seq_raw", "-e", "tcp.payload"], capture_output=True, text=True,
                         timeout=300).stdout.split()
    syn = segments(path)[0]
    assert syn["flags"] == 0x02
    got = 0
    for seq, payload in zip(out[::2], out[1::2]):
        off = (int(seq) - syn["seq"] - 1) % 2**32
        chunk = bytes.fromhex(payload)
        assert data[off:off + len(chunk)] == chunk, off
        got += len(chunk)
    assert 0 < got < len(data)
    assert "Previous segment" in " ".join(expert_problems(path))


def sockops_programs(cgroup_fd) -> int:
    ids, cnt = ffi.new("unsigned int[8]"), ffi.new("unsigned int *", 8)
    assert lib.bpf_prog_query(cgroup_fd, lib.BPF_CGROUP_SOCK_OPS, 0, ffi.NULL, ids, cnt) == 0
    return cnt[0]


def test_killed_capture_leaves_nothing_attached(inst, tmp_path):
    """kill -9 of a capture: the kernel empties the program array (its fd
    was the lease) and drops its sockops link; the flags it left on are
    reset by the next `up` (which every `shmbypass run` calls)."""
    cap = Capture(inst, tmp_path / "killed.pcapng")
    cg = os.open(inst.cgroup, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert sockops_programs(cg) == 2
        cap.stop(signal.SIGKILL)
        time.sleep(0.2)
        assert sockops_programs(cg) == 1
    finally:
        os.close(cg)
    core = bpf.get_pinned(inst.pin("prog_msg"))
    try:
        with bpf.Map(bpf.prog_map_fd(core, "capture_msg"), "uint32_t", "uint32_t") as progs:
            assert progs.lookup(0) is None
    finally:
        os.close(core)
    with bpf.Map.pinned(inst.pin("settings"), "uint32_t", "struct sbp_config") as m:
        assert m.lookup(0).capture == 1  # left on by the kill
        # Sends go on, uncaptured, while it is (the tail call finds no program).
        with InGroup(inst):
            ls = listener()
            c = socket.create_connection(ls.getsockname())
        s, _ = ls.accept()
        c.sendall(b"x" * 1000)
        assert recv_exact(s, 1000) == b"x" * 1000
        for x in (c, s, ls):
            x.close()
        assert manager.up(inst) is False
        assert m.lookup(0).capture == 0
    with open(control.ctl_path(inst), "rb") as f:
        assert control.CTL.unpack(f.read())[2] == 0
    # A new capture starts (the lock died with the killed one).
    Capture(inst, tmp_path / "again.pcapng").stop()


def test_one_capture_at_a_time(inst, tmp_path):
    with Capture(inst, tmp_path / "one.pcapng"):
        env = dict(os.environ, SHMBYPASS_INSTANCE=inst.name)
        r = subprocess.run(SHMBYPASS + ["capture", "-w", str(tmp_path / "two.pcapng")], env=env,
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 1 and "another capture" in r.stderr, r.stderr


def test_count_and_duration_stop_it(inst, tmp_path):
    env = dict(os.environ, SHMBYPASS_INSTANCE=inst.name)
    r = subprocess.run(SHMBYPASS + ["capture", "-w", str(tmp_path / "d.pcapng"), "--duration", "0.5"],
                       env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "0 packets" in r.stderr, r.stderr
    out = tmp_path / "c.pcapng"
    proc = subprocess.Popen(SHMBYPASS + ["capture", "-w", str(out), "-c", "5"], env=env,
                            stderr=subprocess.PIPE, text=True)
    assert "capturing" in proc.stderr.readline()
    with InGroup(inst):
        ls = listener()
        c = socket.create_connection(ls.getsockname())
    s, _ = ls.accept()
    for _ in range(10):
        c.sendall(b"ping")
        recv_exact(s, 4)
    assert proc.wait(30) == 0, proc.stderr.read()
    assert "5 packets" in proc.stderr.read()
    assert len(segments(out)) == 5
    for x in (c, s, ls):
        x.close()


def test_turned_off_capture_says_why(inst, tmp_path):
    env = dict(os.environ, SHMBYPASS_INSTANCE=inst.name, SHMBYPASS_WITHOUT="capture")
    r = subprocess.run(SHMBYPASS + ["capture", "-w", str(tmp_path / "x.pcapng")], env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1, r.stderr
    assert "capture is not available here: " in r.stderr and "turned off" in r.stderr


# ---- the shm tier: the interposer's side (native/preload/capture.c) ------------------
#
# The interposer's data path is being rewritten (issue 12), so these tests
# play its part: they make shm-tier connections the way it does (both ends
# ask: BPF pairs them in the shm tier) and call capture_data() as its send
# path will, from native/preload/capture.c built on its own.

SHM = lib.SBP_TIER_SHM


def shm_pair(inst):
    """(client, server, client cookie, server cookie) of a shm-tier connection."""
    with InGroup(inst):
        ls = socket.socket()
        ask(ls)
        ls.bind(("127.0.0.1", 0))
        ls.listen()
        c = socket.socket()
        ask(c)
        c.connect(ls.getsockname())
        s, _ = ls.accept()
        ask(s)
    ls.close()
    ci, si = info(c), info(s)
    assert (ci.tier, si.tier) == (SHM, SHM)
    return c, s, ci.cookie, si.cookie


@pytest.fixture(scope="module")
def capture_so(tmp_path_factory):
    """native/preload/capture.c alone, as a shared library with its
    symbols visible."""
    out = tmp_path_factory.mktemp("capture_so") / "libcapture.so"
    native = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "native")
    subprocess.run(["gcc", "-O2", "-g", "-Wall", "-Wextra", "-Werror", "-D_GNU_SOURCE",
                    f"-I{native}", "-fPIC", "-shared", "-o", str(out),
                    os.path.join(native, "preload", "capture.c"), "-lpthread"], check=True)
    return out


class Interposer:
    """A fresh copy of the library (its own globals: capture_init runs once
    per copy) for one instance."""

    def __init__(self, so, inst, tmp_path):
        copy = tmp_path / f"libcapture-{inst.name}.so"
        copy.write_bytes(so.read_bytes())
        os.environ["SHMBYPASS_INSTANCE"] = inst.name  # capture_init reads it
        try:
            self.lib = ctypes.CDLL(str(copy))
        finally:
            del os.environ["SHMBYPASS_INSTANCE"]
        self.lib.capture_data.argtypes = [ctypes.c_uint64, ctypes.c_int, ctypes.c_uint64,
                                          ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]

    def init(self, inst):
        os.environ["SHMBYPASS_INSTANCE"] = inst.name
        try:
            self.lib.capture_init()
        finally:
            del os.environ["SHMBYPASS_INSTANCE"]

    def on(self) -> bool:
        word = ctypes.c_void_p.in_dll(self.lib, "capture_word").value
        return ctypes.c_uint32.from_address(word).value != 0

    def send(self, cookie, offset, *pieces, rx=False):
        """capture_data() of these pieces as one send (an iovec each)."""
        iov = (Iovec * len(pieces))()
        keep = [ctypes.create_string_buffer(p, len(p)) for p in pieces]
        for v, b, p in zip(iov, keep, pieces):
            v.iov_base, v.iov_len = ctypes.addressof(b), len(p)
        self.lib.capture_data(cookie, lib.SBP_CAP_RX if rx else lib.SBP_CAP_TX, offset, iov,
                              len(pieces), sum(map(len, pieces)))


class Iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


def payloads(path):
    """(stream, source port, offset, bytes) of every data segment of flows
    whose handshake is in the file (tshark's relative sequence numbers count
    from the ISN: offset = relative seq - 1)."""
    need("tshark")
    out = subprocess.run(["tshark", "-r", str(path), "-T", "fields", "-e", "tcp.stream",
                          "-e", "tcp.srcport", "-e", "tcp.seq", "-e", "tcp.payload"],
                         capture_output=True, text=True, timeout=300, check=True).stdout
    rows = []
    for line in out.splitlines():
        st, sport, seq, data = (line.split("\t") + [""])[:4]
        if data:
            rows.append((int(st), int(sport), int(seq) - 1, bytes.fromhex(data)))
    return rows


def test_shm_tier_sends_read_back(inst, tmp_path, capture_so):
    """capture_on() is off until a capture runs and off again after it;
    sends (several iovecs, both directions, 1 B to 1 MiB: records of 64 KiB
    at most) come back byte for byte in a flow with the real handshake and
    FINs, and no expert warning."""
    ip = Interposer(capture_so, inst, tmp_path)
    assert not ip.on()
    ip.init(inst)
    assert not ip.on()
    rng = random.Random(5)
    path = tmp_path / "shm.pcapng"
    with Capture(inst, path, "tier", "shm") as cap:
        assert ip.on()
        c, s, cc, sc = shm_pair(inst)
        sent = {cc: bytearray(), sc: bytearray()}
        for size in (1, 100, 4096, 70000, 1 << 20, 3):
            for cookie in (cc, sc):
                data = rng.randbytes(size)
                ip.send(cookie, len(sent[cookie]), data[:size // 3], data[size // 3:])
                sent[cookie] += data
        c.close()
        s.close()
        time.sleep(0.3)
        summary = cap.stop()
    assert not ip.on()
    assert "nothing dropped" in summary, summary
    [(nodes, got_c, got_s)] = streams(path)
    assert sha(got_c) == sha(bytes(sent[cc])) and sha(got_s) == sha(bytes(sent[sc]))
    assert expert_problems(path) == []
    segs = segments(path)
    assert segs[0]["flags"] == 0x02 and [x for x in segs if x["flags"] & 0x01]  # SYN .. FINs


def test_shm_tier_threads_and_full_rings(inst, tmp_path, capture_so):
    """Eight threads of one process write into its one ring (64 KiB: -B
    256) as fast as they can: every byte is either in the pcap at its own
    sequence number or counted as dropped, never both, never elsewhere."""
    ip = Interposer(capture_so, inst, tmp_path)
    ip.init(inst)
    streams_data = {}
    path = tmp_path / "threads.pcapng"

    def writer(cookie, seed):
        rng = random.Random(seed)
        data = rng.randbytes(3 << 20)
        streams_data[cookie] = data
        off = 0
        while off < len(data):
            n = rng.choice((1, 17, 1000, 4096, 30000))
            ip.send(cookie, off, data[off:off + n])
            off += n

    with Capture(inst, path, "-B", "256") as cap:
        pairs = [shm_pair(inst) for _ in range(4)]
        threads = [threading.Thread(target=writer, args=(cookie, i))
                   for i, p in enumerate(pairs) for cookie in p[2:]]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for c, s, _, _ in pairs:
            c.close()
            s.close()
        time.sleep(0.3)
        summary = cap.stop()
    total = sum(map(len, streams_data.values()))
    dropped = 0
    if "shm-tier records" in summary:
        dropped = int(summary.split("shm-tier records (")[1].split()[0])
    assert "refused" not in summary and "kernel-tier" not in summary, summary
    # Each segment's bytes are its direction's at its relative sequence
    # number (streams are random: a match elsewhere is impossible).
    got = 0
    for st, sport, seq, chunk in payloads(path):
        assert any(d[seq:seq + len(chunk)] == chunk for d in streams_data.values()), (st, seq)
        got += len(chunk)
    assert got + dropped == total, (got, dropped, total)


def _ring_files(inst, pid=None):
    d = os.path.join(inst.run_dir, control.RING_DIR)
    return [os.path.join(d, n) for n in os.listdir(d) if pid is None or n.startswith(f"{pid}-")]


def _in_child(fn):
    """Run fn in a forked child; its exit status."""
    pid = os.fork()
    if pid == 0:
        try:
            fn()
            os._exit(0)
        except BaseException:
            os._exit(1)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def test_shm_rings_are_untrusted(inst, tmp_path, capture_so):
    """Next to a process whose records are good: a process of another user
    writing records for root's connection (refused: a ring speaks for its
    owner's connections only), a process that wrecks its own ring after
    writing (its records lost and counted, nothing else), a file that is not
    a ring and a symlink (ignored). The capture goes on and the good bytes
    are all there."""
    import mmap
    import struct
    ip = Interposer(capture_so, inst, tmp_path)
    ip.init(inst)
    path = tmp_path / "hostile.pcapng"
    with Capture(inst, path) as cap:
        c, s, cc, sc = shm_pair(inst)
        good = os.urandom(300000)

        def other_user():
            os.setgid(65534)
            os.setuid(65534)
            ip.send(cc, 0, b"forged by nobody" * 100)

        def wrecker():
            ip.send(sc, 0, b"x" * 5000)
            [ring] = _ring_files(inst, os.getpid())
            with open(ring, "r+b") as f, mmap.mmap(f.fileno(), 0) as m:
                struct.pack_into("<Q", m, 64, 1 << 62)           # head far past the tail
                struct.pack_into("<IIQ", m, 4096, 0xFFFFFFF0, 0, 0)  # a first slot of 4 GiB

        assert _in_child(other_user) == 0
        assert _in_child(wrecker) == 0
        d = os.path.join(inst.run_dir, control.RING_DIR)
        with open(os.path.join(d, "1-1-abc"), "wb") as f:
            f.write(b"\xff" * 100)
        os.symlink("/etc/passwd", os.path.join(d, "2-1-abd"))
        for i in range(0, len(good), 7000):
            ip.send(cc, i, good[i:i + 7000])
        c.close()
        s.close()
        time.sleep(0.3)
        summary = cap.stop()
    assert "records refused" in summary and "shm-tier records" in summary, summary
    [(_, got_c, got_s)] = streams(path)
    assert got_c == good
    assert got_s == b""  # the wrecked ring's 5000 bytes are lost (and counted)


def test_shm_side_of_a_killed_capture(inst, tmp_path, capture_so):
    """A capture killed with -9: its lease runs out and the interposers
    stop writing (the flag word may stay on until `up` resets it)."""
    ip = Interposer(capture_so, inst, tmp_path)
    ip.init(inst)
    cap = Capture(inst, tmp_path / "killed.pcapng")
    c, s, cc, _ = shm_pair(inst)
    ip.send(cc, 0, b"before the kill")
    [ring] = _ring_files(inst, os.getpid())

    def head():
        with open(ring, "rb") as f:
            f.seek(64)
            return int.from_bytes(f.read(8), "little")

    cap.stop(signal.SIGKILL)
    assert ip.on()  # the word is left on...
    h = head()
    time.sleep(session.LEASE_NS / 1e9 + 0.2)  # ...but the lease from its last renewal ran out
    ip.send(cc, 15, b"after the lease")
    assert head() == h
    assert manager.up(inst) is False
    assert not ip.on()
    c.close()
    s.close()


PEER_SCRIPT = r'''
import ctypes, hashlib, random, socket, sys
lib = ctypes.CDLL(None)
lib.shmbypass_fd_settle.argtypes = [ctypes.c_int, ctypes.c_int]
lib.shmbypass_fd_rings.argtypes = [ctypes.c_int]
role, port = sys.argv[1], int(sys.argv[2])
rng = random.Random(role)
if role == "server":
    ls = socket.create_server(("127.0.0.1", port))
    print("READY", flush=True)
    s, _ = ls.accept()
else:
    s = socket.create_connection(("127.0.0.1", port))
first = rng.randbytes(300)                  # before the rings: over TCP
s.sendall(first)
got = bytearray()
while len(got) < 300:
    got += s.recv(300 - len(got))
lib.shmbypass_fd_settle(s.fileno(), 2000)
rest = b"".join(rng.randbytes(n) for n in (1, 4096, 70000, 1 << 20))
s.sendall(rest)
n = len(rest)
while len(got) < 300 + n:
    got += s.recv(1 << 20)
rings = lib.shmbypass_fd_rings(s.fileno())
s.shutdown(socket.SHUT_WR)
assert s.recv(1) == b""
print("SENT", hashlib.sha256(first + rest).hexdigest(), rings, flush=True)
'''


def test_shm_tier_interposer_captured(inst, tmp_path):
    """Two programs under `shmbypass run` in the shm tier (through their
    rings, after a first exchange over TCP): the interposer copies every send
    into its capture ring, so the capture holds both streams byte for byte,
    the TCP part included, in one flow with the real handshake."""
    path = tmp_path / "shm-run.pcapng"
    script = tmp_path / "peer.py"
    script.write_text(PEER_SCRIPT)
    port = free_port()
    env = dict(os.environ, SHMBYPASS_INSTANCE=inst.name)
    run = SHMBYPASS + ["run", "--"]
    with Capture(inst, path, "port", str(port)) as cap:
        srv = subprocess.Popen(run + [sys.executable, str(script), "server", str(port)], env=env,
                               stdout=subprocess.PIPE, text=True)
        try:
            assert srv.stdout.readline().strip() == "READY"
            cli = subprocess.run(run + [sys.executable, str(script), "client", str(port)], env=env,
                                 capture_output=True, text=True, timeout=120)
            assert cli.returncode == 0, cli.stderr
            sout = srv.communicate(timeout=60)[0]
        finally:
            srv.kill()
        time.sleep(0.3)
        summary = cap.stop()
    _, csha, crings = cli.stdout.split()[-3:]
    _, ssha, srings = sout.split()[-3:]
    assert crings == srings == "3", (cli.stdout, sout)     # both directions used rings
    assert "nothing dropped" in summary, summary
    [(nodes, got_c, got_s)] = streams(path)
    assert sha(got_c) == csha and sha(got_s) == ssha
    assert expert_problems(path) == []
