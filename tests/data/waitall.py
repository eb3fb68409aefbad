"""recv(MSG_WAITALL) of 100 bytes sent as 40 + 60: prints how often it came back short."""
import socket, threading, time
ls = socket.socket(); ls.bind(('127.0.0.1',0)); ls.listen()
c = socket.create_connection(ls.getsockname()); s,_ = ls.accept()
short = 0
for i in range(50):
    def w():
        c.send(b'a'*40); time.sleep(0.002); c.send(b'b'*60)
    t = threading.Thread(target=w); t.start()
    got = s.recv(100, socket.MSG_WAITALL)
    t.join()
    if len(got) != 100:
        short += 1
        got += s.recv(100 - len(got), socket.MSG_WAITALL)
print('short', short)
