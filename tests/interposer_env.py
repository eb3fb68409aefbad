"""What the interposer tests share: the instances they run in (Setup, the
`setups` and `su` fixtures), peer processes (Proc, run_pair: tests/ipc_peer.py
under `shmbypass run`), and long-running real servers (Server, run_tool,
TierWatch). Used by test_interposer.py, test_apps_interposer.py,
test_apps_shm.py and test_apps_users.py.

Set-ups:

``tcp``   the library is fully active (region mapped, sockets marked, sk_state
          read back) but the BPF side pairs nothing (the instance drains), so
          every connection stays on TCP: the app must see exactly TCP.
``shm``   the BPF handshake puts connections in the shm tier.
``bell``  like shm, but in doorbell mode (SHMBYPASS_DOORBELL=1): no futex
          anywhere, every wait sleeps on the TCP socket, as between two VMs
          sharing an ivshmem region.
``slots`` the VM-pair path on one host (a shared region's slots).
"""
import json
import os
import select
import signal
import subprocess
import sys
import time

import pytest

from shmbypass import manager, shmtier
from conftest import new_instance

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PEER = os.path.join(HERE, "ipc_peer.py")
PY = sys.executable
RUN = [PY, "-m", "shmbypass", "run", "--tier", "shm", "--"]
SLOTS = 64


# -- set-ups ------------------------------------------------------------------

class Setup:
    """An instance up for one way of running the shm tier:

    ``tcp``    the library is loaded and asks, but BPF pairs nothing (the
               instance drains): the app must see exactly TCP;
    ``shm``    one host: each pair of processes brings its own memory;
    ``bell``   the same in doorbell mode (SHMBYPASS_DOORBELL=1): no futex,
               every wait sleeps on the TCP socket, as between two VMs;
    ``slots``  the VM-pair path on one host: 127.0.0.1 is a "peer VM", the
               handshake carries the TCP option and hands out slots of a
               shared (POSIX) region."""

    def __init__(self, mode):
        self.mode = mode
        self.inst = new_instance("ipc")
        if mode == "slots":
            manager.up(self.inst, slot_count=SLOTS, backend="posix", vm_peers=("127.0.0.1",))
        else:
            manager.up(self.inst)
        try:
            if mode == "tcp":
                # Keep these connections off the kernel tier too, so the
                # app sees the interposer over plain TCP (the kernel tier
                # has its own tests and its own quirks).
                manager.set_draining(self.inst, True)
            self.spec = shmtier.region_spec(self.inst)
            assert bool(self.spec) == (mode == "slots"), self.inst.load_state()
        except BaseException:
            self.close()
            raise

    def env(self, **extra):
        env = dict(os.environ, SHMBYPASS_INSTANCE=self.inst.name)
        env.pop("SHMBYPASS_DOORBELL", None)
        env.pop("SHMBYPASS_REGION", None)
        if self.spec:
            env["SHMBYPASS_REGION"] = self.spec
        if self.mode == "bell":
            env["SHMBYPASS_DOORBELL"] = "1"
        env.update({k: str(v) for k, v in extra.items()})
        return env

    @property
    def expect_tier(self):
        return 0 if self.mode == "tcp" else 2

    def close(self):
        manager.down(self.inst, drain_timeout=1, force=True)


_setups = {}


@pytest.fixture(scope="module")
def setups():
    if os.geteuid() != 0:
        pytest.fail("the test suite must run as root")
    try:
        yield _setups
    finally:
        for s in _setups.values():
            s.close()
        _setups.clear()


def get_setup(setups, mode):
    if mode not in setups:
        setups[mode] = Setup(mode)
    return setups[mode]


@pytest.fixture(params=["tcp", "shm", "bell", "slots"])
def su(request, setups):
    return get_setup(setups, request.param)


# -- running peers ------------------------------------------------------------

class Proc:
    """A peer process; its stdout lines are collected by a thread-free reader."""

    def __init__(self, argv, env, wrap=True, stdin=None):
        self.p = subprocess.Popen((RUN if wrap else []) + argv, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, start_new_session=True,
                                  stdin=stdin)
        self.lines = []
        self._buf = b""         # read from the pipe, not a whole line yet

    def readline(self, timeout=30):
        """The next stdout line, or None at EOF. Reads the pipe itself: select
        and a buffered readline disagree about lines already buffered."""
        end = time.monotonic() + timeout
        fd = self.p.stdout.fileno()
        while b"\n" not in self._buf:
            left = end - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no output from {self.p.args} in {timeout}s")
            if select.select([fd], [], [], left)[0]:
                chunk = os.read(fd, 65536)
                if not chunk:
                    if not self._buf:
                        return None
                    self._buf += b"\n"     # a last line without its newline
                self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        self.lines.append(line.decode(errors="replace"))
        return self.lines[-1]

    def wait_for(self, prefix, timeout=30):
        while True:
            line = self.readline(timeout)
            if line is None:
                raise AssertionError(f"{self.p.args} ended before {prefix!r}: {self.stderr()}")
            if line.startswith(prefix):
                return line[len(prefix):].strip()

    def finish(self, timeout=60):
        try:
            out, err = self.p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            out, err = self.p.communicate()
            raise AssertionError(f"{self.p.args} hung; stderr: {err[-3000:]}")
        self.lines += (self._buf.decode(errors="replace") + out).splitlines()
        self._buf = b""
        self._err = err
        return self.result()

    def result(self):
        for line in reversed(self.lines):
            if line.startswith("RESULT "):
                return json.loads(line[7:])
        return {}

    def stderr(self):
        if getattr(self, "_err", None) is None:
            try:
                self._err = self.p.stderr.read() if self.p.poll() is not None else ""
            except ValueError:
                self._err = ""
        return self._err

    def kill(self, sig=signal.SIGKILL):
        try:
            os.killpg(self.p.pid, sig)
        except ProcessLookupError:
            pass


def peer(su, role, scenario, *args, wrap=True, **env):
    return Proc([PY, PEER, role, scenario] + [str(a) for a in args], su.env(**env), wrap)


def run_pair(su, scenario, sargs=(), cargs=(), timeout=45, swrap=True, cwrap=True, env=None):
    srv = peer(su, "server", scenario, *sargs, wrap=swrap, **(env or {}))
    cli = None
    try:
        port = srv.wait_for("PORT ")
        cli = peer(su, "client", scenario, port, *cargs, wrap=cwrap, **(env or {}))
        cres = cli.finish(timeout)
        sres = srv.finish(timeout)
        assert cli.p.returncode == 0 and srv.p.returncode == 0, (
            f"client rc {cli.p.returncode} {cres} {cli.stderr()[-2000:]}\n"
            f"server rc {srv.p.returncode} {sres} {srv.stderr()[-2000:]}")
        return sres, cres
    finally:
        for p in (srv, cli):
            if p:
                p.kill()


def check_tier(su, *results):
    for r in results:
        assert r.get("tier") == su.expect_tier, r


# -- real applications -----------------------------------------------------------

@pytest.fixture
def app_su(setups):
    """The shm tier as `up` makes it by default (one host: each pair of
    processes brings its memory)."""
    return get_setup(setups, "shm")


def shm_rows(su):
    from shmbypass import status
    return [r for r in status.connections(su.inst) if r["tier"] == "shm"]


class Server:
    """A long-running program under `shmbypass run`, killed (group) at the end."""

    def __init__(self, su, argv, ready, wrap=True, **env):
        self.p = subprocess.Popen((RUN if wrap else []) + argv, env=su.env(**env),
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                  start_new_session=True)
        end = time.monotonic() + 20
        while not ready():
            if self.p.poll() is not None:
                raise AssertionError(f"{argv[0]} exited: {self.p.stderr.read().decode()[-2000:]}")
            if time.monotonic() > end:
                self.stop()
                raise AssertionError(f"{argv[0]} not ready in 20 s")
            time.sleep(0.05)

    def stop(self):
        try:
            os.killpg(self.p.pid, signal.SIGTERM)
            self.p.wait(10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(self.p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.p.wait()


def listening(port):
    """Is something listening on port? (Read /proc: connecting would use up a
    one-shot server such as `iperf3 -1`.)"""
    def check():
        for name in ("/proc/net/tcp", "/proc/net/tcp6"):
            with open(name) as f:
                for line in f.readlines()[1:]:
                    local, state = line.split()[1], line.split()[3]
                    if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                        return True
        return False
    return check


class TierWatch:
    """`shmbypass status --json`, polled in the background while an app runs:
    the rows of the connections to or from `port`, each with the most bytes
    seen (the issue asks for the apps' connections to be shown in the shm
    tier by that very command, not by the library's own view)."""

    def __init__(self, su, port):
        import threading
        self.rows = {}
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, args=(su.env(), f":{port}"), daemon=True)
        self._t.start()

    def _run(self, env, suffix):
        while not self._stop.is_set():
            p = subprocess.run([PY, "-m", "shmbypass", "status", "--json"], env=env,
                               capture_output=True, text=True, timeout=60)
            if p.returncode == 0:
                for r in json.loads(p.stdout)["connections"]:
                    if r["local"].endswith(suffix) or r["remote"].endswith(suffix):
                        old = self.rows.get((r["local"], r["remote"]))
                        if not old or r["bytes_tx"] + r["bytes_rx"] >= \
                                old["bytes_tx"] + old["bytes_rx"]:
                            self.rows[(r["local"], r["remote"])] = r
            self._stop.wait(0.2)

    def stop(self):
        self._stop.set()
        self._t.join(60)
        return list(self.rows.values())


def assert_shm_both_ends(rows, min_bytes):
    """Some connection moved min_bytes in the shm tier, and `status` showed
    both of its ends there."""
    big = [r for r in rows if r["tier"] == "shm" and max(r["bytes_tx"], r["bytes_rx"]) >= min_bytes]
    port = lambda a: a.rsplit(":", 1)[1]     # noqa: E731 (a v4 peer of a v6 socket is v4-mapped)
    ends = {(port(r["local"]), port(r["remote"])) for r in big}
    assert any((rem, loc) in ends for loc, rem in ends), rows


def run_tool(su, argv, timeout=120, wrap=True, **env):
    p = subprocess.run((RUN if wrap else []) + argv, env=su.env(**env), capture_output=True,
                       timeout=timeout)
    return p


WRK_CHECK = """
-- every response body must be the file SBP_EXPECT names, byte for byte
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args)
  local f = assert(io.open(os.getenv("SBP_EXPECT"), "rb"))
  want = f:read("*a"); f:close()
  good = 0; bad = 0
end
function response(status, headers, body)
  if status == 200 and body == want then good = good + 1 else bad = bad + 1 end
end
function done(summary, latency, requests)
  local g, b = 0, 0
  for _, t in ipairs(threads) do g = g + t:get("good"); b = b + t:get("bad") end
  io.write(string.format("CHECKED good=%d bad=%d\\n", g, b))
end
"""
