"""`vm status` and `vm format` on the host: what a region file (or, in a
guest, the ivshmem BAR) holds, read-only through shmbypass.region.view, with
liveness: a channel whose writer's or reader's guest no longer maps the
region is dead."""
import mmap
import os

from shmbypass.region.ivshmem import format_ivshmem_file, open_ivshmem_bar
from shmbypass.region.view import LIVE_STATES, inspect_region


def region_mappers(path):
    """Who maps the region file now: {guest name: pid} of the QEMU processes
    whose mappings include it (the guest is the last '-' field of QEMU's
    -name, as VMPair names them), plus {"?<pid>": pid} for other mappers.
    Reads /proc only."""
    try:
        st = os.stat(path)
    except OSError:
        return {}
    base = os.path.basename(path)
    found = {}
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == os.getpid():
            continue
        try:
            hit = False
            with open(f"/proc/{d}/maps") as f:
                for line in f:  # addr perms offset dev inode path
                    fields = line.split(None, 5)
                    if (len(fields) == 6 and fields[4] == str(st.st_ino)
                            and os.path.basename(fields[5].rstrip("\n").removesuffix(" (deleted)")) == base):
                        hit = True
                        break
            if not hit:
                continue
            with open(f"/proc/{d}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            continue
        name = None
        if b"-name" in args[:-1]:
            name = args[args.index(b"-name") + 1].decode(errors="replace").rsplit("-", 1)[-1]
        found[name if name else f"?{d}"] = int(d)
    return found


def apply_liveness(rep, mappers):
    """Mark channels whose writer or reader guest is not mapping the region
    any more as dead. Without any mapper (the pair is gone, or this is a
    copy of a region) liveness is unknown and nothing changes."""
    rep["mapped_by"] = {k: v for k, v in sorted(mappers.items())}
    if not mappers:
        for p in rep["parts"]:
            p["alive"] = None
        return rep
    for p in rep["parts"]:
        p["alive"] = p["guest"] in mappers if p["guest"] else None
    for c in rep["channels"]:
        gone = [g for g in (c["writer"], c["reader"]) if g and g not in mappers]
        if gone and c["state"] not in ("closed", "corrupt"):
            c["ring_state"] = c["state"]
            c["state"] = "dead"
            c["dead"] = gone
    return rep


def format_region_file(path, guests=("A", "B"), region_id=None):
    """Host side: format an ivshmem region file (sized already, guests not
    running yet) with one part per guest. Returns region_status(path)."""
    format_ivshmem_file(path, guests=guests, region_id=region_id)
    rep = region_status(path, liveness=False)
    rep["region_id"] = int(rep["header"]["region_id"], 16)
    return rep


def region_status(path, liveness=True):
    """inspect_region() of a region file, mapped read-only (never written),
    with liveness: which guests still map it, channels of a gone guest dead."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return {"state": "garbage", "problem": "empty file", "size": 0, "header": None,
                    "parts": [], "channels": [], "path": path}
        m = mmap.mmap(f.fileno(), size, mmap.MAP_SHARED, mmap.PROT_READ)
    try:
        rep = inspect_region(m)
    finally:
        m.close()
    rep["path"] = path
    if liveness:
        apply_liveness(rep, region_mappers(path))
    return rep


def bar_status():
    """inspect_region() of this guest's ivshmem BAR2, mapped read-only."""
    m, size, dev = open_ivshmem_bar(writable=False)
    try:
        rep = inspect_region(m)
    finally:
        m.close()
    rep["path"] = os.path.join(dev, "resource2")
    return rep


def render_status(rep):
    lines = [f"region {rep['path']}: {rep['size']} bytes, {rep['state']}"
             + (f": {rep['problem']}" if rep["problem"] else "")]
    h = rep["header"]
    if h:
        lines.append(f"  version {h['version']}  id {h['region_id']}  backend {h['backend']}  "
                     f"{h['slot_count']} slots x {h['slot_size']} B  region_size {h['region_size']}  "
                     f"owner uid {h['owner_uid']}")
    for p in rep["parts"]:
        alive = {True: ", mapped", False: ", GONE", None: ""}[p.get("alive")]
        who = f"guest {p['guest']}" if p.get("guest") else f"owner {p['owner']}"
        lines.append(f"  part {p['part']}: slots {p['first_slot']}..{p['first_slot'] + p['slot_count'] - 1}"
                     f"  {who}{alive}")
    if rep["state"] == "ok":
        live = sum(c["state"] in LIVE_STATES for c in rep["channels"])
        dead = sum(c["state"] == "dead" for c in rep["channels"])
        lines.append(f"  {live} live channel(s)" + (f", {dead} dead" if dead else "")
                     + f", {len(rep['channels'])} ring(s) formatted")
        if rep["channels"]:
            lines.append(f"  {'slot':>5} {'part':>4} {'dir':>4} {'generation':>10} {'head':>14} "
                         f"{'tail':>14} {'queued':>10}  {'state':<13} flags")
            for c in rep["channels"]:
                q = "?" if c["queued"] is None else c["queued"]
                part = "-" if c["part"] is None else c["part"]
                d = f"{c['writer'] or '?'}>{c['reader'] or '?'}" if c.get("writer") else "-"
                lines.append(f"  {c['slot']:>5} {part:>4} {d:>4} {c['generation']:>#10x} {c['head']:>14} "
                             f"{c['tail']:>14} {q:>10}  {c['state']:<13} {','.join(c['flags']) or '-'}")
    return "\n".join(lines)
