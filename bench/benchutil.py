"""Helpers shared by the bench/ suites."""
import os

from shmbypass import paths


def own_cgroup():
    with open("/proc/self/cgroup") as f:
        for line in f:
            if line.startswith("0::"):
                return os.path.join(paths.cgroup2_root(), line[3:].strip().lstrip("/"))
    raise RuntimeError("no cgroup v2 membership")


class InGroup:
    """This process inside the instance's cgroup for a block (sockets made
    inside it are in the bypass), then back where it was."""

    def __init__(self, inst):
        self.inst = inst

    def __enter__(self):
        from shmbypass import manager
        self.home = own_cgroup()
        manager.join_cgroup(self.inst, os.getpid())
        return self

    def __exit__(self, *exc):
        with open(os.path.join(self.home, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))
