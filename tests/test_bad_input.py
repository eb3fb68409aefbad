"""Bad input gets a clear one-line error and leaves nothing behind."""
import os
import shutil
import subprocess
import sys

import pytest

from shmbypass import paths
from conftest import assert_gone, new_instance

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def shmbypass(args, inst, env=None, prefix=()):
    e = dict(os.environ, SHMBYPASS_INSTANCE=inst.name, **(env or {}))
    return subprocess.run(list(prefix) + [sys.executable, "-m", "shmbypass"] + args,
                          env=e, capture_output=True, text=True, timeout=120, cwd=ROOT)


def up_fails(message, **kw):
    """`shmbypass up` (kw: env, prefix) fails with one line naming message
    and leaves nothing behind."""
    inst = new_instance()
    one_line_error(shmbypass(["up"], inst, **kw), message)
    assert_gone(inst)


def one_line_error(r, *words):
    assert r.returncode == 1, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("shmbypass: error: "), lines
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


def test_not_root():
    inst = new_instance()
    # A user namespace makes us uid 65534 while the files stay readable.
    userns = ["unshare", "--user", "--map-user=65534", "--map-group=65534"]
    for cmd in (["up"], ["down"]):
        one_line_error(shmbypass(cmd, inst, prefix=userns), "must run as root")
    # run: a non-root user needs an instance an administrator opened to it
    one_line_error(shmbypass(["run", "--", "true"], inst, prefix=userns),
                   f"instance {inst.name} takes no non-root programs",
                   "an administrator runs `shmbypass up --allow-user USER` first")
    assert_gone(inst)


def test_cgroup2_not_mounted():
    root = paths.cgroup2_root()
    # In a private mount namespace, with every cgroup2 mount gone.
    script = f"umount -l {root} && exec \"$@\""
    up_fails("cgroup v2 is not mounted",
             prefix=["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh"])


def test_bpffs_not_mountable():
    up_fails("cannot mount bpffs", env={"SHMBYPASS_BPFFS": "/proc/sys/shmbypass-no-such-dir"})
    assert not os.path.exists("/proc/sys/shmbypass-no-such-dir")


def test_kernel_without_needed_programs(tmp_path):
    """A verifier that refuses our programs: a clear message, nothing left."""
    clang = shutil.which("clang-19") or shutil.which("clang")
    obj = tmp_path / "bypass.bpf.o"
    subprocess.run([clang, "-g", "-O2", "-target", "bpf", "-I", os.path.join(ROOT, "build", "bpf"),
                    "-c", os.path.join(ROOT, "tests", "data", "no_helper.bpf.c"), "-o", str(obj)],
                   check=True)
    up_fails("this kernel cannot run the bypass programs", env={"SHMBYPASS_BPF_DIR": str(tmp_path)})


def test_missing_build():
    up_fails("is missing", env={"SHMBYPASS_BPF_DIR": "/nonexistent-shmbypass"})


def test_run_without_command():
    inst = new_instance()
    r = shmbypass(["run", "--"], inst)
    one_line_error(r, "no command given")
    assert_gone(inst)


BAD_NAMES = ["../sbt-escape", "a/b", "..", ".", ".hidden", "a..b", "x" * 65, "", "sp ace",
             "tab\tname", "ünï"]


@pytest.mark.parametrize("cmd", [["up"], ["down"], ["run", "--", "true"], ["status"],
                                 ["status", "--json"], ["doctor"], ["bench", "--quick"]])
def test_instance_name_is_checked_by_every_command(cmd):
    """SHMBYPASS_INSTANCE names a directory under bpffs, /run and the cgroup
    tree whose entries `down` removes as root: a name that is not one plain
    path component is refused, with one line, before anything is touched."""
    from types import SimpleNamespace
    escape = f"sbt-escape-{os.getpid()}"
    for bad in BAD_NAMES + [f"../{escape}"]:
        r = shmbypass(cmd, SimpleNamespace(name=bad))
        one_line_error(r, "invalid instance name")
    for parent in (os.path.dirname(paths.BPFFS), "/", os.path.dirname(paths.cgroup2_root())):
        assert not os.path.exists(os.path.join(parent, escape)), parent


def test_instance_name_in_python():
    from shmbypass.errors import ShmbypassError
    for bad in BAD_NAMES + ["nul\0byte"]:
        with pytest.raises(ShmbypassError, match="invalid instance name"):
            paths.Instance(bad)
    for good in ("shmbypass", "sbt-1234-5", "a.b_c-D9", "x" * 64, "-dash-first"):
        assert paths.Instance(good).pin_dir == os.path.join(paths.BPFFS, good)
