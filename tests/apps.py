"""Starting and stopping real applications for the tests."""
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

SHMBYPASS = [sys.executable, "-m", "shmbypass"]


def need(*binaries):
    for b in binaries:
        if not shutil.which(b):
            pytest.fail(f"{b} is not installed: scripts/setup.sh installs it (run make test)")


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_port(port, host="127.0.0.1", timeout=20, proc=None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            socket.create_connection((host, port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port}")


def run_in(inst, argv, tier="kernel", **kw):
    """Run argv under `shmbypass run --tier` in the instance; return CompletedProcess."""
    env = dict(os.environ, SHMBYPASS_INSTANCE=inst.name)
    return subprocess.run(SHMBYPASS + ["run", "--tier", tier, "--"] + argv, env=env,
                          capture_output=True, **kw)


def stop_group(proc, timeout):
    """If proc still runs: SIGTERM to its process group, SIGKILL after timeout s."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def nginx_conf(d, port, www, connections):
    """d/nginx.conf: nginx in the foreground as root, one worker, sendfile
    on, serving www on 127.0.0.1:port, every file it writes in d; its path."""
    conf = d / "nginx.conf"
    conf.write_text(f"""daemon off; master_process on; worker_processes 1; user root;
pid {d}/nginx.pid; error_log {d}/error.log;
events {{ worker_connections {connections}; }}
http {{ access_log off; sendfile on; tcp_nopush on;
  client_body_temp_path {d}; proxy_temp_path {d}; fastcgi_temp_path {d};
  uwsgi_temp_path {d}; scgi_temp_path {d};
  server {{ listen 127.0.0.1:{port}; root {www}; }} }}
""")
    return conf


class Server:
    """A server started under `shmbypass run`, killed (with its group) at exit."""

    def __init__(self, inst, argv, port, tier="kernel"):
        env = dict(os.environ, SHMBYPASS_INSTANCE=inst.name)
        self.proc = subprocess.Popen(SHMBYPASS + ["run", "--tier", tier, "--"] + argv, env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     start_new_session=True)
        try:
            wait_port(port, proc=self.proc)
        except Exception:
            self.stop()
            raise

    def stop(self):
        stop_group(self.proc, 10)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
