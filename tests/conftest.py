"""Shared fixtures: a private bypass instance per test, and a way to put the
test process (or a child) inside the bypass cgroup.

Every instance is named sbt-<pid>-<n>; a run that was killed leaves such
names behind, and the next run removes them first."""
import contextlib
import glob
import itertools
import os
import pwd
import subprocess
import time

import pytest

from shmbypass import bpf, manager, paths, slots, status
from shmbypass._native import ffi, lib

# Tests move this very process into the bypass group (InGroup), as if it ran
# under `shmbypass run`, so it needs what `run` gives every program: the guard
# against tcp_bpf's spurious EAGAIN (native/guard.c). LD_PRELOAD is read at
# exec time: `make test` sets it; here children get it too.
GUARD = paths.tool("libshmbypass-guard.so")
GUARDED = GUARD in os.environ.get("LD_PRELOAD", "")

# The interposer's test build (native/Makefile: preload/testhooks.c, -DSBP_TEST)
# has what the tests ask it (an fd's tier, SHMBYPASS_TEST_ARM_DELAY_NS); the
# shipped library has none of it. `shmbypass run` preloads SHMBYPASS_PRELOAD,
# so every peer the tests start gets the test build (unless another build, e.g.
# a sanitizer one, is named already).
os.environ.setdefault("SHMBYPASS_PRELOAD", paths.tool("libshmbypass-preload-test.so"))


def pytest_report_header(config):
    if not GUARDED:
        return (f"WARNING: {GUARD} is not preloaded (use `make test`): in-process kernel-tier "
                "tests may see the kernel's spurious EAGAIN")
    return f"guard preloaded: {GUARD}"


_counter = itertools.count()


def pytest_sessionstart(session):
    if os.geteuid() == 0:
        manager.sweep_dead("sbt-")


@contextlib.contextmanager
def system_users(names, user_group=False):
    """The users of `names` that do not exist yet, made as system users
    without a login (and a group of their own if user_group), removed at the
    end whatever happens; the ones that existed are left alone."""
    created = []
    try:
        for u in names:
            try:
                pwd.getpwnam(u)
            except KeyError:
                subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin"]
                               + (["--user-group"] if user_group else []) + [u],
                               check=True, capture_output=True)
                created.append(u)
        yield
    finally:
        for u in created:
            subprocess.run(["userdel", u], capture_output=True)


def new_instance(tag: str = "") -> paths.Instance:
    return paths.Instance(f"sbt-{tag + '-' if tag else ''}{os.getpid()}-{next(_counter)}")


def assert_gone(inst: paths.Instance) -> None:
    assert not os.path.exists(inst.pin_dir), f"pins left in {inst.pin_dir}"
    assert not os.path.exists(inst.run_dir), f"run dir left: {inst.run_dir}"
    cg = inst.default_cgroup()
    assert not (cg and os.path.exists(cg)), f"cgroup left: {cg}"
    left = glob.glob(f"/dev/shm/{inst.name}-*")
    assert not left, f"shared memory left: {left}"


@pytest.fixture
def inst():
    """A private instance, up, torn down (and checked gone) afterwards."""
    if os.geteuid() != 0:
        pytest.fail("the test suite must run as root")
    instance = new_instance()
    manager.up(instance)
    try:
        yield instance
    finally:
        errors = status.errors(instance) if manager.is_up(instance) else {}
        manager.down(instance, drain_timeout=2, force=True)
        assert_gone(instance)
    assert not errors, f"BPF programs reported errors (line: errno): {errors}"


InGroup = manager.InGroup


def free_list(instance: paths.Instance) -> list[int]:
    """The ids on BPF's free list, in pop order. It drains the queue and
    pushes every id back, so only a test may call it, while no connection is
    being set up: the pool checks compare it with slots.free_slots(), which
    counts from slot_state and leaves the queue alone."""
    fd = bpf.get_pinned(instance.pin("free_slots"))
    out = []
    try:
        val = ffi.new("uint32_t *")
        while lib.bpf_map_lookup_and_delete_elem(fd, ffi.NULL, val) == 0:
            out.append(val[0])
        for slot in out:
            val[0] = slot
            assert lib.bpf_map_update_elem(fd, ffi.NULL, val, 0) == 0, f"push slot {slot} back"
    finally:
        os.close(fd)
    return out


def assert_slots_back(instance: paths.Instance, timeout: float = 30) -> None:
    """Every slot of the pool is free again (within `timeout`: the last
    closes are still being processed) and on the free list; if not, say what
    holds them."""
    total = slots.config(instance)["slot_count"]
    end = time.monotonic() + timeout
    while len(slots.free_slots(instance)) != total and time.monotonic() < end:
        time.sleep(0.2)
    free = len(slots.free_slots(instance))
    assert free == total, (f"{total - free} of {total} slots not back; reservations "
                           f"{slots.reservations(instance)[:20]}; counters {status.counters(instance)}")
    assert sorted(free_list(instance)) == slots.free_slots(instance), "slot_state and the free list disagree"


@pytest.fixture
def in_group(inst):
    with InGroup(inst):
        yield inst
