"""What the interposer test peers share (tests/ipc_peer.py, ipc_many.py):
the address, the test hooks of the interposer's test build (the tier of a
socket, its rings, a settle), the RESULT they print, small socket helpers."""
import ctypes
import os
import select
import socket

FIONREAD = 0x541B
SIOCOUTQ = 0x5411
HOST = os.environ.get("IPC_HOST", "127.0.0.1")
FAMILY = socket.AF_INET6 if ":" in HOST else socket.AF_INET
RESULT = {}

try:
    _lib = ctypes.CDLL(None)
    _tier = _lib.shmbypass_fd_tier
    _tier.argtypes = [ctypes.c_int]
    _rings = _lib.shmbypass_fd_rings
    _rings.argtypes = [ctypes.c_int]
    _settle = _lib.shmbypass_fd_settle
    _settle.argtypes = [ctypes.c_int, ctypes.c_int]
except (OSError, AttributeError):
    _tier = _rings = _settle = None


def tier(sock):
    fd = sock if isinstance(sock, int) else sock.fileno()
    return _tier(fd) if _tier else 0


def rings(sock):
    """Which directions use rings now (bit 0 ours, bit 1 the peer's)."""
    return _rings(sock.fileno()) if _rings else 0


def settle(sock):
    """Wait (briefly) until the connection uses its rings, as it does after
    a first exchange: the bytes that follow test the rings."""
    if _settle:
        _settle(sock.fileno(), 1000)
    return sock


def out(**kw):
    RESULT.update(kw)




def wait_readable(s, timeout=10):
    r, _, _ = select.select([s], [], [], timeout)
    assert r, "timed out waiting for data"


def pattern(start, n):
    """Deterministic stream: byte i is i % 251."""
    return bytes((start + i) % 251 for i in range(n))


def fill_until_eagain(s):
    s.setblocking(False)
    total = 0
    chunk = b"x" * 65536
    while True:
        try:
            total += s.send(chunk)
        except BlockingIOError:
            break
    s.setblocking(True)
    return total
