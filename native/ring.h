/* SPDX-License-Identifier: GPL-2.0 */
/*
 * The shared-memory ring: one direction of one connection, held in one slot
 * of a region (see region.h). Single producer, single consumer, a byte
 * stream. Only offsets live in shared memory, never pointers: every process
 * (and every VM) maps the slot at its own address.
 *
 * Slot layout (SBP_RING_HDR_SIZE bytes of header, then the data area):
 *   cache line 0  magic, version, generation, capacity, flags, reset reason
 *                 (written at format/close/reset only: read-mostly)
 *   cache line 1  head: bytes ever written (writer stores, reader loads)
 *                 writer_waiting: the writer's futex word; writer_cpu
 *   cache line 2  tail: bytes ever read (reader stores, writer loads)
 *                 reader_waiting: the reader's futex word; reader_cpu
 *                 (the *_cpu words are spin hints: a waiter whose peer runs
 *                 on its own CPU yields instead of spinning)
 *   +4096         data, capacity bytes (a power of two); index = pos & (cap-1)
 *
 * Everything read from shared memory is untrusted. The capacity is taken
 * from the local view (the slot size the caller knows), never re-read; a
 * header whose magic/generation changed, or whose head/tail make no sense
 * (tail > head, head - tail > capacity, either moving backwards) is corrupt:
 * the call returns -EPROTO and never touches memory outside the slot.
 *
 * Return values are negative errnos, as in the kernel.
 *
 * Threads: one writer and one reader at a time per ring (callers serialise),
 * and at most one futex waiter plus one doorbell waiter per direction.
 * close/reset check magic+generation first so a stale view never flags a
 * slot that was re-formatted for another connection; slots are reused only
 * after both ends have closed.
 */
#ifndef SHMBYPASS_RING_H
#define SHMBYPASS_RING_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>
#include <sys/uio.h>

#define SBP_RING_MAGIC      0x474e495259424d53ULL  /* "SMBYRING" little-endian */
#define SBP_RING_VERSION    1u
#define SBP_RING_HDR_SIZE   4096u                  /* header area at the start of a slot */
#define SBP_RING_MIN_CAP    4096u
#define SBP_RING_MAX_CAP    (1u << 30)

/* flags (cache line 0) */
#define SBP_RING_WRITER_CLOSED  0x1u   /* FIN: reader drains, then read() returns 0 */
#define SBP_RING_READER_CLOSED  0x2u   /* writer gets -EPIPE */
#define SBP_RING_RESET          0x4u   /* both sides get -ECONNRESET */
#define SBP_RING_LINKED         0x8u   /* the stream goes on elsewhere (next_*) */
#define SBP_RING_READER_MOVED   0x10u  /* the reader followed the link: reusable */

/* Where a linked ring's stream continues (next_kind). */
#define SBP_NEXT_RING 1u               /* another ring (next_area) of the same stream */
#define SBP_NEXT_TCP  2u               /* the TCP connection, after next_bells doorbells */

/* A reader that drained a linked ring gets this instead of -EAGAIN: read
 * sbp_ring_next() and go on there. */
#define SBP_RING_GO_NEXT        (-EXDEV)

/* bits of the waiting words: how the sleeping side wants to be woken */
#define SBP_WAIT_FUTEX      0x1u       /* FUTEX_WAKE on the word */
#define SBP_WAIT_DOORBELL   0x2u       /* the other side's caller rings a doorbell */

/* read flags */
#define SBP_PEEK            0x2        /* same value as MSG_PEEK */

/* reset reasons (free for callers to extend above 0x100) */
#define SBP_RESET_NONE      0u
#define SBP_RESET_APP       1u         /* application abort (SO_LINGER 0, RST) */
#define SBP_RESET_PEER_DIED 2u
#define SBP_RESET_CORRUPT   3u         /* a call returned -EPROTO */

#define SBP_RING_SPIN_DEFAULT_NS 30000u /* upper bound of the adaptive spin */
/* Doorbell mode (the peer may be in another VM): the spin follows the
 * measured cost of a doorbell wake-up instead (see sbp_ring_set_bell_cost),
 * at most this much by default (a caller's sbp_ring_set_spin still rules). */
#define SBP_RING_SPIN_DOORBELL_MAX_NS 4000000u

/* Process-local view of a ring. Plain struct so callers can embed it; treat
 * the fields as private. */
struct sbp_ring {
	void *hdr;              /* start of the slot (struct sbp_ring_hdr) */
	unsigned char *data;    /* hdr + SBP_RING_HDR_SIZE */
	uint64_t cap;           /* trusted: derived from the local slot size */
	uint64_t generation;    /* trusted: what we formatted or attached with */
	uint64_t seen_head;     /* highest head seen: head never goes back */
	uint64_t seen_tail;     /* highest tail seen */
	uint32_t spin_max_ns;   /* 0 = never spin */
	uint32_t spin_ns;       /* current adaptive spin budget */
	uint32_t hit_ewma_ns;   /* how long waits that spinning satisfied took */
	uint32_t iter_ns;       /* what one round of the spin costs (0: not measured) */
	uint32_t misses;        /* waits in a row that spinning did not satisfy */
	uint32_t *reader_waiting; /* the futex words in the header */
	uint32_t *writer_waiting;
	int doorbell;           /* cross-VM: never futex-wake, never futex-wait */
	int peer_waiting;       /* the last write/read found the peer armed */
	int futex_broken;       /* FUTEX_WAIT said EFAULT: fall back to polling sleeps */
	int spun;               /* sbp_ring_spin_* just missed: the next wait sleeps at once */
	/* doorbell mode only: the spin's calibration (see sbp_ring_set_bell_cost) */
	uint32_t bell_ns;       /* estimated cost of a doorbell wake-up (0: not known) */
	uint32_t wait_ewma_ns;  /* how long waits take, spin or sleep */
	int64_t wait_start_ns;  /* when the current wait began (0: none) */
	int64_t armed_ns;       /* when it armed the doorbell and returned -EAGAIN */
	int armed_read;         /* that wait was for readable (1) or writable (0) */
};

/* The shared header, for reference (only ring.c and ring_wait.c touch it). */
struct sbp_ring_hdr {
	/* cache line 0: read-mostly */
	uint64_t magic;
	uint64_t generation;
	uint64_t capacity;      /* informational: checked against the local view */
	uint32_t version;
	uint32_t flags;         /* SBP_RING_* */
	uint32_t reset_reason;
	uint32_t next_kind;     /* SBP_NEXT_*: valid once SBP_RING_LINKED is set */
	uint64_t next_start;    /* stream position where the next part begins (= head) */
	uint64_t next_bells;    /* SBP_NEXT_TCP: doorbells sent on TCP before the payload */
	uint32_t next_area;     /* SBP_NEXT_RING: which area (caller's numbering) */
	uint32_t pad0;
	/* cache line 1: written by the writer */
	uint64_t head;
	uint32_t writer_waiting;
	uint32_t writer_cpu;    /* hint: CPU + 1 of the last write (0 = unknown) */
	uint32_t pad1[12];
	/* cache line 2: written by the reader */
	uint64_t tail;
	uint32_t reader_waiting;
	uint32_t reader_cpu;    /* hint: CPU + 1 of the last read (0 = unknown) */
	uint32_t pad2[12];
};

/* Capacity a slot of slot_size bytes gives: the largest power of two that
 * fits after the header; 0 if the slot is too small. */
uint64_t sbp_ring_capacity_for(size_t slot_size);

/* Writer side: initialise the header for a new connection. The magic is
 * stored last (release), so attach never sees a half-made header. */
int  sbp_ring_format(void *slot, size_t slot_size, uint64_t generation);
/* 0, -EAGAIN (not (yet) formatted with that generation), -EPROTO (bad header),
 * -EINVAL (slot too small) */
int  sbp_ring_attach(struct sbp_ring *r, void *slot, size_t slot_size, uint64_t generation);

/* Never blocks. Bytes copied (may be short), -EAGAIN full, -EPIPE reader
 * closed (or writer already closed), -ECONNRESET reset, -EPROTO corrupt. */
ssize_t sbp_ring_write(struct sbp_ring *r, const void *buf, size_t len);
ssize_t sbp_ring_writev(struct sbp_ring *r, const struct iovec *iov, int iovcnt);
/* Never blocks. Bytes, 0 = EOF (writer closed and empty), -EAGAIN empty,
 * -ECONNRESET (after what was written before the reset is drained), -EPROTO.
 * flags: SBP_PEEK (copy without consuming). */
ssize_t sbp_ring_read(struct sbp_ring *r, void *buf, size_t len, int flags);
ssize_t sbp_ring_readv(struct sbp_ring *r, const struct iovec *iov, int iovcnt, int flags);

size_t sbp_ring_readable(const struct sbp_ring *r);  /* bytes available (0 if corrupt) */
size_t sbp_ring_writable(const struct sbp_ring *r);  /* free space (0 if corrupt/closed) */
/* SBP_RING_* flags as seen now (untrusted bits, for readiness reporting). */
uint32_t sbp_ring_flags(const struct sbp_ring *r);
uint32_t sbp_ring_reset_reason(const struct sbp_ring *r);
/* 1 if a call would return -EPROTO now. */
int  sbp_ring_corrupt(const struct sbp_ring *r);

void sbp_ring_close_writer(struct sbp_ring *r);  /* FIN: reader drains then gets 0 */
void sbp_ring_close_reader(struct sbp_ring *r);  /* writer then gets -EPIPE */
void sbp_ring_reset(struct sbp_ring *r, uint32_t reason);  /* both sides: -ECONNRESET */

/* Zero-copy access, for callers that move the bytes themselves (pread into
 * the ring, write a pipe from it). One writer / one reader, as above.
 *
 * Writer: sbp_ring_reserve() describes up to max bytes of free space as at
 * most two pieces of the data area (two when it wraps; unused pieces are
 * NULL/0). Returns the bytes described, -EAGAIN full (max > 0), -EPIPE,
 * -ECONNRESET, -EPROTO, -EINVAL (iov NULL). Fill a prefix of it, then
 * sbp_ring_commit(n) publishes n bytes (n <= what was reserved; 0 is a
 * no-op) and wakes the reader like a write: check sbp_ring_peer_waiting().
 * Commit returns n, or -EPROTO if head moved since the reserve (only the
 * writer moves it), -EINVAL if n exceeds the room, -EPIPE/-ECONNRESET.
 *
 * Reader: sbp_ring_peek_iov() describes up to max readable bytes the same
 * way: bytes, 0 = EOF, -EAGAIN empty, -ECONNRESET, -EPROTO. Then
 * sbp_ring_consume(n) gives n of them back (n <= available): n, -EPROTO if
 * tail moved since the peek, -EINVAL if n is more than is there.
 *
 * The pieces point into shared memory: the peer (or a hostile process) may
 * change the bytes under you, never the bounds. */
ssize_t sbp_ring_reserve(struct sbp_ring *r, struct iovec iov[2], size_t max);
ssize_t sbp_ring_commit(struct sbp_ring *r, size_t n);
ssize_t sbp_ring_peek_iov(struct sbp_ring *r, struct iovec iov[2], size_t max);
ssize_t sbp_ring_consume(struct sbp_ring *r, size_t n);

/* ---- waiting and waking (ring_wait.c) --------------------------------- */

/* Block until the ring is readable (data, EOF, reset or corrupt: the next
 * read will not return -EAGAIN). Adaptive bounded spin first, then arm
 * reader_waiting, full fence, re-check, futex sleep.
 * 0 ready, -ETIMEDOUT, -EINTR (signal). timeout_ns < 0 = forever, 0 = poll.
 * In doorbell mode there is no futex sleep: after the spin the flag is armed
 * (SBP_WAIT_DOORBELL) and -EAGAIN is returned: wait for the doorbell. */
int  sbp_ring_wait_readable(struct sbp_ring *r, int64_t timeout_ns);
/* ... until at least min bytes are there (or EOF/reset/corrupt/linked; min
 * over the capacity counts as a full ring): SO_RCVLOWAT, MSG_PEEK|WAITALL. */
int  sbp_ring_wait_readable_min(struct sbp_ring *r, size_t min, int64_t timeout_ns);
/* Same for room to write (or reader closed/reset/corrupt). */
int  sbp_ring_wait_writable(struct sbp_ring *r, int64_t timeout_ns);

/* Only the adaptive spin of a wait, no sleep: 0 ready, -EAGAIN the budget
 * ran out (then the next sbp_ring_wait_* of that ring does not spin again).
 * For callers with work of their own to do before a sleep (the interposer
 * looks at its TCP socket): spinning first keeps that work, and its
 * syscalls, off the path of a peer that answers within microseconds. */
int  sbp_ring_spin_readable(struct sbp_ring *r);
int  sbp_ring_spin_readable_min(struct sbp_ring *r, size_t min);
int  sbp_ring_spin_writable(struct sbp_ring *r);

/* For callers that sleep elsewhere (epoll/poll on the TCP socket): arm the
 * waiting word with SBP_WAIT_DOORBELL, full fence, re-check. Returns 1 if
 * already ready (flag disarmed again: do not sleep), 0 if armed: the other
 * side's write/read will report sbp_ring_peer_waiting() and its caller sends
 * a doorbell. sbp_ring_disarm_* clears the word after waking. */
int  sbp_ring_arm_readable(struct sbp_ring *r);
int  sbp_ring_arm_readable_min(struct sbp_ring *r, size_t min);
int  sbp_ring_arm_writable(struct sbp_ring *r);
void sbp_ring_disarm_readable(struct sbp_ring *r);
void sbp_ring_disarm_writable(struct sbp_ring *r);

/* A stream that moves between rings and TCP (stream.h). The writer formats
 * a ring at any stream position; it links a ring it stops writing to the
 * next part (wakes the reader like a write) and writes there; a reader that
 * drained a linked ring gets SBP_RING_GO_NEXT and reads the link. */
int  sbp_ring_format_at(void *slot, size_t slot_size, uint64_t generation, uint64_t start);
/* Wake whoever sleeps on this ring (futex), so it looks at what changed
 * elsewhere (a request in the block header). */
void sbp_ring_kick(struct sbp_ring *r);
/* The writer, going back to TCP: the bytes its reader has not taken, as
 * stream positions [*from, *to) and the (at most 2) pieces holding them.
 * Read from the header, checked like any (-EPROTO if it makes no sense). */
int sbp_ring_unread_iov(struct sbp_ring *r, uint64_t *from, uint64_t *to, struct iovec iov[2]);
uint64_t sbp_ring_head_pos(const struct sbp_ring *r);   /* the writer's position */
uint64_t sbp_ring_tail_pos(const struct sbp_ring *r);   /* the reader's position */
void sbp_ring_link(struct sbp_ring *r, uint32_t kind, uint32_t area, uint64_t bells);
struct sbp_ring_next {
	uint32_t kind;
	uint32_t area;          /* untrusted: the caller checks its range */
	uint64_t start;         /* == the drained ring's final position */
	uint64_t bells;         /* untrusted */
};
/* 0 and *out if linked and drained; -EAGAIN not (yet); -EPROTO a link that
 * does not fit (start is not where this ring ended). */
int  sbp_ring_next(struct sbp_ring *r, struct sbp_ring_next *out);
/* The same before the reader took the ring's last bytes (a peek looks
 * ahead): the link is final once set, as is the head it names. */
int  sbp_ring_link_ahead(struct sbp_ring *r, struct sbp_ring_next *out);
/* The reader moved on: the writer may format this ring again. */
void sbp_ring_moved(struct sbp_ring *r);
/* The writer's view of a ring it linked earlier: may it be formatted again? */
int  sbp_ring_reusable(void *slot, size_t slot_size, uint64_t generation);

void sbp_ring_set_spin(struct sbp_ring *r, uint32_t spin_ns);  /* 0 = never spin */
/* Cross-VM: futex wakes cannot cross a VM boundary. With on, wait_* never
 * sleeps on a futex and write/read never FUTEX_WAKE; callers ring a doorbell
 * (a byte on the TCP socket) when sbp_ring_peer_waiting() says so. */
int  sbp_ring_doorbell_mode(struct sbp_ring *r, int on);
/* 1 if the last write (writer) or read (reader) or close found the other side
 * armed with SBP_WAIT_DOORBELL and disarmed it: send one doorbell byte now.
 * (Futex waiters are woken by the ring itself outside doorbell mode.) */
int  sbp_ring_peer_waiting(const struct sbp_ring *r);

/* Doorbell mode's spin: two kernels, so a sleeping waiter costs its peer a
 * doorbell (a TCP segment through both guests' stacks, then a wake-up), and
 * a guest under TCG runs about 30x slower than the host: the fixed 30 us
 * spin ends before the peer VM can answer, and every wait pays a doorbell.
 * The classic rule instead: spin about as long as blocking costs (here 2x
 * the doorbell's cost, so a waiter also rides out its peer's own doorbell
 * wake-up), bounded by spin_max_ns, and short (1/8) when waits have been
 * taking much longer than that (a slow or idle peer: spinning would only
 * burn CPU). The cost is seeded by the caller (e.g. the TCP connection's
 * RTT, tcpi_rtt) and refined by every sleep: after wait_* returned -EAGAIN
 * and the caller slept and woke, sbp_ring_note_wakeup() takes the time from
 * arming to readiness as a sample (falling fast to lower samples, rising
 * slowly to higher ones, ignoring samples over 4x the estimate: a peer that
 * took its time says nothing about doorbells). Both are no-ops outside
 * doorbell mode. */
void sbp_ring_set_bell_cost(struct sbp_ring *r, uint32_t cost_ns);
void sbp_ring_note_wakeup(struct sbp_ring *r);
/* The spin the next wait would use (ns), for tests and status. */
uint32_t sbp_ring_spin_budget(const struct sbp_ring *r);

/* Like sbp_ring_arm_writable, but the reader rings only once at least
 * min_room bytes are free (rounded up to KiB, at most the capacity): a
 * reader taking small pieces does not wake the writer for each (as TCP
 * wakes a writer only past a low-water mark). Doorbell waiters only; the
 * wish lives in bits SBP_WAIT_ROOM_SHIFT.. of the writer's waiting word. */
#define SBP_WAIT_ROOM_SHIFT 8
int  sbp_ring_arm_writable_min(struct sbp_ring *r, size_t min_room);

#endif
