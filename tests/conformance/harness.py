"""Run a scenario under one tier and compare what its programs saw with TCP.

A run starts the scenario's server program, waits for its "PORT" line,
starts the client program, and collects both programs' OBS/TIER lines
(runtime.py) until they exit or the scenario's DEADLINE passes (then both
process groups are killed and the end is "hangs").

    tcp     plain loopback TCP: no instance, nothing preloaded
    kernel  `shmbypass run --tier kernel -- ...` in a private instance
    shm     `shmbypass run -- ...` (the default tier) in a private instance

Each bypass run gets its own instance (up, run, down, checked gone), so a
scenario that leaks or breaks something cannot change the next one's result.
"""
import dataclasses
import importlib
import os
import pkgutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.dirname(HERE)
ROOT = os.path.dirname(TESTS)
PEER = os.path.join(HERE, "peer.py")
TIERS = ("tcp", "kernel", "shm")
DEADLINE = 20       # seconds, unless the scenario says otherwise
if HERE not in sys.path:
    sys.path.append(HERE)       # scenarios import runtime as the programs do


def scenario_names() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules([os.path.join(HERE, "scenarios")]))


def scenario(name: str):
    return importlib.import_module(f"scenarios.{name}")


@dataclasses.dataclass
class Run:
    name: str
    tier: str
    obs: dict           # {"server": {...}, "client": {...}}, each with its "end"
    tiers: list         # [[role, label, tier, reason], ...] as the programs recorded them
    stderr: dict
    bpf_errors: dict = dataclasses.field(default_factory=dict)

    def describe(self) -> str:
        err = "".join(f"\n--- {role} stderr:\n{text[-1500:]}" for role, text in self.stderr.items()
                      if text.strip())
        return f"{self.name} under {self.tier}: {self.obs} tiers {self.tiers}{err}"


class Program:
    """One scenario program in its own session; stdout lines collected by a
    thread so that a killed program keeps what it printed."""

    def __init__(self, argv, env, stdin):
        self.err = tempfile.TemporaryFile()
        self.p = subprocess.Popen(argv, env=env, stdin=stdin, stdout=subprocess.PIPE,
                                  stderr=self.err, start_new_session=True)
        self.lines = []
        self.port = threading.Event()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        self.end = None

    def _read(self):
        for raw in self.p.stdout:
            line = raw.decode(errors="replace").rstrip("\n")
            self.lines.append(line)
            if line.startswith("PORT "):
                self.port.set()
        self.port.set()          # EOF: whoever waits for the port stops waiting

    def wait(self, deadline: float) -> None:
        try:
            rc = self.p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.end = "hangs"
            return
        # `shmbypass run` reports a signal as 128+N, a bare child as -N
        if rc < 0 or rc > 128:
            self.end = f"signal {-rc if rc < 0 else rc - 128}"
        else:
            self.end = f"exit {rc}"

    def kill(self):
        try:
            os.killpg(self.p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def finish(self):
        self.kill()                 # and whatever it left running in its group
        self.p.wait()
        self.reader.join(5)
        self.err.seek(0)
        text = self.err.read().decode(errors="replace")
        self.err.close()
        return text

    def results(self, role):
        obs, tiers = {}, []
        import json
        for line in self.lines:
            if line.startswith("OBS "):
                k, v = json.loads(line[4:])
                obs[k] = v
            elif line.startswith("TIER "):
                tiers.append([role] + json.loads(line[5:]))
        obs["end"] = self.end
        return obs, tiers


def _env(inst=None) -> dict:
    """Nothing preloaded and no instance for TCP. SHMBYPASS_PRELOAD stays:
    tests/conftest.py names the interposer's test build (the shipped code
    plus the shmbypass_fd_tier export that runtime.tier_of asks)."""
    env = {k: v for k, v in os.environ.items()
           if k != "LD_PRELOAD" and not k.startswith("SHMBYPASS_") or k == "SHMBYPASS_PRELOAD"}
    if inst is not None:
        env["SHMBYPASS_INSTANCE"] = inst.name
    return env


def _argv(tier, argv):
    if tier == "tcp":
        return argv
    return [sys.executable, "-m", "shmbypass", "run", "--tier", tier, "--"] + argv


def _run_programs(name, tier, env, bindir) -> tuple[dict, list, dict]:
    mod = scenario(name)
    deadline = time.monotonic() + getattr(mod, "DEADLINE", DEADLINE)
    client_cmd = getattr(mod, "CLIENT", None)
    srv = Program(_argv(tier, [sys.executable, PEER, name, "server"]), env, subprocess.PIPE)
    cli = None
    try:
        srv.port.wait(max(0.0, deadline - time.monotonic()))
        port = next((ln.split()[1] for ln in srv.lines if ln.startswith("PORT ")), None)
        if port is not None:
            argv = ([os.path.join(bindir, client_cmd[0])] + client_cmd[1:] if client_cmd
                    else [sys.executable, PEER, name, "client"]) + [port]
            cli = Program(_argv(tier, argv), env, subprocess.DEVNULL)
            cli.wait(deadline)
        srv.p.stdin.close()         # the client is gone: runtime.Server.client_done()
        srv.wait(deadline)
    finally:
        stderr = {"server": srv.finish()}
        if cli:
            stderr["client"] = cli.finish()
    sobs, stiers = srv.results("server")
    obs = {"server": sobs}
    tiers = stiers
    if cli:
        cobs, ctiers = cli.results("client")
        obs["client"] = cobs
        tiers += ctiers
    if hasattr(mod, "observe"):
        obs = mod.observe(obs)
    return obs, tiers, stderr


def run(name: str, tier: str, bindir: str) -> Run:
    if tier == "tcp":
        obs, tiers, stderr = _run_programs(name, tier, _env(), bindir)
        return Run(name, tier, obs, tiers, stderr)
    from shmbypass import manager, status
    from conftest import assert_gone, new_instance
    inst = new_instance("cf")
    manager.up(inst)
    try:
        obs, tiers, stderr = _run_programs(name, tier, _env(inst), bindir)
        errors = status.errors(inst)
    finally:
        manager.down(inst, drain_timeout=2, force=True)
    assert_gone(inst)
    return Run(name, tier, obs, tiers, stderr, errors)


_oracles: dict[str, Run] = {}


def oracle(name: str, bindir: str) -> Run:
    """The scenario under plain TCP, run once per session."""
    if name not in _oracles:
        _oracles[name] = run(name, "tcp", bindir)
    return _oracles[name]


def check_oracle(r: Run) -> list[str]:
    """What is wrong with a TCP run (then the scenario, not the bypass, is wrong)."""
    bad = [f"{role} {o['end']}" + (f" ({o['exception']})" if "exception" in o else "")
           for role, o in r.obs.items()
           if o.get("end") == "hangs" or o.get("end", "").startswith("exit ") and o["end"] != "exit 0"]
    expect = getattr(scenario(r.name), "expect_tcp", None)
    if expect:
        try:
            expect(r.obs)
        except AssertionError as e:
            bad.append(f"expect_tcp: {e}")
    return bad


def _flatten(d, prefix=""):
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v and not set(v) <= {"n", "sha256"}:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def compare(tcp: Run, got: Run) -> list[str]:
    """Every observable that differs from TCP's, and every connection that
    did not take the run's tier; [] means the same as TCP."""
    a, b = _flatten(tcp.obs), _flatten(got.obs)
    diffs = [f"{k}: {_short(b.get(k, '(none)'))} (TCP: {_short(a.get(k, '(none)'))})"
             for k in sorted(set(a) | set(b)) if a.get(k, "(none)") != b.get(k, "(none)")]
    diffs += tier_diffs(got)
    if got.bpf_errors:
        diffs.append(f"BPF programs reported errors: {got.bpf_errors}")
    return diffs


def tier_diffs(got: Run) -> list[str]:
    """Connections that did not take the run's tier. A scenario may name
    reasons for which a fallback is right (FALLBACK_OK, e.g. the documented
    handshake-race rule); at least one connection must still be in the tier."""
    ok = getattr(scenario(got.name), "FALLBACK_OK", set())
    if not any(t == got.tier for _, _, t, _ in got.tiers):
        return [f"no connection took the {got.tier} tier: "
                + ", ".join(sorted({f"{t} ({r})" if r else t for _, _, t, r in got.tiers})
                            or ["none recorded"])]
    bad = {}
    for role, label, t, reason in got.tiers:
        if t != got.tier and reason not in ok:
            key = f"tier of {role} {label}: {t}" + (f" ({reason})" if reason else "")
            bad[key] = bad.get(key, 0) + 1
    return [f"{k}{f' x{n}' if n > 1 else ''} (expected {got.tier})" for k, n in sorted(bad.items())]


def _short(v) -> str:
    if isinstance(v, dict) and set(v) == {"n", "sha256"}:
        return f"{v['n']} B"
    s = str(v)
    return s if len(s) <= 60 else s[:57] + "..."
