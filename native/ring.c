// SPDX-License-Identifier: GPL-2.0
/*
 * SPSC byte ring in shared memory. See ring.h for the layout and the rules.
 *
 * Ordering in one picture:
 *   writer: copy bytes; store-release head;  full fence; load reader_waiting
 *   reader: load-acquire head; copy bytes; store-release tail; full fence;
 *           load writer_waiting
 *   sleeper: spin; arm own waiting word; full fence; re-check; FUTEX_WAIT
 * The two fences make the "publish, then look for a sleeper" / "arm, then
 * look for data" pair a Dekker handshake: one of the two sides always sees
 * the other, so a wake-up is never lost.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE             /* sched_getcpu (the cffi build does not set it) */
#endif
#include <errno.h>
#include <limits.h>
#include <linux/futex.h>
#include <sched.h>
#include <stdbool.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "ring.h"
#include "sys.h"

_Static_assert(sizeof(struct sbp_ring_hdr) == 192, "ring header: three cache lines");
_Static_assert(offsetof(struct sbp_ring_hdr, head) == 64, "head on cache line 1");
_Static_assert(offsetof(struct sbp_ring_hdr, tail) == 128, "tail on cache line 2");
_Static_assert(sizeof(struct sbp_ring_hdr) <= SBP_RING_HDR_SIZE, "header fits");

#define LOAD(p)          __atomic_load_n((p), __ATOMIC_RELAXED)
#define LOAD_ACQ(p)      __atomic_load_n((p), __ATOMIC_ACQUIRE)
#define STORE(p, v)      __atomic_store_n((p), (v), __ATOMIC_RELAXED)
#define STORE_REL(p, v)  __atomic_store_n((p), (v), __ATOMIC_RELEASE)
#define FULL_FENCE()     __atomic_thread_fence(__ATOMIC_SEQ_CST)

static inline struct sbp_ring_hdr *H(const struct sbp_ring *r)
{
	return (struct sbp_ring_hdr *)r->hdr;
}

/* Non-private futex calls: the memory is MAP_SHARED between processes. */
static int futex_wait(uint32_t *word, uint32_t val, int64_t timeout_ns)
{
	struct timespec ts, *tp = NULL;

	if (timeout_ns >= 0) {
		ts.tv_sec = timeout_ns / 1000000000;
		ts.tv_nsec = timeout_ns % 1000000000;
		tp = &ts;
	}
	if (syscall(SYS_futex, word, FUTEX_WAIT, val, tp, NULL, 0) == 0)
		return 0;
	return -errno;
}

static void futex_wake(uint32_t *word)
{
	syscall(SYS_futex, word, FUTEX_WAKE, INT_MAX, NULL, NULL, 0);
}

uint64_t sbp_ring_capacity_for(size_t slot_size)
{
	uint64_t room, cap;

	if (slot_size < SBP_RING_HDR_SIZE + SBP_RING_MIN_CAP)
		return 0;
	room = slot_size - SBP_RING_HDR_SIZE;
	cap = SBP_RING_MAX_CAP;
	while (cap > room)
		cap >>= 1;
	return cap;
}

/* Cache line 0 still describes our connection. Every call starts here, so a
 * slot re-formatted under a stale view (or scribbled on) stops it at once. */
static inline bool line0_ok(const struct sbp_ring *r)
{
	const struct sbp_ring_hdr *h = H(r);

	return r->hdr && LOAD(&h->magic) == SBP_RING_MAGIC &&
	       LOAD(&h->generation) == r->generation &&
	       LOAD(&h->capacity) == r->cap;
}

/* A consistent head/tail pair or false. Positions are monotonic u64 byte
 * counts; tail <= head <= tail + cap, and neither may go back. Also records
 * the positions seen so the next call can check monotonicity. */
static inline bool positions_ok(struct sbp_ring *r, uint64_t head, uint64_t tail)
{
	if (tail > head || head - tail > r->cap)
		return false;
	if (head < r->seen_head || tail < r->seen_tail)
		return false;
	r->seen_head = head;
	r->seen_tail = tail;
	return true;
}

/* Same check without recording (for the const query functions). */
static inline bool positions_sane(const struct sbp_ring *r, uint64_t head, uint64_t tail)
{
	return tail <= head && head - tail <= r->cap &&
	       head >= r->seen_head && tail >= r->seen_tail;
}

int sbp_ring_format(void *slot, size_t slot_size, uint64_t generation)
{
	struct sbp_ring_hdr *h = slot;
	uint64_t cap = sbp_ring_capacity_for(slot_size);

	if (!slot || !cap)
		return -EINVAL;
	/* Invalidate first: an attach racing with us sees magic 0 (-EAGAIN). */
	STORE(&h->magic, 0);
	FULL_FENCE();
	STORE(&h->generation, generation);
	STORE(&h->capacity, cap);
	STORE(&h->version, SBP_RING_VERSION);
	STORE(&h->flags, 0);
	STORE(&h->reset_reason, 0);
	STORE(&h->head, 0);
	STORE(&h->tail, 0);
	STORE(&h->writer_waiting, 0);
	STORE(&h->reader_waiting, 0);
	STORE(&h->writer_cpu, 0);
	STORE(&h->reader_cpu, 0);
	/* SYNC POINT: format: whoever load-acquires the magic sees the rest. */
	STORE_REL(&h->magic, SBP_RING_MAGIC);
	return 0;
}

int sbp_ring_attach(struct sbp_ring *r, void *slot, size_t slot_size, uint64_t generation)
{
	struct sbp_ring_hdr *h = slot;
	uint64_t cap = sbp_ring_capacity_for(slot_size);
	uint64_t magic, head, tail;

	if (!r || !slot || !cap)
		return -EINVAL;
	memset(r, 0, sizeof(*r));
	/* SYNC POINT: attach: pairs with the release of the magic in format. */
	magic = LOAD_ACQ(&h->magic);
	if (magic == 0)
		return -EAGAIN;
	if (magic != SBP_RING_MAGIC || LOAD(&h->version) != SBP_RING_VERSION)
		return -EPROTO;
	if (LOAD(&h->generation) != generation)
		return -EAGAIN;     /* another connection's ring (older or newer) */
	if (LOAD(&h->capacity) != cap)
		return -EPROTO;
	/* SYNC POINT: attach during format. The first magic may be the slot's
	 * previous one, read before the format began, and then head/tail could
	 * still be the old connection's (a head that later "goes back" to 0
	 * looks like corruption). Our generation is stored after the format
	 * cleared the magic, so a magic read after it (acquire fence, then
	 * load-acquire) is that format's final release store or 0: if it is
	 * set, head and tail read after it are the formatted ones or newer. */
	__atomic_thread_fence(__ATOMIC_ACQUIRE);
	if (LOAD_ACQ(&h->magic) != SBP_RING_MAGIC)
		return -EAGAIN;
	head = LOAD_ACQ(&h->head);
	tail = LOAD_ACQ(&h->tail);
	r->hdr = slot;
	r->data = (unsigned char *)slot + SBP_RING_HDR_SIZE;
	r->cap = cap;
	r->generation = generation;
	r->reader_waiting = &h->reader_waiting;
	r->writer_waiting = &h->writer_waiting;
	r->spin_max_ns = SBP_RING_SPIN_DEFAULT_NS;
	r->spin_ns = SBP_RING_SPIN_DEFAULT_NS;
	if (!positions_ok(r, head, tail)) {
		memset(r, 0, sizeof(*r));
		return -EPROTO;
	}
	return 0;
}

void sbp_ring_set_wait_words(struct sbp_ring *r, uint32_t *reader_waiting, uint32_t *writer_waiting)
{
	if (!r->hdr)
		return;
	r->reader_waiting = reader_waiting ? reader_waiting : &H(r)->reader_waiting;
	r->writer_waiting = writer_waiting ? writer_waiting : &H(r)->writer_waiting;
}

/* After publishing (head, tail or a flag): wake the other side if it armed
 * its word. The fast path is one load of a line nobody writes while the
 * other side is busy. */
static void wake_peer(struct sbp_ring *r, uint32_t *word)
{
	uint32_t armed;

	/* SYNC POINT: publish -> look for a sleeper (pairs with arm -> re-check). */
	FULL_FENCE();
	if (LOAD(word) == 0)
		return;
	armed = __atomic_exchange_n(word, 0, __ATOMIC_SEQ_CST);
	if (r->doorbell) {
		if (armed)
			r->peer_waiting = 1;
		return;
	}
	if (armed & SBP_WAIT_FUTEX)
		futex_wake(word);
	if (armed & SBP_WAIT_DOORBELL)
		r->peer_waiting = 1;
}

/* The reader gave room back (tail is the new tail, head what it loaded):
 * wake the writer, unless it armed for doorbells with a minimum of room
 * (sbp_ring_arm_writable_min) that is not free yet. A stale head only makes
 * the room look bigger (a spurious wake-up, never a lost one). The minimum
 * is at most the capacity, so the writer is woken at the latest when the
 * ring is empty; a reader stops short of that only when it chooses to stop
 * reading, as over TCP. A futex sleeper is always woken. */
static void wake_writer(struct sbp_ring *r, uint64_t head, uint64_t tail)
{
	uint32_t w;
	uint64_t want;

	/* SYNC POINT: publish -> look for a sleeper (as wake_peer). */
	FULL_FENCE();
	w = LOAD(r->writer_waiting);
	if (w == 0)
		return;
	want = (uint64_t)(w >> SBP_WAIT_ROOM_SHIFT) << 10;
	if (want && !(w & SBP_WAIT_FUTEX)) {
		if (want > r->cap)
			want = r->cap;          /* untrusted bits: never more than a drained ring */
		if (tail <= head && r->cap - (head - tail) < want)
			return;
	}
	wake_peer(r, r->writer_waiting);
}

/* Big copies are published in pieces of this size so the other side can
 * work on the first piece while we copy the next. */
#define SBP_RING_CHUNK (64u * 1024)

/* Copy n bytes at ring position pos (wraps); n <= cap is the caller's job. */
static inline void copy_in(struct sbp_ring *r, uint64_t pos, const void *src, size_t n)
{
	size_t off = pos & (r->cap - 1), first = r->cap - off;

	if (first >= n) {
		memcpy(r->data + off, src, n);
	} else {
		memcpy(r->data + off, src, first);
		memcpy(r->data, (const char *)src + first, n - first);
	}
}

static inline void copy_out(const struct sbp_ring *r, uint64_t pos, void *dst, size_t n)
{
	size_t off = pos & (r->cap - 1), first = r->cap - off;

	if (first >= n) {
		memcpy(dst, r->data + off, n);
	} else {
		memcpy(dst, r->data + off, first);
		memcpy((char *)dst + first, r->data, n - first);
	}
}

/* What a write would see now: 0 with head and tail (checked), or the
 * error it gets (-EPROTO corrupt, -ECONNRESET reset, -EPIPE closed). */
static int writer_view(struct sbp_ring *r, uint64_t *head, uint64_t *tail)
{
	struct sbp_ring_hdr *h;
	uint32_t flags;

	if (!line0_ok(r))
		return -EPROTO;
	h = H(r);
	flags = LOAD_ACQ(&h->flags);
	if (flags & SBP_RING_RESET)
		return -ECONNRESET;
	if (flags & (SBP_RING_READER_CLOSED | SBP_RING_WRITER_CLOSED))
		return -EPIPE;
	*head = LOAD(&h->head);         /* ours, but checked like the rest */
	/* SYNC POINT: writer acquires tail: the reader is done with the bytes below it. */
	*tail = LOAD_ACQ(&h->tail);
	return positions_ok(r, *head, *tail) ? 0 : -EPROTO;
}

ssize_t sbp_ring_writev(struct sbp_ring *r, const struct iovec *iov, int iovcnt)
{
	struct sbp_ring_hdr *h = H(r);
	uint64_t head, tail, room, done = 0, published = 0;
	int i, rc;

	r->peer_waiting = 0;
	if (iovcnt < 0 || (!iov && iovcnt))
		return -EINVAL;
	rc = writer_view(r, &head, &tail);
	if (rc < 0)
		return rc;
	room = r->cap - (head - tail);
	for (i = 0; i < iovcnt && done < room; i++) {
		const char *src = iov[i].iov_base;
		size_t left = iov[i].iov_len;

		while (left && done < room) {
			size_t n = left < SBP_RING_CHUNK ? left : SBP_RING_CHUNK;

			if (n > room - done)
				n = room - done;
			copy_in(r, head + done, src, n);
			src += n;
			left -= n;
			done += n;
			if (done >= published + SBP_RING_CHUNK) {
				/* a big write: let the reader start on what is there */
				STORE_REL(&h->head, head + done);
				published = done;
				wake_peer(r, r->reader_waiting);
			}
		}
		if (left)
			break;
	}
	if (done == 0) {
		for (; i < iovcnt; i++)
			if (iov[i].iov_len)
				return -EAGAIN;  /* full */
		return 0;                /* nothing asked */
	}
	r->seen_head = head + done;
	STORE(&h->writer_cpu, (uint32_t)(sched_getcpu() + 1));  /* a hint for waiters */
	if (published == done)
		return (ssize_t)done;
	/* SYNC POINT: producer: the bytes are visible before the new head. */
	STORE_REL(&h->head, head + done);
	wake_peer(r, r->reader_waiting);
	return (ssize_t)done;
}

ssize_t sbp_ring_write(struct sbp_ring *r, const void *buf, size_t len)
{
	struct iovec iov = { .iov_base = (void *)buf, .iov_len = len };

	return sbp_ring_writev(r, &iov, 1);
}

/* What a read would see now: 0 with head, tail (checked) and the flags, or
 * -EPROTO. Flags before head: if WRITER_CLOSED is seen, so is the final head. */
static int reader_view(struct sbp_ring *r, uint64_t *head, uint64_t *tail, uint32_t *flags)
{
	struct sbp_ring_hdr *h;

	if (!line0_ok(r))
		return -EPROTO;
	h = H(r);
	*flags = LOAD_ACQ(&h->flags);
	/* SYNC POINT: consumer acquires head: the bytes below it are written. */
	*head = LOAD_ACQ(&h->head);
	*tail = LOAD(&h->tail);         /* ours, but checked like the rest */
	return positions_ok(r, *head, *tail) ? 0 : -EPROTO;
}

/* An empty ring: reset, EOF (writer closed), or nothing yet (-EAGAIN, or 0
 * for a caller that asked for nothing). */
static ssize_t empty_ring(uint32_t flags, int asked)
{
	if (flags & SBP_RING_RESET)
		return -ECONNRESET;
	if (flags & SBP_RING_WRITER_CLOSED)
		return 0;
	return asked ? -EAGAIN : 0;
}

ssize_t sbp_ring_readv(struct sbp_ring *r, const struct iovec *iov, int iovcnt, int flags)
{
	struct sbp_ring_hdr *h = H(r);
	uint64_t head, tail, avail, done = 0, released = 0;
	uint32_t rflags;
	int i, rc, asked = 0;

	r->peer_waiting = 0;
	if (iovcnt < 0 || (!iov && iovcnt))
		return -EINVAL;
	rc = reader_view(r, &head, &tail, &rflags);
	if (rc < 0)
		return rc;
	avail = head - tail;
	if (avail == 0) {
		for (i = 0; i < iovcnt; i++)
			asked |= iov[i].iov_len != 0;
		return empty_ring(rflags, asked);
	}
	for (i = 0; i < iovcnt && done < avail; i++) {
		char *dst = iov[i].iov_base;
		size_t left = iov[i].iov_len;

		while (left && done < avail) {
			size_t n = left < SBP_RING_CHUNK ? left : SBP_RING_CHUNK;

			if (n > avail - done)
				n = avail - done;
			copy_out(r, tail + done, dst, n);
			dst += n;
			left -= n;
			done += n;
			if (!(flags & SBP_PEEK) && done >= released + SBP_RING_CHUNK) {
				/* a big read: give room back to the writer early */
				STORE_REL(&h->tail, tail + done);
				released = done;
				wake_writer(r, head, tail + done);
			}
		}
		if (left)
			break;
	}
	if (done == 0 || (flags & SBP_PEEK))
		return (ssize_t)done;
	r->seen_tail = tail + done;
	STORE(&h->reader_cpu, (uint32_t)(sched_getcpu() + 1));  /* a hint for waiters */
	if (released == done)
		return (ssize_t)done;
	/* SYNC POINT: consumer: done reading the bytes before giving them back. */
	STORE_REL(&h->tail, tail + done);
	wake_writer(r, head, tail + done);
	return (ssize_t)done;
}

ssize_t sbp_ring_read(struct sbp_ring *r, void *buf, size_t len, int flags)
{
	struct iovec iov = { .iov_base = buf, .iov_len = len };

	return sbp_ring_readv(r, &iov, 1, flags);
}

size_t sbp_ring_readable(const struct sbp_ring *r)
{
	uint64_t head, tail;

	if (!line0_ok(r))
		return 0;
	head = LOAD_ACQ(&H(r)->head);
	tail = LOAD(&H(r)->tail);
	return positions_sane(r, head, tail) ? (size_t)(head - tail) : 0;
}

size_t sbp_ring_writable(const struct sbp_ring *r)
{
	uint64_t head, tail;

	if (!line0_ok(r) || (LOAD(&H(r)->flags) & (SBP_RING_RESET | SBP_RING_READER_CLOSED |
						    SBP_RING_WRITER_CLOSED)))
		return 0;
	head = LOAD(&H(r)->head);
	tail = LOAD_ACQ(&H(r)->tail);
	return positions_sane(r, head, tail) ? (size_t)(r->cap - (head - tail)) : 0;
}

uint32_t sbp_ring_flags(const struct sbp_ring *r)
{
	return line0_ok(r) ? LOAD_ACQ(&H(r)->flags) : 0;
}

uint32_t sbp_ring_reset_reason(const struct sbp_ring *r)
{
	return line0_ok(r) ? LOAD(&H(r)->reset_reason) : 0;
}

int sbp_ring_corrupt(const struct sbp_ring *r)
{
	if (!line0_ok(r))
		return 1;
	return !positions_sane(r, LOAD(&H(r)->head), LOAD(&H(r)->tail));
}

/* Would read() return something other than -EAGAIN? */
static bool read_ready(const struct sbp_ring *r)
{
	uint64_t head, tail;

	if (!line0_ok(r))
		return true;
	if (LOAD_ACQ(&H(r)->flags) & (SBP_RING_WRITER_CLOSED | SBP_RING_RESET))
		return true;
	head = LOAD_ACQ(&H(r)->head);
	tail = LOAD(&H(r)->tail);
	return !positions_sane(r, head, tail) || head != tail;
}

/* Would write() return something other than -EAGAIN? */
static bool write_ready(const struct sbp_ring *r)
{
	uint64_t head, tail;

	if (!line0_ok(r))
		return true;
	if (LOAD_ACQ(&H(r)->flags) & (SBP_RING_READER_CLOSED | SBP_RING_WRITER_CLOSED | SBP_RING_RESET))
		return true;
	head = LOAD(&H(r)->head);
	tail = LOAD_ACQ(&H(r)->tail);
	return !positions_sane(r, head, tail) || head - tail < r->cap;
}

/* Adaptive spin: a wait satisfied while spinning keeps (doubles back to) the
 * full budget; one that had to sleep halves it, down to 1/32 of the maximum.
 * Ping-pong traffic keeps spinning, an idle or slow peer costs almost nothing. */
static void spin_hit(struct sbp_ring *r)
{
	uint32_t s = r->spin_ns * 2;

	r->spin_ns = (s > r->spin_max_ns || s < r->spin_ns) ? r->spin_max_ns : s;
}

static void spin_miss(struct sbp_ring *r)
{
	uint32_t floor = r->spin_max_ns / 32;

	r->spin_ns = r->spin_ns / 2 > floor ? r->spin_ns / 2 : floor;
}

/* Peer's CPU unknown: how long to spin before mixing in sched_yield(). */
#define SBP_RING_PURE_SPIN_NS 2000

/* ---- doorbell mode's spin (ring.h, sbp_ring_set_bell_cost) ---------------- */

static uint32_t bell_cost(const struct sbp_ring *r)
{
	return r->bell_ns ? r->bell_ns : SBP_RING_SPIN_DEFAULT_NS;
}

uint32_t sbp_ring_spin_budget(const struct sbp_ring *r)
{
	uint64_t d, b;

	if (!r->doorbell || !r->spin_max_ns)
		return r->spin_ns;
	d = bell_cost(r);
	/* 2x the doorbell: the answer may itself come after the peer's own
	 * doorbell wake-up. Waits much longer than that: a slow or idle
	 * peer, spin a little only. */
	b = r->wait_ewma_ns > 4 * d ? d / 8 : 2 * d;
	if (b < 1000)
		b = 1000;
	return b > r->spin_max_ns ? r->spin_max_ns : (uint32_t)b;
}

/* A doorbell-mode wait ended (ready) at t: how long it took feeds the EWMA
 * that tells traffic from idleness. Samples are capped so that one long
 * idle wait is forgotten after a few quick ones. */
static void bell_wait_done(struct sbp_ring *r, int64_t t)
{
	uint64_t cap = 8 * (uint64_t)bell_cost(r), w;

	if (r->wait_start_ns) {
		w = t > r->wait_start_ns ? (uint64_t)(t - r->wait_start_ns) : 0;
		if (w > cap)
			w = cap;
		w = (7 * (uint64_t)r->wait_ewma_ns + w) / 8;
		r->wait_ewma_ns = w > UINT32_MAX ? UINT32_MAX : (uint32_t)w;
	}
	r->wait_start_ns = 0;
	r->armed_ns = 0;
}

void sbp_ring_set_bell_cost(struct sbp_ring *r, uint32_t cost_ns)
{
	if (cost_ns > SBP_RING_SPIN_DOORBELL_MAX_NS)
		cost_ns = SBP_RING_SPIN_DOORBELL_MAX_NS;
	r->bell_ns = cost_ns;
}

void sbp_ring_note_wakeup(struct sbp_ring *r)
{
	int64_t t, s;
	uint32_t d;

	if (!r->doorbell || !r->armed_ns || !r->hdr)
		return;
	if (!(r->armed_read ? read_ready(r) : write_ready(r)))
		return;                 /* not for us (yet): the wait goes on */
	t = now_ns();
	s = t - r->armed_ns;
	d = bell_cost(r);
	/* From arming to readiness: the doorbell's cost plus however long the
	 * peer took to act. Low samples are the truth about doorbells (fall
	 * fast); higher ones may be the peer's slowness (rise slowly, and not
	 * at all from samples over 4x). */
	if (s > 0 && s < (int64_t)d)
		sbp_ring_set_bell_cost(r, (uint32_t)((d + s) / 2));
	else if (s > 0 && s <= 4 * (int64_t)d)
		sbp_ring_set_bell_cost(r, d + (uint32_t)((s - d) / 16));
	bell_wait_done(r, t);
}

/* The bounded spin of a wait: 0 as soon as ready, -EAGAIN when the budget
 * (or the deadline) ran out. Adaptive: a hit keeps the budget, a miss
 * halves it (spin_hit/spin_miss). */
static int spin_until(struct sbp_ring *r, bool (*ready)(const struct sbp_ring *),
		      const uint32_t *peer_cpu, int64_t start, int64_t deadline)
{
	uint32_t spin = sbp_ring_spin_budget(r);   /* r->spin_ns outside doorbell mode */
	int64_t spin_end = start + spin;

	if (r->doorbell && !r->armed_ns)
		r->wait_start_ns = start;       /* the wait begins (bell_wait_done) */
	if (!spin)
		return -EAGAIN;
	if (spin_end > deadline)
		spin_end = deadline;
	/* Bounded spin: the peer is probably running right now. Where it runs
	 * decides how: on another CPU, spin (it answers within microseconds);
	 * on our CPU, spinning only delays it, so sched_yield() at once and let
	 * it run. Each side records its CPU (+1) beside its position on every
	 * call; unknown (0 or stale): spin briefly, then mix in yields (with
	 * nothing else runnable a yield returns at once). In doorbell mode the
	 * peer may run in another kernel, whose CPU numbers say nothing about
	 * ours (two one-vCPU guests are both on CPU 0): unknown. */
	for (;;) {
		uint32_t peer = r->doorbell ? 0 : LOAD(peer_cpu);
		int me = sched_getcpu();
		bool same = peer && me >= 0 && peer == (uint32_t)me + 1;
		int64_t t;

		for (int i = 0; i < (same ? 1 : 64); i++) {
			if (ready(r)) {
				spin_hit(r);
				if (r->doorbell)
					bell_wait_done(r, now_ns());
				return 0;
			}
			cpu_relax();
		}
		t = now_ns();
		if (t >= spin_end)
			break;
		if (same || (!peer && t >= start + SBP_RING_PURE_SPIN_NS))
			sched_yield();
	}
	spin_miss(r);
	return -EAGAIN;
}

static int wait_for(struct sbp_ring *r, bool (*ready)(const struct sbp_ring *),
		    uint32_t *word, const uint32_t *peer_cpu, int64_t timeout_ns)
{
	int64_t start, deadline;
	int64_t poll_ns = 20000;   /* futex-less fallback: sleep, doubling to 1 ms */
	bool skip_spin = r->spun;

	r->spun = 0;
	if (ready(r)) {
		if (r->armed_ns)        /* woke from a doorbell sleep: calibrate */
			sbp_ring_note_wakeup(r);
		return 0;
	}
	if (timeout_ns == 0)
		return -ETIMEDOUT;
	start = now_ns();
	deadline = timeout_ns < 0 ? INT64_MAX : start + timeout_ns;
	if (r->doorbell && !r->armed_ns && !skip_spin)
		r->wait_start_ns = start;       /* else it goes on (after a spin or a wake-up) */

	/* A spin that just missed (sbp_ring_spin_*) is not repeated. */
	if (!skip_spin && spin_until(r, ready, peer_cpu, start, deadline) == 0)
		return 0;

	if (r->doorbell) {
		/* The caller sleeps on its TCP socket; the peer rings. */
		__atomic_fetch_or(word, SBP_WAIT_DOORBELL, __ATOMIC_SEQ_CST);
		/* SYNC POINT: arm -> re-check (pairs with wake_peer's fence). */
		FULL_FENCE();
		if (ready(r)) {
			__atomic_fetch_and(word, ~SBP_WAIT_DOORBELL, __ATOMIC_RELAXED);
			bell_wait_done(r, now_ns());
			return 0;
		}
		if (now_ns() >= deadline) {
			r->wait_start_ns = r->armed_ns = 0;
			return -ETIMEDOUT;
		}
		/* The caller sleeps; sbp_ring_note_wakeup() when it wakes. */
		r->armed_ns = now_ns();
		r->armed_read = ready == read_ready;
		return -EAGAIN;
	}

	for (;;) {
		uint32_t val;
		int64_t left;
		int rc;

		__atomic_fetch_or(word, SBP_WAIT_FUTEX, __ATOMIC_SEQ_CST);
		/* SYNC POINT: arm -> re-check (pairs with wake_peer's fence). */
		FULL_FENCE();
		if (ready(r)) {
			__atomic_fetch_and(word, ~SBP_WAIT_FUTEX, __ATOMIC_RELAXED);
			return 0;
		}
		left = deadline == INT64_MAX ? -1 : deadline - now_ns();
		if (deadline != INT64_MAX && left <= 0) {
			__atomic_fetch_and(word, ~SBP_WAIT_FUTEX, __ATOMIC_RELAXED);
			return -ETIMEDOUT;
		}
		val = LOAD(word);
		if (!(val & SBP_WAIT_FUTEX))
			continue;       /* already woken (cleared) */
		if (r->futex_broken) {
			rc = -EFAULT;
		} else {
			rc = futex_wait(word, val, left);
			if (rc == -EFAULT || rc == -ENOSYS)
				r->futex_broken = 1;
		}
		if (rc == -EFAULT || rc == -ENOSYS) {
			/* No shared futex on this memory (e.g. BPF arena without
			 * moved wait words): sleep in short steps instead. */
			struct timespec ts = { 0, poll_ns };

			if (left >= 0 && left < poll_ns)
				ts.tv_nsec = left;
			if (nanosleep(&ts, NULL) < 0 && errno == EINTR)
				rc = -EINTR;
			if (poll_ns < 1000000)
				poll_ns *= 2;
		}
		if (rc == -EINTR) {
			__atomic_fetch_and(word, ~SBP_WAIT_FUTEX, __ATOMIC_RELAXED);
			return ready(r) ? 0 : -EINTR;
		}
		if (ready(r)) {         /* the usual wake-up: the waker disarmed us */
			__atomic_fetch_and(word, ~SBP_WAIT_FUTEX, __ATOMIC_RELAXED);
			return 0;
		}
		/* spurious, -EAGAIN (word changed), -ETIMEDOUT: re-arm and re-check */
	}
}

int sbp_ring_wait_readable(struct sbp_ring *r, int64_t timeout_ns)
{
	if (!r->hdr)
		return -EINVAL;
	return wait_for(r, read_ready, r->reader_waiting, &H(r)->writer_cpu, timeout_ns);
}

int sbp_ring_wait_writable(struct sbp_ring *r, int64_t timeout_ns)
{
	if (!r->hdr)
		return -EINVAL;
	return wait_for(r, write_ready, r->writer_waiting, &H(r)->reader_cpu, timeout_ns);
}

static int spin_only(struct sbp_ring *r, bool (*ready)(const struct sbp_ring *),
		     const uint32_t *peer_cpu)
{
	int rc;

	if (ready(r))
		return 0;
	rc = spin_until(r, ready, peer_cpu, now_ns(), INT64_MAX);
	r->spun = rc != 0;
	return rc;
}

int sbp_ring_spin_readable(struct sbp_ring *r)
{
	if (!r->hdr)
		return -EINVAL;
	return spin_only(r, read_ready, &H(r)->writer_cpu);
}

int sbp_ring_spin_writable(struct sbp_ring *r)
{
	if (!r->hdr)
		return -EINVAL;
	return spin_only(r, write_ready, &H(r)->reader_cpu);
}

static int arm(struct sbp_ring *r, bool (*ready)(const struct sbp_ring *), uint32_t *word)
{
	if (!r->hdr)
		return 1;
	__atomic_fetch_or(word, SBP_WAIT_DOORBELL, __ATOMIC_SEQ_CST);
	/* SYNC POINT: arm -> re-check (pairs with wake_peer's fence). */
	FULL_FENCE();
	if (ready(r)) {
		__atomic_fetch_and(word, ~SBP_WAIT_DOORBELL, __ATOMIC_RELAXED);
		return 1;
	}
	return 0;
}

int sbp_ring_arm_readable(struct sbp_ring *r)
{
	return arm(r, read_ready, r->reader_waiting);
}

int sbp_ring_arm_writable(struct sbp_ring *r)
{
	return arm(r, write_ready, r->writer_waiting);
}

void sbp_ring_disarm_readable(struct sbp_ring *r)
{
	if (r->hdr)
		__atomic_fetch_and(r->reader_waiting, ~SBP_WAIT_DOORBELL, __ATOMIC_RELAXED);
}

void sbp_ring_disarm_writable(struct sbp_ring *r)
{
	if (r->hdr)
		__atomic_fetch_and(r->writer_waiting, ~SBP_WAIT_DOORBELL, __ATOMIC_RELAXED);
}

/* Set a flag bit, then wake whoever may be waiting for it. A view whose
 * line 0 no longer matches touches nothing: the slot may belong to a newer
 * connection now. */
static void set_flag(struct sbp_ring *r, uint32_t bit, uint32_t reason)
{
	struct sbp_ring_hdr *h;
	int peer = 0;

	if (!line0_ok(r))
		return;
	h = H(r);
	if (reason)
		STORE(&h->reset_reason, reason);
	/* SYNC POINT: flags: everything written before (head, reason) is
	 * visible to whoever acquires the flag. */
	__atomic_fetch_or(&h->flags, bit, __ATOMIC_RELEASE);
	r->peer_waiting = 0;
	if (bit & (SBP_RING_WRITER_CLOSED | SBP_RING_RESET)) {
		wake_peer(r, r->reader_waiting);
		peer |= r->peer_waiting;
	}
	if (bit & (SBP_RING_READER_CLOSED | SBP_RING_RESET)) {
		wake_peer(r, r->writer_waiting);
		peer |= r->peer_waiting;
	}
	r->peer_waiting = peer;
}

void sbp_ring_close_writer(struct sbp_ring *r)
{
	set_flag(r, SBP_RING_WRITER_CLOSED, 0);
}

void sbp_ring_close_reader(struct sbp_ring *r)
{
	set_flag(r, SBP_RING_READER_CLOSED, 0);
}

void sbp_ring_reset(struct sbp_ring *r, uint32_t reason)
{
	set_flag(r, SBP_RING_RESET, reason ? reason : SBP_RESET_APP);
}

void sbp_ring_set_spin(struct sbp_ring *r, uint32_t spin_ns)
{
	r->spin_max_ns = spin_ns;
	r->spin_ns = spin_ns;
}

int sbp_ring_doorbell_mode(struct sbp_ring *r, int on)
{
	int old = r->doorbell;

	r->doorbell = !!on;
	return old;
}

int sbp_ring_peer_waiting(const struct sbp_ring *r)
{
	return r->peer_waiting;
}

/* ---- zero-copy access: the caller moves the bytes itself -------------------- *
 * For sendfile/splice: pread() straight into the free part of the data area,
 * write() a pipe straight from the readable part, instead of copying through
 * a bounce buffer. The pieces handed out lie inside the data area by
 * construction (offset < cap, lengths bounded by cap - offset and by the
 * checked room/data); commit/consume re-check the header, and refuse if our
 * own position moved under us (only we move it: a hostile hand did). */

static void iov_clear(struct iovec iov[2])
{
	iov[0].iov_base = iov[1].iov_base = NULL;
	iov[0].iov_len = iov[1].iov_len = 0;
}

/* n bytes from ring position pos as at most two pieces (it may wrap). */
static void iov_at(const struct sbp_ring *r, uint64_t pos, uint64_t n, struct iovec iov[2])
{
	size_t off = pos & (r->cap - 1), first = r->cap - off;

	if (first > n)
		first = n;
	iov[0].iov_base = r->data + off;
	iov[0].iov_len = first;
	if (n > first) {
		iov[1].iov_base = r->data;
		iov[1].iov_len = n - first;
	}
}

ssize_t sbp_ring_reserve(struct sbp_ring *r, struct iovec iov[2], size_t max)
{
	uint64_t head, tail, room;
	int rc;

	r->peer_waiting = 0;
	if (!iov)
		return -EINVAL;
	iov_clear(iov);
	rc = writer_view(r, &head, &tail);   /* records head: commit checks it is unchanged */
	if (rc < 0)
		return rc;
	room = r->cap - (head - tail);
	if (room > max)
		room = max;
	if (room == 0)
		return max ? -EAGAIN : 0;
	iov_at(r, head, room, iov);
	return (ssize_t)room;
}

ssize_t sbp_ring_commit(struct sbp_ring *r, size_t n)
{
	struct sbp_ring_hdr *h = H(r);
	uint64_t head, tail, reserved = r->seen_head;
	int rc;

	r->peer_waiting = 0;
	rc = writer_view(r, &head, &tail);
	if (rc < 0)
		return rc;
	if (head != reserved)
		return -EPROTO;
	/* The room only grows while we hold the writer's role. */
	if (n > r->cap - (head - tail))
		return -EINVAL;
	if (n == 0)
		return 0;
	r->seen_head = head + n;
	STORE(&h->writer_cpu, (uint32_t)(sched_getcpu() + 1));  /* a hint for waiters */
	/* SYNC POINT: producer: the caller's bytes are visible before the new head. */
	STORE_REL(&h->head, head + n);
	wake_peer(r, r->reader_waiting);
	return (ssize_t)n;
}

ssize_t sbp_ring_peek_iov(struct sbp_ring *r, struct iovec iov[2], size_t max)
{
	uint64_t head, tail, avail;
	uint32_t rflags;
	int rc;

	r->peer_waiting = 0;
	if (!iov)
		return -EINVAL;
	iov_clear(iov);
	rc = reader_view(r, &head, &tail, &rflags);   /* records tail: consume checks it */
	if (rc < 0)
		return rc;
	avail = head - tail;
	if (avail == 0)
		return empty_ring(rflags, max != 0);
	if (avail > max)
		avail = max;
	iov_at(r, tail, avail, iov);
	return (ssize_t)avail;
}

ssize_t sbp_ring_consume(struct sbp_ring *r, size_t n)
{
	struct sbp_ring_hdr *h = H(r);
	uint64_t head, tail, peeked = r->seen_tail;
	uint32_t rflags;
	int rc;

	r->peer_waiting = 0;
	rc = reader_view(r, &head, &tail, &rflags);
	if (rc < 0)
		return rc;
	if (tail != peeked)
		return -EPROTO;
	if (n > head - tail)
		return -EINVAL;
	if (n == 0)
		return 0;
	r->seen_tail = tail + n;
	STORE(&h->reader_cpu, (uint32_t)(sched_getcpu() + 1));  /* a hint for waiters */
	/* SYNC POINT: consumer: done with the bytes before giving them back. */
	STORE_REL(&h->tail, tail + n);
	wake_writer(r, head, tail + n);
	return (ssize_t)n;
}

/* ---- a writer that waits for a minimum of room ----------------------------- */

static uint64_t room_wish(const struct sbp_ring *r, size_t min_room, uint32_t *bits)
{
	uint64_t kib = ((uint64_t)min_room + 1023) >> 10, want;

	if (kib > (UINT32_MAX >> SBP_WAIT_ROOM_SHIFT))
		kib = UINT32_MAX >> SBP_WAIT_ROOM_SHIFT;
	want = kib << 10;
	if (want > r->cap) {
		want = r->cap;
		kib = r->cap >> 10;
	}
	*bits = (uint32_t)(kib << SBP_WAIT_ROOM_SHIFT);
	return want;
}

int sbp_ring_arm_writable_min(struct sbp_ring *r, size_t min_room)
{
	uint64_t head, tail, want;
	uint32_t bits;

	if (!r->hdr)
		return 1;
	want = room_wish(r, min_room, &bits);
	/* Only the writer arms this word (the reader only clears it): replace
	 * an earlier wish, keep a futex sleeper's bit. */
	__atomic_fetch_and(r->writer_waiting, SBP_WAIT_FUTEX, __ATOMIC_SEQ_CST);
	__atomic_fetch_or(r->writer_waiting, SBP_WAIT_DOORBELL | bits, __ATOMIC_SEQ_CST);
	/* SYNC POINT: arm -> re-check (pairs with wake_writer's fence). */
	FULL_FENCE();
	if (!line0_ok(r) || (LOAD_ACQ(&H(r)->flags) & (SBP_RING_READER_CLOSED |
							 SBP_RING_WRITER_CLOSED | SBP_RING_RESET)))
		goto ready;
	head = LOAD(&H(r)->head);
	tail = LOAD_ACQ(&H(r)->tail);
	if (!positions_sane(r, head, tail) || r->cap - (head - tail) >= want)
		goto ready;
	return 0;
ready:
	__atomic_fetch_and(r->writer_waiting, SBP_WAIT_FUTEX, __ATOMIC_RELAXED);
	return 1;
}
