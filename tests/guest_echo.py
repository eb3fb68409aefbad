"""The echo server the VM tests run in guest B (fed to the guest's python on
stdin): 10.77.0.2:PORT, echoes one connection, then prints the byte count
and the sha256 of what it received."""
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
