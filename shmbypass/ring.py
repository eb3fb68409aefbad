"""The shared-memory ring (native/ring.c) from Python.

A :class:`Ring` is a process-local view of one ring living in a writable
buffer: an mmap of a region slot, a slice of one, or a cffi pointer. One side formats it (:meth:`Ring.create`), the other attaches with
the same generation (:meth:`Ring.attach`). Errors from the C side become the
named exceptions below; "would block" is :class:`RingFull` / :class:`RingEmpty`
(both ``BlockingIOError``), so non-blocking loops read naturally::

    w = Ring.create(slot, generation=7)         # writer side
    r = Ring.attach(slot, generation=7)         # reader side (another process)
    w.send_all(b"hello"); w.close_writer()
    r.recv_exact(5) == b"hello"; r.read() == b""  # EOF
"""
import errno
import os

from ._native import ffi, lib

__all__ = [
    "Ring", "RingError", "RingCorrupt", "RingReset", "RingClosed", "RingNotReady",
    "RingFull", "RingEmpty", "RingTimeout", "capacity_for",
    "WRITER_CLOSED", "READER_CLOSED", "RESET", "HDR_SIZE", "SPIN_DEFAULT_NS",
]

WRITER_CLOSED = lib.SBP_RING_WRITER_CLOSED
READER_CLOSED = lib.SBP_RING_READER_CLOSED
RESET = lib.SBP_RING_RESET
HDR_SIZE = lib.SBP_RING_HDR_SIZE
SPIN_DEFAULT_NS = lib.SBP_RING_SPIN_DEFAULT_NS
RESET_APP = lib.SBP_RESET_APP
RESET_PEER_DIED = lib.SBP_RESET_PEER_DIED
RESET_CORRUPT = lib.SBP_RESET_CORRUPT


class RingError(OSError):
    """Base of every ring error; ``errno`` is set."""


class RingCorrupt(RingError):
    """The shared header makes no sense (-EPROTO): reset the connection."""


class RingReset(RingError, ConnectionResetError):
    """The ring was reset (-ECONNRESET)."""


class RingClosed(RingError, BrokenPipeError):
    """Writing after the reader closed, or after our own close_writer (-EPIPE)."""


class RingNotReady(RingError):
    """attach: the slot is not (yet) formatted with this generation (-EAGAIN)."""


class RingFull(RingError, BlockingIOError):
    """write: no room (-EAGAIN)."""


class RingEmpty(RingError, BlockingIOError):
    """read: no data and no EOF (-EAGAIN)."""


class RingTimeout(RingError, TimeoutError):
    """A blocking helper ran out of time."""


_BY_ERRNO = {
    errno.EPROTO: RingCorrupt,
    errno.ECONNRESET: RingReset,
    errno.EPIPE: RingClosed,
}


def _raise(rc, would_block=RingError, what="ring"):
    e = -rc
    cls = would_block if e == errno.EAGAIN else _BY_ERRNO.get(e, RingError)
    raise cls(e, f"{what}: {os.strerror(e)}")


def capacity_for(slot_size):
    """Data capacity of a ring in a slot of ``slot_size`` bytes (0: too small)."""
    return lib.sbp_ring_capacity_for(slot_size)


def _iovec(bufs):
    """A struct iovec[] over cffi buffers (which the caller keeps alive)."""
    iov = ffi.new("struct iovec[]", max(1, len(bufs)))
    for i, b in enumerate(bufs):
        iov[i].iov_base = b
        iov[i].iov_len = len(b)
    return iov


def _ns(timeout):
    return -1 if timeout is None else max(0, int(timeout * 1e9))


class Ring:
    """Process-local view of one ring. Use :meth:`create` or :meth:`attach`."""

    def __init__(self, buf, size=None):
        if isinstance(buf, ffi.CData):
            if size is None:
                raise ValueError("a cffi pointer needs size=")
            self._keep = None
            self._ptr = ffi.cast("void *", buf)
        else:
            self._keep = ffi.from_buffer(buf, require_writable=True)
            self._ptr = ffi.cast("void *", self._keep)
            if size is None:
                size = len(self._keep)
            elif size > len(self._keep):
                raise ValueError(f"size {size} exceeds the buffer ({len(self._keep)})")
        self.size = size
        self._r = ffi.new("struct sbp_ring *")

    # -- life cycle -------------------------------------------------------
    @classmethod
    def create(cls, buf, generation, size=None):
        """Format the ring in ``buf`` (writer side) and attach to it."""
        self = cls(buf, size)
        rc = lib.sbp_ring_format(self._ptr, self.size, generation)
        if rc < 0:
            self.close()
            raise ValueError(f"cannot format a ring in {self.size} bytes: {os.strerror(-rc)}")
        self._attach(generation)
        return self

    @classmethod
    def attach(cls, buf, generation, size=None):
        """Attach to a ring formatted with ``generation``. Raises
        :class:`RingNotReady` if it is not (yet), :class:`RingCorrupt` if the
        header is garbage."""
        self = cls(buf, size)
        self._attach(generation)
        return self

    def _attach(self, generation):
        rc = lib.sbp_ring_attach(self._r, self._ptr, self.size, generation)
        if rc < 0:
            self.close()
            if rc == -errno.EINVAL:
                raise ValueError(f"a ring needs more than {self.size} bytes")
            _raise(rc, RingNotReady, "attach")
        self.generation = generation

    def close(self):
        """Drop this view (the shared ring is left as it is)."""
        if getattr(self, "_r", None) is not None:
            self._r.hdr = ffi.NULL
        keep, self._keep = getattr(self, "_keep", None), None
        if keep is not None:
            ffi.release(keep)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def closed(self):
        return self._r.hdr == ffi.NULL

    def _check(self):
        if self._r.hdr == ffi.NULL:
            raise ValueError("ring view is closed")

    # -- data ---------------------------------------------------------------
    def write(self, data):
        """Copy as much of ``data`` as fits; returns the count (may be short).
        Raises RingFull, RingClosed, RingReset, RingCorrupt."""
        self._check()
        src = ffi.from_buffer(data)
        rc = lib.sbp_ring_write(self._r, src, len(src))
        if rc < 0:
            _raise(rc, RingFull, "write")
        return rc

    def writev(self, buffers):
        self._check()
        bufs = [ffi.from_buffer(b) for b in buffers]
        rc = lib.sbp_ring_writev(self._r, _iovec(bufs), len(bufs))
        if rc < 0:
            _raise(rc, RingFull, "writev")
        return rc

    def readinto(self, buf, peek=False):
        """Read into ``buf``; returns the count, 0 at EOF. Raises RingEmpty,
        RingReset, RingCorrupt."""
        self._check()
        dst = ffi.from_buffer(buf, require_writable=True)
        rc = lib.sbp_ring_read(self._r, dst, len(dst), lib.SBP_PEEK if peek else 0)
        if rc < 0:
            _raise(rc, RingEmpty, "read")
        return rc

    def read(self, n=65536, peek=False):
        """Up to ``n`` bytes; ``b""`` at EOF."""
        buf = bytearray(n)
        got = self.readinto(buf, peek)
        del buf[got:]
        return bytes(buf)

    def readv(self, buffers, peek=False):
        self._check()
        bufs = [ffi.from_buffer(b, require_writable=True) for b in buffers]
        rc = lib.sbp_ring_readv(self._r, _iovec(bufs), len(bufs), lib.SBP_PEEK if peek else 0)
        if rc < 0:
            _raise(rc, RingEmpty, "readv")
        return rc

    # -- blocking helpers -------------------------------------------------
    def _wait(self, fn, timeout):
        self._check()
        rc = fn(self._r, _ns(timeout))
        while rc == -errno.EINTR:   # Python runs its signal handlers here
            rc = fn(self._r, _ns(timeout))
        if rc == 0:
            return True
        if rc in (-errno.ETIMEDOUT, -errno.EAGAIN):  # EAGAIN: doorbell mode, armed
            return False
        _raise(rc, RingError, "wait")

    def wait_readable(self, timeout=None, min=1):
        """Spin briefly, then sleep until min bytes (SO_RCVLOWAT), EOF, reset
        or corruption. True when ready, False on timeout (or, in doorbell
        mode, when armed)."""
        return self._wait(lambda r, t: lib.sbp_ring_wait_readable_min(r, min, t), timeout)

    def wait_writable(self, timeout=None):
        return self._wait(lib.sbp_ring_wait_writable, timeout)

    def send_all(self, data, timeout=None):
        """Write all of ``data``, waiting for room. ``timeout`` bounds each wait."""
        view = memoryview(data).cast("B")
        off = 0
        while off < len(view):
            try:
                off += self.write(view[off:])
            except RingFull:
                if not self.wait_writable(timeout):
                    raise RingTimeout(errno.ETIMEDOUT, f"send_all: {off}/{len(view)} bytes sent")
        return off

    def recv_exact(self, n, timeout=None):
        """Read exactly ``n`` bytes, waiting; fewer only at EOF."""
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            try:
                k = self.readinto(view[got:])
            except RingEmpty:
                if not self.wait_readable(timeout):
                    raise RingTimeout(errno.ETIMEDOUT, f"recv_exact: {got}/{n} bytes")
                continue
            if k == 0:
                break
            got += k
        del view
        del buf[got:]
        return bytes(buf)

    # -- state ----------------------------------------------------------------
    @property
    def capacity(self):
        return self._r.cap

    @property
    def readable(self):
        return lib.sbp_ring_readable(self._r) if not self.closed else 0

    @property
    def writable(self):
        return lib.sbp_ring_writable(self._r) if not self.closed else 0

    @property
    def flags(self):
        return lib.sbp_ring_flags(self._r) if not self.closed else 0

    @property
    def reset_reason(self):
        return lib.sbp_ring_reset_reason(self._r) if not self.closed else 0

    @property
    def corrupt(self):
        return bool(lib.sbp_ring_corrupt(self._r)) if not self.closed else False

    @property
    def peer_waiting(self):
        """The last write/read/close found the peer armed for a doorbell."""
        return bool(lib.sbp_ring_peer_waiting(self._r))

    def close_writer(self):
        """FIN: the reader drains, then reads b""."""
        self._check()
        lib.sbp_ring_close_writer(self._r)

    def close_reader(self):
        """The writer gets RingClosed (EPIPE)."""
        self._check()
        lib.sbp_ring_close_reader(self._r)

    def reset(self, reason=RESET_APP):
        """Both sides get RingReset (the reader after draining)."""
        self._check()
        lib.sbp_ring_reset(self._r, reason)

    def set_spin(self, spin_ns):
        """Upper bound of the adaptive spin before sleeping (0: never spin)."""
        lib.sbp_ring_set_spin(self._r, spin_ns)

    def doorbell_mode(self, on=True):
        return bool(lib.sbp_ring_doorbell_mode(self._r, 1 if on else 0))

    def arm_readable(self, min=1):
        """Arm for a doorbell; True if min bytes are there already (then not armed)."""
        return bool(lib.sbp_ring_arm_readable_min(self._r, min))

    def arm_writable(self):
        return bool(lib.sbp_ring_arm_writable(self._r))

    def disarm_readable(self):
        lib.sbp_ring_disarm_readable(self._r)

    def disarm_writable(self):
        lib.sbp_ring_disarm_writable(self._r)
