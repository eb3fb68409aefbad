"""Which processes hold a socket, by socket cookie (what `status` rows are
keyed by), like the users:(...) column of `ss -p`.

sock_diag (inet_diag through pyroute2) gives each TCP socket's cookie and
inode; /proc/<pid>/fd links name the inodes a process holds (`socket:[N]`).
sock_diag answers for the calling thread's network namespace only: cookies
not found in ours are looked for in the namespaces other processes are in,
from a short-lived thread that joins each (setns applies to one thread).
"""
import ctypes
import os
import socket
import threading

from pyroute2.netlink.exceptions import NetlinkError  # noqa: F401 (status catches it)

SO_NETNS_COOKIE = 71  # linux/socket.h (5.14+)
CLONE_NEWNET = 0x40000000


def _diag() -> dict[int, int]:
    """cookie -> inode of every TCP socket of this thread's netns."""
    from pyroute2 import DiagSocket
    from pyroute2.netlink.diag import SS_ALL
    out = {}
    with DiagSocket() as ds:
        ds.bind()
        for fam in (socket.AF_INET, socket.AF_INET6):
            for m in ds.get_sock_stats(family=fam, states=SS_ALL):
                if m["idiag_inode"]:
                    out[m["idiag_cookie"]] = m["idiag_inode"]
    return out


def netns_cookie() -> int | None:
    """The cookie of this thread's network namespace (as BPF's
    bpf_get_netns_cookie gives it), None on kernels without SO_NETNS_COOKIE."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            return int.from_bytes(s.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8), "little")
        except OSError:
            return None


def _in_netns(path: str, fn):
    """fn() run in a thread that joined the network namespace at path."""
    result = {}

    def body():
        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(path, os.O_RDONLY)
        try:
            if libc.setns(fd, CLONE_NEWNET) != 0:
                result["err"] = OSError(ctypes.get_errno(), f"setns {path}")
                return
        finally:
            os.close(fd)
        try:
            result["value"] = fn()
        except Exception as e:  # handed to the caller's thread
            result["err"] = e

    t = threading.Thread(target=body, name="owners-netns")
    t.start()
    t.join()
    if "err" in result:
        raise result["err"]
    return result["value"]


def _pids() -> list[int]:
    return sorted(int(p) for p in os.listdir("/proc") if p.isdigit())


def _inode_holders(inodes: set[int]) -> dict[int, list[dict]]:
    """inode -> [{pid, command, fd}] for the socket inodes asked for."""
    out: dict[int, list[dict]] = {}
    for pid in _pids():
        fd_dir = f"/proc/{pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue  # gone, or not ours to read
        comm = None
        for fd in fds:
            try:
                link = os.readlink(f"{fd_dir}/{fd}")
            except OSError:
                continue
            if not link.startswith("socket:["):
                continue
            ino = int(link[8:-1])
            if ino not in inodes:
                continue
            if comm is None:
                try:
                    with open(f"/proc/{pid}/comm") as f:
                        comm = f.read().strip()
                except OSError:
                    comm = "?"
            out.setdefault(ino, []).append({"pid": pid, "command": comm, "fd": int(fd)})
    return out


def _other_netns() -> list[str]:
    """/proc/<pid>/ns/net of one process per network namespace that is not
    ours."""
    try:
        ours = os.stat("/proc/thread-self/ns/net").st_ino
    except OSError:
        return []
    seen = {ours}
    paths = []
    for pid in _pids():
        p = f"/proc/{pid}/ns/net"
        try:
            ino = os.stat(p).st_ino
        except OSError:
            continue
        if ino not in seen:
            seen.add(ino)
            paths.append(p)
    return paths


def by_cookie(wanted: dict[int, int]) -> dict[int, list[dict]]:
    """{cookie: netns cookie} -> {cookie: [{pid, command, fd}, ...]} for the
    sockets some process holds (a socket in TIME_WAIT, or held by no one we
    can see, is left out)."""
    if not wanted:
        return {}
    inode_of = {c: i for c, i in _diag().items() if c in wanted}
    ours = netns_cookie()
    missing = {wanted[c] for c in wanted if c not in inode_of and wanted[c] != ours}
    for path in _other_netns() if missing else ():
        try:
            ns, found = _in_netns(path, lambda: (netns_cookie(), _diag()))
        except (OSError, NetlinkError):
            continue  # the process left, or its namespace is gone
        if ns in missing:
            inode_of.update({c: i for c, i in found.items() if c in wanted})
            missing.discard(ns)
        if not missing:
            break
    holders = _inode_holders(set(inode_of.values()))
    return {c: holders[i] for c, i in inode_of.items() if i in holders}
