"""Connection set-up: connect + accept + close, and connect + one 64 B
exchange + close, over loopback TCP, a Unix socket, and loopback TCP inside
the kernel tier (this process moved into a private instance's cgroup)."""
import socket

import pytest

from shmbypass.manager import InGroup


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


def _bench(benchmark, family, tmp_path, exchange):
    lst, addr = _listener(family, tmp_path)
    try:
        benchmark(_connect_cycle, family, lst, addr, exchange)
    finally:
        lst.close()


@pytest.mark.parametrize("exchange", [False, True], ids=["connect-close", "connect-64B-close"])
@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_UNIX], ids=["tcp", "unix"])
def test_connect(benchmark, tmp_path, family, exchange):
    _bench(benchmark, family, tmp_path, exchange)


@pytest.mark.parametrize("exchange", [False, True], ids=["connect-close", "connect-64B-close"])
def test_connect_kernel_tier(benchmark, tmp_path, kernel_instance, exchange):
    """Same as tcp, with sockops pairing and sockhash insert/remove on every connection."""
    with InGroup(kernel_instance):
        _bench(benchmark, socket.AF_INET, tmp_path, exchange)
    from shmbypass import status
    assert status.counters(kernel_instance).get("paired", 0) > 0, "no connection was bypassed"
