"""shmbypass/pcap.py: synthetic flows written as pcapng/pcap must read back
in the real tools exactly: tshark's follow-tcp-stream gives the bytes sent,
tshark's expert analysis finds nothing wrong, tcpdump reads every packet,
and the sequence numbers continue from the given ISNs."""
import os
import random
import re
import subprocess

import pytest

from shmbypass import pcap
from shmbypass.pcap import C2S, S2C, Close, Data, Open, Reset, TcpFlow
from apps import need

T0 = 1_700_000_000 * 10**9


def tshark(*args) -> str:
    need("tshark")
    p = subprocess.run(["tshark", *args], capture_output=True, text=True, timeout=120)
    noise = [ln for ln in p.stderr.splitlines() if ln.strip() and "Running as user" not in ln]
    assert p.returncode == 0 and not noise, (args, p.stderr)
    return p.stdout


def follow(path, stream=0) -> tuple[tuple[str, str], bytes, bytes]:
    """(node 0, node 1), bytes from node 0, bytes from node 1."""
    out = tshark("-r", str(path), "-q", "-z", f"follow,tcp,raw,{stream}")
    body = out.split("=" * 67)[1]
    nodes = tuple(re.findall(r"^Node [01]: (.*)$", body, re.M))
    a, b = bytearray(), bytearray()
    for line in body.splitlines():
        if re.fullmatch(r"\t?[0-9a-f]+", line):
            (b if line.startswith("\t") else a).extend(bytes.fromhex(line.strip()))
    return nodes, bytes(a), bytes(b)


def expert_problems(path) -> list[str]:
    """tshark's expert info at warning level and above (malformed packets,
    bad checksums, unseen segments, window full, ...): one summary each."""
    out = tshark("-r", str(path), "-o", "tcp.check_checksum:TRUE", "-o", "ip.check_checksum:TRUE",
                 "-q", "-z", "expert,warn")
    return [m.group(1).strip() for m in re.finditer(r"^\s+\d+\s+\S+\s+\S+\s+(.*)$", out, re.M)]


def segments(path) -> list[dict]:
    out = tshark("-r", str(path), "-T", "fields", "-E", "separator=,", "-e", "tcp.stream",
                 "-e", "tcp.srcport", "-e", "tcp.seq_raw", "-e", "tcp.ack_raw", "-e", "tcp.len",
                 "-e", "tcp.flags")
    rows = []
    for line in out.splitlines():
        st, sport, seq, ack, n, flags = line.split(",")
        rows.append({"stream": int(st), "sport": int(sport), "seq": int(seq), "ack": int(ack),
                     "len": int(n), "flags": int(flags, 16)})
    return rows


def tcpdump(path) -> list[str]:
    need("tcpdump")
    p = subprocess.run(["tcpdump", "-r", str(path), "-nn", "-S"], capture_output=True, text=True,
                       timeout=120)
    noise = [ln for ln in p.stderr.splitlines() if not ln.startswith("reading from file")]
    assert p.returncode == 0 and not noise, p.stderr
    return p.stdout.splitlines()


def conversation(rng, flow, sizes_c, sizes_s, t=T0):
    """Open, alternate sends of the given sizes; the events and the bytes
    each side sent."""
    events, sent = [Open(t)], (bytearray(), bytearray())
    for i in range(max(len(sizes_c), len(sizes_s))):
        for d, sizes in ((C2S, sizes_c), (S2C, sizes_s)):
            if i < len(sizes):
                t += 1000
                data = rng.randbytes(sizes[i])
                events.append(Data(d, data, t))
                sent[d].extend(data)
    return events, bytes(sent[0]), bytes(sent[1]), t


def test_ipv4_flow_reads_back_exactly(tmp_path):
    rng = random.Random(7)
    mss = 1000
    # the client's sequence numbers wrap around 2^32 in the middle
    flow = TcpFlow(("127.0.0.1", 40123), ("127.0.0.1", 46379), client_isn=0xFFFFF000,
                   server_isn=rng.getrandbits(32), mss=mss)
    sizes_c = [1, 999, 1000, 1001, 70000, 5]
    sizes_s = [5, 3000, 1, 200000]
    events, c, s, t = conversation(rng, flow, sizes_c, sizes_s)
    events += [Close(C2S, t + 1), Close(S2C, t + 2)]
    pkts = flow.packets(events)
    path = tmp_path / "flow.pcapng"
    pcap.write(str(path), pkts)

    nodes, got_c, got_s = follow(path)
    assert nodes == ("127.0.0.1:40123", "127.0.0.1:46379")
    assert got_c == c and got_s == s
    assert expert_problems(path) == []
    # the check sees what is wrong: a lost segment
    broken = tmp_path / "broken.pcapng"
    pcap.write(str(broken), pkts[:10] + pkts[11:])
    assert "Previous segment" in " ".join(expert_problems(broken))

    segs = segments(path)
    assert len(segs) == len(pkts)
    syn, synack, ack3 = segs[:3]
    assert (syn["seq"], syn["flags"]) == (flow.client_isn, pcap.SYN)
    assert (synack["seq"], synack["ack"], synack["flags"]) == (
        flow.server_isn, (flow.client_isn + 1) % 2**32, pcap.SYN | pcap.ACK)
    data = [x for x in segs if x["len"]]
    assert all(x["len"] <= mss for x in data)
    n_segs = sum(-(-n // mss) for n in sizes_c + sizes_s)
    assert len(data) == n_segs
    first_c = next(x for x in data if x["sport"] == 40123)
    first_s = next(x for x in data if x["sport"] == 46379)
    assert first_c["seq"] == (flow.client_isn + 1) % 2**32
    assert first_s["seq"] == (flow.server_isn + 1) % 2**32
    fins = [x for x in segs if x["flags"] & pcap.FIN]
    assert [x["sport"] for x in fins] == [40123, 46379]
    assert fins[0]["seq"] == (flow.client_isn + 1 + len(c)) % 2**32

    lines = tcpdump(path)
    assert len(lines) == len(pkts)
    assert f"127.0.0.1.40123 > 127.0.0.1.46379: Flags [S], seq {flow.client_isn}," in lines[0]
    assert f"Flags [S.], seq {flow.server_isn}, ack {(flow.client_isn + 1) % 2**32}," in lines[1]


def test_ipv6_reset_in_classic_pcap(tmp_path):
    rng = random.Random(8)
    flow = TcpFlow(("::1", 50000), ("::1", 48080), client_isn=12345, server_isn=67890, mss=1440)
    events, c, s, t = conversation(rng, flow, [100, 5000], [64 * 1024])
    events += [Reset(S2C, t + 1), Data(C2S, b"never written", t + 2)]
    path = tmp_path / "v6.pcap"
    with open(path, "wb") as f:
        pcap.write(f, flow.packets(events), fmt="pcap")
    nodes, got_c, got_s = follow(path)
    assert nodes == ("[::1]:50000", "[::1]:48080")
    assert (got_c, got_s) == (c, s)
    lines = tcpdump(path)
    assert "IP6 ::1.48080 > ::1.50000: Flags [R.]" in lines[-1]
    assert expert_problems(path) == ["Connection reset (RST)"]


def test_two_flows_interleaved(tmp_path):
    rng = random.Random(9)
    flows, sent = [], []
    for i, port in enumerate((47001, 47002)):
        f = TcpFlow(("127.0.0.1", 41000 + i), ("127.0.0.1", port), rng.getrandbits(32),
                    rng.getrandbits(32))
        ev, c, s, t = conversation(rng, f, [300, 40000], [20, 7], t=T0 + i * 500)
        flows.append(f.packets(ev + [Close(C2S, t + 1), Close(S2C, t + 2)]))
        sent.append((c, s))
    merged = pcap.merge(*flows)
    assert [p.ts for p in merged] == sorted(p.ts for p in merged)
    path = tmp_path / "two.pcapng"
    pcap.write(str(path), merged)
    for i in (0, 1):
        nodes, c, s = follow(path, i)
        assert nodes[1] == f"127.0.0.1:{47001 + i}" and (c, s) == sent[i]
    assert expert_problems(path) == []
    assert len(tcpdump(path)) == len(merged)


def test_v4_mapped_and_mid_stream(tmp_path):
    """A v4-mapped socket's flow is IPv4 on the wire; a capture that began
    after some bytes keeps their real sequence numbers."""
    flow = TcpFlow(("::ffff:127.0.0.1", 40000), ("::ffff:127.0.0.1", 9000), 1000, 2000,
                   before=(100, 7))
    pkts = flow.packets([Data(C2S, b"x" * 10, T0), Data(S2C, b"y" * 3, T0 + 1)])
    path = tmp_path / "mid.pcapng"
    pcap.write(str(path), pkts)
    segs = segments(path)
    assert [(x["seq"], x["ack"]) for x in segs] == [(1101, 2008), (2008, 1111)]
    assert tcpdump(path)[0].split()[1:4] == ["IP", "127.0.0.1.40000", ">"]
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]


def test_bad_flows_are_refused():
    with pytest.raises(ValueError):
        TcpFlow(("127.0.0.1", 1), ("::1", 2), 0, 0)
    with pytest.raises(ValueError):
        TcpFlow(("127.0.0.1", 1), ("127.0.0.1", 2), 0, 0, mss=0)
    f = TcpFlow(("127.0.0.1", 1), ("127.0.0.1", 2), 0, 0)
    with pytest.raises(ValueError):
        f.packets([Close(C2S, 0), Data(C2S, b"late", 1)])
    with pytest.raises(ValueError):
        list(pcap.stream([], fmt="erf"))
