"""Real applications for `shmbypass bench --apps`, unmodified: each runs over
plain TCP, then with both ends under `shmbypass run --tier kernel` and
`--tier shm`. While it runs, `shmbypass status --json` must show its
connections in the expected tier; if not, the entry says so loudly and gets
no ratio.

  redis    redis-server + redis-benchmark GET, -c 1 and -c 50
  nginx    nginx (sendfile on) + wrk: a 1 KiB file at -c 10, a 1 MiB file at -c 1;
           then curl fetches the 1 MiB file once and its sha256 is compared
  iperf3   iperf3 -s / iperf3 -c, one stream

Apps that are not installed are skipped with a line saying so. The helpers
here (ports, listeners, tier checks, ratios) serve the sidecar too.
"""
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import time

from shmbypass.bench.measure import BYPASS_TIERS, TRANSPORT_LABELS, engaged
from shmbypass.bench.runner import BenchError, Child, NotAvailable


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listen(child, port, timeout=15.0):
    """Wait until the child's network namespace has a listener on port
    (read from /proc/<pid>/net/tcp*, which shows the process's own netns)."""
    deadline = time.monotonic() + timeout
    want = f":{port:04X} "
    while time.monotonic() < deadline:
        if child.p.poll() is not None:
            raise BenchError(f"{child.what}: exited with status {child.p.returncode}{child.stderr_tail()}")
        for name in ("tcp", "tcp6"):
            try:
                with open(f"/proc/{child.p.pid}/net/{name}") as f:
                    next(f)
                    for line in f:
                        fields = line.split()
                        if want in fields[1] + " " and fields[3] == "0A":
                            return
            except (FileNotFoundError, ProcessLookupError, StopIteration):
                pass
        time.sleep(0.05)
    raise BenchError(f"{child.what}: not listening on port {port} after {timeout:.0f} s")


def app_transports(runner):
    """tcp, and the bypass tiers that work here (--only may name some)."""
    named = runner.only & {"tcp", "kernel", "shm"}
    out = []
    for t in ("tcp", "kernel", "shm"):
        if (not named or t in named or t == "tcp") and (t == "tcp" or runner.available(t)):
            out.append(t)
    return out


class Watch:
    """Look at the tiers of the connections on some ports while an app runs."""

    def __init__(self, runner, ports):
        self.runner = runner
        self.ports = ports
        self.tiers = None

    def poll(self, child, settle=0.3, timeout=None):
        """Poll status until connections show up (then once more, after
        `settle` s, so a connection still pairing is not misjudged)."""
        deadline = time.monotonic() + (timeout or 30)
        while time.monotonic() < deadline and child.p.poll() is None:
            tiers = self.runner.tiers_for_ports(self.ports)
            if tiers:
                time.sleep(settle)
                again = self.runner.tiers_for_ports(self.ports)
                self.tiers = again or tiers
                return
            time.sleep(0.1)


# The BPF counter that counts a connection's sockets as they pair in a tier
# (the run's instance holds nothing but the app's connections).
PAIRED = {"shm": "shm", "kernel": "paired"}


def paired_since(runner, transport, before):
    """The tiers the BPF counters saw pairing since `before` (one per socket
    for shm, per pair for kernel), for a client that ended before status
    could see its connections; None if nothing paired, or something fell
    back (handshake race, table full, shm fallback)."""
    after = runner.status().get("counters", {})
    n = after.get(PAIRED[transport], 0) - before.get(PAIRED[transport], 0)
    fell = sum(after.get(k, 0) - before.get(k, 0) for k in ("handshake_race", "table_full", "shm_fallback"))
    return [BYPASS_TIERS[transport]] * n if n > 0 and not fell else None


def run_client(runner, transport, argv, name, port, seconds, settle=0.3):
    """Run an app's client to its end under transport, watching the tiers of
    the connections on port meanwhile (or, if it ended first, what the BPF
    counters saw pair): (its stdout, the tiers seen or None, why the window
    was noisy or None, other processes' CPU in cores)."""
    before = runner.status().get("counters", {}) if transport in BYPASS_TIERS else {}
    client = Child(runner, runner.wrap(transport, argv), f"{name} [{transport}]")
    watch = Watch(runner, [port])
    win = runner.window()
    if transport in BYPASS_TIERS:
        watch.poll(client, settle=settle)
    text = read_all(client, 60 + 10 * seconds)
    why, other = win.noise()
    if transport in BYPASS_TIERS and watch.tiers is None:
        watch.tiers = paired_since(runner, transport, before)
    return text, watch.tiers, why, other


def judge(runner, entry, transport, tiers):
    expected = BYPASS_TIERS.get(transport)
    if not expected:
        return
    entry["tiers_seen"] = tiers or []
    if tiers is None:
        # It finished before status could see a connection: unknown, so no ratio.
        entry["engaged"] = None
        entry["error"] = ("tier not verified: it finished before `shmbypass status` saw its "
                          "connections, and the BPF counters saw none pair")
        runner.loud(f"{entry['name']} under {TRANSPORT_LABELS[transport]}: {entry['error']}; no ratio for it")
        return
    entry["engaged"] = engaged(transport, tiers)
    if not entry["engaged"]:
        seen = ", ".join(sorted(set(tiers))) if tiers else "no connection of the bypass group"
        runner.loud(f"THE BYPASS DID NOT ENGAGE for {entry['name']} under {TRANSPORT_LABELS[transport]}: "
                    f"`shmbypass status` shows {seen} instead of tier {expected}; no ratio for it")


def add_ratios(entries):
    """ratio = how many times better than the TCP entry of the same name."""
    base = {e["name"]: e for e in entries if e["transport"] == "tcp" and not e.get("error")}
    for e in entries:
        b = base.get(e["name"])
        key = e.get("metric")
        if e["transport"] == "tcp" or not b or not key or e.get("error"):
            continue
        if e["transport"] in BYPASS_TIERS and e.get("engaged") is not True:
            continue
        x, y = e["figures"].get(key), b["figures"].get(key)
        if x and y:
            e["ratio"] = (x / y) if e.get("higher_better", True) else (y / x)


# ----------------------------------------------------------------- apps


def steps(runner):
    """Progress-bar steps: one per app and transport."""
    return len(app_transports(runner)) * 3


def run_apps(runner):
    seconds = runner.args.seconds or (2.0 if runner.args.quick else 5.0)
    for name, fn, binaries in (("redis", redis, ["redis-server", "redis-benchmark"]),
                               ("nginx+wrk", nginx_wrk, ["nginx", "wrk"]),
                               ("iperf3", iperf3, ["iperf3"])):
        if not runner.selected("apps", None, None):
            return
        missing = [b for b in binaries if not shutil.which(b, path=os.environ.get("PATH", "") +
                                                          ":/usr/sbin:/sbin")]
        if missing:
            line = f"{name}: not installed ({', '.join(missing)} missing), skipped"
            runner.progress.say("bench: " + line)
            runner.apps.append({"name": name, "skipped": f"{', '.join(missing)} not installed"})
            continue
        entries = []
        for transport in app_transports(runner):
            runner.progress.set(f"apps: {name} [{transport}]")
            try:
                entries += fn(runner, transport, seconds)
            except (BenchError, NotAvailable) as e:
                runner.loud(f"{name} under {TRANSPORT_LABELS[transport]} failed: {e}")
                entries.append({"name": name, "transport": transport, "error": str(e), "figures": {}})
            finally:
                runner.stop_children()
                runner.progress.step()
        add_ratios(entries)
        runner.apps.extend(entries)


def _redis_get(runner, transport, port, conns, n, seconds):
    """One redis-benchmark GET run: (its name, its CSV row, run_client's tiers, why, other)."""
    name = f"redis-benchmark GET -c {conns}"
    text, tiers, why, other = run_client(runner, transport, [
        "redis-benchmark", "-h", "127.0.0.1", "-p", str(port), "-t", "get", "-n", str(n),
        "-c", str(conns), "--csv"], name, port, seconds)
    for line in text.splitlines():
        cols = [c.strip('"') for c in line.strip().split(",")]
        if cols and cols[0] == "GET":
            return name, cols, tiers, why, other
    raise BenchError(f"{name}: no GET line in its output: {text.strip()[-200:]}")


def redis(runner, transport, seconds):
    port = free_port()
    server = Child(runner, runner.wrap(transport, [
        "redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
        "--protected-mode", "no", "--daemonize", "no", "--dir", runner.tmp, "--logfile", ""]),
        f"redis-server [{transport}]", stdout=False)
    wait_listen(server, port)
    out = []
    for conns, n in ((1, int(20000 * seconds)), (50, int(150000 * seconds))):
        # More requests until a run lasts most of `seconds` (as timeit's
        # autorange): each run pays about 0.1 s of start in the shm tier
        # (its connections begin on TCP), which TCP's request count left
        # at half of the run (10-29x TCP between runs).
        for _ in range(4):
            name, row, tiers, why, other = _redis_get(runner, transport, port, conns, n, seconds)
            took = n / max(float(row[1]), 1.0)
            if took >= 0.8 * seconds:
                break
            n = int(n * min(10.0, 1.2 * seconds / max(took, 1e-3)))
        entry = {"name": name, "transport": transport, "metric": "rps", "higher_better": True,
                 "figures": {"rps": float(row[1]), "p50_ms": float(row[4]), "p99_ms": float(row[6]),
                             "other_cpu_cores": other}, "noisy": why}
        judge(runner, entry, transport, tiers)
        out.append(entry)
    return out


def nginx_wrk(runner, transport, seconds):
    port = free_port()
    root = os.path.join(runner.tmp, f"nginx-{transport}")
    www = os.path.join(root, "www")
    os.makedirs(www, exist_ok=True)
    for fname, size in (("1k.bin", 1024), ("1m.bin", 1 << 20)):
        with open(os.path.join(www, fname), "wb") as f:
            f.write(os.urandom(size))
    conf = os.path.join(root, "nginx.conf")
    with open(conf, "w") as f:
        f.write(f"""worker_processes 1;
daemon off;
master_process off;
pid {root}/nginx.pid;
error_log {root}/error.log;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  sendfile on;
  client_body_temp_path {root}/cb;
  proxy_temp_path {root}/px;
  fastcgi_temp_path {root}/fc;
  server {{ listen 127.0.0.1:{port}; root {www}; location / {{ }} }}
}}
""")
    nginx = shutil.which("nginx", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    server = Child(runner, runner.wrap(transport, [nginx, "-p", root, "-c", conf, "-e",
                                                   os.path.join(root, "error.log")]),
                   f"nginx [{transport}]", stdout=False)
    wait_listen(server, port)
    out = []
    for fname, conns in (("1k.bin", 10), ("1m.bin", 1)):
        name = f"wrk {fname} -c {conns}"
        text, tiers, why, other = run_client(runner, transport, [
            "wrk", "-t1", f"-c{conns}", f"-d{max(1, int(seconds))}s", "--latency",
            f"http://127.0.0.1:{port}/{fname}"], name, port, seconds)
        m = re.search(r"Requests/sec:\s+([\d.]+)", text)
        if not m:
            raise BenchError(f"{name}: no Requests/sec in its output: {text.strip()[-200:]}")
        done = re.search(r"(\d+) requests in", text)
        figs = {"rps": float(m.group(1)), "other_cpu_cores": other}
        for pct in ("50", "99"):
            lm = re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s)\s*$", text, re.M)
            if lm:
                figs[f"p{pct}_ms"] = float(lm.group(1)) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[lm.group(2)]
        errors = re.search(r"Socket errors:.*|Non-2xx or 3xx responses: \d+", text)
        if not errors and (not done or int(done.group(1)) == 0):
            errors = re.search(r".+", "no request completed")
        entry = {"name": name, "transport": transport, "metric": "rps", "higher_better": True,
                 "figures": figs, "noisy": why}
        if errors:
            entry["error"] = errors.group(0)
            runner.loud(f"{name} [{transport}]: {errors.group(0)}")
        judge(runner, entry, transport, tiers)
        out.append(entry)
    # wrk checks no content: fetch the 1 MiB file once more with curl, through
    # the same transport, and compare it with what nginx serves.
    bad = _check_fetch(runner, transport, f"http://127.0.0.1:{port}/1m.bin",
                       os.path.join(www, "1m.bin"))
    if bad:
        runner.loud(f"nginx [{transport}]: {bad}")
        for e in out:
            e.setdefault("error", bad)
    return out


def _check_fetch(runner, transport, url, path):
    """None if curl (under transport) gets exactly the file at path, else why not."""
    curl = shutil.which("curl")
    if not curl:
        return None                     # nothing to check with; wrk's figures stand
    got = path + f".got-{transport}"
    child = Child(runner, runner.wrap(transport, [curl, "-sS", "-o", got, url]),
                  f"curl 1m.bin [{transport}]", stdout=False)
    try:
        child.p.wait(60)
    except subprocess.TimeoutExpired:
        return "data check: curl did not finish in 60 s"
    try:
        if child.p.returncode != 0:
            return f"data check: curl exited with status {child.p.returncode}{child.stderr_tail()}"
        with open(path, "rb") as a, open(got, "rb") as b:
            if hashlib.sha256(a.read()).digest() != hashlib.sha256(b.read()).digest():
                return "data check: the file curl fetched differs from the one nginx serves"
    finally:
        if os.path.exists(got):
            os.unlink(got)
    return None


def iperf3(runner, transport, seconds):
    port = free_port()
    server = Child(runner, runner.wrap(transport, ["iperf3", "-s", "-1", "-B", "127.0.0.1", "-p", str(port)]),
                   f"iperf3 -s [{transport}]", stdout=False)
    wait_listen(server, port)
    text, tiers, why, other = run_client(runner, transport, [
        "iperf3", "-c", "127.0.0.1", "-p", str(port), "-t", str(max(1, int(seconds))), "-J"],
        "iperf3 -c", port, seconds, settle=0.5)
    try:
        res = json.loads(text)
        bps = res["end"]["sum_received"]["bits_per_second"]
    except (ValueError, KeyError) as e:
        raise BenchError(f"iperf3: unexpected output ({e}): {text.strip()[-200:]}") from None
    entry = {"name": "iperf3 1 stream", "transport": transport, "metric": "gbit_s", "higher_better": True,
             "figures": {"gbit_s": bps / 1e9, "other_cpu_cores": other}, "noisy": why}
    judge(runner, entry, transport, tiers)
    return [entry]


def read_all(child, timeout):
    """All of a child's stdout until it exits."""
    lines = []
    try:
        while True:
            lines.append(child.read_line(timeout))
    except BenchError:
        if child.p.poll() is None:
            raise
    rest = child.buf.decode(errors="replace")
    if child.p.returncode not in (0, None):
        raise BenchError(f"{child.what}: exited with status {child.p.returncode}{child.stderr_tail()}")
    return "\n".join(lines) + ("\n" + rest if rest else "")
