// SPDX-License-Identifier: GPL-2.0
/*
 * ring.c: the SPSC byte ring in shared memory: format/attach, write/read
 * (copying or zero-copy), queries, close/reset. See ring.h for the layout and
 * the rules; how a side waits for the other, and wakes it, is ring_wait.c.
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
#include <sched.h>
#include <stdbool.h>
#include <string.h>

#include "ring.h"
#include "ring_wait.h"
#include "ringmem.h"

_Static_assert(sizeof(struct sbp_ring_hdr) == 192, "ring header: three cache lines");
_Static_assert(offsetof(struct sbp_ring_hdr, head) == 64, "head on cache line 1");
_Static_assert(offsetof(struct sbp_ring_hdr, tail) == 128, "tail on cache line 2");
_Static_assert(sizeof(struct sbp_ring_hdr) <= SBP_RING_HDR_SIZE, "header fits");

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

int sbp_ring_format(void *slot, size_t slot_size, uint64_t generation)
{
	return sbp_ring_format_at(slot, slot_size, generation, 0);
}

int sbp_ring_format_at(void *slot, size_t slot_size, uint64_t generation, uint64_t start)
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
	STORE(&h->next_kind, 0);
	STORE(&h->next_start, 0);
	STORE(&h->next_bells, 0);
	STORE(&h->next_area, 0);
	STORE(&h->head, start);
	STORE(&h->tail, start);
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
	r->seen_head = r->seen_tail = tail;     /* a ring may start at any position */
	if (!positions_ok(r, head, tail)) {
		memset(r, 0, sizeof(*r));
		return -EPROTO;
	}
	return 0;
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
	if (flags & (SBP_RING_READER_CLOSED | SBP_RING_WRITER_CLOSED | SBP_RING_LINKED))
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
				ring_wake(r, r->reader_waiting);
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
	ring_wake(r, r->reader_waiting);
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
	if (flags & SBP_RING_LINKED)
		return SBP_RING_GO_NEXT;
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
				ring_wake_writer(r, head, tail + done);
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
	ring_wake_writer(r, head, tail + done);
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
	if (bit & (SBP_RING_WRITER_CLOSED | SBP_RING_RESET | SBP_RING_LINKED)) {
		ring_wake(r, r->reader_waiting);
		peer |= r->peer_waiting;
	}
	if (bit & (SBP_RING_READER_CLOSED | SBP_RING_RESET)) {
		ring_wake(r, r->writer_waiting);
		peer |= r->peer_waiting;
	}
	r->peer_waiting = peer;
}

uint64_t sbp_ring_head_pos(const struct sbp_ring *r)
{
	return r->seen_head;
}

uint64_t sbp_ring_tail_pos(const struct sbp_ring *r)
{
	return r->seen_tail;
}

void sbp_ring_link(struct sbp_ring *r, uint32_t kind, uint32_t area, uint64_t bells)
{
	struct sbp_ring_hdr *h;

	if (!line0_ok(r))
		return;
	h = H(r);
	STORE(&h->next_kind, kind);
	STORE(&h->next_area, area);
	STORE(&h->next_bells, bells);
	STORE(&h->next_start, LOAD(&h->head));
	/* SYNC POINT: the link fields before the flag (set_flag releases);
	 * a linked ring is "readable": its reader is woken like by a write. */
	set_flag(r, SBP_RING_LINKED, 0);
}

static int read_link(struct sbp_ring *r, struct sbp_ring_next *out, bool drained)
{
	uint64_t head, tail;
	uint32_t flags;
	int rc;

	rc = reader_view(r, &head, &tail, &flags);
	if (rc < 0)
		return rc;
	if (!(flags & SBP_RING_LINKED) || (drained && head != tail))
		return -EAGAIN;
	out->kind = LOAD(&H(r)->next_kind);
	out->area = LOAD(&H(r)->next_area);
	out->start = LOAD(&H(r)->next_start);
	out->bells = LOAD(&H(r)->next_bells);
	if (out->start != head || (out->kind != SBP_NEXT_RING && out->kind != SBP_NEXT_TCP))
		return -EPROTO;
	return 0;
}

int sbp_ring_next(struct sbp_ring *r, struct sbp_ring_next *out)
{
	return read_link(r, out, true);
}

int sbp_ring_link_ahead(struct sbp_ring *r, struct sbp_ring_next *out)
{
	return read_link(r, out, false);
}

void sbp_ring_moved(struct sbp_ring *r)
{
	set_flag(r, SBP_RING_READER_MOVED, 0);
}

int sbp_ring_reusable(void *slot, size_t slot_size, uint64_t generation)
{
	struct sbp_ring_hdr *h = slot;

	(void)slot_size;
	/* Never formatted for this connection, or the reader left it. */
	return LOAD_ACQ(&h->magic) != SBP_RING_MAGIC || LOAD(&h->generation) != generation ||
	       (LOAD_ACQ(&h->flags) & SBP_RING_READER_MOVED);
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

/* Zero-copy access: the caller moves the bytes itself.
 * For sendfile/splice: pread() straight into the free part of the data area,
 * write() a pipe straight from the readable part, instead of copying through
 * a bounce buffer. The pieces handed out lie inside the data area by
 * construction (offset < cap, lengths bounded by cap - offset and by the
 * checked room/data); commit/consume re-check the header, and refuse if our
 * own position moved under us (only we move it: a hostile hand did). */

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

void sbp_ring_kick(struct sbp_ring *r)
{
	if (!line0_ok(r))
		return;
	ring_wake(r, r->reader_waiting);
	ring_wake(r, r->writer_waiting);
}

int sbp_ring_unread_iov(struct sbp_ring *r, uint64_t *from, uint64_t *to, struct iovec iov[2])
{
	uint64_t head, tail;
	uint32_t flags;
	int rc;

	iov_clear(iov);
	rc = reader_view(r, &head, &tail, &flags);
	if (rc < 0)
		return rc;
	*from = tail;
	*to = head;
	iov_at(r, tail, head - tail, iov);
	return 0;
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
	ring_wake(r, r->reader_waiting);
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
	ring_wake_writer(r, head, tail + n);
	return (ssize_t)n;
}
