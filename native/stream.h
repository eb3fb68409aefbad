/* SPDX-License-Identifier: GPL-2.0 */
/*
 * One direction of one connection in pair memory (pairmem.h): a byte stream
 * written into one ring area at a time. The writer moves to a larger area
 * when its reader falls behind (instead of sleeping, up to the largest) and
 * back to the smallest when the stream is idle, so memory follows the data
 * in flight; it may also hand the rest of the stream to TCP (a program
 * without our library is about to get the socket). Each move links the old
 * ring to the next part (ring.h: sbp_ring_link); the reader drains the old
 * ring and follows. Stream positions are continuous across parts.
 *
 * The caller serialises writers and readers (one each) and owns the
 * waiting: s->ring is the ring in use now (wait/arm/spin on it), and
 * changes only inside these calls.
 */
#ifndef SHMBYPASS_STREAM_H
#define SHMBYPASS_STREAM_H

#include <stdint.h>
#include <sys/types.h>
#include <sys/uio.h>

#include "pairmem.h"
#include "ring.h"

#define SBP_STREAM_MAX_AREAS 4

/* The areas a stream may use: ring slots of growing size. A connection in
 * pair memory has SBP_AREAS of them (sbp_stream_areas_pair); a slot of a
 * shared region (a VM pair) is a stream of one area that never moves. */
struct sbp_stream_areas {
	void *slot[SBP_STREAM_MAX_AREAS];
	size_t size[SBP_STREAM_MAX_AREAS];
	int n;
};

struct sbp_stream {
	struct sbp_stream_areas a;      /* trusted: computed from local geometry */
	uint64_t gen;                   /* ring generation of this connection and direction */
	int area;                       /* the area in use */
	struct sbp_ring ring;           /* view of it */
	uint32_t spin_ns;               /* copied to each new view */
	int doorbell;
	int bell_pending;               /* a move found the reader armed: ring it */
};

/* The areas of direction dir of a block of a checked pair region; 0 or
 * -EINVAL (block or direction out of range). */
int sbp_stream_areas_pair(struct sbp_stream_areas *a, const struct sbp_pair_info *pi, void *base,
			  uint32_t block, int dir);
/* One slot of a region, as a stream that never moves. */
void sbp_stream_areas_slot(struct sbp_stream_areas *a, void *slot, size_t size);
/* The generation the rings of a pair-memory block's direction carry. */
uint64_t sbp_stream_gen(uint32_t block_gen, int dir);

/* Writer: format area 0 with generation gen at stream position start.
 * 0, -EINVAL. s->spin_ns and s->doorbell are kept (set them first). */
int sbp_stream_writer_open(struct sbp_stream *s, const struct sbp_stream_areas *a, uint64_t gen,
			   uint64_t start);
/* Reader: attach area 0 (the writer formatted it). 0, -EAGAIN not yet,
 * -EPROTO. sbp_ring_tail_pos(&s->ring) is then where the ring part starts. */
int sbp_stream_reader_open(struct sbp_stream *s, const struct sbp_stream_areas *a, uint64_t gen);

/* Move to the next larger free area: 1 moved, 0 already the largest (or
 * the reader still holds the larger ones), -errno. Only when the ring is
 * full is this worth it: the reader is behind. */
int sbp_stream_grow(struct sbp_stream *s);
/* Back to the smallest area if the ring is empty and larger than that: 1
 * moved, 0 not. The memory of the area left is given back. */
int sbp_stream_shrink(struct sbp_stream *s);
/* The rest of the stream goes over TCP, after `bells` doorbell bytes the
 * writer has sent there. No more ring writes after this. */
void sbp_stream_to_tcp(struct sbp_stream *s, uint64_t bells);

/* Writer: did the last write or move find the reader armed for a doorbell
 * (sbp_ring_peer_waiting, across moves)? Clears the note. */
int sbp_stream_peer_waiting(struct sbp_stream *s);

/* Reader: like sbp_ring_readv, following links to new areas on the way.
 * SBP_RING_GO_NEXT when the stream went on to TCP (sbp_stream_tcp_bells
 * then says after how many doorbells). */
ssize_t sbp_stream_readv(struct sbp_stream *s, const struct iovec *iov, int iovcnt, int flags);
/* Reader: may more bytes come where the stream is written now (the last
 * area of the links from the ring being read: not closed, reset, linked
 * to TCP, corrupt or full)? For a peek that waits. */
int sbp_stream_peek_may_grow(const struct sbp_stream *s);
/* After SBP_RING_GO_NEXT: the writer's doorbell count; -EAGAIN/-EPROTO. */
/* The writer, going back to TCP: what its reader has not taken from
 * stream position `from` on (it stopped there), across the areas still
 * holding it, in order: iovecs (returned count, at most 2 * SBP_AREAS)
 * and *total bytes; -EPROTO if the headers (which the reader can write)
 * do not add up. */
int sbp_stream_unread(const struct sbp_stream *s, uint64_t from, struct iovec iov[2 * SBP_AREAS],
		      size_t *total);
int sbp_stream_tcp_bells(struct sbp_stream *s, uint64_t *bells);
/* Reader: follow a pending link to another ring now (readiness checks):
 * 1 followed, 0 nothing to follow, SBP_RING_GO_NEXT (TCP), -EPROTO. */
int sbp_stream_follow(struct sbp_stream *s);

#endif
