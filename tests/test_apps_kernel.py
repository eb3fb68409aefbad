"""Real, unmodified applications in the kernel tier."""
import os
import socket
import time

from shmbypass import status
from apps import Server, free_port, need, run_in
from conftest import InGroup
from sockets import recv_exact


def resp(*args):
    out = [f"*{len(args)}\r\n".encode()]
    for a in args:
        a = a if isinstance(a, bytes) else str(a).encode()
        out.append(f"${len(a)}\r\n".encode() + a + b"\r\n")
    return b"".join(out)


def test_redis_server_and_benchmark(inst, tmp_path):
    need("redis-server", "redis-benchmark", "redis-cli")
    port = free_port()
    redis = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(tmp_path)]
    with Server(inst, redis, port):
        before = status.counters(inst)
        r = run_in(inst, ["redis-benchmark", "-p", str(port), "-n", "20000", "-c", "20",
                          "-t", "set,get,lpush,lrange", "-q"], timeout=300, text=True)
        assert r.returncode == 0, r.stderr
        assert "error" not in (r.stdout + r.stderr).lower(), r.stdout + r.stderr
        assert r.stdout.count("requests per second") >= 4, r.stdout
        after = status.counters(inst)
        assert after["paired"] - before["paired"] >= 20
        assert after["bytes_redirect"] > before["bytes_redirect"]

        # redis-cli writes and reads back a 1 MiB value exactly.
        value = os.urandom(512 * 1024).hex().encode()
        r = run_in(inst, ["redis-cli", "-p", str(port), "-x", "set", "big"], input=value, timeout=60)
        assert r.returncode == 0 and r.stdout.strip() == b"OK", r
        r = run_in(inst, ["redis-cli", "-p", str(port), "--no-raw", "strlen", "big"], timeout=60)
        assert r.stdout.strip() == b"(integer) %d" % len(value)
        r = run_in(inst, ["redis-cli", "-p", str(port), "get", "big"], timeout=60)
        assert r.stdout.rstrip(b"\n") == value

        # A live connection to redis is shown in the kernel tier, both ends.
        with InGroup(inst):
            c = socket.create_connection(("127.0.0.1", port))
        c.sendall(resp("PING"))
        assert recv_exact(c, 7) == b"+PONG\r\n"
        rows = [row for row in status.connections(inst)
                if row["remote"] == f"127.0.0.1:{port}" and row["local"] == "%s:%d" % c.getsockname()]
        assert len(rows) == 1 and rows[0]["tier"] == "kernel", rows
        server_side = [row for row in status.connections(inst)
                       if row["local"] == f"127.0.0.1:{port}" and row["remote"] == "%s:%d" % c.getsockname()]
        assert len(server_side) == 1 and server_side[0]["tier"] == "kernel"
        assert rows[0]["bytes_tx"] == 14 and rows[0]["bytes_rx"] == 7
        c.close()
