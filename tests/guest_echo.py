"""Servers the VM tests run in guest B (fed to the guest's python on stdin),
listening on 10.77.0.2:PORT.

ECHO_SERVER echoes one connection, then prints the byte count and the sha256
of what it received. SINK_SERVER reads one connection to its end and creates
/tmp/sink-started once 1 MiB has arrived (the tests that kill a guest wait
for it)."""
ECHO_SERVER = """
import hashlib, socket, sys
ls = socket.create_server(("10.77.0.2", int(sys.argv[1])))
ls.settimeout(120)
c, _ = ls.accept()
c.settimeout(120)
h, n = hashlib.sha256(), 0
while True:
    b = c.recv(65536)
    if not b:
        break
    h.update(b); n += len(b)
    c.sendall(b)
c.close()
print(n, h.hexdigest())
"""

SINK_SERVER = """
import socket, sys
ls = socket.create_server(("10.77.0.2", int(sys.argv[1])))
c, _ = ls.accept()
n = 0
while True:
    b = c.recv(65536)
    if not b:
        break
    n += len(b)
    if n >= 1 << 20:
        open("/tmp/sink-started", "w").close()
"""
