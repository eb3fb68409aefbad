"""`shmbypass metrics`: a real Prometheus server scrapes the exporter while
redis-benchmark runs through both tiers, and what Prometheus stored (read
back through its HTTP API) must agree with `status --json`; the textfile
mode is parsed and compared the same way."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from shmbypass import bpf, metrics, status
from apps import SHMBYPASS, Server, free_port, need, stop_group, wait_port
from conftest import InGroup
from sockets import pair, transfer

HERE = os.path.dirname(os.path.abspath(__file__))


def status_json(inst) -> dict:
    p = subprocess.run(SHMBYPASS + ["status", "--json"], capture_output=True, text=True,
                       env=dict(os.environ, SHMBYPASS_INSTANCE=inst.name), timeout=60)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def by_tier(st) -> dict[str, int]:
    out = {}
    for c in st["connections"]:
        out[c["tier"]] = out.get(c["tier"], 0) + 1
    return out


def tier_bytes(st, tier, direction) -> int:
    return sum(c[f"bytes_{direction}"] for c in st["connections"] if c["tier"] == tier)


# What a direction of a one-host connection can hold unread: its four areas
# (native/pairmem.h, sbp_area_cap).
STREAM_MAX = (16 << 10) + (256 << 10) + (1 << 20) + (8 << 20)


def shm_rows(st) -> dict[tuple, dict]:
    """(netns, local, remote) -> row, of the shm-tier rows."""
    return {(str(c["netns"]), c["local"], c["remote"]): c
            for c in st["connections"] if c["tier"] == "shm"}


# -- the exporter and a real Prometheus ----------------------------------------

class Exporter:
    def __init__(self, inst, *extra):
        self.port = free_port()
        self.proc = subprocess.Popen(
            SHMBYPASS + ["metrics", "--listen", f"127.0.0.1:{self.port}", *extra],
            env=dict(os.environ, SHMBYPASS_INSTANCE=inst.name), stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            wait_port(self.port, proc=self.proc)
        except Exception:
            self.stop()
            raise

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.communicate()


class Prometheus:
    """Debian's prometheus on a loopback port, scraping `target` every
    second, with its data in tmp (removed by stop())."""

    def __init__(self, tmp, target):
        need("prometheus")
        self.dir = tmp / "prometheus"
        self.dir.mkdir()
        conf = self.dir / "prometheus.yml"
        # honor_labels: keep the exporter's `instance` label (the shmbypass
        # instance) instead of renaming it exported_instance.
        conf.write_text(f"""global:
  scrape_interval: 1s
  scrape_timeout: 900ms
scrape_configs:
  - job_name: shmbypass
    honor_labels: true
    static_configs:
      - targets: ["{target}"]
""")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(self.dir / "log", "w+")
        self.proc = subprocess.Popen(
            ["prometheus", f"--config.file={conf}", f"--storage.tsdb.path={self.dir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--storage.tsdb.retention.time=1h"],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    with urllib.request.urlopen(self.url + "/-/ready", timeout=2) as r:
                        if r.status == 200:
                            break
                except OSError:
                    pass
                assert self.proc.poll() is None, f"prometheus exited: {self.logtext()}"
                assert time.monotonic() < deadline, f"prometheus not ready: {self.logtext()}"
                time.sleep(0.2)
        except BaseException:
            self.stop()
            raise

    def logtext(self):
        self.log.seek(0)
        return self.log.read()[-3000:]

    def query(self, q, at=None) -> dict:
        """{frozenset(labels.items()): value} of an instant query."""
        params = {"query": q}
        if at is not None:
            params["time"] = f"{at:.3f}"
        url = self.url + "/api/v1/query?" + urllib.parse.urlencode(params)
        with urllib.request.urlopen(url, timeout=10) as r:
            body = json.load(r)
        assert body["status"] == "success", body
        return {frozenset(s["metric"].items()): float(s["value"][1]) for s in body["data"]["result"]}

    def one(self, q, at=None) -> float | None:
        res = self.query(q, at)
        assert len(res) <= 1, res
        return next(iter(res.values()), None)

    def scrape_after(self, t, inst, timeout=30) -> float:
        """Wait for a scrape that started after t; its timestamp."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ts = self.one(f'timestamp(shmbypass_up{{instance="{inst.name}"}})')
            if ts is not None and ts > t:
                return ts
            time.sleep(0.2)
        raise AssertionError(f"no scrape after {t}: targets "
                             f"{urllib.request.urlopen(self.url + '/api/v1/targets').read()[:2000]}")

    def stop(self):
        stop_group(self.proc, 20)
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def bench(inst, port, tier):
    """redis-benchmark over 4 kept-alive connections, far more requests than
    the test waits for (it is killed): its connections live the whole test
    (-l would open new ones at every round)."""
    return subprocess.Popen(
        SHMBYPASS + ["run", "--tier", tier, "--", "redis-benchmark", "-p", str(port), "-c", "4",
                     "-P", "4", "-t", "set", "-n", "1000000000", "-q"],
        env=dict(os.environ, SHMBYPASS_INSTANCE=inst.name), stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, start_new_session=True)


def kill(proc):
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


COUNTERS = {  # status --json counter -> the series it is exported as
    "established": "shmbypass_connections_established_total",
    "closed": "shmbypass_connections_closed_total",
    "shm": "shmbypass_shm_tier_sockets_total",
    "bytes_redirect": "shmbypass_kernel_tier_sent_bytes_total",
    "msg_redirect": 'shmbypass_sk_msg_sends_total{verdict="redirect"}',
}


def sel(series, inst):
    """Add the instance matcher to a series selector."""
    name, _, rest = series.partition("{")
    return f'{name}{{instance="{inst.name}"' + ("," + rest if rest else "}")


def test_prometheus_scrapes_redis_run(inst, tmp_path):
    need("redis-server", "redis-benchmark")
    port = free_port()
    exporter = Exporter(inst, "--bpf-stats")
    prom = None
    benches = []
    try:
        prom = Prometheus(tmp_path, f"127.0.0.1:{exporter.port}")
        with Server(inst, ["redis-server", "--port", str(port), "--save", "", "--appendonly", "no",
                           "--bind", "127.0.0.1"], port, tier="shm"):
            benches = [bench(inst, port, "shm"), bench(inst, port, "kernel")]
            # Wait until both benchmarks have their 4 connections (8 rows each).
            deadline = time.monotonic() + 60
            while True:
                tiers = by_tier(status_json(inst))
                if tiers.get("shm", 0) >= 8 and tiers.get("kernel", 0) >= 8:
                    break
                for b in benches:
                    assert b.poll() is None, b.stderr.read()
                assert time.monotonic() < deadline, f"connections by tier: {tiers}"
                time.sleep(0.5)

            # Counters and byte counts: the scraped value lies between what
            # status said just before the scrape and just after it.
            checked = 0
            for _ in range(3):
                s0 = status_json(inst)
                ts = prom.scrape_after(time.time(), inst)
                s1 = status_json(inst)
                for name, series in COUNTERS.items():
                    v = prom.one(sel(series, inst), at=ts)
                    assert s0["counters"][name] <= v <= s1["counters"][name], (name, s0, v, s1)
                for tier in ("kernel", "shm"):
                    for d in ("tx", "rx"):
                        v = prom.one(f'shmbypass_connection_bytes{{instance="{inst.name}",'
                                     f'tier="{tier}",direction="{d}"}}', at=ts)
                        assert tier_bytes(s0, tier, d) <= v <= tier_bytes(s1, tier, d), (tier, d)
                # Connections by tier: the benchmarks keep theirs open, so
                # status gives the same rows before and after the scrape.
                if by_tier(s0) == by_tier(s1):
                    got = {dict(k)["tier"]: v for k, v in prom.query(
                        f'sum by (tier) (shmbypass_connections{{instance="{inst.name}"}})',
                        at=ts).items()}
                    assert got == by_tier(s0), (got, s0["connections"])
                    # each shm socket's own series: its bytes between the
                    # two statuses, its ring fill at most what a ring holds
                    rows0, rows1 = shm_rows(s0), shm_rows(s1)
                    for d in ("tx", "rx"):
                        per = {(lab["netns"], lab["local"], lab["remote"]): v
                               for lab, v in ((dict(k), v) for k, v in prom.query(
                                   f'shmbypass_shm_connection_bytes_total{{instance="{inst.name}",'
                                   f'direction="{d}"}}', at=ts).items())}
                        assert set(per) == set(rows0), (per, rows0)
                        for key, v in per.items():
                            assert rows0[key][f"bytes_{d}"] <= v <= rows1[key][f"bytes_{d}"], key
                        queued = prom.query(f'shmbypass_shm_connection_queued_bytes{{instance='
                                            f'"{inst.name}",direction="{d}"}}', at=ts)
                        assert all(0 <= v <= STREAM_MAX for v in queued.values()), queued
                    checked += 1
            assert checked, "the connections changed during every scrape"
            # the bytes kept moving (the benchmarks were really in these tiers)
            assert s1["counters"]["bytes_redirect"] > 0 and tier_bytes(s1, "shm", "tx") > 0

            # Program runs: counted (--bpf-stats) and growing.
            runs = {dict(k)["program"]: v for k, v in prom.query(
                f'shmbypass_bpf_program_runs_total{{instance="{inst.name}"}}').items()}
            assert runs.get("sbp_msg", 0) > 0 and runs.get("sbp_sockops", 0) > 0, runs
            assert prom.one(f'shmbypass_bpf_stats_enabled{{instance="{inst.name}"}}') == 1
            assert prom.one(f'shmbypass_up{{instance="{inst.name}"}}') == 1
            assert not prom.query(f'shmbypass_bpf_errors_total{{instance="{inst.name}"}}')
            # one host: no region, so no slot pool to report
            assert not prom.query(f'shmbypass_slots{{instance="{inst.name}"}}')
            for b in benches:
                assert b.poll() is None, b.stderr.read()
    finally:
        for b in benches:
            kill(b)
        if prom:
            prom.stop()
        out, err = exporter.stop()
    assert exporter.proc.returncode == 0, err
    assert not (tmp_path / "prometheus").exists()


def parse(text) -> dict:
    """{(name, frozenset(labels)): value} of exposition text."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def held_shm_pair(inst, size):
    """Two programs under `shmbypass run` holding one connection that moved
    size bytes each way (tests/stream_peer.py); (server, client, local port)."""
    env = dict(os.environ, SHMBYPASS_INSTANCE=inst.name)
    peer = [sys.executable, os.path.join(HERE, "stream_peer.py")]
    srv = subprocess.Popen(SHMBYPASS + ["run", "--", *peer, "server", str(size)], env=env,
                           text=True, stdout=subprocess.PIPE)
    port = srv.stdout.readline().split()[1]
    cli = subprocess.Popen(SHMBYPASS + ["run", "--", *peer, "client", port, str(size)], env=env,
                           text=True, stdout=subprocess.PIPE, stdin=subprocess.PIPE)
    held = cli.stdout.readline().split()
    assert held and held[0] == "HELD", held
    return srv, cli, int(held[1])


def test_textfile_matches_status(inst, tmp_path):
    out = tmp_path / "textfile"
    out.mkdir()
    path = out / "shmbypass.prom"
    srv, cli, _ = held_shm_pair(inst, 300_000)
    with InGroup(inst):
        c, s = pair()
    try:
        transfer(c, s, b"x" * 100_000)
        transfer(s, c, b"y" * 123)
        p = subprocess.run(SHMBYPASS + ["metrics", "--textfile", str(path)], capture_output=True,
                           text=True, env=dict(os.environ, SHMBYPASS_INSTANCE=inst.name), timeout=60)
        assert p.returncode == 0, p.stderr
        st = status_json(inst)
    finally:
        c.close()
        s.close()
        cli.stdin.close()
        cli.wait(30)
        srv.wait(30)
    assert os.listdir(out) == ["shmbypass.prom"]  # written whole, then renamed
    m = parse(path.read_text())
    lab = {"instance": inst.name}

    def get(name, **labels):
        return m[(name, frozenset({**lab, **labels}.items()))]

    assert get("shmbypass_up") == 1
    assert get("shmbypass_connections", tier="kernel", reason="none") == 2
    assert get("shmbypass_connection_bytes", tier="kernel", direction="tx") == 100_123
    assert get("shmbypass_connection_bytes", tier="kernel", direction="rx") == 100_123
    assert tier_bytes(st, "kernel", "tx") == 100_123
    for name, series in COUNTERS.items():
        sname, _, rest = series.partition("{")
        labels = dict(kv.split("=") for kv in rest.rstrip("}").split(",") if kv)
        assert get(sname, **{k: v.strip('"') for k, v in labels.items()}) == st["counters"][name]
    # Every BPF counter has a documented series of its own.
    assert set(status.COUNTERS.values()) <= set(metrics.COUNTER_METRICS)
    # The held shm connection, idle: its series say what status says.
    rows = shm_rows(st)
    assert len(rows) == 2, st["connections"]
    for (netns, local, remote), r in rows.items():
        for d in ("tx", "rx"):
            key = dict(netns=netns, local=local, remote=remote, direction=d)
            assert get("shmbypass_shm_connection_bytes_total", **key) == r[f"bytes_{d}"], r
            if r[f"{d}_queued"] is None:
                assert ("shmbypass_shm_connection_queued_bytes",
                        frozenset({**lab, **key}.items())) not in m
            else:
                assert get("shmbypass_shm_connection_queued_bytes", **key) == r[f"{d}_queued"]
    for d in ("tx", "rx"):
        assert get("shmbypass_connection_bytes", tier="shm", direction=d) == tier_bytes(st, "shm", d)
    assert not [k for k in m if k[0] == "shmbypass_slots"]  # one host: no slot pool
    if not bpf.stats_sysctl():  # run counts are left out, and the exporter said why
        assert get("shmbypass_bpf_stats_enabled") == 0
        assert "kernel.bpf_stats_enabled=0" in p.stderr
        assert not [k for k in m if k[0] == "shmbypass_bpf_program_runs_total"]


def test_listen_spec():
    assert metrics.parse_listen("127.0.0.1:9472") == ("127.0.0.1", 9472)
    assert metrics.parse_listen("[::1]:9472") == ("::1", 9472)
    assert metrics.parse_listen(":9472") == ("0.0.0.0", 9472)
    for bad in ("9472", "host:", "host:99999", "host:x"):
        with pytest.raises(Exception, match="ADDR:PORT"):
            metrics.parse_listen(bad)
