"""Connection set-up: connect + accept + close, and connect + one 64 B
exchange + close, over loopback TCP, a Unix socket, and loopback TCP inside
the kernel tier (this process moved into the bench instance's cgroup; the
tier checked as `shmbypass bench` checks it)."""
import socket
import time

import pytest

from shmbypass.bench import measure


def _listener(family, tmp_path):
    if family == socket.AF_UNIX:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        addr = str(tmp_path / "l.sock")
        s.bind(addr)
    else:
        s = socket.socket(family, socket.SOCK_STREAM)
        s.bind(("127.0.0.1", 0))
        addr = s.getsockname()
    s.listen(1024)
    return s, addr


def _connect_cycle(family, lst, addr, exchange):
    c = socket.socket(family, socket.SOCK_STREAM)
    c.connect(addr)
    a, _ = lst.accept()
    if exchange:
        c.sendall(b"x" * 64)
        got = a.recv(64)
        a.sendall(got)
        c.recv(64)
    c.close()
    a.close()


def _held_tiers(runner, lst, addr):
    """The tiers `shmbypass status` shows for one connection held open (the
    benchmarked ones are gone before status could see them)."""
    c = socket.create_connection(addr)
    a, _ = lst.accept()
    try:
        for _ in range(50):  # until status lists it (pairing is at ESTABLISHED)
            tiers = runner.tiers_for_port(addr[1])
            if tiers:
                return tiers
            time.sleep(0.1)
        return tiers
    finally:
        c.close()
        a.close()


@pytest.mark.parametrize("exchange", [False, True], ids=["connect-close", "connect-64B-close"])
@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_UNIX], ids=["tcp", "unix"])
def test_connect(benchmark, tmp_path, family, exchange):
    lst, addr = _listener(family, tmp_path)
    try:
        benchmark(_connect_cycle, family, lst, addr, exchange)
    finally:
        lst.close()


@pytest.mark.parametrize("exchange", [False, True], ids=["connect-close", "connect-64B-close"])
def test_connect_kernel_tier(benchmark, tmp_path, kernel_tier, exchange):
    """Same as tcp, with sockops pairing and sockhash insert/remove on every connection."""
    with kernel_tier.in_group():
        lst, addr = _listener(socket.AF_INET, tmp_path)
        try:
            benchmark(_connect_cycle, socket.AF_INET, lst, addr, exchange)
            tiers = _held_tiers(kernel_tier, lst, addr)
        finally:
            lst.close()
    assert measure.engaged("kernel", tiers), f"not bypassed: `shmbypass status` shows tiers {tiers}"
