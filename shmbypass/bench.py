"""`shmbypass bench`: loopback TCP against the bypass, as a table, JSON,
a Markdown report and a plot.

The embedded matrix needs nothing beyond the project: sbp-pingpong (native/
tools/sbp-pingpong.c) runs as an unmodified TCP program, once per transport:

  tcp     loopback TCP, no bypass
  unix    a Unix stream socket (what a program could use if it were changed)
  kernel  both ends under `shmbypass run --tier kernel` (sockops + sk_msg)
  shm     both ends under `shmbypass run --tier shm` (LD_PRELOAD rings)
  ring    sbp-ringbench: the raw ring with no sockets, the physical limit
          (the same capacity as the shm tier's slots, so the two compare)

x tests (64 B, 1 KiB, 16 KiB ping-pong RTT; 64 KiB and 1 MiB streams;
connections per second, unpinned only) x placements (both processes on one
core, on different cores, unpinned).

Method: one server and one client process per (transport, placement); the
client keeps one connection and runs each test on command (stdin), so the
figures of one cell share a connection whose tier is checked with
`shmbypass status --json` while it is open. Each repetition has its own
warm-up; a repetition during which other processes used the CPU (machine busy
time from /proc/stat minus our two processes' CPU time) is run again. Medians
over repetitions, min-max spread beside them, ratios against TCP in the same
placement. A bypass that did not engage gets no ratio, and says so.

The bypass runs as its own instance (SHMBYPASS_INSTANCE=sbp-bench-<pid>), so a
user's set-up is never touched; it is taken down at the end and on Ctrl-C.
"""
import argparse
import datetime
import json
import os
import platform
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

from shmbypass import __version__, manager, paths, region

# ----------------------------------------------------------------- the matrix


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

# Issue targets, as ratios against TCP in the same placement (>1 = better).
# The issues' targets. against "tcp": the ratio column (>1 = better than TCP,
# want at least `want`); against "ring": latency as a multiple of the raw
# ring's (want at most `want`), throughput as a fraction of it (at least).
# An app target names an entry of --apps by its name.
TARGETS = [
    dict(transport="kernel", test="rtt64", want=1.5, text="kernel tier 64 B RTT at least 1.5x lower than TCP"),
    dict(transport="kernel", test="stream1m", want=1.5, text="kernel tier 1 MiB throughput at least 1.5x TCP"),
    dict(transport="shm", test="rtt64", placement="cross-core", want=20.0,
         text="shm tier 64 B RTT on different cores at least 20x lower than TCP"),
    dict(transport="shm", test="rtt64", placement="cross-core", against="ring", want=1.5,
         text="shm tier 64 B RTT on different cores within 1.5x of the raw ring"),
    dict(transport="shm", test="rtt64", placement="same-core", want=2.0,
         text="shm tier 64 B RTT on one core at least 2x lower than TCP"),
    dict(transport="shm", test="stream64k", want=5.0, text="shm tier 64 KiB throughput at least 5x TCP"),
    dict(transport="shm", test="stream64k", against="ring", want=0.8,
         text="shm tier 64 KiB throughput at least 80% of the raw ring"),
    dict(transport="shm", test="connrate", want=0.9, text="shm tier connections per second at least 90% of TCP"),
    dict(transport="shm", app="redis-benchmark GET -c 1", want=5.0,
         text="shm tier redis-benchmark -c 1 GET at least 5x TCP"),
    dict(transport="shm", app="redis-benchmark GET -c 50", want=1.3,
         text="shm tier redis-benchmark -c 50 GET at least 1.3x TCP"),
]

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


class BenchError(Exception):
    pass


class NotAvailable(Exception):
    """A transport or app that cannot run here; str() says why."""


# ----------------------------------------------------------------- processes


class Child:
    """A child process in its own session (Ctrl-C reaches only us; we stop
    children ourselves), with stdout read line by line with timeouts."""

    def __init__(self, runner, argv, what, stdin=False, preexec=None, log=True, stdout=True):
        self.what = what
        self.argv = argv
        self.errfile = tempfile.TemporaryFile(dir=runner.tmp)
        if log:
            runner.note_command(what, argv)
        try:
            self.p = subprocess.Popen(
                argv, stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                stdout=subprocess.PIPE if stdout else subprocess.DEVNULL, stderr=self.errfile,
                env=runner.env,
                start_new_session=True, preexec_fn=preexec, cwd=runner.tmp)
        except FileNotFoundError:
            raise NotAvailable(f"{argv[0]} not found") from None
        runner.children.append(self)
        self.buf = b""

    def read_line(self, timeout):
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BenchError(f"{self.what}: no answer within {timeout:.0f} s{self.stderr_tail()}")
            r, _, _ = select.select([self.p.stdout], [], [], left)
            if r:
                chunk = os.read(self.p.stdout.fileno(), 65536)
                if not chunk:
                    self.p.wait()
                    raise BenchError(f"{self.what}: exited with status {self.p.returncode}"
                                     f"{self.stderr_tail()}")
                self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line.decode(errors="replace")

    def read_json(self, timeout):
        while True:
            line = self.read_line(timeout).strip()
            if line.startswith("{"):
                return json.loads(line)

    def send(self, text):
        self.p.stdin.write(text.encode())
        self.p.stdin.flush()

    def stderr_tail(self):
        try:
            self.errfile.seek(0)
            text = self.errfile.read().decode(errors="replace").strip()
        except ValueError:
            return ""
        return (": " + text.splitlines()[-1]) if text else ""

    def finish(self, timeout=10.0):
        """Close stdin and wait for a clean exit; stop it if it hangs."""
        if self.p.stdin:
            try:
                self.p.stdin.close()
            except OSError:
                pass
        try:
            self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            self.stop()
        return self.p.returncode

    def stop(self):
        """SIGTERM to its process group, then SIGKILL."""
        if self.p.poll() is None:
            for sig, wait in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 3.0)):
                try:
                    os.killpg(self.p.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    self.p.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        for f in (self.p.stdin, self.p.stdout):
            try:
                if f:
                    f.close()
            except OSError:
                pass
        self.errfile.close()


# ----------------------------------------------------------------- progress


class Progress:
    """A progress bar on stderr; plain lines when stderr is not a terminal."""

    def __init__(self, total, enabled=True):
        self.total = max(total, 1)
        self.done = 0
        self.label = ""
        self.tty = sys.stderr.isatty()
        self.enabled = enabled
        self.t0 = time.monotonic()
        self.last_plain = 0.0

    def set(self, label):
        self.label = label
        self.draw()

    def step(self, n=1):
        self.done = min(self.total, self.done + n)
        self.draw()

    def draw(self):
        if not self.enabled:
            return
        frac = self.done / self.total
        elapsed = time.monotonic() - self.t0
        if self.tty:
            width = 30
            bar = "#" * int(frac * width) + "-" * (width - int(frac * width))
            text = f"\r[{bar}] {frac * 100:3.0f}% {elapsed:5.1f}s  {self.label}"
            sys.stderr.write(text[:110].ljust(110))
            sys.stderr.flush()
        elif time.monotonic() - self.last_plain > 5 or self.done == self.total:
            self.last_plain = time.monotonic()
            sys.stderr.write(f"bench: {frac * 100:3.0f}% {elapsed:5.1f}s {self.label}\n")

    def say(self, text):
        """Print a message without tearing the bar."""
        if self.tty and self.enabled:
            sys.stderr.write("\r" + " " * 110 + "\r")
        sys.stderr.write(text + "\n")
        sys.stderr.flush()
        self.draw()

    def close(self):
        if self.tty and self.enabled:
            sys.stderr.write("\r" + " " * 110 + "\r")
            sys.stderr.flush()


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


def headline(test, s):
    """(value, better-is-higher) of a summary: what ratios compare."""
    if not s:
        return None, True
    if test.kind == "rtt":
        return s.get("p50_ns"), False
    if test.kind == "stream":
        return s.get("gbps"), True
    return s.get("conns_per_s"), True


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


def fmt_ns(ns):
    if ns is None:
        return "-"
    if ns >= 1e6:
        return f"{ns / 1e6:.2f} ms"
    return f"{ns / 1e3:.1f} us" if ns < 1e5 else f"{ns / 1e3:.0f} us"


def fmt_ratio(x):
    return "-" if x is None else f"{x:.2f}x"


def fmt_size(n):
    return f"{n >> 20} MiB" if n >= 1 << 20 else f"{n >> 10} KiB" if n >= 1024 else f"{n} B"


# ----------------------------------------------------------------- the runner


@dataclass
class Cell:
    transport: str
    placement: str
    test: Test
    reps: list = field(default_factory=list)
    noisy_repeats: int = 0
    still_noisy: int = 0
    engaged: bool | None = None     # None: not a bypass transport
    tiers_seen: list = field(default_factory=list)
    error: str | None = None

    def to_json(self, base):
        s = summarize(self.test, self.reps)
        return {
            "transport": self.transport, "placement": self.placement, "test": self.test.name,
            "kind": self.test.kind, "size": self.test.size, "engaged": self.engaged,
            "tiers_seen": self.tiers_seen, "error": self.error,
            "noisy_repeats": self.noisy_repeats, "still_noisy": self.still_noisy,
            "summary": s,
            "ratio_vs_tcp": ratio(self.test, s, base) if self.engaged is not False and base else {},
            "samples": self.reps,
        }


class Runner:
    def __init__(self, args):
        self.args = args
        self.cfg = dict(QUICK if args.quick else FULL)
        if args.reps:
            self.cfg["reps"] = args.reps
        if args.seconds:
            for k in ("rtt_seconds", "stream_seconds", "connrate_seconds"):
                self.cfg[k] = args.seconds
        self.only = {t.strip() for t in (args.only or "").split(",") if t.strip()}
        self.pid = os.getpid()
        self.instance = f"sbp-bench-{self.pid}"
        self.env = dict(os.environ, SHMBYPASS_INSTANCE=self.instance, PYTHONUNBUFFERED="1")
        self.tmp = tempfile.mkdtemp(prefix="sbp-bench-")
        self.children: list[Child] = []
        self.commands: list[dict] = []
        self.cells: list[Cell] = []
        self.skipped: list[dict] = []
        self.warnings: list[str] = []
        self.apps: list[dict] = []
        self.sidecar: list[dict] = []
        self.retries_left = self.cfg["retry_budget"]
        self.budget_warned = False
        self.bypass_up = False
        self.availability: dict[str, bool] = {}
        self.placements_skipped: set[str] = set()
        self.netns: list[str] = []
        self.pingpong = paths.tool("sbp-pingpong")
        self.ringbench = paths.tool("sbp-ringbench")
        self.progress = Progress(1, enabled=not args.no_progress)

    # -- helpers

    def shmbypass(self, *args):
        return [sys.executable, "-m", "shmbypass", *args]

    def note_command(self, what, argv):
        entry = {"what": what, "argv": [str(a) for a in argv]}
        if entry not in self.commands:
            self.commands.append(entry)

    def loud(self, text):
        """A warning the user must not miss: stderr now, and in the reports."""
        self.warnings.append(text)
        self.progress.say("bench: WARNING: " + text)

    def selected(self, *names):
        """--only: each of transport / placement / test must match if the
        filter names any of its kind."""
        if not self.only:
            return True
        groups = [set(TRANSPORTS) | {"apps", "sidecar"}, set(PLACEMENTS), {t.name for t in TESTS}]
        for name, group in zip(names, groups):
            if name is None:
                continue
            wanted = self.only & group
            if wanted and name not in wanted:
                return False
        return True

    def wrap(self, transport, argv):
        tier = BYPASS_TIERS.get(transport)
        return self.shmbypass("run", "--tier", tier, "--", *argv) if tier else argv

    def status(self):
        out = subprocess.run(self.shmbypass("status", "--json"), env=self.env, capture_output=True,
                             text=True, timeout=30)
        if out.returncode != 0:
            raise BenchError("shmbypass status failed: " + (out.stderr.strip().splitlines() or ["?"])[-1])
        return json.loads(out.stdout)

    def tiers_for_ports(self, ports):
        """Tiers of the bypass group's live connections that touch any of
        ports (one entry per socket, so a bypassed pair shows two)."""
        want = {str(p) for p in ports}
        tiers = []
        for c in self.status().get("connections", []):
            ends = {c.get("local", "").rsplit(":", 1)[-1], c.get("remote", "").rsplit(":", 1)[-1]}
            if ends & want:
                tiers.append(c.get("tier"))
        return tiers

    def tiers_for_port(self, port):
        return self.tiers_for_ports([port])

    def stop_children(self):
        for c in reversed(self.children):
            try:
                c.stop()
            except Exception:  # noqa: BLE001 - stop everything we can
                pass
        self.children.clear()

    def remove_netns(self):
        for name in self.netns:
            try:
                from pyroute2 import netns
                netns.remove(name)
            except Exception:  # noqa: BLE001
                pass
        self.netns.clear()

    # -- bypass lifecycle

    def sweep_leftovers(self):
        """Take down instances of bench runs that were killed (their pid is gone)."""
        for name in manager.sweep_dead("sbp-bench-"):
            self.progress.say(f"bench: took down {name}, left by a bench run that was killed")

    def ensure_up(self):
        if self.bypass_up:
            return
        self.sweep_leftovers()
        self.note_command("bring the bench's own bypass instance up",
                          ["SHMBYPASS_INSTANCE=" + self.instance] + self.shmbypass("up"))
        out = subprocess.run(self.shmbypass("up"), env=self.env, capture_output=True, text=True,
                             timeout=60)
        if out.returncode != 0:
            raise NotAvailable((out.stderr.strip().splitlines() or ["shmbypass up failed"])[-1])
        self.bypass_up = True

    def teardown(self):
        if os.getpid() != self.pid:
            return  # a forked helper (pyroute2 forks) must not tear down our state
        self.stop_children()
        self.remove_netns()
        if self.bypass_up:
            out = subprocess.run(self.shmbypass("down", "--force", "--drain-timeout", "2"),
                                 env=self.env, capture_output=True, text=True, timeout=60)
            if out.returncode != 0:
                sys.stderr.write(f"bench: WARNING: `shmbypass down` of instance {self.instance} "
                                 f"failed: {out.stderr.strip()}\n")
            self.bypass_up = False
        shutil.rmtree(self.tmp, ignore_errors=True)

    # -- availability of each transport

    def available(self, transport):
        """Whether transport can run here; the first time it is not, say why."""
        if transport not in self.availability:
            try:
                self.check_transport(transport)
                self.availability[transport] = True
            except NotAvailable as e:
                self.availability[transport] = False
                self.skipped.append({"transport": transport, "reason": str(e)})
                level = "WARNING: " if transport in ("kernel", "shm") else ""
                self.progress.say(f"bench: {level}{TRANSPORT_LABELS[transport]}: NOT AVAILABLE, "
                                  f"skipped: {e}")
        return self.availability[transport]

    def check_transport(self, transport):
        """Raise NotAvailable with a concrete reason."""
        if transport in ("tcp", "unix"):
            if not os.access(self.pingpong, os.X_OK):
                raise NotAvailable(f"{self.pingpong} is not built (run `make -C native`)")
        elif transport == "kernel":
            self.check_transport("tcp")
            self.ensure_up()
        elif transport == "shm":
            self.check_transport("tcp")
            self.ensure_up()
            out = subprocess.run(self.shmbypass("run", "--tier", "shm", "--", "true"), env=self.env,
                                 capture_output=True, text=True, timeout=60)
            if out.returncode != 0:
                why = (out.stderr.strip().splitlines() or ["`shmbypass run --tier shm` failed"])[-1]
                raise NotAvailable(f"`shmbypass run --tier shm -- true` failed: {why}")
        elif transport == "ring":
            if not os.access(self.ringbench, os.X_OK):
                raise NotAvailable(f"{self.ringbench} is not built (the raw ring benchmark, "
                                   f"native/tools/sbp-ringbench.c)")

    # -- the matrix

    def plan(self):
        matrix_names = set(PLACEMENTS) | {t.name for t in TESTS}
        if self.only & {"apps", "sidecar"} and not self.only & matrix_names:
            return []  # --only apps,sidecar[,transports]: no matrix
        plan = []
        for transport in TRANSPORTS:
            if not self.selected(transport, None, None):
                continue
            for placement in PLACEMENTS:
                if not self.selected(transport, placement, None) or not self.placement_possible(placement):
                    continue
                tests = [t for t in TESTS if self.selected(transport, placement, t.name)
                         and (t.kind != "connrate" or placement in CONNRATE_PLACEMENTS)
                         and not (transport == "ring" and t.kind == "connrate")]
                if tests:
                    plan.append((transport, placement, tests))
        return plan

    def placement_possible(self, placement):
        """Whether the CPUs the placement pins to exist; says why not, once."""
        missing = sorted(c for c in PLACEMENTS[placement] if c is not None and c >= (os.cpu_count() or 1))
        if missing and placement not in self.placements_skipped:
            self.placements_skipped.add(placement)
            self.skipped.append({"transport": placement,
                                 "reason": f"this machine has no CPU {missing[0]} to pin to"})
            self.progress.say(f"bench: placement {placement} skipped: no CPU {missing[0]} to pin to")
        return not missing

    def seconds(self, test):
        return self.cfg[f"{test.kind}_seconds"]

    def command_for(self, test):
        if test.kind == "rtt":
            return f"rtt {test.size} {self.cfg['rtt_seconds']} {self.cfg['rtt_warmup']}\n"
        if test.kind == "stream":
            return f"stream {test.size} {self.cfg['stream_seconds']}\n"
        return f"connrate {self.cfg['connrate_seconds']}\n"

    def pp_common(self, cpu):
        argv = []
        if cpu is not None:
            argv += ["--cpu", str(cpu)]
        if self.args.poll:
            argv += ["--poll"]
        return argv

    def run_cell_pingpong(self, transport, placement, tests):
        scpu, ccpu = PLACEMENTS[placement]
        listen = f"unix:{self.tmp}/pp.sock" if transport == "unix" else "127.0.0.1:0"
        label = f"{transport}/{placement}"
        server = Child(self, self.wrap(transport, [self.pingpong, "server", listen] + self.pp_common(scpu)),
                       f"{label} server")
        cells = [Cell(transport, placement, t) for t in tests]
        try:
            addr = server.read_json(timeout=30)["listening"]
            client = Child(self, self.wrap(transport, [self.pingpong, "client", addr, "--stdin"]
                                           + self.pp_common(ccpu)), f"{label} client", stdin=True)
            port = addr.rsplit(":", 1)[-1]
            expected = BYPASS_TIERS.get(transport)
            checked = False
            # Tests that keep the connection first; connrate closes it.
            for cell in sorted(cells, key=lambda c: c.test.kind == "connrate"):
                if expected and not checked and cell.test.kind == "connrate":
                    # Short connections are gone before status can see them:
                    # look at one long-lived connection instead.
                    self.engagement_probe(transport, addr, cells)
                    checked = True
                self.run_reps(client, cell, f"{label} {cell.test.name}")
                if expected and not checked:
                    tiers = self.tiers_for_port(port)
                    checked = True
                    self.record_engagement(transport, placement, cells, tiers)
            client.finish()
        except BenchError as e:
            for c in cells:
                if not c.reps:
                    c.error = str(e)
            self.loud(f"{label}: {e}")
        finally:
            server.stop()
        self.cells.extend(cells)

    def engagement_probe(self, transport, addr, cells):
        """For a cell with only connection-rate tests: hold one connection open
        and look at its tier."""
        probe = Child(self, self.wrap(transport, [self.pingpong, "client", addr, "--mode", "rtt",
                                                  "--iters", "10", "--warmup", "0", "--hold"]),
                      f"{transport} engagement probe", stdin=True, log=False)
        try:
            probe.read_json(timeout=30)
            tiers = self.tiers_for_port(addr.rsplit(":", 1)[-1])
        finally:
            probe.finish()
        self.record_engagement(transport, cells[0].placement, cells, tiers)

    def record_engagement(self, transport, placement, cells, tiers):
        expected = BYPASS_TIERS[transport]
        engaged = bool(tiers) and all(t == expected for t in tiers)
        for c in cells:
            c.engaged = engaged
            c.tiers_seen = tiers
        if not engaged:
            seen = ", ".join(tiers) if tiers else "no connection of the bypass group"
            self.loud(f"THE BYPASS DID NOT ENGAGE for {TRANSPORT_LABELS[transport]} ({placement}): "
                      f"`shmbypass status` shows {seen} instead of tier {expected}; "
                      f"its figures are plain TCP and get no ratio")

    def our_cpu(self):
        """CPU seconds used so far by everything this run started: the
        processes of our children's sessions (each Child leads one), what
        they reaped, and this process with what it reaped."""
        import resource
        sids = {str(c.p.pid) for c in self.children}
        hz = os.sysconf("SC_CLK_TCK")
        ticks = 0
        for d in os.listdir("/proc"):
            if not d.isdigit():
                continue
            try:
                with open(f"/proc/{d}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[3] in sids:
                ticks += sum(int(x) for x in fields[11:15])
        own = 0.0
        for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
            ru = resource.getrusage(who)
            own += ru.ru_utime + ru.ru_stime
        return ticks / hz + own

    def window(self):
        """Start a noise window for programs that do not report their own
        CPU (apps, the sidecar's proxy); .noise() at its end."""
        return NoiseWindow(self)

    def retry(self):
        """Whether the run's budget allows one more noise retry."""
        if self.retries_left > 0:
            self.retries_left -= 1
            return True
        if not self.budget_warned:
            self.budget_warned = True
            self.loud(f"the machine stayed busy: after {self.cfg['retry_budget']} repeated repetitions, "
                      f"noisy ones are kept and marked 'noisy' in the table")
        return False

    def run_reps(self, client, cell, label):
        test = cell.test
        timeout = 60 + 20 * self.seconds(test)
        for rep in range(self.cfg["reps"]):
            self.progress.set(f"{label} rep {rep + 1}/{self.cfg['reps']}")
            for attempt in range(NOISE_RETRIES + 1):
                client.send(self.command_for(test))
                r = client.read_json(timeout)
                why = noise_of(r) if test.kind != "connrate" else None
                r["noisy"] = why
                r["attempt"] = attempt
                if not why:
                    break
                if attempt < NOISE_RETRIES and self.retry():
                    cell.noisy_repeats += 1
                    self.progress.say(f"bench: machine busy, repeating {label} rep {rep + 1}: {why}")
                else:
                    cell.still_noisy += 1
                    break
            cell.reps.append(r)
            self.progress.step()

    def run_cell_ring(self, placement, tests):
        """The raw ring (no sockets): sbp-ringbench forks its two sides and
        prints one JSON line like sbp-pingpong's client. It takes counts, not
        durations: each repetition is sized from the previous one's pace."""
        scpu, ccpu = PLACEMENTS[placement]  # A measures, like the client
        cells = [Cell("ring", placement, t) for t in tests]
        for cell in cells:
            t = cell.test
            pace = None  # ns per round trip, or per byte
            for rep in range(self.cfg["reps"]):
                self.progress.set(f"ring/{placement} {t.name} rep {rep + 1}/{self.cfg['reps']}")
                for attempt in range(NOISE_RETRIES + 1):
                    argv = self.ringbench_argv(t, scpu, ccpu, pace)
                    try:
                        r = self.run_ringbench(argv, f"raw ring {t.name}", log=(rep == 0 and attempt == 0))
                    except BenchError as e:
                        cell.error = str(e)
                        self.loud(f"raw ring {placement} {t.name}: {e}")
                        break
                    pace = (r["wall_s"] * 1e9 / r["iters"]) if t.kind == "rtt" else (r["wall_s"] * 1e9 / r["bytes"])
                    why = noise_of(r)
                    r["noisy"], r["attempt"] = why, attempt
                    if not why:
                        break
                    if attempt < NOISE_RETRIES and self.retry():
                        cell.noisy_repeats += 1
                        self.progress.say(f"bench: machine busy, repeating ring/{placement} {t.name} "
                                          f"rep {rep + 1}: {why}")
                    else:
                        cell.still_noisy += 1
                        break
                if cell.error:
                    break
                cell.reps.append(r)
                self.progress.step()
        self.cells.extend(cells)

    def ringbench_argv(self, test, scpu, ccpu, pace):
        secs = self.seconds(test)
        # The tier's ring size: a bigger ring switches less often on one
        # core, and the comparison is of the tier's overhead, not of sizes.
        argv = [self.ringbench, "--mode", test.kind, "--size", str(test.size),
                "--slot-size", str(region.TIER_SLOT_SIZE)]
        if test.kind == "rtt":
            iters = int(secs * 1e9 / pace) if pace else int(secs * 1e9 / 5000)
            argv += ["--iters", str(max(200, min(iters, 20_000_000))),
                     "--warmup", str(self.cfg["rtt_warmup"])]
        else:
            nbytes = int(secs * 1e9 / pace) if pace else int(secs * 2e9)
            nbytes = max(4 * test.size, nbytes - nbytes % test.size)
            argv += ["--bytes", str(nbytes), "--warmup-bytes", str(16 << 20)]
        if ccpu is not None:
            argv += ["--cpu-a", str(ccpu), "--cpu-b", str(scpu)]
        return argv

    def run_ringbench(self, argv, what, log):
        """Run it once; machine busy time is taken around the whole run and
        compared with both processes' whole CPU time (wait4 counts the
        forked side, which the measuring side reaps)."""
        m0 = machine_cpu()
        child = Child(self, argv, what, log=log)
        try:
            r = child.read_json(timeout=60 + 20 * max(self.cfg["rtt_seconds"], self.cfg["stream_seconds"]))
            _, status, ru = os.wait4(child.p.pid, 0)
            child.p.returncode = os.waitstatus_to_exitcode(status)
        finally:
            child.stop()
            self.children.remove(child)
        m1 = machine_cpu()
        if child.p.returncode != 0:
            raise BenchError(f"{what}: exit status {child.p.returncode}")
        r["client_cpu_s"] = r.get("cpu_a_s", 0.0)
        r["server_cpu_s"] = r.get("cpu_b_s", 0.0)
        total = ru.ru_utime + ru.ru_stime
        # noise_of() compares machine busy time with our CPU over one window:
        # here the window is the whole process, so use whole-process figures.
        r["machine_busy_s"] = round(m1[0] - m0[0] - (total - r["client_cpu_s"] - r["server_cpu_s"]), 3)
        r["machine_steal_s"] = round(m1[1] - m0[1], 3)
        return r

    # -- the whole run

    def run(self):
        t0 = time.monotonic()
        started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        plan = [p for p in self.plan() if self.available(p[0])]
        if plan:
            self.note_command("the client's test lines on its stdin (one per repetition)",
                              sorted({self.command_for(t).strip() for _, _, tests in plan for t in tests}))
        steps = sum(len(tests) for _, _, tests in plan) * self.cfg["reps"]
        if self.args.apps or self.args.sidecar:
            from shmbypass import bench_apps
            steps += bench_apps.steps(self)
        self.progress.total = max(1, steps)
        for transport, placement, tests in plan:
            if transport == "ring":
                self.run_cell_ring(placement, tests)
            else:
                self.run_cell_pingpong(transport, placement, tests)
        if self.args.apps or self.args.sidecar:
            from shmbypass import bench_apps
            if self.args.apps:
                bench_apps.run_apps(self)
            bench_apps.run_sidecar(self)
        self.progress.close()
        return self.report(started, time.monotonic() - t0)

    # -- results

    def base(self, placement, test):
        for c in self.cells:
            if c.transport == "tcp" and c.placement == placement and c.test == test and c.reps:
                return summarize(test, c.reps)
        return None

    def report(self, started, duration):
        results = [c.to_json(self.base(c.placement, c.test)) for c in self.cells]
        return {
            "tool": "shmbypass bench", "version": __version__, "started": started,
            "duration_s": round(duration, 1), "quick": bool(self.args.quick),
            "poll": bool(self.args.poll), "instance": self.instance,
            "machine": machine_info(), "config": self.cfg,
            "method": {
                "repetitions": self.cfg["reps"], "noise_cores": NOISE_CORES,
                "noise_floor_s": NOISE_FLOOR_S, "steal_fraction": STEAL_FRACTION,
                "noise_retries": NOISE_RETRIES,
                "ratio": "against loopback TCP in the same placement; >1 means better than TCP "
                         "(TCP latency / latency, or throughput / TCP throughput)",
            },
            "commands": self.commands, "results": results, "skipped": self.skipped,
            "warnings": self.warnings, "apps": self.apps, "sidecar": self.sidecar,
            "targets": targets(results, self.apps),
        }


def targets(results, apps=()):
    out = []
    by = {(r["transport"], r["placement"], r["test"]): r for r in results}
    for t in TARGETS:
        base = {"target": t["text"], "transport": t["transport"], "want": t["want"]}
        if "app" in t:
            for a in apps:
                if a.get("name") == t["app"] and a.get("transport") == t["transport"]:
                    got = a.get("ratio")
                    out.append(dict(base, placement="unpinned", test=t["app"], got=got,
                                    got_text=None if got is None else f"{got:.2f}x TCP",
                                    engaged=a.get("engaged"), met=None if got is None else got >= t["want"]))
            continue
        placements = [t["placement"]] if t.get("placement") else list(PLACEMENTS)
        for pl in placements:
            r = by.get((t["transport"], pl, t["test"]))
            if not r or not r["summary"]:
                continue
            if t.get("against") == "ring":
                ring = by.get(("ring", pl, t["test"]))
                got = None
                if ring and ring["summary"] and r["engaged"] is not False:
                    if r["kind"] == "rtt":
                        got = r["summary"]["p50_ns"] / ring["summary"]["p50_ns"]
                        text, met = f"{got:.2f}x the ring's p50", got <= t["want"]
                    else:
                        got = r["summary"]["gbps"] / ring["summary"]["gbps"]
                        text, met = f"{got * 100:.0f}% of the ring", got >= t["want"]
            else:
                rt = r["ratio_vs_tcp"]
                got = rt.get("p50") or rt.get("gbps") or rt.get("conns_per_s")
                if got is not None:
                    text, met = f"{got:.2f}x TCP", got >= t["want"]
            out.append(dict(base, placement=pl, test=t["test"], got=got, engaged=r["engaged"],
                            got_text=None if got is None else text, met=None if got is None else met))
    return out


class NoiseWindow:
    def __init__(self, runner):
        self.runner = runner
        self.t0 = time.monotonic()
        self.m0 = machine_cpu()
        self.c0 = runner.our_cpu()

    def noise(self):
        """(why or None, other processes' CPU in cores) since the start."""
        m1, c1 = machine_cpu(), self.runner.our_cpu()
        wall = time.monotonic() - self.t0
        rep = {"wall_s": wall, "client_cpu_s": c1 - self.c0, "server_cpu_s": 0.0,
               "machine_busy_s": m1[0] - self.m0[0], "machine_steal_s": m1[1] - self.m0[1]}
        other = max(0.0, rep["machine_busy_s"] - rep["client_cpu_s"])
        return noise_of(rep), round(other / wall, 2) if wall > 0 else 0.0


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


# ----------------------------------------------------------------- rendering


def table_rows(report):
    """Rows for the text table and the Markdown report."""
    rows = []
    for r in report["results"]:
        s, rt = r["summary"], r["ratio_vs_tcp"]
        note = ""
        if r["engaged"] is False:
            note = "BYPASS NOT ENGAGED (tier: " + (",".join(r["tiers_seen"]) or "none") + ")"
        elif r["error"] and not s:
            note = "FAILED: " + r["error"]
        elif r["still_noisy"]:
            note = f"noisy ({r['still_noisy']} rep)"
        if r["kind"] == "rtt" and s:
            fig = f"p50 {fmt_ns(s['p50_ns'])}  p99 {fmt_ns(s['p99_ns'])}  p999 {fmt_ns(s['p999_ns'])}"
            spread = f"{fmt_ns(s['p50_ns_min'])}-{fmt_ns(s['p50_ns_max'])}"
            cpu = f"{s['cpu_us_per_op']:.1f} us/op"
            vs = "" if note.startswith("BYPASS") else (
                f"{fmt_ratio(rt.get('p50'))} (p99 {fmt_ratio(rt.get('p99'))})" if rt else "")
        elif r["kind"] == "stream" and s:
            fig = f"{s['gbps']:.2f} GB/s"
            spread = f"{s['gbps_min']:.2f}-{s['gbps_max']:.2f}"
            cpu = f"{s['cpu_s_per_gb']:.2f} s/GB"
            vs = "" if note.startswith("BYPASS") else fmt_ratio(rt.get("gbps")) if rt else ""
        elif r["kind"] == "connrate" and s:
            fig = f"{s['conns_per_s']:.0f} conn/s  p50 {fmt_ns(s['p50_ns'])}"
            spread = f"{s['conns_per_s_min']:.0f}-{s['conns_per_s_max']:.0f}"
            cpu = f"{s['client_cpu_us_per_conn']:.1f} us/conn (client)"
            vs = "" if note.startswith("BYPASS") else fmt_ratio(rt.get("conns_per_s")) if rt else ""
        else:
            fig = spread = cpu = vs = "-"
        if r["transport"] == "tcp" and s:
            vs = "1.00x (base)"
        rows.append([r["placement"], TRANSPORT_LABELS[r["transport"]], _test_label(r["test"]),
                     fig, spread, cpu, vs or "-", note])
    return rows


HEADER = ["placement", "transport", "test", "median", "spread (min-max)", "CPU", "vs TCP", "note"]


def _test_label(name):
    return next(t.label for t in TESTS if t.name == name)


def render_text(report):
    rows = table_rows(report)
    order = {p: i for i, p in enumerate(PLACEMENTS)}
    rows.sort(key=lambda r: (order.get(r[0], 9), [t.label for t in TESTS].index(r[2]),
                             list(TRANSPORT_LABELS.values()).index(r[1])))
    widths = [max(len(str(x)) for x in col) for col in zip(HEADER, *rows)]
    lines = []
    prev = None
    for row in [HEADER] + rows:
        if prev is not None and row[0] != prev and row is not rows[0] and prev != "placement":
            lines.append("")
        lines.append("  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip())
        prev = row[0]
    out = [f"shmbypass bench ({'quick' if report['quick'] else 'full'}): "
           f"{report['machine']['cpu_model']}, {report['machine']['cores']} cores, "
           f"kernel {report['machine']['kernel']}; medians of {report['config']['reps']} repetitions; "
           f"'vs TCP' = how many times better than loopback TCP in the same placement", ""]
    out += lines
    for s in report["skipped"]:
        out.append(f"skipped {TRANSPORT_LABELS.get(s['transport'], s['transport'])}: {s['reason']}")
    out += _apps_text(report)
    mets = [t for t in report["targets"] if t["met"] is not None]
    if mets:
        out.append("")
        out.append("targets:" + ("  (a quick run: 0.1 s windows on a shared machine move ratios "
                                 "near their line; the full run in bench/RESULTS.md is the "
                                 "reference)" if report["quick"] else ""))
        for t in mets:
            out.append(f"  {'met    ' if t['met'] else 'NOT MET'} {t['target']} ({t['placement']}): "
                       f"{t.get('got_text') or format(t['got'], '.2f')}")
    for w in report["warnings"]:
        out.append("WARNING: " + w)
    return "\n".join(out)


def _apps_text(report):
    out = []
    for title, items in (("applications", report["apps"]), ("sidecar (client -> haproxy -> server)",
                                                              report["sidecar"])):
        if not items:
            continue
        out.append("")
        out.append(title + ":")
        for a in sort_entries(items):
            out.append("  " + app_line(a))
    return out


def app_line(a):
    if a.get("skipped"):
        return f"{a['name']}: skipped: {a['skipped']}"
    parts = [f"{a['name']} [{TRANSPORT_LABELS.get(a['transport'], a['transport'])}]"]
    for k, v in a.get("figures", {}).items():
        parts.append(f"{FIGURE_LABELS.get(k, k)} {fmt_fig(v)}")
    if a.get("engaged") is False:
        parts.append("BYPASS NOT ENGAGED (tier: " + (",".join(a.get("tiers_seen") or []) or "none") + ")")
    elif a.get("ratio") is not None:
        parts.append(f"vs TCP {a['ratio']:.2f}x")
    if a.get("noisy"):
        parts.append(f"noisy: {a['noisy']}")
    elif a.get("noisy_reps"):
        parts.append(f"noisy ({a['noisy_reps']} rep)")
    if a.get("error"):
        parts.append("FAILED: " + a["error"])
    return "  ".join(parts)


FIGURE_LABELS = {
    "rps": "requests/s", "rps_1conn": "requests/s (1 conn)", "p50_ms": "p50 ms", "p99_ms": "p99 ms",
    "p50_us": "p50 us", "p99_us": "p99 us", "p99_us_worst": "worst p99 us", "gbit_s": "Gbit/s",
    "cpu_us_per_req_ends": "CPU us/req (client+server)", "other_cpu_cores": "others' CPU (cores)",
}


def fmt_fig(v):
    if not isinstance(v, float):
        return str(v)
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:.1f}" if abs(v) >= 10 else f"{v:.3g}"


def sort_entries(items):
    """Each benchmark's transports side by side, in first-seen order."""
    first = {}
    for i, a in enumerate(items):
        first.setdefault(a["name"], i)
    order = {t: i for i, t in enumerate(TRANSPORTS)}
    return sorted(items, key=lambda a: (first[a["name"]], order.get(a.get("transport"), -1)))


def app_table(items):
    """Markdown table of app or sidecar entries, one row per (name, transport)."""
    lines = ["| benchmark | transport | figures | vs TCP | note |", "|---|---|---|---|---|"]
    for a in sort_entries(items):
        if a.get("skipped"):
            lines.append(f"| {a['name']} | - | - | - | skipped: {a['skipped']} |")
            continue
        figs = ", ".join(f"{FIGURE_LABELS.get(k, k)} {fmt_fig(v)}" for k, v in a.get("figures", {}).items())
        if a.get("engaged") is False:
            vs = "-"
            note = "**BYPASS NOT ENGAGED** (tier: " + (",".join(a.get("tiers_seen") or []) or "none") + ")"
        else:
            vs = "1.00x (base)" if a["transport"] == "tcp" and not a.get("error") else (
                f"{a['ratio']:.2f}x" if a.get("ratio") is not None else "-")
            note = ""
        if a.get("noisy"):
            note += f" noisy: {a['noisy']}"
        elif a.get("noisy_reps"):
            note += f" noisy ({a['noisy_reps']} rep)"
        if a.get("error"):
            note += " FAILED: " + a["error"]
        lines.append(f"| {a['name']} | {TRANSPORT_LABELS.get(a['transport'], a['transport'])} | {figs} | "
                     f"{vs} | {note.strip()} |".replace("\n", " "))
    return lines


def render_markdown(report, plot_name):
    m = report["machine"]
    lines = [
        "# shmbypass bench",
        "",
        f"{'Quick' if report['quick'] else 'Full'} run of {report['started']} "
        f"({report['duration_s']} s): {m['cpu_model']}, {m['cores']} cores, kernel {m['kernel']}, "
        f"load average at start {' '.join(m.get('loadavg', []))}.",
        "",
        f"Medians of {report['config']['reps']} repetitions (spread = min-max of the per-repetition "
        f"figure). \"vs TCP\" = how many times better than loopback TCP in the same placement "
        f"(TCP latency / latency; throughput / TCP throughput). CPU = client + server CPU time per "
        f"operation (per GB for streams). Placements: same-core = both processes on CPU 0; "
        f"cross-core = server on CPU 0, client on CPU 1; unpinned = the scheduler decides.",
        "",
    ]
    if plot_name:
        lines += [f"![latency and throughput]({plot_name})", ""]
    rows = table_rows(report)
    order = {p: i for i, p in enumerate(PLACEMENTS)}
    rows.sort(key=lambda r: (order.get(r[0], 9), [t.label for t in TESTS].index(r[2]),
                             list(TRANSPORT_LABELS.values()).index(r[1])))
    lines.append("| " + " | ".join(HEADER) + " |")
    lines.append("|" + "---|" * len(HEADER))
    for row in rows:
        lines.append("| " + " | ".join(str(x).replace("|", "/") for x in row) + " |")
    lines.append("")
    if report["targets"]:
        lines += ["## Targets", "", "| target | placement | measured | met |", "|---|---|---|---|"]
        for t in report["targets"]:
            got = "-" if t["got"] is None else (t.get("got_text") or f"{t['got']:.2f}x")
            met = "not engaged" if t["engaged"] is False else "-" if t["met"] is None else (
                "yes" if t["met"] else "**no**")
            lines.append(f"| {t['target']} | {t['placement']} | {got} | {met} |")
        lines.append("")
    if report["skipped"]:
        lines += ["## Skipped", ""]
        lines += [f"- {TRANSPORT_LABELS.get(s['transport'], s['transport'])}: {s['reason']}"
                  for s in report["skipped"]]
        lines.append("")
    for title, items in (("Applications", report["apps"]),
                         ("Sidecar: client -> haproxy (TCP mode) -> server", report["sidecar"])):
        if items:
            lines += [f"## {title}", ""] + app_table(items) + [""]
    if report["warnings"]:
        lines += ["## Warnings", ""] + [f"- **{w}**" for w in report["warnings"]] + [""]
    noisy = sum(r["noisy_repeats"] for r in report["results"])
    still = sum(r["still_noisy"] for r in report["results"])
    lines += ["## Method", "",
              f"- Repetitions run again because other processes used the CPU: {noisy}; "
              f"kept although still noisy after {NOISE_RETRIES} retries: {still}.",
              "- Each repetition has its own warm-up; RTT repetitions size their iteration count from "
              "the warm-up's pace; streams from the warm-up's rate.",
              f"- Bypass instance: `{report['instance']}` (its own, brought up and taken down by the bench).",
              "", "## Commands", ""]
    for c in report["commands"]:
        lines.append(f"- {c['what']}: `{' '.join(c['argv'])}`")
    lines.append("")
    return "\n".join(lines)


def render_plot(report, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    placements = [p for p in PLACEMENTS if any(r["placement"] == p for r in report["results"])]
    if not placements:
        return False
    fig, axes = plt.subplots(2, len(placements), figsize=(5 * len(placements), 8), squeeze=False)
    colors = {"tcp": "#d62728", "unix": "#9467bd", "kernel": "#1f77b4", "shm": "#2ca02c",
              "ring": "#7f7f7f"}
    rtt_tests = [t for t in TESTS if t.kind == "rtt"]
    stream_tests = [t for t in TESTS if t.kind == "stream"]
    for col, pl in enumerate(placements):
        ax = axes[0][col]
        for tr in TRANSPORTS:
            xs, ys, lo, hi, p99 = [], [], [], [], []
            for i, t in enumerate(rtt_tests):
                r = _find(report, tr, pl, t.name)
                if not r or not r["summary"] or r["engaged"] is False:
                    continue
                s = r["summary"]
                xs.append(i)
                ys.append(s["p50_ns"] / 1e3)
                lo.append((s["p50_ns"] - s["p50_ns_min"]) / 1e3)
                hi.append((s["p50_ns_max"] - s["p50_ns"]) / 1e3)
                p99.append(s["p99_ns"] / 1e3)
            if xs:
                ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, color=colors[tr],
                            label=f"{TRANSPORT_LABELS[tr]} p50")
                ax.plot(xs, p99, linestyle=":", marker=".", color=colors[tr], alpha=0.6)
        ax.set_xticks(range(len(rtt_tests)), [fmt_size(t.size) for t in rtt_tests])
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda y, _: f"{y:g}"))
        ax.yaxis.set_minor_formatter(ticker.NullFormatter())
        ax.set_title(f"RTT, {pl} (p50 solid, p99 dotted)")
        ax.set_ylabel("round trip, us")
        ax.grid(True, which="both", alpha=0.3)
        if col == 0:
            ax.legend(fontsize=8)
        ax = axes[1][col]
        present = [tr for tr in TRANSPORTS if any(
            _find(report, tr, pl, t.name) for t in stream_tests)]
        width = 0.8 / max(len(present), 1)
        for j, tr in enumerate(present):
            xs, ys, err = [], [], [[], []]
            for i, t in enumerate(stream_tests):
                r = _find(report, tr, pl, t.name)
                if not r or not r["summary"] or r["engaged"] is False:
                    continue
                s = r["summary"]
                xs.append(i + (j - (len(present) - 1) / 2) * width)
                ys.append(s["gbps"])
                err[0].append(s["gbps"] - s["gbps_min"])
                err[1].append(s["gbps_max"] - s["gbps"])
            if xs:
                ax.bar(xs, ys, width, yerr=err, capsize=3, color=colors[tr], label=TRANSPORT_LABELS[tr])
        ax.set_xticks(range(len(stream_tests)), [f"{fmt_size(t.size)} sends" for t in stream_tests])
        ax.set_title(f"throughput, {pl}")
        ax.set_ylabel("GB/s")
        ax.grid(True, axis="y", alpha=0.3)
        if col == 0 and present:
            ax.legend(fontsize=8)
    fig.suptitle(f"shmbypass bench: {report['machine']['cpu_model']}, {report['machine']['cores']} cores, "
                 f"kernel {report['machine']['kernel']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _find(report, transport, placement, test):
    for r in report["results"]:
        if r["transport"] == transport and r["placement"] == placement and r["test"] == test:
            return r
    return None


def write_outputs(report, out_dir):
    os.makedirs(out_dir, exist_ok=True)
    files = {}
    plot = os.path.join(out_dir, "bench.png")
    try:
        if render_plot(report, plot):
            files["plot"] = plot
    except ImportError as e:
        report["warnings"].append(f"no plot: matplotlib is not installed ({e})")
    path = os.path.join(out_dir, "bench.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
    files["json"] = path
    path = os.path.join(out_dir, "bench.md")
    with open(path, "w") as f:
        f.write(render_markdown(report, "bench.png" if "plot" in files else None))
    files["markdown"] = path
    return files


RESULTS_MARKER = "<!-- everything below is generated by shmbypass bench --results-md -->"


def update_results_md(path, report, files):
    """Keep FILE up to the marker line, replace the rest with the report,
    its plot linked relative to FILE."""
    head = ""
    if os.path.exists(path):
        with open(path) as f:
            head = f.read().split(RESULTS_MARKER)[0]
    plot = os.path.relpath(files["plot"], os.path.dirname(os.path.abspath(path))) if "plot" in files else None
    body = render_markdown(report, plot).replace("# shmbypass bench\n", "## The latest run\n", 1)
    with open(path, "w") as f:
        f.write(head.rstrip("\n") + "\n\n" + RESULTS_MARKER + "\n\n" + body)
    return path


# ----------------------------------------------------------------- CLI


def add_parser(subparsers):
    p = subparsers.add_parser(
        "bench", help="loopback TCP vs the bypass: RTT, throughput, connection rate, apps",
        description="Run the loopback-vs-bypass benchmark matrix and write a table, JSON, "
                    "a Markdown report and a PNG plot.")
    p.add_argument("--quick", action="store_true", help="short repetitions (under a minute)")
    p.add_argument("--out", default="bench-out", help="output directory (default ./bench-out)")
    p.add_argument("--apps", action="store_true",
                   help="also installed real apps: redis-benchmark, wrk vs nginx, iperf3, and the sidecar")
    p.add_argument("--sidecar", action="store_true",
                   help="the sidecar scenario: client -> haproxy -> server, on loopback and across netns")
    p.add_argument("--poll", action="store_true",
                   help="the ping-pong programs busy-poll recv (MSG_DONTWAIT) 50 us before blocking")
    p.add_argument("--reps", type=int, help="repetitions per figure (default 3 quick, 5 full)")
    p.add_argument("--seconds", type=float, help="seconds per repetition (default 0.1 quick, 1 full)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--results-md", metavar="FILE",
                   help="also replace what follows the marker line in FILE with the report "
                        "(bench/RESULTS.md: the hand-written reading above the marker stays)")
    p.add_argument("--from-json", metavar="FILE",
                   help="do not measure: render the table, report and plot again from a saved bench.json")
    p.add_argument("--only", help=argparse.SUPPRESS)  # tests: comma list of transports/placements/tests
    p.set_defaults(func=cmd_bench)


_MAIN_PID = None


def cmd_bench(args) -> int:
    global _MAIN_PID
    if args.from_json:
        with open(args.from_json) as f:
            report = json.load(f)
        report["targets"] = targets(report["results"], report.get("apps", []))
        files = write_outputs(report, args.out)
        if args.results_md:
            files["results"] = update_results_md(args.results_md, report, files)
        print(render_text(report))
        print("wrote " + ", ".join(files[k] for k in ("json", "markdown", "plot", "results") if k in files))
        return 0
    runner = Runner(args)
    _MAIN_PID = runner.pid
    # Our own handlers, also for SIGINT: a shell that starts us in the
    # background sets SIGINT to ignored, and the clean-up must still run.
    handled = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    old = {sig: signal.signal(sig, _raise_interrupt) for sig in handled}
    try:
        report = runner.run()
    except KeyboardInterrupt:
        if os.getpid() != runner.pid:
            os._exit(130)  # a forked helper: never run our clean-up twice
        runner.progress.close()
        sys.stderr.write("bench: interrupted; stopping children and taking the bypass down\n")
        runner.teardown()
        return 130
    finally:
        runner.teardown()
        for sig, handler in old.items():
            signal.signal(sig, handler)
    files = write_outputs(report, args.out)
    if args.results_md:
        files["results"] = update_results_md(args.results_md, report, files)
    print(render_text(report))
    print()
    print("wrote " + ", ".join(files[k] for k in ("json", "markdown", "plot", "results") if k in files))
    return _verdict(report)


def _verdict(report) -> int:
    """Exit status: never 0 when a bypass tier that was asked for did not run.
    The reason is the last line (stderr), after what was measured."""
    why = [f"the {TRANSPORT_LABELS[s['transport']]} could not be set up: {s['reason']}"
           for s in report["skipped"] if s["transport"] in BYPASS_TIERS]
    code = 2 if why else 0
    bad = [r for r in report["results"] if r["engaged"] is False]
    bad += [dict(a, test=a["name"]) for a in report.get("apps", []) + report.get("sidecar", [])
            if a.get("transport") in BYPASS_TIERS and a.get("engaged") is False]
    if bad:
        why.append(f"{len(bad)} measurement(s) ran outside the tier they were meant for "
                   f"(e.g. {TRANSPORT_LABELS[bad[0]['transport']]} {bad[0]['test']})")
        code = code or 3
    if why:
        sys.stdout.flush()
        sys.stderr.write("bench: FAILED: " + "; ".join(why) + "\n")
    return code


def _raise_interrupt(signum, frame):
    if os.getpid() != _MAIN_PID:
        os._exit(128 + signum)  # a forked helper being stopped
    raise KeyboardInterrupt
