"""Real servers that run as non-root users, in the shm tier (issue 12, Tests).

One instance for the module, up with `--allow-user` for nobody (the echo
servers), daemon (a second non-root client), www-data (nginx's workers) and
redis. Each program gets the bypass one of the two ways an administrator
would give it:

``run-then-drop``  root starts `shmbypass run -- runuser -u USER -- CMD`:
                   the interposer is loaded, the final process runs as USER;
``user-runs``      USER starts the launcher `up` publishes
                   (/run/<instance>/bin/shmbypass-run), which joins the
                   bypass group through the root broker, no sudo.

Servers that drop privileges after start (nginx `user www-data;`) need
neither: their master starts under `shmbypass run` as root. Every test
compares the bytes and reads the tier of its connections from `status`.
(Programs that run as other users use the system's python3, stdlib only:
the project's Python environment may sit where they cannot enter, /root.)
"""
import hashlib
import json
import os
import pwd
import shutil
import subprocess
import tempfile
import time

import pytest

from shmbypass import manager, policy, status
from apps import free_port, need
from conftest import assert_gone, new_instance, system_users
from interposer_env import PY, RUN, WRK_CHECK, Proc, Server, listening

HERE = os.path.dirname(os.path.abspath(__file__))
SERVERS = os.path.join(HERE, "user_servers.py")
SYS_PY = "/usr/bin/python3"
USERS = ("nobody", "daemon", "www-data", "redis")
MIB = 1 << 20


class UsersSetup:
    """An instance up (one-host shm tier) that allows USERS besides root."""

    def __init__(self):
        self.inst = new_instance("users")
        self.uids = {u: pwd.getpwnam(u).pw_uid for u in USERS}
        manager.up(self.inst, allow=policy.Policy(users=sorted(self.uids.values())))

    def env(self, **extra):
        env = dict(os.environ, SHMBYPASS_INSTANCE=self.inst.name)
        env.pop("SHMBYPASS_REGION", None)
        env.pop("SHMBYPASS_DOORBELL", None)
        env.update({k: str(v) for k, v in extra.items()})
        return env

    def command(self, user, argv, order):
        """argv run as `user` under the bypass, the way `order` says."""
        if user == "root":
            return RUN + argv
        if order == "run-then-drop":
            return RUN + ["runuser", "-u", user, "--"] + argv
        launcher = os.path.join(self.inst.run_dir, "bin", "shmbypass-run")
        return ["runuser", "-u", user, "--", launcher, "--tier", "shm", "--"] + argv

    def close(self):
        errors = status.errors(self.inst) if manager.is_up(self.inst) else {}
        manager.down(self.inst, drain_timeout=1, force=True)
        assert_gone(self.inst)
        assert not errors, f"BPF programs reported errors (line: errno): {errors}"


@pytest.fixture(scope="module")
def users_su():
    if os.geteuid() != 0:
        pytest.fail("the test suite must run as root")
    need("runuser", "setpriv")
    with system_users(USERS):     # redis comes with redis-server; the others with Debian
        su = UsersSetup()
        try:
            yield su
        finally:
            su.close()


@pytest.fixture(scope="module")
def denied_user():
    """A system user of our own that the instance does not allow."""
    name = f"sbt-deny-{os.getpid()}"
    subprocess.run(["useradd", "--system", "--no-create-home", "--user-group", "--shell",
                    "/usr/sbin/nologin", name], check=True, capture_output=True)
    try:
        yield name
    finally:
        subprocess.run(["userdel", name], capture_output=True)


@pytest.fixture
def shared_dir():
    """A directory other users can read (pytest's tmp_path is root's, 0700)."""
    d = tempfile.mkdtemp(prefix="sbt-users-")
    os.chmod(d, 0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


# -- helpers ----------------------------------------------------------------------

def port_of(addr):
    return addr.rsplit(":", 1)[1]


def rows_of(rows, port_a, port_b):
    """The rows of the connection between these two ports (both ends)."""
    want = {str(port_a), str(port_b)}
    return [r for r in rows if {port_of(r["local"]), port_of(r["remote"])} == want]


def status_json(su):
    """`shmbypass status --json`, the command (not the library's view)."""
    out = subprocess.run([PY, "-m", "shmbypass", "status", "--json"], env=su.env(),
                         capture_output=True, text=True, timeout=120, check=True).stdout
    return json.loads(out)["connections"]


def watch(su, port, proc):
    """The rows of connections to or from `port`, read from `status` while
    `proc` runs (each as last seen)."""
    seen = {}
    while True:
        done = proc.poll() is not None
        for r in status.connections(su.inst):
            if str(port) in (port_of(r["local"]), port_of(r["remote"])):
                seen[(r["local"], r["remote"])] = r
        if done:
            return list(seen.values())
        time.sleep(0.05)


def assert_pairs_in_shm(rows, min_pairs):
    """Every row seen is in the shm tier with no reason, and at least
    min_pairs connections were seen with both ends (a connection that came
    and went between two looks may show one end or none)."""
    assert rows and all(r["tier"] == "shm" and not r["reason"] for r in rows), rows
    ends = {(port_of(r["local"]), port_of(r["remote"])) for r in rows}
    pairs = sum((rem, loc) in ends for loc, rem in ends) // 2
    assert pairs >= min_pairs, (pairs, rows)
    return pairs


def uids_of(pgid, comm, want):
    """The effective uids of the processes named comm in process group pgid,
    once they are `want` (a master forks its workers after it listens), or
    after 30 s."""
    end = time.monotonic() + 30
    while (uids := _uids(pgid, comm)) != want and time.monotonic() < end:
        time.sleep(0.1)
    return uids


def _uids(pgid, comm):
    uids = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.getpgid(int(pid)) != pgid:
                continue
            with open(f"/proc/{pid}/comm") as f:
                if f.read().strip() != comm:
                    continue
            with open(f"/proc/{pid}/status") as f:
                uids |= {int(ln.split()[2]) for ln in f if ln.startswith("Uid:")}
        except (ProcessLookupError, FileNotFoundError):
            pass
    return uids


# -- echo servers as nobody: fork per connection, thread per connection -------------

# how the server is started, and how the daemon clients are (the other way)
ORDERS = {"fork": ("run-then-drop", "user-runs"), "thread": ("user-runs", "run-then-drop")}


@pytest.mark.parametrize("kind", ["fork", "thread"])
def test_echo_server_as_nobody(users_su, kind):
    """An echo server that runs as nobody from the start, and four clients
    (two as root, two as daemon) each echoing 1 MiB of random bytes and then
    holding their connection: every client and every server end is in the
    shm tier (the interposer's view), and `shmbypass status --json` shows
    each connection's two ends in the shm tier with the MiB both ways."""
    su = users_su
    srv_order, cli_order = ORDERS[kind]
    srv = Proc(su.command("nobody", [SYS_PY, SERVERS, kind], srv_order), su.env(), wrap=False)
    clients = []
    try:
        port = int(srv.wait_for("PORT "))
        held, conns = {}, []
        for user in ("root", "daemon", "root", "daemon"):
            argv = su.command(user, [SYS_PY, SERVERS, "client", str(port), str(MIB)], cli_order)
            clients.append(Proc(argv, su.env(), wrap=False, stdin=subprocess.PIPE))
            local, uid, tier, live, ok = map(int, clients[-1].wait_for("HELD ").split())
            assert (uid, tier, live, ok) == (su.uids.get(user, 0), 2, 1, 1), clients[-1].lines
            held[local] = user
            # (one line at a time: the server wrote it before echoing)
            conns.append(srv.wait_for("CONN ").split())
        assert {int(c[0]) for c in conns} == set(held), (conns, held)
        assert {tuple(c[1:]) for c in conns} == {(str(su.uids["nobody"]), "2", "1")}, conns
        rows = status_json(su)
        for local in held:
            pair = rows_of(rows, local, port)
            assert len(pair) == 2, (local, rows)
            assert all(r["tier"] == "shm" and not r["reason"] for r in pair), pair
            # (both ends went live before the echo: these bytes took the rings)
            assert all(min(r["bytes_tx"], r["bytes_rx"]) >= MIB for r in pair), json.dumps(pair)
        for c in clients:
            c.p.stdin.close()
            c.p.stdin = None
            c.finish(60)
            assert c.p.returncode == 0, (c.lines, c.stderr()[-2000:])
        assert srv.p.poll() is None, srv.stderr()[-2000:]
    finally:
        for p in clients + [srv]:
            p.kill()


# -- nginx: master as root, workers as www-data ----------------------------------------

def start_nginx(su, d, user):
    """nginx under `shmbypass run` as root, workers as `user`, serving d/www
    (a 16 MiB big.bin, a small.txt); (server, port, big.bin's bytes)."""
    port = free_port()
    os.makedirs(f"{d}/www", mode=0o755)
    data = os.urandom(16 * MIB)
    for name, body in (("big.bin", data), ("small.txt", b"hello\n" * 100)):
        with open(f"{d}/www/{name}", "wb") as f:
            f.write(body)
        os.chmod(f"{d}/www/{name}", 0o644)
    with open(f"{d}/nginx.conf", "w") as f:
        f.write(f"""daemon off; master_process on; worker_processes 2; user {user};
pid {d}/nginx.pid; error_log {d}/error.log;
events {{ worker_connections 256; }}
http {{ access_log off; sendfile on; tcp_nopush on;
  client_body_temp_path {d}/tmp; proxy_temp_path {d}/tmp; fastcgi_temp_path {d}/tmp;
  uwsgi_temp_path {d}/tmp; scgi_temp_path {d}/tmp;
  server {{ listen 127.0.0.1:{port}; root {d}/www; }} }}
""")
    srv = Server(su, ["nginx", "-c", f"{d}/nginx.conf", "-p", d], listening(port))
    try:
        want = {0, pwd.getpwnam(user).pw_uid}
        assert uids_of(srv.p.pid, "nginx", want) == want
    except BaseException:
        srv.stop()
        raise
    return srv, port, data


def curl_watched(su, d, port, data):
    """curl gets big.bin (sha256 compared), slowed down so that `status`
    sees its connection: the rows seen."""
    got = f"{d}/got.bin"
    curl = subprocess.Popen(RUN + ["curl", "-sSf", "--limit-rate", "4M", "-o", got,
                                   f"http://127.0.0.1:{port}/big.bin"],
                            env=su.env(), stderr=subprocess.PIPE)
    rows = watch(su, port, curl)
    assert curl.wait() == 0, curl.stderr.read()
    with open(got, "rb") as f:
        assert hashlib.file_digest(f, "sha256").digest() == hashlib.sha256(data).digest()
    os.unlink(got)
    return rows


def test_nginx_workers_as_www_data(users_su, shared_dir):
    """nginx started as root under `shmbypass run`, its workers dropping to
    www-data (`user www-data;`): curl gets a 16 MiB file (sha256 compared),
    wrk a small one over 8 connections at a time (no socket errors) and the
    16 MiB one (every body compared by wrk's Lua); every connection seen by
    `status` meanwhile is in the shm tier (hundreds with wrk, both ends of
    each seen), with no fallback reason."""
    need("nginx", "curl", "wrk")
    su, d = users_su, shared_dir
    srv, port, data = start_nginx(su, d, "www-data")
    try:
        assert assert_pairs_in_shm(curl_watched(su, d, port, data), 1) == 1
        # wrk: a small file over 8 connections at a time (nginx closes each
        # after 1,000 requests: hundreds of connections in all)
        wrk = subprocess.Popen(RUN + ["wrk", "-t1", "-c8", "-d3s",
                                      f"http://127.0.0.1:{port}/small.txt"],
                               env=su.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        rows = watch(su, port, wrk)
        text = wrk.stdout.read().decode()
        assert wrk.wait() == 0 and "Requests/sec" in text, (text, wrk.stderr.read())
        assert "Socket errors" not in text and "Non-2xx" not in text, text
        pairs = assert_pairs_in_shm(rows, 8)
        print(f"wrk: {pairs} connections seen in the shm tier (both ends), {len(rows)} rows")
        # wrk: the big file, each body compared
        with open(f"{d}/check.lua", "w") as f:
            f.write(WRK_CHECK)
        p = subprocess.run(RUN + ["wrk", "-t1", "-c2", "-d3s", "--timeout", "60s", "-s",
                                  f"{d}/check.lua", f"http://127.0.0.1:{port}/big.bin"],
                           env=su.env(SBP_EXPECT=f"{d}/www/big.bin"), capture_output=True,
                           timeout=120)
        text = p.stdout.decode()
        good_bad = [ln for ln in text.splitlines() if ln.startswith("CHECKED ")]
        assert p.returncode == 0 and good_bad, (text, p.stderr.decode()[-2000:])
        good, bad = (int(x.split("=")[1]) for x in good_bad[0].split()[1:])
        assert good > 0 and bad == 0, text
    finally:
        srv.stop()


def test_nginx_workers_as_a_user_not_allowed(users_su, denied_user, shared_dir):
    """The same nginx, its workers dropping to a user the instance does not
    allow: the master listened (as root), the worker that accepts asks
    again as itself and the policy turns the connection back to TCP, both
    rows saying policy (as last seen by `status`), the worker
    saying why on stderr (nginx's error log); curl still gets the file."""
    need("nginx", "curl")
    su, d = users_su, shared_dir
    srv, port, data = start_nginx(su, d, denied_user)
    try:
        rows = curl_watched(su, d, port, data)
        assert len(rows) == 2 and all(r["tier"] == "tcp" for r in rows), rows
        assert {r["reason"] for r in rows} == {"policy"}, rows
    finally:
        srv.stop()
    uid = pwd.getpwnam(denied_user).pw_uid
    with open(f"{d}/error.log") as f:        # nginx's stderr, once it runs
        said = [ln for ln in f if "may not share memory" in ln]
    assert said and all(f"uid {uid}" in ln for ln in said), said
    print(f"nginx worker said {len(said)}x: {said[0].strip()}")


# -- redis as the redis user ----------------------------------------------------------------

def test_redis_as_redis_user(users_su, shared_dir):
    """redis-server started with `runuser -u redis` under `shmbypass run`;
    redis-benchmark -c 1 and redis-cli as root: no errors, OK replies, a
    1 MiB value written and read back exactly, and a held connection whose
    two ends `status` shows in the shm tier."""
    need("redis-server", "redis-benchmark", "redis-cli")
    su, port = users_su, free_port()
    srv = Server(su, ["runuser", "-u", "redis", "--", "redis-server", "--port", str(port),
                      "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                      "--dir", shared_dir], listening(port))
    cli = None
    try:
        want = {su.uids["redis"]}
        assert uids_of(srv.p.pid, "redis-server", want) == want
        p = subprocess.run(RUN + ["redis-benchmark", "-p", str(port), "-q", "-c", "1",
                                  "-n", "5000", "-t", "set,get"],
                           env=su.env(), capture_output=True, timeout=120)
        text = p.stdout.decode(errors="replace").replace("\r", "\n")
        assert p.returncode == 0, p.stderr.decode()[-2000:]
        assert "error" not in text.lower() and text.count("requests per second") == 2, text
        value = os.urandom(MIB // 2).hex().encode()           # 1 MiB of text
        p = subprocess.run(RUN + ["redis-cli", "-p", str(port), "-x", "set", "big"],
                           input=value, env=su.env(), capture_output=True, timeout=60)
        assert p.stdout.strip() == b"OK", p
        p = subprocess.run(RUN + ["redis-cli", "-p", str(port), "--raw", "get", "big"],
                           env=su.env(), capture_output=True, timeout=60)
        assert p.stdout.rstrip(b"\n") == value, p.stderr
        # a held connection: its client port from the server, its tier from status
        cli = subprocess.Popen(RUN + ["redis-cli", "-p", str(port)], env=su.env(),
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        cli.stdin.write(b"PING\nCLIENT INFO\n")
        cli.stdin.flush()
        assert cli.stdout.readline().strip() == b"PONG"
        info = cli.stdout.readline().decode()
        local = [f.split("=", 1)[1] for f in info.split() if f.startswith("addr=")]
        assert local, info
        pair = rows_of(status.connections(su.inst), port_of(local[0]), port)
        assert len(pair) == 2 and all(r["tier"] == "shm" and not r["reason"] for r in pair), pair
    finally:
        if cli:
            cli.stdin.close()
            cli.wait(10)
        srv.stop()


# -- policy: a user the instance does not allow, to a non-root server -------------------------

def free_uid():
    uid = 64000
    while True:
        try:
            pwd.getpwuid(uid)
            uid += 1
        except KeyError:
            return uid


def test_user_not_allowed_to_a_non_root_server(users_su):
    """A client under a uid the instance does not allow (no passwd entry:
    setpriv), started by root under `shmbypass run`, echoes 1 MiB to the
    echo server of nobody (allowed): it works, in the kernel tier, both rows
    say policy, its stderr says so in one line. The same uid cannot
    join through the broker: the launcher exits non-zero with the reason."""
    su = users_su
    uid = free_uid()
    drop = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]
    srv = Proc(su.command("nobody", [SYS_PY, SERVERS, "thread"], "run-then-drop"), su.env(),
               wrap=False)
    cli = None
    try:
        port = int(srv.wait_for("PORT "))
        cli = Proc(RUN + drop + [SYS_PY, SERVERS, "client", str(port), str(MIB)], su.env(),
                   wrap=False, stdin=subprocess.PIPE)
        local, cuid, tier, live, ok = map(int, cli.wait_for("HELD ").split())
        assert (cuid, tier, live, ok) == (uid, 0, 0, 1), cli.lines
        pair = rows_of(status.connections(su.inst), local, port)
        assert len(pair) == 2 and all(r["tier"] == "kernel" for r in pair), pair
        assert {r["reason"] for r in pair} == {"policy"}, pair
        cli.p.stdin.close()
        cli.p.stdin = None
        cli.finish(60)
        assert cli.p.returncode == 0, cli.stderr()[-2000:]
        lines = [ln for ln in cli.stderr().splitlines() if "may not share memory" in ln]
        assert len(lines) == 1 and f"uid {uid}" in lines[0], cli.stderr()
        launcher = os.path.join(su.inst.run_dir, "bin", "shmbypass-run")
        p = subprocess.run(drop + [launcher, "--", SYS_PY, "-c", "print('joined')"],
                           env=su.env(), capture_output=True, text=True, timeout=60)
        assert p.returncode != 0 and "joined" not in p.stdout, p
        assert f"uid {uid}" in p.stderr and "not allowed" in p.stderr, p.stderr
    finally:
        for p in (cli, srv):
            if p:
                p.kill()
