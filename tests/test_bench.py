"""`shmbypass bench` and sbp-pingpong: a cheap subset of the real run, its
outputs, ratios against TCP in the same placement, loud non-engagement, and
Ctrl-C leaving nothing behind. No timed assertions: figures are only checked
for being present and consistent."""
import glob
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from shmbypass import paths
from shmbypass.bench import measure, micro
from shmbypass.bench import report as bench_report

PY = sys.executable
PINGPONG = paths.tool("sbp-pingpong")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_bench(out, *extra, timeout=300):
    return subprocess.run([PY, "-m", "shmbypass", "bench", "--quick", "--no-progress", "--out", str(out),
                           *extra], capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def bench_leftovers(pid):
    name = f"sbp-bench-{pid}"
    left = [p for p in (os.path.join(paths.BPFFS, name), f"/run/{name}",
                        os.path.join(paths.cgroup2_root() or "/nonexistent", name)) if os.path.exists(p)]
    return left


def children_of_session_alive(pids):
    return [p for p in pids if os.path.exists(f"/proc/{p}")]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    res = run_bench(out, "--only", "tcp,kernel,rtt64,stream64k,same-core,unpinned",
                    "--reps", "2", "--seconds", "0.05")
    assert res.returncode == 0, res.stdout + res.stderr
    with open(out / "bench.json") as f:
        report = json.load(f)
    return out, res, report


def test_outputs_exist(quick_run):
    out, res, report = quick_run
    assert (out / "bench.md").stat().st_size > 0
    png = (out / "bench.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "bench.md").read_text()
    assert "loopback TCP" in md and "kernel tier" in md and "bench.png" in md
    assert "loopback TCP" in res.stdout and "kernel tier" in res.stdout
    for key in ("cpu_model", "cores", "kernel"):
        assert report["machine"][key]
    assert any("sbp-pingpong" in " ".join(c["argv"]) for c in report["commands"])
    assert any("--tier" in c["argv"] for c in report["commands"])


def test_rows_and_samples(quick_run):
    _, _, report = quick_run
    cells = {(r["transport"], r["placement"], r["test"]): r for r in report["results"]}
    for transport in ("tcp", "kernel"):
        for placement in ("same-core", "unpinned"):
            for test in ("rtt64", "stream64k"):
                r = cells[(transport, placement, test)]
                assert len(r["samples"]) == 2, r
                assert r["summary"], r
    assert not any(p == "cross-core" for _, p, _ in cells)
    rtt = cells[("tcp", "unpinned", "rtt64")]
    for s in rtt["samples"]:
        assert s["p50_ns"] <= s["p99_ns"] <= s["p999_ns"]
        assert s["client_cpu_s"] >= 0 and s["server_cpu_s"] >= 0
    assert cells[("tcp", "same-core", "rtt64")]["samples"][0]["client_cpu"] == 0


def test_kernel_tier_engaged_and_ratios_use_same_placement(quick_run):
    _, _, report = quick_run
    cells = {(r["transport"], r["placement"], r["test"]): r for r in report["results"]}
    for placement in ("same-core", "unpinned"):
        k, t = cells[("kernel", placement, "rtt64")], cells[("tcp", placement, "rtt64")]
        assert k["engaged"] is True, k["tiers_seen"]
        assert set(k["tiers_seen"]) == {"kernel"}
        assert k["ratio_vs_tcp"]["p50"] == pytest.approx(t["summary"]["p50_ns"] / k["summary"]["p50_ns"])
        ks, ts = cells[("kernel", placement, "stream64k")], cells[("tcp", placement, "stream64k")]
        assert ks["ratio_vs_tcp"]["gbps"] == pytest.approx(ks["summary"]["gbps"] / ts["summary"]["gbps"])
    assert cells[("tcp", "unpinned", "rtt64")]["engaged"] is None


def test_summary_is_median_of_repetitions(quick_run):
    _, _, report = quick_run
    for r in report["results"]:
        if r["kind"] == "rtt":
            p50s = sorted(s["p50_ns"] for s in r["samples"])
            assert r["summary"]["p50_ns_min"] == p50s[0]
            assert r["summary"]["p50_ns_max"] == p50s[-1]
            assert p50s[0] <= r["summary"]["p50_ns"] <= p50s[-1]


def test_not_engaged_gets_no_ratio():
    """A bypass row whose connections were seen in the wrong tier: loud note, no ratio."""
    test = measure.TESTS[0]
    tcp = micro.Cell("tcp", "unpinned", test, reps=[_rtt(10000)])
    bad = micro.Cell("kernel", "unpinned", test, reps=[_rtt(5000)], engaged=False, tiers_seen=["tcp", "tcp"])
    base = measure.summarize(test, tcp.reps)
    rows = [tcp.to_json(None), bad.to_json(base)]
    assert rows[1]["ratio_vs_tcp"] == {}
    report = {"results": rows}
    table = bench_report.table_rows(report)
    assert "BYPASS NOT ENGAGED" in table[1][-1]
    assert table[1][6] == "-"
    assert measure.ratio(test, measure.summarize(test, bad.reps), base)["p50"] == pytest.approx(2.0)


def _rtt(p50):
    return {"p50_ns": p50, "p99_ns": 2 * p50, "p999_ns": 3 * p50, "mean_ns": p50, "iters": 100,
            "client_cpu_s": 0.001, "server_cpu_s": 0.001, "wall_s": 0.1}


def test_noise_detection():
    quiet = {"wall_s": 1.0, "client_cpu_s": 0.5, "server_cpu_s": 0.5, "machine_busy_s": 1.05,
             "machine_steal_s": 0.0}
    assert measure.noise_of(quiet) is None
    busy = dict(quiet, machine_busy_s=1.6)
    assert "other processes" in measure.noise_of(busy)
    stolen = dict(quiet, machine_steal_s=0.3)
    assert "stole" in measure.noise_of(stolen)


def test_missing_transport_is_skipped_with_reason(tmp_path):
    """The shm tier and the raw ring say why they are missing instead of a number."""
    res = run_bench(tmp_path, "--only", "shm,ring,tcp,rtt64,unpinned", "--reps", "1", "--seconds", "0.05")
    report = json.loads((tmp_path / "bench.json").read_text())
    if res.returncode == 3:  # present but not engaging: that is said loudly, not hidden
        assert "DID NOT ENGAGE" in res.stderr
        assert any(r["engaged"] is False and not r["ratio_vs_tcp"] for r in report["results"])
    present = {r["transport"] for r in report["results"]}
    skipped = {s["transport"]: s["reason"] for s in report["skipped"]}
    if res.returncode != 3:
        # a bypass tier that was asked for and could not be set up fails the run
        assert res.returncode == (2 if "shm" in skipped else 0), res.stdout + res.stderr
    for t in ("shm", "ring"):
        assert (t in present) != (t in skipped)
        if t in skipped:
            assert skipped[t] and "NOT AVAILABLE" in res.stderr


def test_bypass_that_cannot_be_set_up_fails_the_run(tmp_path):
    """A kernel that refuses the core programs: the bench still measures and
    writes TCP, but exits non-zero with the reason on its last line."""
    import shutil
    clang = shutil.which("clang-19") or shutil.which("clang")
    bpfdir = tmp_path / "bpf"
    bpfdir.mkdir()
    subprocess.run([clang, "-g", "-O2", "-target", "bpf", "-I", os.path.join(ROOT, "build", "bpf"),
                    "-c", os.path.join(ROOT, "tests", "data", "no_helper.bpf.c"),
                    "-o", str(bpfdir / "bypass.bpf.o")], check=True)
    res = subprocess.run([PY, "-m", "shmbypass", "bench", "--quick", "--no-progress", "--out",
                          str(tmp_path / "out"), "--only", "tcp,kernel,rtt64,unpinned", "--reps", "1",
                          "--seconds", "0.05"], capture_output=True, text=True, timeout=300, cwd=ROOT,
                         env=dict(os.environ, SHMBYPASS_BPF_DIR=str(bpfdir)))
    assert res.returncode == 2, res.stdout + res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("bench: FAILED: the kernel tier could not be set up: "), last
    assert "this kernel cannot run the bypass programs" in last
    report = json.loads((tmp_path / "out" / "bench.json").read_text())
    assert {r["transport"] for r in report["results"]} == {"tcp"}


def test_ctrl_c_leaves_nothing(tmp_path):
    p = subprocess.Popen([PY, "-m", "shmbypass", "bench", "--no-progress", "--out", str(tmp_path),
                          "--only", "kernel,rtt64,unpinned", "--reps", "50", "--seconds", "0.5"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                         start_new_session=True)
    try:
        # Wait until its bypass instance is up and a client is running.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not bench_leftovers(p.pid) and p.poll() is None:
            time.sleep(0.1)
        if not bench_leftovers(p.pid):
            p.kill()
            pytest.fail("bench never brought its instance up: " + " ".join(p.communicate()))
        time.sleep(1.5)
        kids = _session_pids(p.pid)
        assert kids, "no child processes seen"
        os.kill(p.pid, signal.SIGINT)
        out, err = p.communicate(timeout=60)
        assert p.returncode == 130, out + err
        assert "interrupted" in err
        assert bench_leftovers(p.pid) == []
        deadline = time.monotonic() + 5
        while children_of_session_alive(kids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert children_of_session_alive(kids) == []
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        for pid in _session_pids(p.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if bench_leftovers(p.pid):
            env = dict(os.environ, SHMBYPASS_INSTANCE=f"sbp-bench-{p.pid}")
            subprocess.run([PY, "-m", "shmbypass", "down", "--force"], env=env, cwd=ROOT)


def _session_pids(bench_pid):
    """Processes started by the bench: children of it, and their descendants."""
    out = []
    todo = [bench_pid]
    while todo:
        pid = todo.pop()
        for path in glob.glob(f"/proc/{pid}/task/*/children"):
            try:
                kids = [int(x) for x in open(path).read().split()]
            except OSError:
                continue
            out += kids
            todo += kids
    return out


# ----------------------------------------------------------------- sbp-pingpong


def _server(addr, *args):
    p = subprocess.Popen([PINGPONG, "server", addr, *args], stdout=subprocess.PIPE, text=True)
    line = json.loads(p.stdout.readline())
    return p, line["listening"]


@pytest.mark.parametrize("listen", ["127.0.0.1:0", "[::1]:0", "unix:@sbp-test-{pid}", "unix:{tmp}/s.sock"])
def test_pingpong_addresses_and_modes(listen, tmp_path):
    listen = listen.format(pid=os.getpid(), tmp=tmp_path)
    srv, addr = _server(listen, "--stats-file", str(tmp_path / "stats.json"))
    try:
        for mode, extra, key in (("rtt", ["--iters", "500", "--warmup", "10", "--reps", "2"], "p50_ns"),
                                 ("stream", ["--size", "65536", "--bytes", "8M", "--warmup", "1M"], "gbps"),
                                 ("connrate", ["--iters", "50"], "conns_per_s")):
            out = subprocess.run([PINGPONG, "client", addr, "--mode", mode, *extra], capture_output=True,
                                 text=True, timeout=60)
            assert out.returncode == 0, out.stderr
            lines = [json.loads(x) for x in out.stdout.splitlines()]
            assert len(lines) == (2 if mode == "rtt" else 1)
            assert all(x[key] > 0 for x in lines)
            if mode == "stream":
                assert lines[0]["bytes"] == 8 << 20
    finally:
        srv.send_signal(signal.SIGTERM)
        srv.wait(10)
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats["connections"] >= 52 and stats["spurious_eagain"] == 0


def test_pingpong_echo_threads_and_stdin_commands(tmp_path):
    srv, addr = _server("127.0.0.1:0")
    echo, eaddr = _server("127.0.0.1:0", "--threads")
    echo.stdout.close()
    try:
        out = subprocess.run([PINGPONG, "client", addr, "--stdin", "--poll=20"], input=(
            "rtt 1024 0.05 10\nstream 1048576 0.05\nconnrate 0.05\nquit\n"), capture_output=True,
            text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        ops = [json.loads(x)["op"] for x in out.stdout.splitlines()]
        assert ops == ["rtt", "stream", "connrate"]
        # Echo server: connrate against it, and several clients at once.
        clients = [subprocess.Popen([PINGPONG, "client", eaddr, "--mode", "connrate", "--iters", "100"],
                                    stdout=subprocess.PIPE, text=True) for _ in range(3)]
        for c in clients:
            res = json.loads(c.communicate(timeout=60)[0])
            assert res["count"] == 100
    finally:
        for p in (srv, echo):
            p.send_signal(signal.SIGTERM)
            p.wait(10)


def test_pingpong_bad_input():
    for argv in (["client"], ["client", "nohostport"], ["server", "127.0.0.1:0", "--mode"],
                 ["client", "127.0.0.1:1", "--size", "x"], ["bogus", "127.0.0.1:1"]):
        out = subprocess.run([PINGPONG, *argv], capture_output=True, text=True, timeout=10)
        assert out.returncode != 0 and out.stderr, argv


def test_results_md_keeps_the_reading(quick_run, tmp_path):
    out, _, report = quick_run
    path = tmp_path / "RESULTS.md"
    path.write_text("# Results\n\nThe reading, written by hand.\n")
    files = {"plot": str(out / "bench.png")}
    for _ in range(2):  # regenerating replaces the generated part only
        bench_report.update_results_md(str(path), report, files)
    text = path.read_text()
    assert text.startswith("# Results\n\nThe reading, written by hand.\n")
    assert text.count(bench_report.RESULTS_MARKER) == 1
    assert "## The latest run" in text and "bench.png" in text and "kernel tier" in text


@pytest.mark.apps
def test_sidecar_and_apps_subset(tmp_path):
    """The sidecar (loopback and three netns) and the apps, briefly: every entry
    has figures, kernel-tier entries were seen in the kernel tier, and no
    namespace or instance is left behind."""
    import shutil
    res = run_bench(tmp_path, "--apps", "--only", "apps,sidecar,tcp,kernel", "--reps", "1", "--seconds", "0.05")
    report = json.loads((tmp_path / "bench.json").read_text())
    assert res.returncode in (0, 3), res.stdout + res.stderr
    side = [e for e in report["sidecar"] if not e.get("skipped")]
    for topo in ("loopback", "netns"):
        for transport in ("tcp", "kernel"):
            mine = [e for e in side if e.get("topology") == topo and e["transport"] == transport]
            assert len(mine) == 3, (topo, transport, report["sidecar"])
            assert all(e["figures"] and not e.get("error") for e in mine), mine
            if transport == "kernel":
                assert all(e["engaged"] is True for e in mine), mine
                assert all(e.get("ratio") for e in mine), mine
    apps = {(e["name"], e["transport"]): e for e in report["apps"] if not e.get("skipped")}
    if shutil.which("redis-benchmark"):
        assert apps[("redis-benchmark GET -c 50", "tcp")]["figures"]["rps"] > 0
        k = apps[("redis-benchmark GET -c 50", "kernel")]
        assert k["engaged"] is not False, k
    assert not [n for n in os.listdir("/var/run/netns") if n.startswith("sbb")] if os.path.isdir(
        "/var/run/netns") else True
    assert bench_leftovers(_bench_pid(report)) == []


def _bench_pid(report):
    return int(report["instance"].rsplit("-", 1)[1])


def test_pingpong_server_survives_bad_clients():
    """A stray connection (garbage, or a client that vanishes mid-op) is
    dropped; the server goes on serving."""
    import socket
    srv = subprocess.Popen([PINGPONG, "server", "127.0.0.1:0"], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    try:
        host, port = json.loads(srv.stdout.readline())["listening"].rsplit(":", 1)
        with socket.create_connection((host, int(port))) as s:
            s.sendall(b"GET / HTTP/1.0\r\n\r\n" + b"x" * 64)
            try:
                assert s.recv(100) == b""  # dropped: EOF...
            except ConnectionResetError:
                pass  # ...or a reset, as it closed with our extra bytes unread
        with socket.create_connection((host, int(port))) as s:  # a hello for 10 round trips, then gone
            s.sendall(bytes.fromhex("53425050") + (1).to_bytes(2, "little") + (1).to_bytes(2, "little")
                      + (64).to_bytes(4, "little") + bytes(4) + (10).to_bytes(8, "little") + bytes(40)
                      + b"y" * 10)
        out = subprocess.run([PINGPONG, "client", f"{host}:{port}", "--mode", "rtt", "--iters", "100"],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and json.loads(out.stdout)["iters"] == 100, out.stderr
    finally:
        srv.send_signal(signal.SIGTERM)
        _, err = srv.communicate(timeout=10)
    assert "dropping a connection" in err
