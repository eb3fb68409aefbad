"""A hostile program for tests/test_isolation.py: it runs under `shmbypass
run` as a non-root user, holds a shm-tier connection of its own, and tries
to reach the memory of connections that are not its own; then it writes
garbage to everything it can. Stdlib only (it runs as another user, with
the system's python3).

    python3 hostile.py CONFIG_JSON

CONFIG_JSON: {"port": a server to connect to, "instance": name,
"victims": {pid: [[address, length], ...]} (where each victim maps its pair
regions, as root read it from /proc/PID/maps), "inboxes": [paths],
"magic": SBP_INBOX_MSG_MAGIC, "sol": SOL_SHMBYPASS, optionally "forge":
[active cookie, passive cookie] of another pair's connection}.

It prints "CONNECTED <tier> <rings>" once its own connection uses its rings,
then "PROBED <json>": {"tries": [[what, path, outcome], ...] where outcome is
"ok", "ok:<n> bytes", or an errno name, "maps": [[dev, inode], ...] of every
mapping and fd it holds afterwards}. On a line on its stdin it writes the
garbage and prints "GARBAGE <json>" (what it wrote, what the kernel said).
"""
import ctypes
import errno
import json
import mmap
import os
import random
import socket
import struct
import subprocess
import sys

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
SYS_BPF, SYS_SETSOCKOPT, SYS_PROCESS_VM_READV = 321, 54, 310     # x86_64
BPF_OBJ_GET, BPF_F_RDONLY = 7, 1 << 3
MEMFD = "/memfd:shmbypass"
TRIES = []
HEADERS = {}        # address of each own region -> its header page as it was


def outcome(fn):
    try:
        r = fn()
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))
    return "ok" if r is None else f"ok:{r}"


def attempt(what, path, fn):
    TRIES.append([what, path, outcome(fn)])


def _check(rc):
    if rc < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return rc


def obj_get(path, flags):
    """bpf(BPF_OBJ_GET): the way to open a pin (open(2) is not)."""
    p = ctypes.create_string_buffer(path.encode())
    attr = struct.pack("=QII", ctypes.addressof(p), 0, flags) + bytes(120 - 16)
    buf = ctypes.create_string_buffer(attr, len(attr))
    fd = _check(libc.syscall(SYS_BPF, BPF_OBJ_GET, buf, len(attr)))
    os.close(fd)


class IOVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


def vm_read(pid, addr, n):
    buf = ctypes.create_string_buffer(n)
    local, remote = IOVec(ctypes.addressof(buf), n), IOVec(addr, n)
    return _check(libc.syscall(SYS_PROCESS_VM_READV, pid, ctypes.byref(local), 1,
                               ctypes.byref(remote), 1, 0))


def read_file(path, n=4096, offset=0):
    fd = os.open(path, os.O_RDONLY)
    try:
        return len(os.pread(fd, n, offset))
    finally:
        os.close(fd)


def open_rw(path):
    os.close(os.open(path, os.O_RDWR))


def map_file(path):
    """Map what it can open, read-write if it can, and read a page."""
    for flags, prot in ((os.O_RDWR, mmap.PROT_READ | mmap.PROT_WRITE), (os.O_RDONLY, mmap.PROT_READ)):
        try:
            fd = os.open(path, flags)
        except OSError:
            continue
        try:
            size = os.fstat(fd).st_size
            if not size:
                return 0
            m = mmap.mmap(fd, min(size, 4096), mmap.MAP_SHARED, prot)
            n = len(m[:4096])
            m.close()
            return n
        finally:
            os.close(fd)
    raise PermissionError(errno.EACCES, "cannot open")


def listing(path):
    return len(os.listdir(path))


def probe_process(pid, regions):
    proc = f"/proc/{pid}"
    attempt("read maps", f"{proc}/maps", lambda: read_file(f"{proc}/maps"))
    attempt("list fds", f"{proc}/fd", lambda: listing(f"{proc}/fd"))
    try:
        fds = os.listdir(f"{proc}/fd")
    except OSError:
        fds = []
    for fd in fds:     # (same uid only) whatever it holds: a memfd would be a way in
        path = f"{proc}/fd/{fd}"
        try:
            target = os.readlink(path)
        except OSError:
            continue
        if target.startswith(MEMFD):
            attempt("open memfd fd", path, lambda: map_file(path))
    attempt("list map_files", f"{proc}/map_files", lambda: listing(f"{proc}/map_files"))
    for addr, length in regions:
        name = f"{proc}/map_files/{addr:x}-{addr + length:x}"
        attempt("open map_files", name, lambda: map_file(name))
        attempt("read mem", f"{proc}/mem@{addr:x}", lambda: read_file(f"{proc}/mem", 4096, addr))
        attempt("process_vm_readv", f"{pid}@{addr:x}", lambda: vm_read(int(pid), addr, 4096))


def probe_pins(instance):
    d = f"/sys/fs/bpf/{instance}"
    attempt("list pins", d, lambda: listing(d))
    try:
        names = os.listdir(d)
    except OSError:
        names = []
    for n in names:
        path = os.path.join(d, n)
        attempt("open pin", path, lambda: read_file(path))
        attempt("open pin rw", path, lambda: open_rw(path))
        attempt("bpf obj_get", path, lambda: obj_get(path, 0))
        attempt("bpf obj_get rdonly", path, lambda: obj_get(path, BPF_F_RDONLY))


def probe_run_dir(instance, inboxes):
    top = f"/run/{instance}"
    attempt("list run dir", top, lambda: listing(top))
    for sub in ("inbox", "capture.d"):
        attempt("list", f"{top}/{sub}", lambda: listing(f"{top}/{sub}"))
    for d, dirs, files in os.walk(top):
        for n in files:
            path = os.path.join(d, n)
            if os.path.islink(path):
                continue
            mode = os.lstat(path).st_mode
            if (mode & 0o170000) == 0o140000:       # a socket
                attempt("connect", path, lambda: connect_unix(path))
                continue
            attempt("open rw", path, lambda: open_rw(path))
            attempt("map", path, lambda: map_file(path))
            if n.endswith(".so"):
                attempt("dlopen", path, lambda: dlopen(path))
    for path in inboxes:
        attempt("connect inbox", path, lambda: connect_unix(path, socket.SOCK_DGRAM))
        attempt("open inbox", path, lambda: read_file(path))


def connect_unix(path, kind=socket.SOCK_STREAM):
    s = socket.socket(socket.AF_UNIX, kind)
    s.settimeout(2)
    try:
        s.connect(path)
        if kind == socket.SOCK_STREAM:
            s.sendall(b"\x00garbage\xff" * 8)
            return len(s.recv(200))
    finally:
        s.close()


def dlopen(path):
    """In a child: a second copy of the interposer's constructors here
    would only confuse this process, and all it could map is its own."""
    r = subprocess.run([sys.executable, "-c", f"import ctypes; ctypes.CDLL({path!r})"],
                       capture_output=True, timeout=30)
    if r.returncode:
        raise OSError(errno.EIO, r.stderr.decode(errors="replace")[-200:])


def held():
    """(dev, inode) of everything this process maps and every fd it holds."""
    out = set()
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 5 and parts[4] != "0":
                out.add((parts[3], int(parts[4])))
    for fd in os.listdir("/proc/self/fd"):
        try:
            st = os.stat(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        out.add((f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}", st.st_ino))
    return sorted(out)


# -- garbage ------------------------------------------------------------------

def own_regions():
    """(address, length) of the pair regions this process maps (its own
    connections' memory), read-write."""
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(None, 5)
            if len(parts) == 6 and parts[5].startswith(MEMFD) and parts[1].startswith("rw"):
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                out.append((lo, hi - lo))
    return out


def scribble(regions, junk):
    """Random bytes over every page of our own pair regions."""
    n = 0
    for addr, length in regions:
        for off in range(0, length, len(junk)):
            k = min(len(junk), length - off)
            ctypes.memmove(addr + off, junk, k)
            n += k
    return n


def random_options(s):
    """Random bytes as every SOL_SHMBYPASS option of our own socket."""
    said = {}
    for opt in range(0, 8):
        for size in (0, 1, 4, 8, 24, 64, 256):
            buf = ctypes.create_string_buffer(os.urandom(size), max(size, 1))
            rc = libc.syscall(SYS_SETSOCKOPT, s.fileno(), CONFIG["sol"], opt, buf, size)
            key = "ok" if rc == 0 else errno.errorcode.get(ctypes.get_errno(), "?")
            said[key] = said.get(key, 0) + 1
    return said


def flood_inboxes(inboxes):
    """Random datagrams, and messages that look like offers (the right magic,
    random cookies, a memfd of garbage), to every inbox it was told of."""
    sent = refused = 0
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.setblocking(False)
    memfd = os.memfd_create("shmbypass", os.MFD_ALLOW_SEALING)
    os.ftruncate(memfd, 1 << 20)
    os.pwrite(memfd, os.urandom(65536), 0)
    for path in inboxes:
        for i in range(60):
            if i % 3 == 0:
                body = os.urandom(random.randint(0, 200))
            else:
                body = struct.pack("=II", CONFIG["magic"], random.choice((1, 2))) + os.urandom(40)
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", memfd))] if i % 2 else []
            try:
                s.sendmsg([body], anc, 0, path)
                sent += 1
            except OSError:
                refused += 1            # full (max_dgram_qlen) or gone
    s.close()
    os.close(memfd)
    return sent, refused


def forge(regions, active, passive):
    """A block that claims to carry another pair's connection (the region's
    header put back, so that a reader believes the region): attached, both
    cookies, 7 bytes read each way. `status` must not show it for them."""
    for addr, _ in regions:
        ctypes.memmove(addr, HEADERS[addr], 4096)
        block = addr + 4096
        ctypes.memmove(block, struct.pack("=QII4Q", 1 << 32 | 2, 0, 0, active, passive, 7, 7), 48)


def garbage(sock):
    junk = os.urandom(1 << 20)
    regions = own_regions()
    for addr, _ in regions:
        HEADERS[addr] = ctypes.string_at(addr, 4096)
    wrote = 0
    said = {}
    for _ in range(3):              # while its peer works on the connection
        wrote += scribble(regions, junk)
        said = random_options(sock)
        try:
            sock.send(os.urandom(4096))
            sock.recv(65536)
        except OSError:
            pass
    if CONFIG.get("forge"):
        forge(regions, *CONFIG["forge"])
    sent, refused = flood_inboxes(CONFIG["inboxes"])
    return {"regions": len(regions), "bytes_scribbled": wrote, "options": said,
            "datagrams_sent": sent, "datagrams_refused": refused}


def main():
    rings = ctypes.CDLL(None).shmbypass_fd_rings
    settle = ctypes.CDLL(None).shmbypass_fd_settle
    tier = ctypes.CDLL(None).shmbypass_fd_tier
    s = socket.create_connection(("127.0.0.1", CONFIG["port"]))
    settle(s.fileno(), 30000)
    for _ in range(3):              # an exchange or two: both directions take the rings
        s.sendall(b"hello")
        got = b""
        while len(got) < 5:
            got += s.recv(5 - len(got))
    print(f"CONNECTED {tier(s.fileno())} {rings(s.fileno())}", flush=True)
    for pid, regions in CONFIG["victims"].items():
        probe_process(pid, regions)
    probe_pins(CONFIG["instance"])
    probe_run_dir(CONFIG["instance"], CONFIG["inboxes"])
    print("PROBED " + json.dumps({"tries": TRIES, "maps": held()}), flush=True)
    sys.stdin.readline()
    s.settimeout(2)
    print("GARBAGE " + json.dumps(garbage(s)), flush=True)
    sys.stdin.readline()
    return 0


if __name__ == "__main__":
    CONFIG = json.loads(sys.argv[1])
    sys.exit(main())
