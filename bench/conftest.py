"""Fixtures for the pytest-benchmark suites in bench/ (not part of `make test`:
run them with `.venv/bin/python -m pytest bench/ --benchmark-json out.json`).

The suites run on `shmbypass bench`'s own machinery (shmbypass/bench/): one
Runner for the session (its child processes, its bypass instance
sbp-bench-<pid>, brought up only when a kernel-tier suite asks and taken down
at the end) and its availability checks. A suite that needs a piece that is
not there (a measuring program, the interposer, root for the kernel tier)
skips with the runner's concrete reason."""
import os

import pytest

from shmbypass.bench.runner import Runner


@pytest.fixture(scope="session")
def runner():
    r = Runner()
    try:
        yield r
    finally:
        r.teardown()


def _require(runner, transport):
    if not runner.available(transport):
        pytest.skip(next(s["reason"] for s in runner.skipped if s["transport"] == transport))
    return runner


@pytest.fixture
def pingpong(runner):
    """The runner, with sbp-pingpong built."""
    return _require(runner, "tcp")


@pytest.fixture
def ringbench(runner):
    """The runner, with sbp-ringbench built."""
    return _require(runner, "ring")


@pytest.fixture
def kernel_tier(runner):
    """The runner, with its instance up (the kernel tier)."""
    if os.geteuid() != 0:
        pytest.skip("the kernel tier needs root (it loads BPF programs)")
    return _require(runner, "kernel")


@pytest.fixture
def shm_tier(runner):
    """The runner, with its instance up and the interposer built (the shm tier)."""
    if os.geteuid() != 0:
        pytest.skip("the shm tier needs root here (it loads BPF programs)")
    return _require(runner, "shm")

