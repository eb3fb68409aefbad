"""Guest agent of the shmbypass VM pair (runs inside each guest).

The guest's init starts this file with the host's own Python (the host's
filesystem is the guest's root, read-only over virtio-9p) and respawns it if
it dies. It talks to the host over one virtio-serial port, one JSON object per
line, in both directions:

    host -> guest  {"op": "ping"}
                   {"op": "exec", "id": N, "cmd": "...", "timeout": T,
                    "stdin": "<base64>", "env": {...}, "cwd": "..."}
                   {"op": "kill", "id": N}            (kill exec N's process group)
    guest -> host  {"op": "hello", "name": "A", "uptime": 5.2, "pid": P}
                   {"op": "result", "id": N, "rc": R, "out": "<base64>",
                    "err": "<base64>", "timed_out": false}

Every exec runs in its own thread and session, so several commands (a server
and its client, say) run at the same time. Only the standard library is used:
this file must work even when the project's package does not import.
"""
import argparse
import base64
import json
import os
import signal
import subprocess
import sys
import threading

GUEST_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/tmp",  # /root stays the host's (read-only): the venv's Python lives there
    "LANG": "C.UTF-8",
    "PYTHONDONTWRITEBYTECODE": "1",  # the root filesystem is read-only
    "PYTHONUNBUFFERED": "1",
    "TERM": "dumb",
}


class Agent:
    def __init__(self, port, name, cwd):
        self.fd = os.open(port, os.O_RDWR | os.O_CLOEXEC)
        self.name = name
        self.cwd = cwd
        self.wlock = threading.Lock()
        self.procs = {}  # exec id -> Popen, for "kill"
        self.plock = threading.Lock()

    def send(self, obj):
        data = (json.dumps(obj) + "\n").encode()
        with self.wlock:
            while data:
                n = os.write(self.fd, data)
                data = data[n:]

    def hello(self):
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        self.send({"op": "hello", "name": self.name, "uptime": uptime, "pid": os.getpid()})

    def run_exec(self, req):
        rid = req.get("id")
        env = dict(GUEST_ENV)
        env["SHMBYPASS_GUEST"] = self.name
        env.update(req.get("env") or {})
        stdin = base64.b64decode(req.get("stdin") or "")
        timeout = req.get("timeout")
        result = {"op": "result", "id": rid, "rc": -1, "out": "", "err": "", "timed_out": False}
        try:
            proc = subprocess.Popen(
                ["/bin/sh", "-c", req["cmd"]], cwd=req.get("cwd") or self.cwd, env=env,
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                start_new_session=True)
        except OSError as e:
            result["err"] = base64.b64encode(f"agent: cannot start: {e}\n".encode()).decode()
            self.send(result)
            return
        with self.plock:
            self.procs[rid] = proc
        try:
            out, err = proc.communicate(stdin, timeout=timeout)
        except subprocess.TimeoutExpired:
            result["timed_out"] = True
            self._killpg(proc)
            out, err = proc.communicate()
        finally:
            with self.plock:
                self.procs.pop(rid, None)
        # A command's background children keep running in its session; the
        # command itself is done. "kill" reaches them through the process group.
        result.update(rc=proc.returncode, out=base64.b64encode(out).decode(),
                      err=base64.b64encode(err).decode())
        self.send(result)

    @staticmethod
    def _killpg(proc):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def serve(self):
        self.hello()
        buf = b""
        while True:
            chunk = os.read(self.fd, 65536)
            if not chunk:  # host side not connected: wait for it
                threading.Event().wait(0.2)
                continue
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                try:
                    req = json.loads(line)
                except ValueError:
                    continue  # a line cut when the host (re)connected
                op = req.get("op")
                if op == "ping":
                    self.hello()
                elif op == "exec":
                    threading.Thread(target=self.run_exec, args=(req,), daemon=True).start()
                elif op == "kill":
                    with self.plock:
                        proc = self.procs.get(req.get("id"))
                    if proc is not None:
                        self._killpg(proc)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", required=True, help="virtio-serial port device")
    ap.add_argument("--name", required=True, help="guest name (A or B)")
    ap.add_argument("--cwd", default="/", help="default working directory for commands")
    args = ap.parse_args()
    os.environ.clear()
    os.environ.update(GUEST_ENV)
    Agent(args.port, args.name, args.cwd).serve()


if __name__ == "__main__":
    sys.exit(main())
