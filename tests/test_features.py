"""Every optional BPF feature degrades alone (issue: "works on the kernel it
is given"). The refusals are real: a test build of bpf/drain.bpf.c that the
verifier rejects (tests/data/refused_drain.bpf.c), this kernel's own answer
where it refuses something, and SHMBYPASS_WITHOUT, which makes the loader
treat a named optional feature as refused on any kernel."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from shmbypass import paths, programs
from conftest import InGroup, assert_gone, new_instance
from sockets import pair, recv_exact, sha

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PY = sys.executable
PEER = os.path.join(HERE, "stream_peer.py")
SIZE = 1 << 20


def shmbypass(args, inst, env=None, **kw):
    e = dict(os.environ, SHMBYPASS_INSTANCE=inst.name, **(env or {}))
    return subprocess.run([PY, "-m", "shmbypass", *args], env=e, capture_output=True, text=True,
                          timeout=120, cwd=ROOT, **kw)


@pytest.fixture
def refused_dir(tmp_path):
    """A BPF directory with the real objects but for drain: one the verifier refuses."""
    clang = shutil.which("clang-19") or shutil.which("clang")
    subprocess.run([clang, "-g", "-O2", "-target", "bpf", "-I", os.path.join(ROOT, "build", "bpf"),
                    "-c", os.path.join(HERE, "data", "refused_drain.bpf.c"),
                    "-o", str(tmp_path / "drain.bpf.o")], check=True)
    for name in ("bypass", "ask", "capture"):
        os.symlink(paths.bpf_object(name), tmp_path / f"{name}.bpf.o")
    return str(tmp_path)


class Instance:
    """An instance brought up through the CLI with an environment, and
    always taken down (forced) and checked gone."""

    def __init__(self, env):
        self.inst = new_instance("feat")
        self.env = env

    def __call__(self, *args, **kw):
        return shmbypass(list(args), self.inst, self.env, **kw)

    def __enter__(self):
        self.up = self("up")
        assert self.up.returncode == 0, self.up.stderr
        return self

    def __exit__(self, *exc):
        self("down", "--force", "--drain-timeout", "1")
        assert_gone(self.inst)

    def status(self):
        r = self("status", "--json")
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)


def shm_pair(it):
    """A server and a client under `shmbypass run`, holding one connection
    that moved SIZE bytes each way. Returns (server, client, client port)."""
    run = [PY, "-m", "shmbypass", "run", "--"]
    env = dict(os.environ, SHMBYPASS_INSTANCE=it.inst.name, **it.env)
    srv = subprocess.Popen(run + [PY, PEER, "server", str(SIZE)], env=env, text=True,
                           stdout=subprocess.PIPE, cwd=ROOT)
    port = srv.stdout.readline().split()[1]
    cli = subprocess.Popen(run + [PY, PEER, "client", port, str(SIZE)], env=env, text=True,
                           stdout=subprocess.PIPE, stdin=subprocess.PIPE, cwd=ROOT)
    held = cli.stdout.readline().split()
    assert held and held[0] == "HELD", held
    return srv, cli, held[1], held[2]


def finish(srv, cli):
    cli.stdin.close()
    cli.wait(30)
    got = srv.stdout.readline().split()
    srv.wait(30)
    return got[1] if got else None


def both_tiers_work(it):
    """A kernel-tier pair (this process, in the group, no interposer) and a
    shm-tier pair (two programs under `run`): tier in status, bytes equal."""
    from stream_peer import pattern
    with InGroup(it.inst):
        c, s = pair()
    try:
        data = os.urandom(SIZE)
        c.sendall(data[:1])
        assert recv_exact(s, 1) == data[:1]
        srv, cli, port, got = shm_pair(it)
        try:
            assert got == sha(pattern(SIZE, 1))
            rows = it.status()["connections"]
            tiers = {(r["local"], r["tier"]) for r in rows}
            assert (f"127.0.0.1:{c.getsockname()[1]}", "kernel") in tiers, rows
            assert (f"127.0.0.1:{port}", "shm") in tiers, rows
            c.sendall(data[1:])
            assert sha(recv_exact(s, SIZE - 1)) == sha(data[1:])
        finally:
            assert finish(srv, cli) == sha(pattern(SIZE, 2))
    finally:
        c.close()
        s.close()


def test_doctor_names_every_feature_with_the_kernels_answer():
    r = subprocess.run([PY, "-m", "shmbypass", "doctor"], capture_output=True, text=True,
                       timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = {ln.split()[1]: ln for ln in r.stdout.splitlines()}
    for name in ("root", "cgroup2", "bpffs", "btf", "core", "drain", "drain-tcp", "ask",
                 "capture", "ivshmem", "guard", "interposer"):
        assert name in lines, r.stdout
    assert "arena" not in lines, r.stdout
    assert lines["core"].startswith("ok")
    for name in ("drain", "drain-tcp", "ask", "capture"):
        ln = lines[name]
        if ln.startswith("off"):
            # the kernel's answer: an errno name, never advice to become root
            assert any(e in ln for e in ("EPERM", "EINVAL", "ENOTSUPP", "EOPNOTSUPP")), ln
            assert "run as root" not in ln, ln


def test_doctor_says_what_was_turned_off():
    r = subprocess.run([PY, "-m", "shmbypass", "doctor"], capture_output=True, text=True, timeout=120,
                       cwd=ROOT, env=dict(os.environ, SHMBYPASS_WITHOUT="drain,capture"))
    lines = {ln.split()[1]: ln for ln in r.stdout.splitlines()}
    for name in ("drain", "capture"):
        assert lines[name].startswith("off") and "turned off (SHMBYPASS_WITHOUT)" in lines[name]
    assert "turned off" not in lines["drain-tcp"], r.stdout


def test_optional_programs_refused_by_the_verifier(refused_dir):
    """Both drain iterators refused: `up` works, says so, both tiers carry
    bytes, and `down` with a live kernel-tier connection refuses to drop
    what it cannot check (unless --force), then leaves nothing."""
    with Instance({"SHMBYPASS_BPF_DIR": refused_dir}) as it:
        assert "optional feature off: drain-tcp: the verifier rejected iter/tcp" in it.up.stderr
        feats = it.status()["features"]
        assert not feats["drain"]["ok"] and not feats["drain-tcp"]["ok"], feats
        assert feats["drain-tcp"]["detail"].startswith("the verifier rejected iter/tcp (EINVAL)")
        st = it("status")
        assert "optional feature off: drain-tcp" in st.stdout
        both_tiers_work(it)
        with InGroup(it.inst):
            c, s = pair()
        try:
            c.sendall(b"x" * 1000)   # unread by s
            r = it("down", "--drain-timeout", "0.5")
            assert r.returncode == 1
            assert "lets shmbypass check no socket's unread redirected bytes" in r.stderr, r.stderr
            assert os.path.isdir(it.inst.pin_dir)   # kept: the connection keeps working
            assert recv_exact(s, 1000) == b"x" * 1000
        finally:
            c.close()
            s.close()
        r = it("down", "--drain-timeout", "0.5")
        assert r.returncode == 0, r.stderr
        assert "no kernel-tier connection was live" in r.stdout


def test_features_turned_off_by_name():
    """SHMBYPASS_WITHOUT=drain,drain-tcp on any kernel: both tiers work
    (one host needs no region), status and up name each feature."""
    with Instance({"SHMBYPASS_WITHOUT": "drain,drain-tcp"}) as it:
        st = it.status()
        for name in ("drain", "drain-tcp"):
            assert st["features"][name] == {"ok": False, "core": False,
                                            "detail": st["features"][name]["detail"]}
            assert "turned off (SHMBYPASS_WITHOUT)" in st["features"][name]["detail"]
            assert f"optional feature off: {name}: " in it.up.stderr
        assert "region" not in it.inst.load_state()
        both_tiers_work(it)


def test_unknown_feature_name_is_refused():
    inst = new_instance()
    r = shmbypass(["up", "--without", "drian"], inst)
    assert r.returncode == 1
    assert r.stderr.strip() == ("shmbypass: error: SHMBYPASS_WITHOUT: unknown feature drian "
                                f"(optional features: {', '.join(programs.OPTIONAL_NAMES)})")
    assert_gone(inst)


def test_down_waits_for_queues_with_iter_tcp():
    """Without the sockmap iterator, iter/tcp checks this namespace's
    queues: `down` waits for unread redirected bytes, then says how."""
    obj, feat = programs.load_optional(programs.OPTIONAL_PROGRAMS[1])
    if not obj:
        pytest.skip(f"the kernel refuses iter/tcp: {feat.detail}")
    obj.close()
    with Instance({"SHMBYPASS_WITHOUT": "drain"}) as it:
        with InGroup(it.inst):
            c, s = pair()
        try:
            c.sendall(b"y" * 5000)
            r = it("down", "--drain-timeout", "0.3")
            assert r.returncode == 1
            assert "1 connection(s) hold 5000 redirected bytes" in r.stderr, r.stderr
            down = subprocess.Popen([PY, "-m", "shmbypass", "down", "--drain-timeout", "20"],
                                    env=dict(os.environ, SHMBYPASS_INSTANCE=it.inst.name),
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
            assert recv_exact(s, 5000) == b"y" * 5000
            out, err = down.communicate(timeout=60)
            assert down.returncode == 0, err
            assert "every redirected byte was read (checked with iter/tcp" in out, out
        finally:
            c.close()
            s.close()
