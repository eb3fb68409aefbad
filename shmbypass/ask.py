"""The SOL_SHMBYPASS socket options from Python (bpf/ask.bpf.c; the
interposer's native/preload/ask.c makes the same calls): ask for the shm
tier on a socket, and read what BPF decided. For tests and tools; inside
the bypass group only (elsewhere the kernel says ENOPROTOOPT)."""
import socket

from shmbypass._native import ffi, lib


def ask(sock: socket.socket, inbox: bytes = b"\0" * 16) -> None:
    """Ask for the shm tier (before connect()/listen(), or on an accepted
    socket by the process that will use it); inbox: the asker's token."""
    a = ffi.new("struct sbp_ask *")
    a.version = lib.SBP_ASK_VERSION
    a.flags = lib.SBP_ASK_SHM
    ffi.memmove(a.inbox, inbox.ljust(16, b"\0")[:16], 16)
    sock.setsockopt(lib.SOL_SHMBYPASS, lib.SBP_SO_ASK, bytes(ffi.buffer(a)))


def info(sock: socket.socket):
    """BPF's answer: a struct sbp_info (tier, reason, role, cookies, both
    identities, the peer's inbox token, a VM pair's slots)."""
    raw = sock.getsockopt(lib.SOL_SHMBYPASS, lib.SBP_SO_INFO, ffi.sizeof("struct sbp_info"))
    out = ffi.new("struct sbp_info *")
    ffi.memmove(out, raw, len(raw))
    return out
