"""Many connections from one process (tests/test_interposer.py,
test_stress.py, test_scale.py: `holdclient`) and asyncio streams (test_apps_interposer.py): the
`manyserver`/`manyclient` and `aioserver`/`aioclient` roles of ipc_peer.py."""
import os
import random
import socket
import sys

from ipc_common import HOST, FAMILY, out, rings as live_rings, tier  # noqa: F401

# ---------------------------------------------------------------------------
# asyncio streams: `aioserver` prints PORT and serves N clients; `aioclient`
# runs N concurrent clients, each sending and reading back messages.

async def _aio_server(n):
    import asyncio
    done = asyncio.Event()
    served = 0

    async def handle(reader, writer):
        nonlocal served
        while True:
            line = await reader.readline()
            if not line:
                break
            writer.write(line[::-1][1:] + b"\n")
            await writer.drain()
        writer.close()
        served += 1
        if served == n:
            done.set()
    srv = await asyncio.start_server(handle, HOST, 0)
    print(f"PORT {srv.sockets[0].getsockname()[1]}", flush=True)
    async with srv:
        await done.wait()
    out(served=served)


async def _aio_client(port, n, msgs):
    import asyncio

    async def one(i):
        reader, writer = await asyncio.open_connection(HOST, port)
        t = tier(writer.get_extra_info("socket").fileno())
        ok = True
        for j in range(msgs):
            msg = f"{i}:{j}:".encode() + os.urandom(random.randint(1, 3000)).hex().encode()
            writer.write(msg + b"\n")
            await writer.drain()
            back = await reader.readline()
            ok &= back == msg[::-1] + b"\n"
        writer.close()
        await writer.wait_closed()
        return ok, t
    res = await asyncio.gather(*(one(i) for i in range(n)))
    out(ok=all(r[0] for r in res), tiers=sorted({r[1] for r in res}))


def rss_kib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _room_for_fds(n):
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < n + 256 and os.geteuid() == 0:
        hard = n + 256          # root may raise it (up to fs.nr_open)
    want = min(hard, max(soft, n + 256))
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def rss_shmem_kib():
    """Shared memory this process has touched (its pair regions, channel pages)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssShmem:"):
                return int(line.split()[1])
    return 0


def many_server(args):
    """Echo one byte per connection for `total` connections (epoll), then
    report how many fds this process has open and its memory: at the 1000th
    connection (warm), when the last `nopen` connections begin (seq: the
    ones before were one at a time) and at the end."""
    import selectors
    total = int(args[0])
    nopen = int(args[1]) if len(args) > 1 else 0
    _room_for_fds(nopen)
    ls = socket.socket(FAMILY, socket.SOCK_STREAM)
    ls.bind((HOST, 0))
    ls.listen(1024)
    ls.setblocking(False)
    fds_before = len(os.listdir("/proc/self/fd"))  # after the library opened its map
    print(f"PORT {ls.getsockname()[1]}", flush=True)
    sel = selectors.DefaultSelector()
    sel.register(ls, selectors.EVENT_READ)
    accepted = closed = 0
    tiers = {}
    rss_warm = rss_seq = 0
    while closed < total:
        ready = sel.select(10)
        if not ready:
            print(f"STALL accepted {accepted} closed {closed} registered "
                  f"{len(sel.get_map()) - 1}", file=sys.stderr, flush=True)
        for key, _ in ready:
            if key.fileobj is ls:
                while True:
                    try:
                        c, _ = ls.accept()
                    except BlockingIOError:
                        break
                    c.setblocking(False)
                    accepted += 1
                    if accepted == min(1000, total // 2):
                        rss_warm = rss_kib()    # after the library's tables grew
                    if accepted == total - nopen + 1:
                        rss_seq = rss_kib()
                    t = tier(c)
                    tiers[t] = tiers.get(t, 0) + 1
                    sel.register(c, selectors.EVENT_READ)
                continue
            c = key.fileobj
            try:
                b = c.recv(1 << 16)
            except (BlockingIOError, InterruptedError):
                continue
            except ConnectionError:
                b = b""
            if b:
                c.sendall(b)
            else:
                sel.unregister(c)
                c.close()
                closed += 1
    sel.unregister(ls)
    sel.close()
    fds_after = len(os.listdir("/proc/self/fd"))
    ls.close()
    out(accepted=accepted, tiers={str(k): v for k, v in tiers.items()},
        fds_before=fds_before, fds_after=fds_after, rss_warm_kib=rss_warm,
        rss_seq_kib=rss_seq, rss_end_kib=rss_kib())


def many_client(args):
    port, seq, nopen = int(args[0]), int(args[1]), int(args[2])
    _room_for_fds(nopen)
    s = socket.create_connection((HOST, port))      # warm-up: the library opens its map
    s.sendall(b"w")
    s.recv(1)
    s.close()
    fds_before = len(os.listdir("/proc/self/fd"))
    tiers = {}
    rss_warm = 0
    for i in range(seq):
        if i == min(1000, seq // 2):
            rss_warm = rss_kib()
        s = socket.create_connection((HOST, port))
        s.sendall(b"x")
        assert s.recv(1) == b"x"
        t = tier(s)
        tiers[t] = tiers.get(t, 0) + 1
        s.close()
    rss_seq = rss_kib()
    socks = [socket.create_connection((HOST, port)) for _ in range(nopen)]
    for s in socks:
        s.sendall(b"y")
    rings = 0  # of the concurrent ones: went live (shmbypass_fd_rings)
    for s in socks:
        assert s.recv(1) == b"y"
        t = tier(s)
        tiers[t] = tiers.get(t, 0) + 1
        rings += bool(live_rings(s))
    for s in socks:
        s.close()
    out(tiers={str(k): v for k, v in tiers.items()}, fds_before=fds_before,
        fds_after=len(os.listdir("/proc/self/fd")), rss_warm_kib=rss_warm,
        rss_seq_kib=rss_seq, rss_end_kib=rss_kib(), rings=rings)


def ping_and_echo(s, nbytes):
    """Ping until both directions use rings (a connection is not live until
    used), then echo nbytes of random bytes in 4 KiB exchanges: (pings,
    whether every byte came back)."""
    k = 0
    while live_rings(s) != 3 and k < 100:
        s.sendall(b"p")
        assert s.recv(1) == b"p"
        k += 1
    data, got = os.urandom(nbytes), bytearray()
    for off in range(0, len(data), 4096):
        s.sendall(data[off:off + 4096])
        while len(got) < off + 4096:
            got += s.recv(off + 4096 - len(got))
    return k, got == data


def hold_client(args):
    """`n` connections to `port`, held: prints "HELD <n> <RssShmem KiB before
    them>" and waits for a line on stdin (the test looks at them idle);
    then one byte each way on all of them at once, and, on `nsample` of
    them spread over the range, pings until both
    directions use rings and echoes 32 KiB of random bytes in 4 KiB
    exchanges; prints "SAMPLED", waits for another line, closes them all."""
    port, n, nsample = int(args[0]), int(args[1]), int(args[2])
    _room_for_fds(n)
    before = rss_shmem_kib()
    socks = [socket.create_connection((HOST, port)) for _ in range(n)]
    tiers = {}
    for s in socks:
        t = tier(s)
        tiers[t] = tiers.get(t, 0) + 1
    print(f"HELD {n} {before}", flush=True)
    sys.stdin.readline()
    for s in socks:             # one byte each way on every one, all at once
        s.sendall(b"t")
    for s in socks:
        assert s.recv(1) == b"t"
    pings, ok, both = [], 0, 0
    for s in (socks[i * n // nsample] for i in range(nsample)):
        k, same = ping_and_echo(s, 32768)
        pings.append(k)
        ok += same
        both += live_rings(s) == 3
    print("SAMPLED", flush=True)
    sys.stdin.readline()
    for s in socks:
        s.close()
    out(tiers={str(k): v for k, v in tiers.items()}, sampled=nsample, echo_ok=ok, both_rings=both,
        max_pings=max(pings), pings=sum(pings))


def fork_server(args):
    """`total` connections, one child each: the parent closes its copy at
    once; the child echoes until EOF and exits without a close (the kernel
    closes the socket)."""
    import signal
    total = int(args[0])
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)   # children reaped for us
    ls = socket.socket(FAMILY, socket.SOCK_STREAM)
    ls.bind((HOST, 0))
    ls.listen(16)
    print(f"PORT {ls.getsockname()[1]}", flush=True)
    for _ in range(total):
        c, _ = ls.accept()
        if os.fork() == 0:
            ls.close()
            while data := c.recv(65536):
                c.sendall(data)
            os._exit(0)
        c.close()
    out(accepted=total)


def seq_client(args):
    """`n` connections one after the other: each pings until both
    directions use rings, echoes 16 KiB of random bytes in 4 KiB exchanges
    and closes."""
    port, n = int(args[0]), int(args[1])
    tiers, ok, both = {}, 0, 0
    for _ in range(n):
        s = socket.create_connection((HOST, port))
        ok += ping_and_echo(s, 16384)[1]
        both += live_rings(s) == 3
        t = tier(s)
        tiers[t] = tiers.get(t, 0) + 1
        s.close()
    out(tiers={str(k): v for k, v in tiers.items()}, echo_ok=ok, both_rings=both)


def aio(role, args):
    import asyncio
    if role == "aioserver":
        asyncio.run(_aio_server(int(args[0])))
    else:
        asyncio.run(_aio_client(int(args[0]), int(args[1]), int(args[2])))
