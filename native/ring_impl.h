/* SPDX-License-Identifier: GPL-2.0 */
/*
 * ring_impl.h: what ring.c and ring_wait.c share and ring users must not
 * touch: the atomics on the shared header, the checks of a view against
 * it, and the "publish, then look for a sleeper" step every publish ends
 * with (inline: it is on every write and read; the wake itself, rare, is
 * in ring_wait.c).
 */
#ifndef SHMBYPASS_RING_IMPL_H
#define SHMBYPASS_RING_IMPL_H

#include <stdbool.h>
#include <stdint.h>

#include "ring.h"

#define LOAD(p)          __atomic_load_n((p), __ATOMIC_RELAXED)
#define LOAD_ACQ(p)      __atomic_load_n((p), __ATOMIC_ACQUIRE)
#define STORE(p, v)      __atomic_store_n((p), (v), __ATOMIC_RELAXED)
#define STORE_REL(p, v)  __atomic_store_n((p), (v), __ATOMIC_RELEASE)
#define FULL_FENCE()     __atomic_thread_fence(__ATOMIC_SEQ_CST)

static inline struct sbp_ring_hdr *H(const struct sbp_ring *r)
{
	return (struct sbp_ring_hdr *)r->hdr;
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

/* A consistent head/tail pair (tail <= head <= tail + cap, neither gone
 * back since the view last looked), without recording it. */
static inline bool positions_sane(const struct sbp_ring *r, uint64_t head, uint64_t tail)
{
	return tail <= head && head - tail <= r->cap &&
	       head >= r->seen_head && tail >= r->seen_tail;
}

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
