/* SPDX-License-Identifier: GPL-2.0 */
/*
 * ring_wait.h: the "publish, then look for a sleeper" step every publish
 * of ring.c ends with (inline: it is on every write and read); the wake
 * itself, rare, is in ring_wait.c. Ring users call ring.h, not this.
 */
#ifndef SHMBYPASS_RING_WAIT_H
#define SHMBYPASS_RING_WAIT_H

#include "ringmem.h"

/* ring_wait.c: the other side armed `word`: disarm it and wake it (futex)
 * or note that its caller must ring a doorbell (r->peer_waiting). */
void ring_wake_armed(struct sbp_ring *r, uint32_t *word);
/* ring_wait.c: the writer armed (w); the reader gave room back (tail is the
 * new tail, head what it loaded). */
void ring_wake_writer_armed(struct sbp_ring *r, uint32_t w, uint64_t head, uint64_t tail);

/* After publishing (head, tail or a flag): wake the other side if it armed
 * its word. The fast path is one load of a line nobody writes while the
 * other side is busy. */
static inline void ring_wake(struct sbp_ring *r, uint32_t *word)
{
	/* SYNC POINT: publish -> look for a sleeper (pairs with arm -> re-check). */
	FULL_FENCE();
	if (LOAD(word) == 0)
		return;
	ring_wake_armed(r, word);
}

/* The reader gave room back: wake the writer if it armed (and, for a
 * doorbell waiter with a minimum of room, once that much is free). */
static inline void ring_wake_writer(struct sbp_ring *r, uint64_t head, uint64_t tail)
{
	uint32_t w;

	/* SYNC POINT: publish -> look for a sleeper (as ring_wake). */
	FULL_FENCE();
	w = LOAD(r->writer_waiting);
	if (w == 0)
		return;
	ring_wake_writer_armed(r, w, head, tail);
}

#endif
