"""Issue 10 cases 4 and 5: a static program that inherits the socket, in a
pipeline (`busybox cat <&3 | ...`: busybox moves the bytes with sendfile()
into the pipe, a splice) must get exactly the bytes: 1 MiB, then EOF; the
sender sees no error."""
import os
import threading
import time

import runtime as rt
from scenarios.splice_out_peer_closed import server  # noqa: F401  (the same server: 1 MiB, close)
BUSYBOX = "/bin/busybox"
WAIT = 6


def client(cli):
    s = cli.conn()
    r, w = os.pipe()
    pid = os.fork()                 # fork + exec, as a shell does (not vfork: case 2)
    if pid == 0:
        os.dup2(s.fileno(), 0)
        os.dup2(w, 1)
        os.execv(BUSYBOX, ["busybox", "cat"])
    s.close()
    os.close(w)
    out = []
    reader = threading.Thread(target=lambda: out.append(read_all(r)), daemon=True)
    reader.start()
    rt.obs("busybox cat", wait(pid, WAIT))
    reader.join(5)
    rt.obs("bytes", rt.data(out[0]) if out else "hangs")   # the server's 1 MiB


def read_all(fd):
    buf = bytearray()
    while True:
        b = os.read(fd, 1 << 20)
        if not b:
            return bytes(buf)
        buf += b


def wait(pid, seconds):
    """The child's exit status, or "hangs" (then it is killed)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.02)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    return "hangs"
