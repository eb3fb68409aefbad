"""What `shmbypass bench` and the pytest-benchmark suites in bench/ measure,
and how: the matrix's transports, placements and tests, the measuring
programs (sbp-pingpong, sbp-ringbench: native/tools/) and their command
lines, the statistics over repetitions, and the noise rule."""
import os
import platform
import socket
import statistics
from dataclasses import dataclass

from shmbypass import paths
from shmbypass.region import SLOT_SIZE_DEFAULT

PINGPONG = paths.tool("sbp-pingpong")
RINGBENCH = paths.tool("sbp-ringbench")


@dataclass(frozen=True)
class Test:
    name: str     # short name used in tables and --only
    kind: str     # rtt | stream | connrate
    size: int
    label: str


TESTS = [
    Test("rtt64", "rtt", 64, "RTT 64 B"),
    Test("rtt1k", "rtt", 1024, "RTT 1 KiB"),
    Test("rtt16k", "rtt", 16384, "RTT 16 KiB"),
    Test("stream64k", "stream", 65536, "stream 64 KiB"),
    Test("stream1m", "stream", 1 << 20, "stream 1 MiB"),
    Test("connrate", "connrate", 64, "connect+64 B+close"),
]
CONNRATE_PLACEMENTS = ("unpinned",)  # connection setup is not a placement question

# placement -> (server cpu, client cpu); None = not pinned
PLACEMENTS = {"same-core": (0, 0), "cross-core": (0, 1), "unpinned": (None, None)}

TRANSPORTS = ["tcp", "unix", "kernel", "shm", "ring"]
TRANSPORT_LABELS = {
    "tcp": "loopback TCP", "unix": "Unix socket", "kernel": "kernel tier",
    "shm": "shm tier", "ring": "raw ring",
}
BYPASS_TIERS = {"kernel": "kernel", "shm": "shm"}

# retry_budget: repetitions run again for noise, in the whole run; past it a
# noisy repetition is kept (and marked), so a busy machine cannot stretch
# --quick past its minute.
QUICK = dict(reps=3, rtt_seconds=0.1, stream_seconds=0.1, connrate_seconds=0.15, rtt_warmup=300,
             retry_budget=10)
FULL = dict(reps=5, rtt_seconds=1.0, stream_seconds=1.0, connrate_seconds=1.0, rtt_warmup=2000,
            retry_budget=60)

NOISE_CORES = 0.25       # other processes may use a quarter of a core...
NOISE_FLOOR_S = 0.03     # ...or 3 ticks of the 100 Hz accounting, whichever is more
STEAL_FRACTION = 0.10    # hypervisor steal above 10% of the window is noise too
NOISE_RETRIES = 2


# ----------------------------------------------------------------- the programs


def pingpong_argv(role, addr, cpu=None, poll=False, *extra):
    """sbp-pingpong as a server (listening on addr; prints {"listening": ...})
    or a client of addr; pinned to cpu unless None."""
    argv = [PINGPONG, role, addr, *extra]
    if cpu is not None:
        argv += ["--cpu", str(cpu)]
    if poll:
        argv += ["--poll"]
    return argv


def pingpong_line(test, cfg):
    """The line that runs one repetition of test on a `client --stdin`."""
    if test.kind == "rtt":
        return f"rtt {test.size} {cfg['rtt_seconds']} {cfg['rtt_warmup']}\n"
    if test.kind == "stream":
        return f"stream {test.size} {cfg['stream_seconds']}\n"
    return f"connrate {cfg['connrate_seconds']}\n"


def ringbench_argv(kind, size, *, iters=None, nbytes=None, warmup=2000, cpu_a=None, cpu_b=None,
                   slot_size=SLOT_SIZE_DEFAULT):
    """sbp-ringbench: the raw ring between two processes, no sockets. Its
    rings are the shm tier's size by default: a bigger ring switches less
    often on one core, and the comparison is of the tier's overhead, not of
    ring sizes."""
    argv = [RINGBENCH, "--mode", kind, "--size", str(size), "--slot-size", str(slot_size)]
    if kind in ("rtt", "self"):
        argv += ["--iters", str(iters), "--warmup", str(warmup)]
    else:
        argv += ["--bytes", str(nbytes), "--warmup-bytes", str(16 << 20)]
    if cpu_a is not None:
        argv += ["--cpu-a", str(cpu_a)]
    if cpu_b is not None:
        argv += ["--cpu-b", str(cpu_b)]
    return argv


def engaged(transport, tiers):
    """The engagement check: every connection `shmbypass status` showed
    (tiers, one per socket) is in transport's tier, and there was one."""
    return bool(tiers) and all(t == BYPASS_TIERS[transport] for t in tiers)


# ----------------------------------------------------------------- statistics


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def summarize(test, reps):
    """Median over repetitions, with min and max of the headline figure."""
    if not reps:
        return {}
    s = {"reps": len(reps)}
    if test.kind == "rtt":
        for k in ("p50_ns", "p99_ns", "p999_ns", "mean_ns"):
            s[k] = median(r[k] for r in reps)
        s["p50_ns_min"] = min(r["p50_ns"] for r in reps)
        s["p50_ns_max"] = max(r["p50_ns"] for r in reps)
        s["p99_ns_min"] = min(r["p99_ns"] for r in reps)
        s["p99_ns_max"] = max(r["p99_ns"] for r in reps)
        s["cpu_us_per_op"] = median(_cpu(r) / r["iters"] * 1e6 for r in reps)
        s["iters"] = median(r["iters"] for r in reps)
    elif test.kind == "stream":
        s["gbps"] = median(r["gbps"] for r in reps)
        s["gbps_min"] = min(r["gbps"] for r in reps)
        s["gbps_max"] = max(r["gbps"] for r in reps)
        s["cpu_s_per_gb"] = median(_cpu(r) / (r["bytes"] / 1e9) for r in reps)
    else:
        s["conns_per_s"] = median(r["conns_per_s"] for r in reps)
        s["conns_per_s_min"] = min(r["conns_per_s"] for r in reps)
        s["conns_per_s_max"] = max(r["conns_per_s"] for r in reps)
        s["p50_ns"] = median(r["p50_ns"] for r in reps)
        s["p99_ns"] = median(r["p99_ns"] for r in reps)
        s["client_cpu_us_per_conn"] = median(r["client_cpu_s"] / r["count"] * 1e6 for r in reps)
    return s


def _cpu(r):
    return r["client_cpu_s"] + max(r.get("server_cpu_s", 0.0), 0.0)


def noise_of(rep):
    """Why this repetition is suspect, or None. Other processes' CPU is the
    machine's busy time minus what our client and server used."""
    busy, wall = rep.get("machine_busy_s", -1), rep.get("wall_s", 0)
    if busy is None or busy < 0 or rep.get("server_cpu_s", -1) < 0:
        return None
    other = busy - _cpu(rep)
    if other > max(NOISE_CORES * wall, NOISE_FLOOR_S):
        return f"other processes used {other:.2f} CPU-s during a {wall:.2f} s repetition"
    steal = rep.get("machine_steal_s", 0)
    if steal > max(STEAL_FRACTION * wall, NOISE_FLOOR_S):
        return f"the hypervisor stole {steal:.2f} CPU-s during a {wall:.2f} s repetition"
    return None


def ratio(test, s, base):
    """x better than TCP: TCP latency / latency, or throughput / TCP's."""
    if not s or not base:
        return {}
    out = {}
    if test.kind == "rtt":
        for k in ("p50_ns", "p99_ns", "p999_ns"):
            if s.get(k) and base.get(k):
                out[k.replace("_ns", "")] = base[k] / s[k]
    elif test.kind == "stream":
        if s.get("gbps") and base.get("gbps"):
            out["gbps"] = s["gbps"] / base["gbps"]
    else:
        if s.get("conns_per_s") and base.get("conns_per_s"):
            out["conns_per_s"] = s["conns_per_s"] / base["conns_per_s"]
    return out


def machine_cpu():
    """(busy, steal) CPU seconds of the whole machine so far, as sbp-pingpong
    counts them: busy = user + nice + system."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    hz = os.sysconf("SC_CLK_TCK")
    return (v[0] + v[1] + v[2]) / hz, (v[7] if len(v) > 7 else 0) / hz


def machine_info():
    model = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {"cpu_model": model, "cores": os.cpu_count(), "kernel": platform.release(),
            "python": platform.python_version(), "hostname": socket.gethostname()}
    try:
        info["loadavg"] = open("/proc/loadavg").read().split()[:3]
    except OSError:
        pass
    try:
        info["clocksource"] = open(
            "/sys/devices/system/clocksource/clocksource0/current_clocksource").read().strip()
    except OSError:
        pass
    return info
