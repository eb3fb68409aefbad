"""The join broker: how a program of an allowed non-root user enters the
bypass group without sudo.

Moving a process into a cgroup needs write access to the cgroup.procs of
the common ancestor of its old and new group, which only root has. So `up`
starts this small root process when it allows users other than root
(--allow-user, --allow-group, --allow-any-user). It listens on
/run/<instance>/broker.sock (mode 0666: anyone may ask) and answers one
request, "join": it takes the caller's pid, uid and gid from the kernel
(SO_PEERCRED), checks them against the instance's policy, and writes the
pid into the bypass cgroup. The caller (`shmbypass run`, shmbypass.launch)
then starts the program, which inherits the group.

It never touches connection memory (that goes from peer to peer, see
native/inbox.c) and is not on any data path; it exits when its instance's
run directory goes away (`down`, or a killed test run cleaned up).
"""
import os
import selectors
import socket
import struct
import sys
import time

from shmbypass import paths, policy

SOCKET = "broker.sock"


def allowed(p: policy.Policy, uid: int, gid: int) -> str | None:
    """None if this identity may join, else why not."""
    if uid == 0 or p.any_user or uid in p.users or gid in p.groups:
        return None
    return (f"uid {uid} (gid {gid}) is not allowed to use the bypass; an administrator allows "
            f"it with `shmbypass up --allow-user USER` or `--allow-group GROUP`")


def handle(conn: socket.socket, inst: paths.Instance) -> None:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", creds)
    request = conn.recv(64).strip()
    if request != b"join":
        conn.sendall(b"denied unknown request\n")
        return
    state = inst.load_state()
    why = allowed(policy.Policy.from_dict(state.get("policy")), uid, gid)
    if why is None:
        try:
            with open(os.path.join(state["cgroup"], "cgroup.procs"), "w") as f:
                f.write(str(pid))
        except (OSError, KeyError) as e:
            why = f"cannot move pid {pid} into the bypass group: {e}"
    conn.sendall(b"ok\n" if why is None else b"denied " + why.encode() + b"\n")


# A caller has this long to send its request; at most this many wait at
# once (the oldest is dropped for a new one). Callers are served as their
# requests arrive, so one that connects and says nothing (anyone may: the
# socket is 0666) holds up nobody else.
REQUEST_WAIT_S = 5
MAX_WAITING = 256


def serve(inst: paths.Instance) -> None:
    path = os.path.join(inst.run_dir, SOCKET)
    ls = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    ls.bind(path)
    os.chmod(path, 0o666)
    ls.listen(64)
    ls.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(ls, selectors.EVENT_READ)
    waiting: dict[socket.socket, float] = {}   # caller -> when it is dropped (oldest first)

    def drop(conn):
        sel.unregister(conn)
        del waiting[conn]
        conn.close()

    while os.path.isdir(inst.run_dir):
        for key, _ in sel.select(timeout=1.0):
            if key.fileobj is ls:
                try:
                    conn, _ = ls.accept()
                except OSError:
                    continue
                if len(waiting) >= MAX_WAITING:
                    drop(next(iter(waiting)))
                conn.setblocking(False)
                sel.register(conn, selectors.EVENT_READ)
                waiting[conn] = time.monotonic() + REQUEST_WAIT_S
                continue
            conn = key.fileobj
            sel.unregister(conn)
            del waiting[conn]
            with conn:
                conn.settimeout(REQUEST_WAIT_S)  # (its request is here; the answer is short)
                try:
                    handle(conn, inst)
                except OSError:
                    pass  # the caller went away: its problem
        now = time.monotonic()
        for conn in [c for c, end in waiting.items() if end < now]:
            drop(conn)
    ls.close()


def start(inst: paths.Instance) -> int:
    """Start the broker for this instance; its pid."""
    import subprocess
    log = open(os.path.join(inst.run_dir, "broker.log"), "ab")
    p = subprocess.Popen([sys.executable, "-m", "shmbypass.broker", inst.name], stdin=subprocess.DEVNULL,
                         stdout=log, stderr=log, start_new_session=True, close_fds=True,
                         env=dict(os.environ, SHMBYPASS_INSTANCE=inst.name))
    log.close()
    path = os.path.join(inst.run_dir, SOCKET)
    end = time.monotonic() + 10
    while not os.path.exists(path) and p.poll() is None and time.monotonic() < end:
        time.sleep(0.01)
    return p.pid


def stop(pid: int | None) -> None:
    if not pid:
        return
    try:
        os.kill(pid, 15)
    except ProcessLookupError:
        pass


if __name__ == "__main__":
    serve(paths.Instance(sys.argv[1]))
