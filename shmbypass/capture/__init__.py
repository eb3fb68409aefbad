"""`shmbypass capture`: a pcap of the bytes that bypassed connections carry
(docs/CAPTURE.md).

No packet of a bypassed connection's payload exists, so a capture records
what the packets would have carried and shmbypass/pcap.py rebuilds them:

- the kernel tier: bpf/capture.bpf.c, loaded by this command for as long as
  it runs, writes each redirected send and each socket's ESTABLISHED, FIN
  and RST into one BPF ring buffer (read here through its mmap);
- the shm tier: the interposer (native/preload/capture.c) writes each send
  into a ring of its process's own under /run/<instance>/capture.d/; this
  command reads every one of them, trusting nothing in them.

Records become pcap flows keyed by the connection (both addresses and
ports, both ISNs): sequence numbers continue from the real ISNs, a record
that was lost leaves a gap where its bytes were, and the summary says how
many were lost.

A capture leaves nothing on when it ends, even killed: the kernel empties
the core's program array when this command's fd of it closes (bpf/capture.h),
the sockops program's link is this command's fd, and the interposers stop
writing when the lease this command renews runs out. The flags it set stay
until the next capture or `up` resets them (reset_if_stale).

control.py   the flag files every interposed process maps, made at `up`; resetting
             the flags a killed capture left on
rings.py     reading the rings: the kernel tier's BPF ring buffer, the interposers' rings
flows.py     records to pcap flows: which socket is which end of which connection
session.py   one capture: set up, read, write, undone
cli.py       `shmbypass capture` itself
"""
