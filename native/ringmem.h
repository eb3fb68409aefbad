/* SPDX-License-Identifier: GPL-2.0 */
/*
 * ringmem.h: what ring.c and ring_wait.c share and ring users must not
 * touch: the atomics on the shared header and the checks of a view
 * against it.
 */
#ifndef SHMBYPASS_RINGMEM_H
#define SHMBYPASS_RINGMEM_H

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

#endif
