"""Fixtures for the pytest-benchmark suites in bench/ (not part of `make test`:
run them with `.venv/bin/python -m pytest bench/ --benchmark-json out.json`).

A suite that needs a piece that is not there (the ring module, the
interposer, root for the kernel tier) skips with the concrete reason."""
import itertools
import os

import pytest

from shmbypass import paths

_counter = itertools.count()


@pytest.fixture
def kernel_instance():
    """A private bypass instance (sbt-bench-<pid>-<n>), taken down afterwards."""
    if os.geteuid() != 0:
        pytest.skip("the kernel tier needs root (it loads BPF programs)")
    from shmbypass import manager
    from shmbypass.errors import ShmbypassError
    inst = paths.Instance(f"sbt-bench-{os.getpid()}-{next(_counter)}")
    try:
        manager.up(inst)
    except ShmbypassError as e:
        pytest.skip(f"the kernel tier cannot come up here: {e}")
    try:
        yield inst
    finally:
        manager.down(inst, drain_timeout=2, force=True)
