"""Memory isolation on one host (issue 12, Tests; docs/ARCHITECTURE.md
"Trust model"), against the real kernel with real users.

Two pairs hold shm-tier connections, each between processes of two
different non-root users: pair 1 an echo server S1 (nobody) and a client V1
(daemon), pair 2 a server S2 (daemon) and a client V2 (nobody). A hostile
program (tests/hostile.py) runs under `shmbypass run` and holds a shm-tier
connection of its own to S1, so it shares memory with a process that also
serves pair 1. It is told, as if it had guessed it, everything root knows:
where each victim maps its pair regions and the paths of every inbox.

As yet another non-root user, it finds nothing that maps another pair's
rings: the victims' /proc/PID/{maps,fd,map_files,mem} and process_vm_readv
say EACCES/EPERM, the pins EACCES/EPERM (open(2) and BPF_OBJ_GET), the
inbox directory cannot be listed, and what /run/<instance> lets it open
(state.json, the libraries, the broker's socket, the inboxes) maps no
memory of anyone's: afterwards it maps no inode a victim maps. Then it
writes garbage to everything it can: every page of its own pair region
(shared with S1) while S1 serves it, random bytes as every SOL_SHMBYPASS
option of its own socket, and random datagrams and forged offers (with a
memfd of garbage) into every inbox. Both pairs then echo another MiB:
sha256 equal, both directions still in their rings, every row in the shm
tier in `shmbypass status --json` with its true byte counts (the hostile
also wrote, in its own region, a block that names pair 1's connection:
status believes a block only for a connection between the processes that
map it), S1 still serving.

Anyone may connect to the join broker (the socket is 0666): a caller that
connects and says nothing, several times over, holds up no other caller
(the third test; the broker served one at a time, 5 s each, so eight such
connections made an allowed user's `shmbypass-run` give up).

Two processes of the SAME uid are one trust domain, and that is the
kernel's rule, not ours: ptrace access (PTRACE_MODE_ATTACH, with no Yama
here) lets a process read another of its uid through /proc/PID/mem and
process_vm_readv, rings included; only /proc/PID/map_files needs
CAP_SYS_ADMIN, and no process keeps a pair region's memfd open for
/proc/PID/fd to reach. The second test shows it. An administrator who
wants two programs isolated runs them as two users.
"""
import json
import os
import pwd
import subprocess

import pytest

from shmbypass import manager, policy, status
from shmbypass._native import lib
from apps import need
from conftest import assert_gone, new_instance, system_users
from interposer_env import PY, RUN, Proc

HERE = os.path.dirname(os.path.abspath(__file__))
SERVERS = os.path.join(HERE, "user_servers.py")
HOSTILE = os.path.join(HERE, "hostile.py")
SYS_PY = "/usr/bin/python3"
MIB = 1 << 20
DENIED = {"EACCES", "EPERM"}


class Isolation:
    """An instance that allows nobody, daemon and a hostile user of our own."""

    def __init__(self, hostile_user):
        self.users = {u: pwd.getpwnam(u).pw_uid for u in ("nobody", "daemon", hostile_user)}
        self.hostile = hostile_user
        self.inst = new_instance("iso")
        manager.up(self.inst, allow=policy.Policy(users=sorted(self.users.values())))
        self.procs = []

    def env(self):
        env = dict(os.environ, SHMBYPASS_INSTANCE=self.inst.name)
        env.pop("SHMBYPASS_REGION", None)
        env.pop("SHMBYPASS_DOORBELL", None)
        return env

    def start(self, user, argv):
        """argv as user under `shmbypass run` (root starts it, runuser drops)."""
        p = Proc(RUN + ["runuser", "-u", user, "--"] + argv, self.env(), wrap=False,
                 stdin=subprocess.PIPE)
        self.procs.append(p)
        return p

    def pid_of(self, proc, user):
        """The pid of the program itself (run and runuser are its parents)."""
        uid = self.users[user]
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                if os.getpgid(int(pid)) != proc.p.pid:
                    continue
                with open(f"/proc/{pid}/status") as f:
                    uids = next(ln for ln in f if ln.startswith("Uid:")).split()[1:]
            except (ProcessLookupError, FileNotFoundError, StopIteration):
                continue
            if int(uids[0]) == uid:
                return int(pid)
        raise AssertionError(f"no process of {user} in {proc.p.args}")

    def close(self):
        for p in self.procs:
            p.kill()
            p.p.wait()
        errors = status.errors(self.inst) if manager.is_up(self.inst) else {}
        manager.down(self.inst, drain_timeout=1, force=True)
        assert_gone(self.inst)
        assert not errors, f"BPF programs reported errors (line: errno): {errors}"


@pytest.fixture
def iso():
    if os.geteuid() != 0:
        pytest.fail("the test suite must run as root")
    need("runuser")
    name = f"sbt-hos-{os.getpid()}"
    with system_users([name], user_group=True):
        su = Isolation(name)
        try:
            yield su
        finally:
            su.close()


def pair_regions(pid):
    """(address, length, dev, inode) of each pair region pid maps."""
    out = []
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            parts = line.split(None, 5)
            if len(parts) == 6 and parts[5].startswith("/memfd:shmbypass"):
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                out.append((lo, hi - lo, parts[3], int(parts[4])))
    return out


def start_pairs(su):
    """Pair 1: S1 (nobody) <- V1 (daemon); pair 2: S2 (daemon) <- V2
    (nobody); each client echoed a MiB through its rings. {name: (proc, pid)}."""
    found = {}
    for srv, cli, srv_user, cli_user in (("S1", "V1", "nobody", "daemon"),
                                         ("S2", "V2", "daemon", "nobody")):
        s = su.start(srv_user, [SYS_PY, SERVERS, "thread"])
        port = int(s.wait_for("PORT "))
        c = su.start(cli_user, [SYS_PY, SERVERS, "client", str(port), str(MIB)])
        local, uid, tier, live, ok = map(int, c.wait_for("HELD ").split())
        assert (uid, tier, live, ok) == (su.users[cli_user], 2, 1, 1), c.lines
        found[srv] = (s, su.pid_of(s, srv_user), port)
        found[cli] = (c, su.pid_of(c, cli_user), local)
    return found


def hostile_config(su, found, port):
    victims = {name: pid for name, (_, pid, _) in found.items()}
    inbox = os.path.join(su.inst.run_dir, "inbox")
    return {
        "port": port,
        "instance": su.inst.name,
        "victims": {str(pid): [[a, n] for a, n, _, _ in pair_regions(pid)]
                    for pid in victims.values()},
        "inboxes": [os.path.join(inbox, n) for n in sorted(os.listdir(inbox))],
        "magic": lib.SBP_INBOX_MSG_MAGIC,
        "sol": lib.SOL_SHMBYPASS,
    }


def echo_again(found):
    """Each client echoes another MiB: (tier, rings, sha256 equal) each."""
    for name in ("V1", "V2"):
        c = found[name][0]
        c.p.stdin.write("again\n")
        c.p.stdin.flush()
    return {name: tuple(map(int, found[name][0].wait_for("AGAIN ").split())) for name in ("V1", "V2")}


def status_rows(su):
    r = subprocess.run([PY, "-m", "shmbypass", "status", "--json"], env=su.env(),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout)["connections"]


def pair_rows(rows, client_port, server_port):
    want = {str(client_port), str(server_port)}
    return [r for r in rows
            if {r["local"].rsplit(":", 1)[1], r["remote"].rsplit(":", 1)[1]} == want]


def test_another_user_reaches_no_other_pair(iso):
    su = iso
    found = start_pairs(su)
    victims = {name: pid for name, (_, pid, _) in found.items()}
    # what each pair maps: S1's pair region with V1, S2's with V2
    theirs = {(dev, ino) for name in ("V1", "V2", "S2")
              for _, _, dev, ino in pair_regions(victims[name])}
    assert len(theirs) == 2, theirs
    cfg = hostile_config(su, found, found["S1"][2])
    v1_rows = pair_rows(status_rows(su), found["V1"][2], found["S1"][2])
    cookies = {r["local"].rsplit(":", 1)[1]: r["cookie"] for r in v1_rows}
    cfg["forge"] = [cookies[str(found["V1"][2])], cookies[str(found["S1"][2])]]
    h = su.start(su.hostile, [SYS_PY, HOSTILE, json.dumps(cfg)])
    tier, rings = map(int, h.wait_for("CONNECTED ").split())
    assert (tier, rings) == (2, 3), (h.lines, h.stderr())
    probed = json.loads(h.wait_for("PROBED ", timeout=120))
    tries = probed["tries"]

    # Nothing of another process: not its maps, fds, map_files, memory.
    by_what = {}
    for what, path, result in tries:
        by_what.setdefault(what, []).append((path, result))
    for what in ("read maps", "list fds", "list map_files", "open map_files", "read mem",
                 "process_vm_readv"):
        assert by_what[what] and {r for _, r in by_what[what]} <= DENIED, (what, by_what[what])
    assert "open memfd fd" not in by_what, by_what.get("open memfd fd")
    # Not the pins, by path nor by BPF_OBJ_GET.
    for what in ("open pin", "open pin rw", "bpf obj_get", "bpf obj_get rdonly"):
        assert by_what[what] and {r for _, r in by_what[what]} <= DENIED, (what, by_what[what])
    # Not the list of inboxes (their names are the tokens BPF relays).
    assert dict(by_what["list"])[os.path.join(su.inst.run_dir, "inbox")] in DENIED
    # What it could open under /run/<instance> maps nothing of anyone's, and
    # no write access to anything but what any program may create.
    for path, result in by_what.get("open rw", []):
        assert result in DENIED, (path, result)
    held = {(dev, ino) for dev, ino in probed["maps"]}
    assert not held & theirs, (held & theirs, tries)
    # (and it did map its own connection's memory: the check would see one)
    assert {(d, i) for _, _, d, i in pair_regions(su.pid_of(h, su.hostile))} & held

    # Garbage into everything it can write.
    h.p.stdin.write("go\n")
    h.p.stdin.flush()
    did = json.loads(h.wait_for("GARBAGE ", timeout=120))
    assert did["regions"] >= 1 and did["bytes_scribbled"] > 0, did
    assert did["datagrams_sent"] > 0, did

    # Its forged block is there, and not believed: as status reads the
    # hostile's own region, it carries no connection of pair 1.
    from shmbypass.region import pair
    owners = dict(zip(cfg["forge"], (found["V1"][1], found["S1"][1])))
    assert not pair.ring_counts([su.pid_of(h, su.hostile)], owners), "a forged block believed"
    # No other connection noticed.
    again = echo_again(found)
    assert again == {"V1": (2, 3, 1), "V2": (2, 3, 1)}, (again, found["V1"][0].stderr())
    rows = status_rows(su)
    for cli, srv in (("V1", "S1"), ("V2", "S2")):
        pair = pair_rows(rows, found[cli][2], found[srv][2])
        assert len(pair) == 2 and all(r["tier"] == "shm" and not r["reason"] for r in pair), pair
        assert all(min(r["bytes_tx"], r["bytes_rx"]) >= 2 * MIB for r in pair), pair
    for name in ("S1", "S2"):
        assert found[name][0].p.poll() is None, (name, found[name][0].stderr()[-2000:])
    h.p.stdin.close()
    h.p.stdin = None
    for name in ("V1", "V2"):
        c = found[name][0]
        c.p.stdin.close()
        c.p.stdin = None
        c.finish(60)
        assert c.p.returncode == 0, (name, c.lines, c.stderr()[-2000:])


def _ptrace_scope():
    try:
        with open("/proc/sys/kernel/yama/ptrace_scope") as f:
            return int(f.read())
    except FileNotFoundError:
        return 0


def test_same_uid_is_one_trust_domain(iso):
    """A program of daemon, V1's user, under `run`: /proc/V1/mem reads V1's
    rings (ptrace rules; Yama's ptrace_scope >= 1 would refuse it), while
    map_files still needs CAP_SYS_ADMIN and V1 holds no memfd to open. The
    other user's processes (S1, nobody) stay closed to it."""
    su = iso
    found = start_pairs(su)
    cfg = hostile_config(su, {k: found[k] for k in ("V1", "S1")}, found["S2"][2])
    h = su.start("daemon", [SYS_PY, HOSTILE, json.dumps(cfg)])
    h.wait_for("CONNECTED ")
    tries = json.loads(h.wait_for("PROBED ", timeout=120))["tries"]
    v1, s1 = f"/proc/{found['V1'][1]}/", f"/proc/{found['S1'][1]}/"
    mine = {(w, p.split("@")[0]): r for w, p, r in tries}
    v1_mem = [r for w, p, r in tries if w == "read mem" and p.startswith(v1)]
    s1_mem = [r for w, p, r in tries if w == "read mem" and p.startswith(s1)]
    assert v1_mem and s1_mem
    if _ptrace_scope() == 0:
        assert set(v1_mem) == {"ok:4096"}, tries
    else:
        assert set(v1_mem) <= DENIED, tries
    assert set(s1_mem) <= DENIED, tries
    assert {r for w, p, r in tries if w == "open map_files" and p.startswith(v1)} <= DENIED
    assert not [t for t in tries if t[0] == "open memfd fd"], tries
    assert mine[("list fds", v1 + "fd")].startswith("ok"), tries
    h.p.stdin.close()
    h.p.stdin = None


SILENT = r"""
import socket, sys
held = []
for _ in range(int(sys.argv[2])):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(sys.argv[1])
    held.append(s)
print("HOLDING", flush=True)
sys.stdin.read()
"""


def test_silent_callers_do_not_hold_the_broker(iso):
    """Any user may connect to the join broker (mode 0666). One that
    connects and says nothing, several times over, must not keep an allowed
    user's `shmbypass-run` from joining (the launcher gives up after 10 s;
    the broker used to serve one caller at a time, waiting 5 s for each)."""
    su = iso
    sock = os.path.join(su.inst.run_dir, "broker.sock")
    silent = Proc(["runuser", "-u", su.hostile, "--", SYS_PY, "-c", SILENT, sock, "8"], su.env(),
                  wrap=False, stdin=subprocess.PIPE)
    su.procs.append(silent)
    silent.wait_for("HOLDING")
    launcher = os.path.join(su.inst.run_dir, "bin", "shmbypass-run")
    r = subprocess.run(["runuser", "-u", "daemon", "--", launcher, "--tier", "shm", "--",
                        SYS_PY, "-c", "print('joined')"], env=su.env(), capture_output=True,
                       text=True, timeout=120)
    assert (r.returncode, r.stdout.strip()) == (0, "joined"), r.stderr
    assert silent.p.poll() is None      # (still holding its connections)
