"""The inbox (native/inbox.c): a message and a memfd reach the process
whose token names the inbox, with the sender's pid as the kernel states it;
whatever else arrives (any process may write to an inbox) is dropped."""
import os
import socket
import struct
import subprocess
import sys

import pytest

from shmbypass._native import ffi, lib


@pytest.fixture
def inbox_dir(tmp_path):
    d = tmp_path / "inbox"
    d.mkdir()
    os.chmod(d, 0o1733)
    return str(d)


def open_inbox(d):
    ib = ffi.new("struct sbp_inbox *")
    assert lib.sbp_inbox_open(ib, d.encode()) == 0
    return ib


def message(**kw):
    m = ffi.new("struct sbp_inbox_msg *")
    m.magic = lib.SBP_INBOX_MSG_MAGIC
    m.version = lib.SBP_INBOX_MSG_VERSION
    for k, v in kw.items():
        setattr(m, k, v)
    return m


def test_message_and_memfd_arrive_with_the_senders_pid(inbox_dir):
    a, b = open_inbox(inbox_dir), open_inbox(inbox_dir)
    try:
        fd = os.memfd_create("t")
        os.ftruncate(fd, 8192)
        os.pwrite(fd, b"shared", 0)
        assert lib.sbp_inbox_send(a, inbox_dir.encode(), b.token,
                                  message(active_cookie=7, passive_cookie=8, block=3, gen=9), fd) == 0
        os.close(fd)
        rx = ffi.new("struct sbp_inbox_rx *")
        assert lib.sbp_inbox_recv(b, rx) == 1
        assert (rx.msg.active_cookie, rx.msg.passive_cookie, rx.msg.block, rx.msg.gen) == (7, 8, 3, 9)
        assert rx.pid == os.getpid() and rx.uid == os.getuid()
        assert rx.fd >= 0 and os.pread(rx.fd, 6, 0) == b"shared"
        os.close(rx.fd)
        assert lib.sbp_inbox_recv(b, rx) == 0           # nothing more
    finally:
        lib.sbp_inbox_close(a)
        lib.sbp_inbox_close(b)
    assert os.listdir(inbox_dir) == []                  # closing unlinks


def test_garbage_is_dropped_and_its_fds_closed(inbox_dir):
    b = open_inbox(inbox_dir)
    path = ffi.string(b.path).decode()
    try:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        r, w = os.pipe()
        fds = struct.pack("ii", r, w)
        s.sendmsg([b"short"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)], 0, path)
        good = bytes(ffi.buffer(message(block=1)))
        bad_magic = b"\0" * len(good)
        s.sendto(bad_magic, path)
        s.sendmsg([good], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)], 0, path)
        os.close(r)
        os.close(w)
        before = set(os.listdir("/proc/self/fd"))
        rx = ffi.new("struct sbp_inbox_rx *")
        assert lib.sbp_inbox_recv(b, rx) == 1 and rx.msg.block == 1
        # the good message's first fd is handed over, the second closed
        assert rx.fd >= 0
        os.close(rx.fd)
        assert lib.sbp_inbox_recv(b, rx) == 0
        assert set(os.listdir("/proc/self/fd")) - before <= {str(rx.fd)}
        s.close()
    finally:
        lib.sbp_inbox_close(b)


def test_no_such_inbox(inbox_dir):
    a = open_inbox(inbox_dir)
    try:
        rc = lib.sbp_inbox_send(a, inbox_dir.encode(), b"\x01" * 16, message(), -1)
        assert rc in (-2, -111)                     # ENOENT / ECONNREFUSED
    finally:
        lib.sbp_inbox_close(a)


def test_pid_is_the_kernels_word(inbox_dir):
    """A child sends: the receiver sees the child's pid, not ours."""
    b = open_inbox(inbox_dir)
    try:
        token = bytes(ffi.buffer(b.token))
        code = (f"from shmbypass._native import ffi, lib\n"
                f"a = ffi.new('struct sbp_inbox *'); assert lib.sbp_inbox_open(a, {inbox_dir!r}.encode()) == 0\n"
                f"m = ffi.new('struct sbp_inbox_msg *'); m.magic = lib.SBP_INBOX_MSG_MAGIC; "
                f"m.version = lib.SBP_INBOX_MSG_VERSION\n"
                f"import os; print(os.getpid()); assert lib.sbp_inbox_send(a, {inbox_dir!r}.encode(), "
                f"{token!r}, m, -1) == 0\nlib.sbp_inbox_close(a)\n")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        rx = ffi.new("struct sbp_inbox_rx *")
        assert lib.sbp_inbox_recv(b, rx) == 1
        assert rx.pid == int(out.stdout) != os.getpid()
    finally:
        lib.sbp_inbox_close(b)
