"""Four threads send 64-byte records on one socket at once (each sendall
whole); the reader sees every record intact, each thread's in order."""
import struct
import threading

import runtime as rt

THREADS, PER, REC = 4, 2000, 64


def server(srv):
    c = srv.conn()
    data = rt.recv_n(c, THREADS * PER * REC)
    seqs, bad = {t: -1 for t in range(THREADS)}, 0
    for off in range(0, len(data), REC):
        tid, seq = struct.unpack_from("!II", data, off)
        if tid not in seqs or seq != seqs[tid] + 1 or data[off + 8:off + REC] != bytes([tid]) * (REC - 8):
            bad += 1
            continue
        seqs[tid] = seq
    rt.obs("bytes", len(data))
    rt.obs("bad records", bad)
    rt.obs("complete", all(v == PER - 1 for v in seqs.values()))
    c.sendall(b"done")
    c.close()


def client(cli):
    s = cli.conn()

    def run(tid):
        for seq in range(PER):
            s.sendall(struct.pack("!II", tid, seq) + bytes([tid]) * (REC - 8))
    ts = [threading.Thread(target=run, args=(t,)) for t in range(THREADS)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    rt.obs("reply", rt.call(rt.recv_all, s))
    s.close()
