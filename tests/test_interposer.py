"""The LD_PRELOAD interposer (native/preload/) with real processes: every
peer (tests/ipc_peer.py) runs under `python -m shmbypass run --tier shm -- ...`
in a private instance, in each set-up of interposer_env.Setup (tcp, shm,
bell, slots). Real applications: test_apps_interposer.py."""
import contextlib
import json
import os
import shutil
import subprocess
import time

import pytest

from shmbypass import shmtier
from shmbypass import region
from apps import need   # a missing app fails the test: setup installs them
from conftest import assert_slots_back

from interposer_env import (PEER, PY, ROOT, RUN, Proc, check_tier,  # noqa: F401
                             get_setup, peer, run_pair, setups, su)


# -- while the negotiation declines: exactly TCP ------------------------------

def test_non_tcp_program_is_untouched(su):
    """UDP, pipes, a Unix socketpair and files, with select/poll/epoll."""
    p = peer(su, "local", "nontcp")
    r = p.finish(60)
    assert p.p.returncode == 0, p.stderr()
    assert r == {"udp_select": True, "udp": "datagram", "pipe_poll": True, "pipe": "piped",
                 "unix_epoll": True, "unix": "unix", "file": "file data", "tier": 0}


def test_shell_pipeline_under_preload(su):
    """A program that never touches TCP (sh, cat, sort through pipes)."""
    p = subprocess.run(RUN + ["sh", "-c", "seq 1 20000 | sort -n | tail -1 | cat"],
                       env=su.env(), capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stdout.strip() == "20000", p.stderr


SIZES = [1, 2, 63, 64, 1000, 4095, 4096, 65535, 65536, 1 << 20, (1 << 20) + 1, 3 << 20, 4 << 20]


def test_integrity_both_ways(su):
    sres, cres = run_pair(su, "integrity", SIZES, SIZES)
    assert cres["echo_ok"] == [True] * len(SIZES)
    assert sres["digests"] == cres["digests"]
    assert sres["eof"] and cres["eof"]
    check_tier(su, cres)


def test_flags_and_options(su):
    sres, cres = run_pair(su, "flags")
    assert sres["peek"] == "hello" and sres["fionread"] == 11 and sres["after_peek"] == "hello world"
    assert sres["waitall"] == 100
    assert sres["dontwait"] == sres["rcvtimeo"] == sres["nonblock"] == "EAGAIN"
    assert sres["rcvtimeo_waited"]
    # SIOCOUTQ counts what the peer has not acknowledged: right after the
    # send, TCP's delayed ACK may leave all 1000 there; ring bytes count as
    # delivered (the ring is the peer's receive buffer), as once ACKed
    assert 0 <= sres["outq"] <= 1000 and sres["outq_after"] == 0
    assert sres["sndtimeo"] == "EAGAIN" and sres["sndtimeo_sent"] > 0
    assert cres["got_ok"] and cres["fill_ok"]
    assert sres["halfclose_data"] == "last words" and cres["after"] == "after-eof"
    assert sres["epipe_nosignal"] in ("BrokenPipeError", "ConnectionResetError")
    assert sres["sigpipe_with_nosignal"] == 0
    assert sres["epipe_signal"] in ("BrokenPipeError", "ConnectionResetError")
    assert sres["sigpipe_without"] >= 1
    check_tier(su, sres, cres)


def test_poll_select_epoll(su):
    sres, cres = run_pair(su, "poll", [150], [150])
    assert sres["missed"] == {"poll": 0, "select": 0, "epoll_lt": 0, "epoll_et": 0}
    assert sres["rest_pollout"] and not sres["rest_pollin"]
    assert sres["lt_first"] and sres["lt_again"] and not sres["lt_after_read"]
    assert sres["et_first"] and not sres["et_again_unread"] and sres["et_new_data"]
    assert sres["out_rest"] and not sres["out_full"] and sres["out_after_drain"]
    assert cres["drained"] == sres["filled"]
    assert sres["rdhup"] and sres["rdhup_in"] and sres["eof"]
    check_tier(su, sres, cres)


def test_fork_both_hold(su):
    sres, cres = run_pair(su, "fork", ["both"], ["both"])
    assert cres["data"] == "childparent" and cres["eof"]
    check_tier(su, cres)


def test_fork_parent_closes_first(su):
    """The pre-fork server pattern: the parent's close is not the end."""
    sres, cres = run_pair(su, "fork", ["parent-closes"], ["parent-closes"])
    assert cres["data"] == "late" and cres["waited"]


def test_dup(su):
    sres, cres = run_pair(su, "dup")
    assert sres["got"] == "pingpong" and cres["data"] == "via-dupvia-dup2" and cres["eof"]
    check_tier(su, sres, cres)


def test_threads_share_a_socket(su):
    sres, cres = run_pair(su, "threads", [4, 3000], [4, 3000])
    assert sres["bad"] == 0 and sres["complete"] and cres["done"]
    check_tier(su, sres, cres)


def test_close_with_unread_data(su):
    n = 700_000
    sres, cres = run_pair(su, "closeunread", [n], [n])
    assert sres["n"] == n and sres["ok"]
    check_tier(su, sres, cres)


def test_exec_hands_over_plain_tcp(su):
    """The server execs a new image (with the interposer) that takes over
    the accepted socket while the client's bytes wait, unread, in a ring:
    the connection goes back to plain TCP first (revert.c) and every byte
    arrives in order; the new image holds no memory of it. A VM pair's
    slots cannot go back: the connection is reset (a documented limit)."""
    if su.mode == "slots":
        srv = peer(su, "server", "exec")
        cli = None
        try:
            cli = peer(su, "client", "exec", srv.wait_for("PORT "))
            cli.finish(45)
            assert cli.p.returncode != 0 and "ConnectionResetError" in cli.stderr(), cli.stderr()
            srv.finish(45)
            assert "cannot follow exec" in srv.stderr(), srv.stderr()
        finally:
            for p in (srv, cli):
                if p:
                    p.kill()
        return
    sres, cres = run_pair(su, "exec")
    assert sres["data"] == "hello" and cres["data"] == "HELLO" and cres["eof"]
    assert sres["tier"] == 0
    if su.mode != "tcp":
        assert sres["rings_before"] == 3, (sres, cres)     # the bytes were in a ring


def test_sendfile_and_splice(su):
    n = 3_000_000
    sres, cres = run_pair(su, "sendfile", [n], [n])
    assert cres["n"] == n + 1000 and sres["sha"] == cres["sha"]
    assert sres["pos"] == 1000
    check_tier(su, sres, cres)


def test_server_writes_first(su):
    sres, cres = run_pair(su, "serverfirst")
    assert cres["greet"] == "220 hello from the server\r\n" and cres["reply"] == "250 ok HELO x"
    check_tier(su, sres, cres)


def test_ipv6(su):
    sres, cres = run_pair(su, "integrity", [100_000], [100_000], env={"IPC_HOST": "::1"})
    assert cres["echo_ok"] == [True]
    check_tier(su, cres)


# -- faults ---------------------------------------------------------------------

@contextlib.contextmanager
def started(su, scenario):
    """(server, client) of an ipc_peer scenario, the client's tier checked;
    both killed at the end."""
    srv = peer(su, "server", scenario)
    cli = None
    try:
        port = srv.wait_for("PORT ")
        cli = peer(su, "client", scenario, port)
        assert int(cli.wait_for("TIER ")) == su.expect_tier
        yield srv, cli
    finally:
        for p in (srv, cli):
            if p:
                p.kill()


def test_kill_sender(su):
    """The receiver gets every byte send() accepted, then EOF."""
    with started(su, "killsender") as (srv, cli):
        accepted = 0
        while accepted < 5_000_000:
            accepted = int(cli.wait_for("SENT "))
        cli.kill()
        cli.p.wait(10)
        sres = srv.finish(60)
        assert sres["end"] == "EOF" and sres["pattern_ok"], sres
        assert sres["total"] >= accepted, (sres, accepted)


def test_kill_receiver(su):
    """The sender gets EPIPE/ECONNRESET, no hang."""
    with started(su, "killreceiver") as (srv, cli):
        srv.wait_for("READ")
        if su.mode != "tcp":
            from shmbypass import status
            rows = [r for r in status.connections(su.inst) if r["tier"] == "shm"]
            assert len(rows) >= 2, status.connections(su.inst)
        srv.kill()
        cres = cli.finish(60)
        assert cres["error"] in ("BrokenPipeError", "ConnectionResetError"), cres


@pytest.mark.parametrize("what", ["positions", "magic", "data"])
def test_hostile_ring_writer(setups, what):
    """Another process that maps the region scribbles on a live connection's
    rings: nobody crashes or reads out of bounds; the connection is reset
    with a reason (garbage in the data area is just data: TCP has no checksum
    against a writer that owns the memory either)."""
    import ctypes
    from shmbypass._native import ffi
    su = get_setup(setups, "slots")
    srv = peer(su, "server", "corrupt", SHMBYPASS_DEBUG=1)
    cli = None
    try:
        port = srv.wait_for("PORT ")
        cli = peer(su, "client", "corrupt", port, SHMBYPASS_DEBUG=1)
        tx, rx = map(int, srv.wait_for("SLOTS ").split())
        time.sleep(0.2)                 # some bytes go back and forth first
        reg = region.open("posix", instance=su.inst.name)
        try:
            for slot in (tx, rx):
                h = ffi.cast("struct sbp_ring_hdr *", reg.slot_ptr(slot))
                if what == "positions":
                    h.tail = h.head + 12345678          # tail beyond head
                elif what == "magic":
                    h.magic = 0xdeadbeef
                else:
                    buf = reg.slot(slot)
                    buf[4096:4096 + 65536] = os.urandom(65536)
                    del buf
        finally:
            reg.close()
        cres, sres = cli.finish(60), srv.finish(60)
        errs = cli.stderr() + srv.stderr()
        assert cli.p.returncode == 0 and srv.p.returncode == 0, (cres, sres, errs[-3000:])
        if what == "data":
            assert cres["end"] == "still-running" or cres["n"] > 0, cres
        else:
            ends = {cres["end"], sres["end"]}
            assert ends <= {"ConnectionResetError", "BrokenPipeError", "EOF"}, (cres, sres)
            assert "ConnectionResetError" in ends, (cres, sres)
            assert "shm channel reset: the ring we" in errs, errs[-3000:]
            assert -1 in (cres["tier_after"], sres["tier_after"])
    finally:
        for p in (srv, cli):
            if p:
                p.kill()


def build_c(tmp_path_factory, name, *libs):
    cc = shutil.which("gcc") or shutil.which("cc")
    if not cc:
        pytest.skip("no C compiler")
    exe = tmp_path_factory.mktemp(name) / name
    subprocess.run([cc, "-O2", "-Wall", "-Werror", "-o", str(exe),
                    os.path.join(ROOT, "native", "tests", f"{name}.c"), *libs], check=True)
    return str(exe)


def test_socket_api_in_one_process(su, tmp_path_factory):
    """native/tests/api_check.c: ppoll, pselect, epoll_pwait(2), readv/writev,
    sendmsg/recvmsg, sendmmsg/recvmmsg, MSG_TRUNC, splice both ways, dup3,
    accept4 flags, SHUT_RD, SHUT_RDWR + EPOLLHUP, no duplicate epoll events;
    both ends in one process."""
    exe = build_c(tmp_path_factory, "api_check", "-ldl")
    p = subprocess.run(RUN + [exe], env=su.env(), capture_output=True, text=True, timeout=60)
    fails = [ln for ln in p.stdout.splitlines() if ln.startswith("FAIL")]
    assert p.returncode == 0 and not fails, (fails, p.stdout[-2000:], p.stderr[-2000:])
    assert f"TIER {su.expect_tier}" in p.stdout


@pytest.fixture(scope="module")
def eintr_prog(tmp_path_factory):
    cc = shutil.which("gcc") or shutil.which("cc")
    if not cc:
        pytest.skip("no C compiler")
    exe = tmp_path_factory.mktemp("eintr") / "eintr"
    subprocess.run([cc, "-O2", "-Wall", "-Werror", "-o", str(exe),
                    os.path.join(ROOT, "native", "tests", "eintr.c")], check=True)
    return str(exe)


@pytest.mark.parametrize("op", ["recv", "splice-out", "send", "sendfile", "splice-in"])
@pytest.mark.parametrize("handler,expect", [("restart", "data"), ("norestart", "EINTR")])
def test_signal_during_a_blocking_call(su, eintr_prog, handler, expect, op):
    """A signal lands while a blocking call waits on the socket (empty, or
    full for the sending calls) having moved no byte: with an SA_RESTART
    handler the call goes on and moves the bytes, as the kernel restarts it;
    without, it returns EINTR. sendfile and splice into and out of a socket
    behave as send() and recv() do (native/tests/eintr.c)."""
    srv = Proc([eintr_prog, "server", handler, op], su.env())
    cli = None
    try:
        port = srv.wait_for("PORT ")
        cli = Proc([eintr_prog, "client", port, op], su.env())
        line = srv.wait_for("RESULT ")
        assert line == f"{expect} hits=1", (op, line)
        assert srv.wait_for("TIER ") == str(su.expect_tier), op
        cli.finish(30)
    finally:
        for p in (srv, cli):
            if p:
                p.kill()


@pytest.mark.parametrize("mode", ["tcp", "shm", "slots"])
def test_many_connections_leak_nothing(setups, mode):
    """Connections in sequence and many open at once: every one works, in the
    shm tier while slots last and on TCP after (never a failed connection);
    afterwards neither process holds more fds than before and every slot is
    back on the free list."""
    su = get_setup(setups, mode)
    seq, nopen = 1000, 300
    srv = Proc([PY, PEER, "manyserver", str(seq + nopen + 1)], su.env())
    try:
        port = srv.wait_for("PORT ")
        cli = Proc([PY, PEER, "manyclient", port, str(seq), str(nopen)], su.env())
        cres = cli.finish(120)
        assert cli.p.returncode == 0, (cres, cli.stderr()[-2000:])
        sres = srv.finish(120)
        assert srv.p.returncode == 0, (sres, srv.stderr()[-2000:])
        assert sres["accepted"] == seq + nopen + 1
        assert cres["fds_after"] == cres["fds_before"], cres
        assert sres["fds_after"] == sres["fds_before"], sres
        assert sum(cres["tiers"].values()) == seq + nopen
        assert set(cres["tiers"]) <= {"0", "2"} and set(sres["tiers"]) <= {"0", "2"}
        if mode == "slots":
            assert cres["tiers"].get("2", 0) > 0, cres
            assert_slots_back(su.inst)
        elif mode == "shm":
            assert cres["tiers"].get("2", 0) > 0, cres
        else:
            assert cres["tiers"] == {"0": seq + nopen}
    finally:
        srv.kill()


# -- mixed peers -----------------------------------------------------------------

class Held:
    """ipc_peer's "hold" scenario: a client and server that keep one
    connection open until the test closes the client's stdin. `prefix` goes
    before the client's python (e.g. setpriv)."""

    def __init__(self, su, swrap=True, cwrap=True, prefix=()):
        self.srv = peer(su, "server", "hold", wrap=swrap)
        self.cli = None
        try:
            self.port = self.srv.wait_for("PORT ")
            self.cli = Proc(list(prefix) + [PY, PEER, "client", "hold", self.port], su.env(),
                            wrap=cwrap, stdin=subprocess.PIPE)
            self.local_port, self.tier = self.cli.wait_for("HELD ").split()
        except BaseException:
            self.kill()
            raise

    def close(self):
        self.cli.p.stdin.close()
        self.cli.p.stdin = None
        self.cli.finish(30)
        self.srv.finish(30)

    def kill(self):
        for p in (self.srv, self.cli):
            if p:
                p.kill()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.kill()


@pytest.mark.parametrize("shimmed", ["client", "server"])
def test_one_side_unshimmed(setups, shimmed):
    """Both work, on TCP (the other end is outside the group and unmarked),
    and `status` says why."""
    from shmbypass import status
    su = get_setup(setups, "shm")
    sres, cres = run_pair(su, "integrity", [200_000], [200_000],
                          swrap=shimmed == "server", cwrap=shimmed == "client")
    assert cres["echo_ok"] == [True]
    assert cres["tier"] == 0 and sres.get("tier", 0) == 0
    # the same, held open so the shimmed end's row can be read
    with Held(su, swrap=shimmed == "server", cwrap=shimmed == "client") as h:
        assert h.tier == "0"
        mine = h.local_port if shimmed == "client" else h.port
        rows = [r for r in status.connections(su.inst) if r["local"].endswith(f":{mine}")]
        assert rows and all(r["tier"] in ("tcp", "kernel") for r in rows), rows
        assert any(r["reason"] for r in rows if r["tier"] == "tcp"), rows
        h.close()


def test_status_shows_both_ends_in_shm(setups):
    """A plain blocking Python client and server, both under `shmbypass run`,
    holding their connection open: `shmbypass status --json` (the command, not
    the library's own view) shows its two ends in the shm tier, with no
    fallback reason."""
    su = get_setup(setups, "shm")
    with Held(su) as h:
        assert h.tier == "2"
        out = subprocess.run([PY, "-m", "shmbypass", "status", "--json"], env=su.env(),
                             capture_output=True, text=True, timeout=60, check=True).stdout
        ends = {h.port, h.local_port}
        rows = [r for r in json.loads(out)["connections"]
                if {r["local"].rsplit(":", 1)[1], r["remote"].rsplit(":", 1)[1]} == ends]
        assert len(rows) == 2 and all(r["tier"] == "shm" and not r["reason"] for r in rows), rows
        h.close()


def test_user_the_policy_does_not_allow(setups):
    """Only root may use the shm tier unless `up --allow-user` says more: a
    client that runs as another user (`nobody`, after setpriv drops root
    under the same preload) asks like any other, but BPF does not pair it
    in the shm tier. Its connection works (the kernel tier, which shares
    no memory), both rows in `status` say why (policy), and its
    stderr says so in one line."""
    from shmbypass import status
    need("setpriv")
    su = get_setup(setups, "shm")
    drop = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    with Held(su, prefix=drop) as h:
        assert h.tier == "0"
        rows = [r for r in status.connections(su.inst)
                if h.port in (r["local"].rsplit(":", 1)[1], r["remote"].rsplit(":", 1)[1])]
        assert len(rows) == 2 and all(r["tier"] == "kernel" for r in rows), rows
        assert {r["reason"] for r in rows} == {"policy"}, rows
        h.close()
        lines = [ln for ln in h.cli.stderr().splitlines() if "may not share memory" in ln]
        assert len(lines) == 1 and "uid 65534" in lines[0], h.cli.stderr()


# -- the shipped library and the test build ----------------------------------------

TEST_HOOKS = ("shmbypass_fd_tier", "shmbypass_fd_slots", "shmbypass_fd_rings", "shmbypass_fd_settle")


def _dynamic_symbols(lib):
    out = subprocess.run(["nm", "-D", "--defined-only", lib], capture_output=True, text=True,
                         check=True).stdout
    return {line.split()[-1] for line in out.splitlines() if line.strip()}


def test_shipped_library_has_no_test_hooks():
    """The test-only exports and SHMBYPASS_TEST_ARM_DELAY_NS exist in the test
    build only; both builds export the same libc hooks otherwise."""
    from shmbypass import paths
    shipped = paths.tool(shmtier.LIBRARY)
    test_build = paths.tool("libshmbypass-preload-test.so")
    prod, test = _dynamic_symbols(shipped), _dynamic_symbols(test_build)
    assert not prod & set(TEST_HOOKS), sorted(prod & set(TEST_HOOKS))
    assert set(TEST_HOOKS) <= test
    assert test - prod == set(TEST_HOOKS), sorted(test ^ prod)
    for lib, has in ((shipped, False), (test_build, True)):
        with open(lib, "rb") as f:
            assert (b"SHMBYPASS_TEST_ARM_DELAY_NS" in f.read()) == has, lib
    assert "socket" in prod and "epoll_wait" in prod and "splice" in prod


# -- the same data paths under AddressSanitizer + UBSan ----------------------------

@pytest.fixture(scope="module")
def san_lib(tmp_path_factory):
    """The library built with -fsanitize=address,undefined into a temp package dir."""
    cc = shutil.which("gcc") or shutil.which("cc")
    if not cc:
        pytest.skip("no C compiler")
    libasan = subprocess.run([cc, "-print-file-name=libasan.so"], capture_output=True,
                             text=True).stdout.strip()
    if not os.path.isabs(libasan) or not os.path.exists(libasan):
        pytest.skip("libasan is not installed (gcc's sanitizer runtime)")
    pkg = tmp_path_factory.mktemp("san")
    lib = pkg / "_bin" / "libshmbypass-preload-test.so"   # the test build: the peers report their tier
    p = subprocess.run(["make", "-s", "-C", os.path.join(ROOT, "native"), f"PKG={pkg}",
                        "SAN=-fsanitize=address,undefined -fno-omit-frame-pointer", str(lib)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    return {"LD_PRELOAD": os.path.realpath(libasan), "SHMBYPASS_PRELOAD": str(lib),
            "ASAN_OPTIONS": "detect_leaks=0:halt_on_error=1:abort_on_error=0",
            "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1"}


SAN_CASES = {
    "integrity": ([1, 4095, 65536, 1 << 20, 4 << 20], [1, 4095, 65536, 1 << 20, 4 << 20]),
    "flags": ((), ()),
    "poll": ([40], [40]),
    "threads": ([4, 1000], [4, 1000]),
    "fork": (["both"], ["both"]),
    "closeunread": ([300_000], [300_000]),
    "sendfile": ([2_000_000], [2_000_000]),
}


@pytest.mark.parametrize("mode", ["posix", "bell"])
@pytest.mark.parametrize("case", sorted(SAN_CASES))
def test_sanitizers(setups, san_lib, mode, case):
    su = get_setup(setups, mode)
    sargs, cargs = SAN_CASES[case]
    srv = peer(su, "server", case, *sargs, **san_lib)
    cli = None
    try:
        port = srv.wait_for("PORT ")
        cli = peer(su, "client", case, port, *cargs, **san_lib)
        cres, sres = cli.finish(120), srv.finish(120)
        errs = cli.stderr() + srv.stderr()
        assert "AddressSanitizer" not in errs and "runtime error" not in errs, errs[-4000:]
        assert cli.p.returncode == 0 and srv.p.returncode == 0, (cres, sres, errs[-3000:])
        assert cres.get("tier", 2) == 2 or case == "fork", cres
    finally:
        for p in (srv, cli):
            if p:
                p.kill()
