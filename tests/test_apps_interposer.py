"""Real applications under the interposer, in the shm tier: redis, nginx
(sendfile to curl and wrk), asyncio streams, iperf3. Bytes compared, the
connections seen in the shm tier while they run."""
import hashlib
import json
import os
import re
import subprocess

from apps import free_port, need, nginx_conf   # a missing app fails the test: setup installs them

from interposer_env import (PEER, PY, RUN, WRK_CHECK, Proc, Server, TierWatch,  # noqa: F401
                             app_su, assert_shm_both_ends, get_setup, listening, run_tool,
                             setups, shm_rows)


def test_redis(app_su):
    need("redis-server", "redis-benchmark", "redis-cli")
    su, port = app_su, free_port()
    srv = Server(su, ["redis-server", "--port", str(port), "--save", "", "--appendonly", "no",
                      "--bind", "127.0.0.1"], listening(port))
    try:
        for args in (["-c", "1", "-n", "10000"], ["-c", "50", "-n", "40000", "-P", "16"],
                     ["-c", "50", "-n", "20000"], ["-c", "1", "-n", "5000", "-P", "16"]):
            p = run_tool(su, ["redis-benchmark", "-p", str(port), "-q", "-t",
                              "set,get,lpush,lrange_100"] + args)
            text = p.stdout.decode(errors="replace").replace("\r", "\n")
            assert p.returncode == 0, p.stderr.decode()[-2000:]
            assert "error" not in text.lower() and "requests per second" in text, text[-2000:]
        # a 1 MiB value, written and read back exactly by redis-cli
        value = os.urandom(1 << 19).hex().encode()          # 1 MiB of text
        p = subprocess.run(RUN + ["redis-cli", "-p", str(port), "-x", "set", "big"],
                           input=value, env=su.env(), capture_output=True, timeout=60)
        assert p.stdout.strip() == b"OK", p
        p = run_tool(su, ["redis-cli", "-p", str(port), "--raw", "get", "big"])
        assert p.stdout.rstrip(b"\n") == value
        # a live connection shows up in the shm tier
        cli = subprocess.Popen(RUN + ["redis-cli", "-p", str(port)], env=su.env(),
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        try:
            cli.stdin.write(b"PING\n")
            cli.stdin.flush()
            assert cli.stdout.readline().strip() == b"PONG"
            assert len(shm_rows(su)) >= 2, shm_rows(su)
        finally:
            cli.stdin.close()
            cli.wait(10)
    finally:
        srv.stop()


def test_nginx_sendfile_curl_and_wrk(app_su, tmp_path):
    need("nginx", "curl", "wrk")
    su, port = app_su, free_port()
    www = tmp_path / "www"
    www.mkdir()
    data = os.urandom(1 << 20) * 100                         # 100 MiB
    (www / "big.bin").write_bytes(data)
    (www / "small.txt").write_text("hello\n" * 100)
    conf = nginx_conf(tmp_path, port, www, 256)
    srv = Server(su, ["nginx", "-c", str(conf), "-p", str(tmp_path)], listening(port))
    try:
        got = tmp_path / "got.bin"
        p = run_tool(su, ["curl", "-sSf", "-o", str(got), f"http://127.0.0.1:{port}/big.bin"])
        assert p.returncode == 0, p.stderr
        with open(got, "rb") as f:
            assert hashlib.file_digest(f, "sha256").hexdigest() == hashlib.sha256(data).hexdigest()
        got.unlink()
        p = run_tool(su, ["wrk", "-t1", "-c8", "-d2s", f"http://127.0.0.1:{port}/small.txt"])
        text = p.stdout.decode()
        assert p.returncode == 0 and "Requests/sec" in text, text
        assert "Socket errors" not in text and "Non-2xx" not in text, text
        # wrk fetching the 100 MiB file over kept-alive connections: every
        # body compared with the file (wrk's Lua), the connections seen in
        # the shm tier by `shmbypass status --json` meanwhile.
        check = tmp_path / "check.lua"
        check.write_text(WRK_CHECK)
        watch = TierWatch(su, port)
        try:
            # (wrk hands whole bodies to Lua slowly, ~50 MB/s even over
            # plain TCP here: a few 100 MiB responses in 6 s)
            p = run_tool(su, ["wrk", "-t1", "-c1", "-d6s", "--timeout", "60s", "-s", str(check),
                              f"http://127.0.0.1:{port}/big.bin"],
                         SBP_EXPECT=str(www / "big.bin"))
        finally:
            rows = watch.stop()
        text = p.stdout.decode()
        m = re.search(r"CHECKED good=(\d+) bad=(\d+)", text)
        assert p.returncode == 0 and m, (text, p.stderr.decode()[-2000:])
        assert int(m[1]) > 0 and int(m[2]) == 0, text
        assert_shm_both_ends(rows, len(data))
    finally:
        srv.stop()


def test_asyncio_streams(app_su):
    su = app_su
    srv = Proc([PY, PEER, "aioserver", "20"], su.env())
    try:
        port = srv.wait_for("PORT ")
        cli = Proc([PY, PEER, "aioclient", port, "20", "30"], su.env())
        cres = cli.finish(60)
        sres = srv.finish(60)
        assert cres.get("ok") and cres.get("tiers") == [2], (cres, cli.stderr())
        assert sres.get("served") == 20, (sres, srv.stderr())
    finally:
        srv.kill()


def test_iperf3(app_su):
    need("iperf3")
    su, port = app_su, free_port()
    srv = Server(su, ["iperf3", "-s", "-1", "-p", str(port)], listening(port))
    try:
        watch = TierWatch(su, port)
        try:
            p = run_tool(su, ["iperf3", "-c", "127.0.0.1", "-p", str(port), "-t", "10", "-J"])
        finally:
            rows = watch.stop()
        res = json.loads(p.stdout)
        assert "error" not in res, res.get("error")
        bps = res["end"]["sum_received"]["bits_per_second"]
        sent, received = res["end"]["sum_sent"]["bytes"], res["end"]["sum_received"]["bytes"]
        assert bps > 0 and 0 < received <= sent, res["end"]   # in flight at the end: not counted
        assert_shm_both_ends(rows, received // 2)
        print(f"iperf3 over the shm tier: {bps / 1e9:.1f} Gbit/s")
    finally:
        srv.stop()
