"""The bench's machinery, shared by the matrix (micro.py), the apps
(apps.py) and the sidecar (sidecar.py): the child processes it starts, the
progress bar, and the :class:`Runner`, which owns one run's bypass instance,
children, temporary directory, warnings and the noise-retry budget."""
import argparse
import json
import os
import resource
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from shmbypass import manager, paths
from shmbypass.bench.measure import (BYPASS_TIERS, FULL, PINGPONG, PLACEMENTS, QUICK, RINGBENCH, TESTS,
                                     TRANSPORT_LABELS, TRANSPORTS, machine_cpu, noise_of)


class BenchError(Exception):
    pass


class NotAvailable(Exception):
    """A transport or app that cannot run here; str() says why."""


class Child:
    """A child process in its own session (Ctrl-C reaches only us; we stop
    children ourselves), with stdout read line by line with timeouts."""

    def __init__(self, runner, argv, what, stdin=False, preexec=None, log=True, stdout=True, env=None):
        self.what = what
        self.argv = argv
        self.errfile = tempfile.TemporaryFile(dir=runner.tmp)
        if log:
            runner.note_command(what, argv)
        try:
            self.p = subprocess.Popen(
                argv, stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                stdout=subprocess.PIPE if stdout else subprocess.DEVNULL, stderr=self.errfile,
                env=runner.env if env is None else env,
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


# What a Runner made without a command line runs as (the pytest-benchmark
# suites in bench/): `shmbypass bench --quick --no-progress`.
SUITE_ARGS = dict(quick=True, reps=None, seconds=None, only=None, no_progress=True, poll=False)


class Runner:
    def __init__(self, args=None):
        self.args = args = args or argparse.Namespace(**SUITE_ARGS)
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
        self.cells = []             # micro.Cell, one per (transport, placement, test)
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
        self.pingpong = PINGPONG
        self.ringbench = RINGBENCH
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

    def run_once(self, argv, what, env=None, timeout=120):
        """Run a measuring program that prints one JSON line and exits; that line."""
        child = Child(self, argv, what, env=env)
        try:
            r = child.read_json(timeout)
            if child.finish(timeout) != 0:
                raise BenchError(f"{what}: exit status {child.p.returncode}{child.stderr_tail()}")
            return r
        finally:
            child.stop()
            self.children.remove(child)

    def in_group(self):
        """This process inside the run's instance (up) for a block: what the
        suites in bench/ use in place of `shmbypass run`."""
        self.ensure_up()
        return manager.InGroup(paths.Instance(self.instance))

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

    def our_cpu(self):
        """CPU seconds used so far by everything this run started: the
        processes of our children's sessions (each Child leads one), what
        they reaped, and this process with what it reaped."""
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
