"""One side of the half-close reproduction (run as its own process, so the
LD_PRELOAD guard is present or absent as the test chooses).

    python halfclose_peer.py NETNS server IP PORT TRIALS
    python halfclose_peer.py NETNS client IP PORT TRIALS

The client sends, calls shutdown(SHUT_WR) and waits in a blocking recv()
for the server to close; the server reads to EOF, waits 50 ms, closes.
Prints one JSON line: {"eagain": N, "ok": M}."""
import errno
import json
import socket
import sys
import time

from pyroute2 import netns

ns, role, ip, port, trials = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
netns.setns(ns)
eagain = ok = 0
if role == "server":
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind((ip, port))
    ls.listen()
    print("listening", flush=True)
    for _ in range(trials):
        s, _ = ls.accept()
        while s.recv(65536):
            pass
        time.sleep(0.05)
        s.close()
else:
    for _ in range(trials):
        c = socket.create_connection((ip, port))
        c.sendall(b"q" * 1024)
        c.shutdown(socket.SHUT_WR)
        try:
            assert c.recv(1) == b""
            ok += 1
        except OSError as e:
            if e.errno != errno.EAGAIN:
                raise
            eagain += 1
        c.close()
print(json.dumps({"eagain": eagain, "ok": ok}), flush=True)
