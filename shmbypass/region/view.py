"""A read-only look at a region image (a file, a BAR, any buffer): its
header, parts and the rings in its slots, for `vm status` and debugging.

It never writes. The layouts are the C headers' (struct sbp_region_hdr,
struct sbp_ring_hdr through cffi) and the verdict on the header is
sbp_region_check()'s, the check the runtime trusts; this module only turns
what they say into a report."""
import errno

from shmbypass._native import ffi, lib
from shmbypass.region.core import BACKEND_NAMES, HDR_SIZE, check_header
from shmbypass.region.ivshmem import tag_guest

MAGIC = ffi.string(lib.SBP_REGION_MAGIC)
RING_FLAGS = {lib.SBP_RING_WRITER_CLOSED: "writer-closed", lib.SBP_RING_READER_CLOSED: "reader-closed",
              lib.SBP_RING_RESET: "reset"}

# States of a channel (the ring's flags; `vm status` adds "dead" from who is alive):
#   live           both directions open
#   fin            the writer closed (FIN); the reader may still drain it
#   reader-closed  the reader is gone; the writer gets EPIPE
#   closed         both ends closed: history until the slot is reused
#   reset          reset (RST, a peer that died and was noticed, corruption)
#   corrupt        head/tail/capacity make no sense
LIVE_STATES = ("live", "fin", "reader-closed")


def _header(h):
    return {"magic": ffi.unpack(h.magic, 8).decode(errors="replace"), "version": h.version,
            "hdr_size": h.hdr_size, "slot_count": h.slot_count, "slot_size": h.slot_size,
            "region_size": h.region_size, "region_id": f"{h.region_id:016x}",
            "backend": BACKEND_NAMES.get(h.backend, str(h.backend)),
            "flags": h.flags, "owner_uid": h.owner_uid, "nparts": h.nparts}


def _ring_state(flags, head, tail, capacity, cap):
    if tail > head or head - tail > cap or capacity != cap:
        return "corrupt"
    if flags & lib.SBP_RING_RESET:
        return "reset"
    closed = lib.SBP_RING_WRITER_CLOSED | lib.SBP_RING_READER_CLOSED
    if flags & closed == closed:
        return "closed"
    if flags & lib.SBP_RING_WRITER_CLOSED:
        return "fin"
    if flags & lib.SBP_RING_READER_CLOSED:
        return "reader-closed"
    return "live"


def _channels(base, info, parts):
    """One entry per slot whose ring magic is set."""
    out = []
    for s in range(info.slot_count):
        r = ffi.cast("struct sbp_ring_hdr *", lib.sbp_region_slot(info, base, s))
        if r.magic != lib.SBP_RING_MAGIC:
            continue
        head, tail, flags = r.head, r.tail, r.flags
        part = next((p["part"] for p in parts
                     if p["first_slot"] <= s < p["first_slot"] + p["slot_count"]), None)
        # A slot is written by its part's owner and, in a pair, read by the other guest.
        writer = parts[part]["guest"] if part is not None else None
        others = [p["guest"] for p in parts if p["part"] != part]
        reader = others[0] if part is not None and len(others) == 1 else None
        out.append({
            "slot": s, "part": part, "writer": writer, "reader": reader,
            "generation": r.generation, "capacity": info.ring_capacity, "head": head, "tail": tail,
            "queued": (head - tail) if head >= tail else None,
            "flags": [n for bit, n in RING_FLAGS.items() if flags & bit],
            "reset_reason": r.reset_reason, "writer_waiting": r.writer_waiting,
            "reader_waiting": r.reader_waiting,
            "state": _ring_state(flags, head, tail, r.capacity, info.ring_capacity)})
    return out


def inspect_region(buf):
    """Report on a region image (bytes-like, only read). Returns a dict:
    {"state": "ok"|"empty"|"garbage"|"version-mismatch", "problem": str|None,
     "size": int, "header": {...}, "parts": [...], "channels": [...]}"""
    rep = {"state": "ok", "problem": None, "size": len(buf), "header": None, "parts": [], "channels": []}
    if len(buf) < max(HDR_SIZE, ffi.sizeof("struct sbp_region_hdr")):
        return dict(rep, state="garbage", problem=f"too short for a region header ({len(buf)} bytes)")
    base = ffi.from_buffer(buf)
    try:
        return _inspect(rep, base, len(buf))
    finally:
        ffi.release(base)  # the caller may close its mapping now


def _inspect(rep, base, size):
    h = ffi.cast("struct sbp_region_hdr *", base)
    magic = ffi.unpack(h.magic, 8)
    if magic != MAGIC:
        if not any(ffi.buffer(base, HDR_SIZE)[:]):
            return dict(rep, state="empty", problem="not formatted (header page is all zeros)")
        return dict(rep, state="garbage", problem=f"bad magic {magic!r} (want {MAGIC!r})")
    rep["header"] = _header(h)
    rc, info = check_header(base, size)
    if rc == -errno.EPROTONOSUPPORT:
        return dict(rep, state="version-mismatch",
                    problem=f"version {h.version}, this build reads {lib.SBP_REGION_VERSION}")
    if rc < 0:
        return dict(rep, state="garbage",
                    problem=f"the region check refuses its geometry: {h.slot_count} slots of "
                            f"{h.slot_size} B, header {h.hdr_size} B, region_size {h.region_size}, "
                            f"{h.nparts} parts, in a mapping of {size} bytes")
    rep["parts"] = [{"part": i, "first_slot": p.first_slot, "slot_count": p.slot_count,
                     "owner": f"{p.owner:#x}", "guest": tag_guest(p.owner)}
                    for i, p in enumerate(info.parts[0:info.nparts])]
    rep["channels"] = _channels(base, info, rep["parts"])
    return rep
