"""Issue 10.9: whatever fails, no VM guest outlives its launcher. What the
teardown and the sweep at the next start do, shown with stand-in processes
named like guests (no QEMU needed)."""
import os
import subprocess
import time

from shmbypass.vm import qemu


def fake_guest(tmp_path, name):
    """A process whose command line looks like a guest's: argv[0] named
    qemu-system-*, and `-name NAME` (a shell that sleeps)."""
    exe = tmp_path / "qemu-system-stand-in"
    if not exe.exists():
        exe.symlink_to("/bin/sh")
    return subprocess.Popen([str(exe), "-c", "sleep 60; true", "-name", name],
                            start_new_session=True)


def gone(p):
    for _ in range(200):
        if p.poll() is not None:
            return True
        time.sleep(0.02)
    return False


def test_sweep_kills_guests_of_dead_launchers(tmp_path):
    dead = 4194303                  # above pid_max's default: never a live pid
    assert not os.path.exists(f"/proc/{dead}")
    orphan = fake_guest(tmp_path, f"{qemu.RUN_PREFIX}{dead}-1-B")
    ours = fake_guest(tmp_path, f"{qemu.RUN_PREFIX}{os.getpid()}-1-A")
    try:
        time.sleep(0.2)             # the shell has its command line
        qemu.sweep_stale()
        assert gone(orphan), "a guest whose launcher is dead survived the sweep"
        assert ours.poll() is None, "the sweep killed a guest of a live launcher"
        assert qemu.kill_guests(lambda n: n == f"{qemu.RUN_PREFIX}{os.getpid()}-1-A") == [ours.pid]
        assert gone(ours)
    finally:
        for p in (orphan, ours):
            if p.poll() is None:
                p.kill()
                p.wait()
