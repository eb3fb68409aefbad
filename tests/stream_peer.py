"""A held connection that moves known bytes both ways, for tests that look
at a live connection from outside (status, down, features).

    python stream_peer.py server SIZE     prints "PORT <n>"; sends SIZE bytes,
                                          reads to EOF, prints "GOT <sha256>"
    python stream_peer.py client PORT SIZE  sends SIZE bytes, reads SIZE, prints
                                          "HELD <local port> <sha256 of what came>",
                                          then holds the connection until stdin closes
The bytes are pattern(SIZE, seed): seed 1 from the server, 2 from the client.
"""
import hashlib
import socket
import sys
import threading


def pattern(size, seed):
    block = hashlib.sha256(bytes([seed])).digest() * 2048
    return (block * (size // len(block) + 1))[:size]


def recv_n(s, n):
    buf = bytearray()
    while len(buf) < n:
        b = s.recv(min(n - len(buf), 1 << 20))
        if not b:
            break
        buf += b
    return bytes(buf)


def server(size):
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(8)
    print("PORT", ls.getsockname()[1], flush=True)
    c, _ = ls.accept()
    t = threading.Thread(target=c.sendall, args=(pattern(size, 1),))
    t.start()
    got = bytearray()
    while True:
        b = c.recv(1 << 20)
        if not b:
            break
        got += b
    t.join()
    print("GOT", hashlib.sha256(got).hexdigest(), flush=True)
    c.close()


def client(port, size):
    s = socket.create_connection(("127.0.0.1", port))
    t = threading.Thread(target=s.sendall, args=(pattern(size, 2),))
    t.start()
    got = recv_n(s, size)
    t.join()
    print("HELD", s.getsockname()[1], hashlib.sha256(got).hexdigest(), flush=True)
    sys.stdin.read()
    s.close()


if __name__ == "__main__":
    if sys.argv[1] == "server":
        server(int(sys.argv[2]))
    else:
        client(int(sys.argv[2]), int(sys.argv[3]))
