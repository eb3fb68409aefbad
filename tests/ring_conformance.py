"""Helpers for the ring conformance suite (tests/test_ring.py).

One suite, every region backend. A :class:`Backend` makes a region and, for
two-process tests, a peer: for ``anon`` a forked child (the only way to share
an anonymous mapping), for ``posix`` a fresh interpreter running this file,
which opens the region by name like any other process would.

Peers talk back through lines on a pipe: ``ready`` when they are about to
block, then one JSON line with the result.
"""
import glob
import hashlib
import itertools
import json
import os
import re
import select
import signal
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from shmbypass import region as regions  # noqa: E402
from shmbypass.region import remove  # noqa: E402
from shmbypass.ring import RingEmpty, RingFull  # noqa: E402

SMALL_SLOT = 4096 + 65536        # 64 KiB rings: many wrap-arounds
_counter = itertools.count()


def sweep_leftovers():
    """Remove the shm segments a killed run of this suite left."""
    found = set()
    for p in glob.glob("/dev/shm/sbt-ring-*"):
        m = re.match(r"(sbt-ring-(\d+)-\d+)", os.path.basename(p))
        if m and (not os.path.exists(f"/proc/{m.group(2)}") or int(m.group(2)) == os.getpid()):
            found.add(m.group(1))
    for name in found:
        remove(name)


class Backend:
    """A region of one backend for one test, and its peers."""

    def __init__(self, kind, slot_count=4, slot_size=SMALL_SLOT):
        self.kind = kind
        self.instance = f"sbt-ring-{os.getpid()}-{next(_counter)}"
        self.region = regions.format(kind, instance=self.instance, slot_count=slot_count,
                                     slot_size=slot_size)
        self.peers = []

    def open_again(self):
        """A second, independent mapping of the same region (None for anon)."""
        if self.kind != "posix":
            return None
        return regions.open("posix", instance=self.instance)

    def spawn(self, role, fork=False, **kw):
        """A peer running role; fork=True forks even for named backends
        (the child uses the inherited Region object)."""
        p = Peer(self, role, kw, fork or self.kind == "anon")
        self.peers.append(p)
        return p

    def cleanup(self):
        for p in self.peers:
            p.kill()
        self.region.destroy()
        remove(self.instance)

    def leftovers(self):
        return [f for f in (f"/dev/shm/{self.instance}-region",) if os.path.exists(f)]


class Peer:
    def __init__(self, backend, role, kw, fork):
        self._buf = b""
        if fork:
            rfd, wfd = os.pipe()
            pid = os.fork()
            if pid == 0:  # child: never returns into pytest
                code = 1
                try:
                    os.close(rfd)
                    out = os.fdopen(wfd, "w", buffering=1)
                    _run_role(backend.region, role, kw, out)
                    code = 0
                finally:
                    os._exit(code)
            os.close(wfd)
            self.pid, self._fd, self._proc = pid, rfd, None
        else:
            spec = dict(kind=backend.kind, instance=backend.instance, role=role, kw=kw)
            self._proc = subprocess.Popen([sys.executable, __file__, json.dumps(spec)],
                                          stdout=subprocess.PIPE)
            self.pid, self._fd = self._proc.pid, self._proc.stdout.fileno()

    def line(self, timeout=60):
        """Next line the peer wrote (str), or raise if it died or timed out."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._fd], [], [], left)[0]:
                raise TimeoutError(f"peer {self.pid}: no answer in {timeout}s")
            chunk = os.read(self._fd, 65536)
            if not chunk:
                raise RuntimeError(f"peer {self.pid} exited without an answer (status {self.wait()})")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line.decode()

    def result(self, timeout=60):
        res = json.loads(self.line(timeout))
        assert self.wait(timeout) == 0
        return res

    def wait(self, timeout=60):
        if self._proc is not None:
            return self._proc.wait(timeout)
        deadline = time.monotonic() + timeout
        while True:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.pid = None
                return os.waitstatus_to_exitcode(status)
            if time.monotonic() > deadline:
                raise TimeoutError(f"peer {self.pid} did not exit")
            time.sleep(0.01)

    def cpu_seconds(self):
        """utime + stime of the peer so far (from /proc)."""
        with open(f"/proc/{self.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def state(self):
        with open(f"/proc/{self.pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]

    def kill(self):
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.kill()
                self._proc.wait()
            self._proc.stdout.close()
        else:
            if self.pid:
                try:
                    os.kill(self.pid, signal.SIGKILL)
                    os.waitpid(self.pid, 0)
                except (ProcessLookupError, ChildProcessError):
                    pass
                self.pid = None
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


# -- what peers do -------------------------------------------------------------

def pattern_chunks(total, seed=1):
    """Deterministic pseudo-random stream in chunks of varying size."""
    block = hashlib.shake_256(str(seed).encode()).digest(1 << 20)
    block = block + block
    off, i = 0, 0
    while off < total:
        n = min(total - off, 1 + (i * 7919 + seed * 104729) % 200000)
        start = (i * 65537) % (1 << 20)
        yield memoryview(block)[start:start + n]
        off += n
        i += 1


def role_consume(ring, out):
    """Read to EOF; report the sha256 and the byte count."""
    h, n = hashlib.sha256(), 0
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    while True:
        try:
            k = ring.readinto(buf)
        except RingEmpty:
            ring.wait_readable()
            continue
        if k == 0:
            break
        h.update(view[:k])
        n += k
    return {"sha256": h.hexdigest(), "bytes": n}


def role_produce(ring, out, total, seed):
    h = hashlib.sha256()
    for chunk in pattern_chunks(total, seed):
        ring.send_all(chunk)
        h.update(chunk)
    ring.close_writer()
    return {"sha256": h.hexdigest(), "bytes": total}


def role_wait_read(ring, out):
    """Block in wait_readable (after saying so), then read what came."""
    print("ready", file=out, flush=True)
    ok = ring.wait_readable(timeout=60)
    return {"woke": ok, "data": ring.read().hex(), "futex_broken": ring._r.futex_broken}


def role_wait_write(ring, out):
    """Fill the ring, then block in wait_writable, then write a marker."""
    filled = 0
    while True:
        try:
            filled += ring.write(b"\xab" * 65536)
        except RingFull:
            break
    print("ready", file=out, flush=True)
    ok = ring.wait_writable(timeout=60)
    n = ring.write(b"MARK")
    return {"woke": ok, "filled": filled, "wrote": n, "futex_broken": ring._r.futex_broken}


ROLES = {"consume": role_consume, "produce": role_produce,
         "wait_read": role_wait_read, "wait_write": role_wait_write}


def _run_role(region, role, kw, out):
    kw = dict(kw)
    ring = region.ring(kw.pop("slot"), kw.pop("generation"))
    if "spin_ns" in kw:
        ring.set_spin(kw.pop("spin_ns"))
    res = ROLES[role](ring, out, **kw)
    print(json.dumps(res), file=out, flush=True)


def _main(spec):
    region = regions.open(spec["kind"], instance=spec["instance"])
    try:
        _run_role(region, spec["role"], spec["kw"], sys.stdout)
    finally:
        region.close()


if __name__ == "__main__":
    _main(json.loads(sys.argv[1]))
