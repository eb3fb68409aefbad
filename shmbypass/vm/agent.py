"""The host end of the guest agents' channel (the agent itself is
vm/agent.py, run inside each guest): one JSON object per line over a unix
socket QEMU connects to the guest's virtio-serial port; commands run
concurrently, each a :class:`Job` whose wait() returns its :class:`Result`."""
import base64
import dataclasses
import itertools
import json
import socket
import threading
import time

from shmbypass.errors import GuestDied, VMError


@dataclasses.dataclass
class Result:
    rc: int
    out: str
    err: str
    timed_out: bool = False
    cmd: str = ""
    guest: str = ""

    @property
    def ok(self):
        return self.rc == 0 and not self.timed_out

    def check(self):
        if not self.ok:
            what = "timed out" if self.timed_out else f"exit {self.rc}"
            raise VMError(f"guest {self.guest}: `{self.cmd}` {what}\n--- stdout\n{self.out}\n--- stderr\n{self.err}")
        return self


class Job:
    """A command running in a guest; wait() returns its Result."""

    def __init__(self, agent, rid, cmd):
        self.agent, self.id, self.cmd = agent, rid, cmd
        self._done = threading.Event()
        self._result = None

    def _finish(self, result):
        self._result = result
        self._done.set()

    def done(self):
        return self._done.is_set()

    def wait(self, timeout=None):
        if not self._done.wait(timeout):
            raise TimeoutError(f"guest {self.agent.name}: `{self.cmd}` still running after {timeout}s")
        if isinstance(self._result, Exception):
            raise self._result
        return self._result

    def kill(self):
        """SIGKILL the command's process group in the guest."""
        if not self._done.is_set():
            self.agent.send({"op": "kill", "id": self.id})


class AgentClient:
    """Host end of one guest's agent channel (a unix socket QEMU listens on)."""

    def __init__(self, name, path):
        self.name, self.path = name, path
        self.sock = None
        self.wlock = threading.Lock()
        self.jobs = {}
        self.ids = itertools.count(1)
        self.hello = threading.Event()
        self.hello_info = None
        self.closed = None  # exception once the channel is gone

    def connect(self, deadline):
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                s.connect(self.path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                s.close()
                if time.monotonic() > deadline:
                    raise VMError(f"guest {self.name}: QEMU never opened {self.path}") from None
                time.sleep(0.02)
        self.sock = s
        threading.Thread(target=self._reader, name=f"sbvm-agent-{self.name}", daemon=True).start()

    def send(self, obj):
        if self.closed:
            raise self.closed
        data = (json.dumps(obj) + "\n").encode()
        with self.wlock:
            self.sock.sendall(data)

    def _reader(self):
        buf = b""
        try:
            while True:
                chunk = self.sock.recv(1 << 16)
                if not chunk:
                    break
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    try:
                        msg = json.loads(line)
                    except ValueError:
                        continue
                    self._dispatch(msg)
        except OSError:
            pass
        self.closed = GuestDied(f"guest {self.name}: agent channel closed (guest gone)")
        for job in list(self.jobs.values()):
            job._finish(self.closed)
        self.jobs.clear()

    def _dispatch(self, msg):
        if msg.get("op") == "hello":
            self.hello_info = msg
            self.hello.set()
        elif msg.get("op") == "result":
            job = self.jobs.pop(msg.get("id"), None)
            if job is not None:
                job._finish(Result(
                    rc=msg["rc"], out=base64.b64decode(msg["out"]).decode(errors="replace"),
                    err=base64.b64decode(msg["err"]).decode(errors="replace"),
                    timed_out=msg.get("timed_out", False), cmd=job.cmd, guest=self.name))

    def wait_hello(self, deadline, alive, fatal):
        """Ping until the agent answers (pings sent before the guest opened
        its port are lost); alive() is False once QEMU has exited, fatal()
        returns the init's FATAL line if it gave up."""
        while not self.hello.wait(0.5):
            if self.closed or not alive():
                raise GuestDied(f"guest {self.name}: QEMU exited during boot")
            msg = fatal()
            if msg:
                raise VMError(f"guest {self.name}: {msg}")
            if time.monotonic() > deadline:
                raise VMError(f"guest {self.name}: no agent after boot timeout")
            self.send({"op": "ping"})
        return self.hello_info

    def start(self, cmd, timeout=None, stdin=b"", env=None, cwd=None):
        rid = next(self.ids)
        job = Job(self, rid, cmd)
        self.jobs[rid] = job
        req = {"op": "exec", "id": rid, "cmd": cmd, "timeout": timeout,
               "stdin": base64.b64encode(stdin).decode()}
        if env:
            req["env"] = env
        if cwd:
            req["cwd"] = cwd
        try:
            self.send(req)
        except Exception:
            self.jobs.pop(rid, None)
            raise
        return job

    def close(self):
        if self.sock is not None:
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self.sock.close()
