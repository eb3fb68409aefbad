"""Pair regions (native/pairmem.h) as `status` sees them: the byte counts
and fill of one-host shm-tier connections, read from the rings themselves.

The rings live in memfds that only the two processes of a pair map; root
reaches them through /proc/<pid>/map_files (CAP_SYS_ADMIN), read-only.
Every word read is untrusted (either process can write anything there):
only for display, clamped, and a block is believed only when its
generation matches the rings'.
"""
import fcntl
import mmap
import os

from shmbypass._native import ffi, lib

MEMFD_NAME = "/memfd:shmbypass"


def _mapped_regions(pid: int):
    """(path under map_files, size) of each pair region mapped by pid, once
    per memfd (a region is one mapping: the size it says it has)."""
    seen = set()
    try:
        with open(f"/proc/{pid}/maps") as f:
            lines = f.readlines()
    except OSError:
        return
    for line in lines:
        parts = line.split(None, 5)
        if len(parts) < 6 or not parts[5].startswith(MEMFD_NAME):
            continue
        inode = parts[4]
        if inode in seen:
            continue
        seen.add(inode)
        lo, hi = (int(x, 16) for x in parts[0].split("-"))
        yield f"/proc/{pid}/map_files/{parts[0]}", hi - lo


def _ring_view(pi, base, block: int, direction: int, gen: int):
    """(written, read, queued, capacity) of one direction, None if no ring
    of it exists yet. A stream moves between areas (native/stream.h) at
    continuous positions, and its reader drains an area before it follows
    the link to the next: what was written is the furthest head, what was
    read the tail of the oldest area not drained yet (every area drained:
    all of it). capacity is that of the area written now."""
    want = lib.sbp_stream_gen(gen, direction)
    rings = []
    for area in range(lib.SBP_AREAS):
        p = lib.sbp_pair_area(pi, base, block, direction, area)
        if p == ffi.NULL:
            continue
        hdr = ffi.cast("struct sbp_ring_hdr *", p)
        if hdr.generation != want:
            continue
        cap = lib.sbp_ring_capacity_for(lib.sbp_pair_area_slot_size(area))
        tail, head = hdr.tail, hdr.head  # tail first: head is never behind it
        rings.append((head, tail, cap))
    if not rings:
        return None
    head, _, cap = max(rings)
    pending = [t for h, t, _ in rings if h != t]
    read = min(min(pending), head) if pending else head
    # Shared memory either process may scribble on: clamped to what the
    # areas can hold, never negative.
    return head, read, max(0, min(head - read, sum(c for _, _, c in rings))), cap


def _blocks(path: str, size: int, out: dict, owners: dict, mappers: set) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        # Sealed against shrinking and at least this large, or a truncate
        # under our reads would be a SIGBUS (anyone can name a memfd so).
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        if not seals & fcntl.F_SEAL_SHRINK or os.fstat(fd).st_size < size:
            return
        m = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
    except (OSError, ValueError):
        return
    finally:
        os.close(fd)
    base = ffi.from_buffer(m)
    try:
        pi = ffi.new("struct sbp_pair_info *")
        if lib.sbp_pair_check(base, size, pi) != 0:
            return  # (a header either process scribbled on: nothing to show)
        for b in range(pi.block_count):
            h = lib.sbp_pair_block(pi, base, b)
            if h == ffi.NULL:
                continue
            state = h.state
            if state & 0xffffffff != lib.SBP_BLOCK_ATTACHED:
                continue
            # A block names the connection it carries, and either process
            # can write any name there: it is believed only for a
            # connection between processes that map this region (the pid
            # that asked for each socket, as BPF recorded it).
            if not {owners.get(h.active_cookie), owners.get(h.passive_cookie)} <= mappers:
                continue
            gen = state >> 32
            a2p = _ring_view(pi, base, b, lib.SBP_DIR_A2P, gen)
            p2a = _ring_view(pi, base, b, lib.SBP_DIR_P2A, gen)
            for cookie, tx, rx, d in ((h.active_cookie, a2p, p2a, lib.SBP_DIR_A2P),
                                      (h.passive_cookie, p2a, a2p, lib.SBP_DIR_P2A)):
                # A direction with no ring yet went over TCP so far: what
                # its reader has read of it (the reader publishes that).
                out[cookie] = {
                    "bytes_tx": tx[0] if tx else int(h.tcp_read[d]),
                    "bytes_rx": rx[1] if rx else int(h.tcp_read[d ^ 1]),
                    "tx_queued": tx[2] if tx else None,
                    "rx_queued": rx[2] if rx else None,
                    "ring_size": tx[3] if tx else None,
                    # what this end's writer counted (untrusted: display only)
                    "ring_full": int(h.full[d]),
                    "doorbells": int(h.bells[d]),
                }
    finally:
        ffi.release(base)  # before the close: a view still exported makes it fail
        m.close()


def ring_counts(pids, owners: dict[int, int]) -> dict[int, dict]:
    """cookie -> bytes_tx, bytes_rx, tx_queued, rx_queued, ring_size,
    ring_full, doorbells of the attached blocks in the pair regions these
    processes map, for connections whose two sockets belong to (owners:
    cookie -> pid) processes that map the block's region. Byte counts are
    stream offsets: they include what went over TCP before the ring;
    ring_full is how often this end's writer found its ring full,
    doorbells how many it sent."""
    regions: dict[int, tuple[str, int, set]] = {}  # inode -> (path, size, pids mapping it)
    for pid in pids:
        for path, size in _mapped_regions(pid):
            try:
                key = os.stat(path).st_ino
            except OSError:
                continue
            regions.setdefault(key, (path, size, set()))[2].add(pid)
    out: dict[int, dict] = {}
    for path, size, mappers in regions.values():
        _blocks(path, size, out, owners, mappers)
    return out
