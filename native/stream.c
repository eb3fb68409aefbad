// SPDX-License-Identifier: GPL-2.0
/* One direction of a connection across ring areas (stream.h). */
#include <errno.h>
#include <string.h>
#include <sys/mman.h>

#include "stream.h"

uint64_t sbp_stream_gen(uint32_t block_gen, int dir)
{
	return (uint64_t)block_gen << 8 | (uint64_t)(dir + 1);
}

int sbp_stream_areas_pair(struct sbp_stream_areas *a, const struct sbp_pair_info *pi, void *base,
			  uint32_t block, int dir)
{
	memset(a, 0, sizeof(*a));
	for (int k = 0; k < SBP_AREAS && k < SBP_STREAM_MAX_AREAS; k++) {
		a->slot[k] = sbp_pair_area(pi, base, block, dir, k);
		a->size[k] = sbp_pair_area_slot_size(k);
		if (!a->slot[k])
			return -EINVAL;
		a->n = k + 1;
	}
	return 0;
}

void sbp_stream_areas_slot(struct sbp_stream_areas *a, void *slot, size_t size)
{
	memset(a, 0, sizeof(*a));
	a->slot[0] = slot;
	a->size[0] = size;
	a->n = 1;
}

static void view_init(struct sbp_stream *s)
{
	sbp_ring_set_spin(&s->ring, s->spin_ns);
	sbp_ring_doorbell_mode(&s->ring, s->doorbell);
}

static void setup(struct sbp_stream *s, const struct sbp_stream_areas *a, uint64_t gen)
{
	uint32_t spin = s->spin_ns;
	int bell = s->doorbell;

	memset(s, 0, sizeof(*s));
	s->a = *a;
	s->gen = gen;
	s->spin_ns = spin;
	s->doorbell = bell;
}

/* Format `area` at `start` and make it the ring in use. */
static int open_area(struct sbp_stream *s, int area, uint64_t start)
{
	void *slot = area < s->a.n ? s->a.slot[area] : NULL;
	size_t size = area < s->a.n ? s->a.size[area] : 0;
	int rc;

	if (!slot)
		return -EINVAL;
	rc = sbp_ring_format_at(slot, size, s->gen, start);
	if (rc == 0)
		rc = sbp_ring_attach(&s->ring, slot, size, s->gen);
	if (rc == 0) {
		s->area = area;
		view_init(s);
	}
	return rc;
}

int sbp_stream_writer_open(struct sbp_stream *s, const struct sbp_stream_areas *a, uint64_t gen,
			   uint64_t start)
{
	setup(s, a, gen);
	return open_area(s, 0, start);
}

int sbp_stream_reader_open(struct sbp_stream *s, const struct sbp_stream_areas *a, uint64_t gen)
{
	int rc;

	setup(s, a, gen);
	if (!a->n || !a->slot[0])
		return -EPROTO;
	rc = sbp_ring_attach(&s->ring, a->slot[0], a->size[0], s->gen);
	if (rc == 0)
		view_init(s);
	return rc;
}

/* Link the ring in use to `area`, formatted at our position, and switch. */
static int move_to(struct sbp_stream *s, int area)
{
	struct sbp_ring old = s->ring;
	uint64_t pos = sbp_ring_head_pos(&s->ring);
	int rc;

	rc = open_area(s, area, pos);
	if (rc < 0) {
		s->ring = old;
		return rc;
	}
	/* SYNC POINT: the new ring is formatted before the link names it. */
	sbp_ring_link(&old, SBP_NEXT_RING, (uint32_t)area, 0);
	s->bell_pending |= sbp_ring_peer_waiting(&old);
	return 1;
}

int sbp_stream_grow(struct sbp_stream *s)
{
	for (int a = s->area + 1; a < s->a.n; a++)
		if (sbp_ring_reusable(s->a.slot[a], s->a.size[a], s->gen))
			return move_to(s, a);
	return 0;
}

int sbp_stream_shrink(struct sbp_stream *s)
{
	unsigned char *data;
	int old = s->area, rc;

	if (old == 0 || sbp_ring_readable(&s->ring) ||
	    !sbp_ring_reusable(s->a.slot[0], s->a.size[0], s->gen))
		return 0;
	data = (unsigned char *)s->a.slot[old] + SBP_RING_HDR_SIZE;
	rc = move_to(s, 0);
	/* The reader has taken every byte of the old area (it was empty): only
	 * its header is read again. Its pages go back to the system. */
	if (rc == 1)
		madvise(data, s->a.size[old] - SBP_RING_HDR_SIZE, MADV_REMOVE);
	return rc;
}

void sbp_stream_to_tcp(struct sbp_stream *s, uint64_t bells)
{
	sbp_ring_link(&s->ring, SBP_NEXT_TCP, 0, bells);
	s->bell_pending |= sbp_ring_peer_waiting(&s->ring);
}

int sbp_stream_peer_waiting(struct sbp_stream *s)
{
	int p = s->bell_pending || sbp_ring_peer_waiting(&s->ring);

	s->bell_pending = 0;
	return p;
}

int sbp_stream_follow(struct sbp_stream *s)
{
	struct sbp_ring_next nx;
	struct sbp_ring old;
	void *slot;
	int rc;

	rc = sbp_ring_next(&s->ring, &nx);
	if (rc == -EAGAIN)
		return 0;
	if (rc < 0)
		return rc;
	if (nx.kind == SBP_NEXT_TCP)
		return SBP_RING_GO_NEXT;
	if (nx.area >= (uint32_t)s->a.n || (int)nx.area == s->area)
		return -EPROTO;
	slot = s->a.slot[nx.area];
	old = s->ring;
	rc = sbp_ring_attach(&s->ring, slot, s->a.size[nx.area], s->gen);
	/* The writer formats before it links: not there = not ours. */
	if (rc < 0 || sbp_ring_tail_pos(&s->ring) != nx.start) {
		s->ring = old;
		return -EPROTO;
	}
	s->area = (int)nx.area;
	view_init(s);
	sbp_ring_moved(&old);
	return 1;
}

/* The ring the area after r's holds (r is linked to it): 0 with it in
 * *next and its area in *area, or -1 (not linked to a ring, not one the
 * writer made, or an area already in the chain: *seen, a bit per area,
 * as the writer cannot format again an area whose bytes are unread). */
static int next_ring(const struct sbp_stream *s, struct sbp_ring *r, struct sbp_ring *next,
		     int *area, unsigned *seen)
{
	struct sbp_ring_next nx;

	if (sbp_ring_link_ahead(r, &nx) < 0 || nx.kind != SBP_NEXT_RING ||
	    nx.area >= (uint32_t)s->a.n || (*seen & (1u << nx.area)))
		return -1;
	*seen |= 1u << nx.area;
	if (sbp_ring_attach(next, s->a.slot[nx.area], s->a.size[nx.area], s->gen) < 0 ||
	    sbp_ring_tail_pos(next) != nx.start)
		return -1;
	*area = (int)nx.area;
	return 0;
}

/* n bytes from src into the iovecs, from byte `at` of them on. */
static void copy_into(const struct iovec *iov, int iovcnt, size_t at, const char *src, size_t n)
{
	for (int i = 0; i < iovcnt && n; i++) {
		size_t k;

		if (at >= iov[i].iov_len) {
			at -= iov[i].iov_len;
			continue;
		}
		k = iov[i].iov_len - at < n ? iov[i].iov_len - at : n;
		memcpy((char *)iov[i].iov_base + at, src, k);
		src += k;
		n -= k;
		at = 0;
	}
}

/* A peek that took all of the ring being read, which links to a later
 * area: the bytes there too, into the iovecs from byte `at` on, at most
 * room (MSG_PEEK|MSG_WAITALL past a fresh 16 KiB area waits for them as
 * TCP does). A peek moves nothing: it looks through views of its own. */
static size_t peek_on(const struct sbp_stream *s, const struct iovec *iov, int iovcnt,
		      size_t at, size_t room)
{
	struct sbp_ring cur = s->ring, next;
	size_t got = 0;
	unsigned seen = 1u << s->area;
	int area;

	while (got < room) {
		struct iovec v[2];
		ssize_t k;

		if (next_ring(s, &cur, &next, &area, &seen) < 0)
			break;
		k = sbp_ring_peek_iov(&next, v, room - got);
		if (k <= 0)
			break;
		copy_into(iov, iovcnt, at + got, v[0].iov_base, v[0].iov_len);
		copy_into(iov, iovcnt, at + got + v[0].iov_len, v[1].iov_base, v[1].iov_len);
		got += (size_t)k;
		if (sbp_ring_readable(&next) != (size_t)k)
			break;          /* the iovecs are full, or more is coming here */
		cur = next;
	}
	return got;
}

int sbp_stream_peek_may_grow(const struct sbp_stream *s)
{
	struct sbp_ring cur = s->ring, next;
	unsigned seen = 1u << s->area;
	int area = s->area;
	uint32_t f;

	while (next_ring(s, &cur, &next, &area, &seen) == 0)
		cur = next;
	f = sbp_ring_flags(&cur);
	if (sbp_ring_corrupt(&cur) || (f & (SBP_RING_WRITER_CLOSED | SBP_RING_RESET | SBP_RING_LINKED)))
		return 0;
	/* a full ring: its writer goes on in a larger area, if there is one */
	return sbp_ring_readable(&cur) < cur.cap || area + 1 < s->a.n;
}

ssize_t sbp_stream_readv(struct sbp_stream *s, const struct iovec *iov, int iovcnt, int flags)
{
	for (;;) {
		ssize_t n = sbp_ring_readv(&s->ring, iov, iovcnt, flags);
		int rc;

		if (n > 0 && (flags & SBP_PEEK) && (size_t)n == sbp_ring_readable(&s->ring) &&
		    (sbp_ring_flags(&s->ring) & SBP_RING_LINKED)) {
			size_t total = 0;

			for (int i = 0; i < iovcnt; i++)
				total = iov[i].iov_len < SIZE_MAX - total ? total + iov[i].iov_len : SIZE_MAX;
			return n + (ssize_t)peek_on(s, iov, iovcnt, (size_t)n, total - (size_t)n);
		}
		if (n != SBP_RING_GO_NEXT)
			return n;
		rc = sbp_stream_follow(s);
		if (rc != 1)
			return rc == 0 ? -EAGAIN : rc;
	}
}

int sbp_stream_unread(const struct sbp_stream *s, uint64_t from, struct iovec iov[2 * SBP_AREAS],
		      size_t *total)
{
	struct { uint64_t lo, hi; struct iovec v[2]; } span[SBP_AREAS];
	uint64_t at, end = sbp_ring_head_pos(&s->ring);
	int n = 0, k = 0;

	/* Every area of this stream that holds bytes the reader has not
	 * taken: the one it reads (its tail is where it stopped) and those
	 * written since (their tail is where they were formatted). */
	for (int a = 0; a < s->a.n; a++) {
		struct sbp_ring t;

		if (sbp_ring_attach(&t, s->a.slot[a], s->a.size[a], s->gen) < 0)
			continue;
		if (sbp_ring_unread_iov(&t, &span[n].lo, &span[n].hi, span[n].v) < 0)
			return -EPROTO;
		if (span[n].hi > span[n].lo)
			n++;
	}
	/* In stream order, each beginning where the one before ends, the last
	 * at our own position; `from` inside the first, or before it (the
	 * reader had not finished the TCP part). */
	*total = 0;
	at = from;
	for (;;) {
		int best = -1;

		for (int i = 0; i < n; i++)
			if (span[i].hi > at && span[i].lo <= at && (best < 0 || span[i].lo > span[best].lo))
				best = i;
		if (best < 0 && at == from)
			for (int i = 0; i < n; i++)
				if (span[i].lo > at && (best < 0 || span[i].lo < span[best].lo))
					best = i;
		if (best < 0)
			break;
		if (span[best].lo > at)
			at = span[best].lo;     /* the reader stopped in the TCP part */
		/* skip what the reader took of this span */
		{
			uint64_t skip = at - span[best].lo;
			struct iovec *v = span[best].v;

			if (skip >= v[0].iov_len) {
				skip -= v[0].iov_len;
				v[0] = v[1];
				v[1].iov_len = 0;
			}
			v[0].iov_base = (char *)v[0].iov_base + skip;
			v[0].iov_len -= skip;
			for (int j = 0; j < 2; j++)
				if (v[j].iov_len)
					iov[k++] = v[j];
		}
		*total += span[best].hi - at;
		at = span[best].hi;
		if (at == end)
			return k;
	}
	return at == end || (n == 0 && from >= end) ? k : -EPROTO;
}

int sbp_stream_tcp_bells(struct sbp_stream *s, uint64_t *bells)
{
	struct sbp_ring_next nx;
	int rc = sbp_ring_next(&s->ring, &nx);

	if (rc < 0)
		return rc;
	if (nx.kind != SBP_NEXT_TCP)
		return -EPROTO;
	*bells = nx.bells;
	return 0;
}
