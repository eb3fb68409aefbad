// SPDX-License-Identifier: GPL-2.0
/*
 * ring_wait.c: how one side of a ring waits for the other and how it is
 * woken: the adaptive spin, arming the waiting word, the futex sleep (or, in
 * doorbell mode, returning to a caller that sleeps elsewhere), the wake-up
 * after a publish, and doorbell mode's spin calibration. See ring.h.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE             /* sched_getcpu (the cffi build does not set it) */
#endif
#include <errno.h>
#include <limits.h>
#include <sched.h>
#include <stdbool.h>
#include <time.h>

#include "ring.h"
#include "ring_wait.h"
#include "ringmem.h"
#include "sys.h"

void ring_wake_armed(struct sbp_ring *r, uint32_t *word)
{
	uint32_t armed = __atomic_exchange_n(word, 0, __ATOMIC_SEQ_CST);

	if (r->doorbell) {
		if (armed)
			r->peer_waiting = 1;
		return;
	}
	if (armed & SBP_WAIT_FUTEX)
		sys_futex_wake(word);
	if (armed & SBP_WAIT_DOORBELL)
		r->peer_waiting = 1;
}

/* The writer armed (w): wake it, unless it armed for doorbells with a
 * minimum of room (sbp_ring_arm_writable_min) that is not free yet. A stale
 * head only makes the room look bigger (a spurious wake-up, never a lost
 * one). The minimum is at most the capacity, so the writer is woken at the
 * latest when the ring is empty; a reader stops short of that only when it
 * chooses to stop reading, as over TCP. A futex sleeper is always woken. */
void ring_wake_writer_armed(struct sbp_ring *r, uint32_t w, uint64_t head, uint64_t tail)
{
	uint64_t want = (uint64_t)(w >> SBP_WAIT_ROOM_SHIFT) << 10;

	if (want && !(w & SBP_WAIT_FUTEX)) {
		if (want > r->cap)
			want = r->cap;          /* untrusted bits: never more than a drained ring */
		if (tail <= head && r->cap - (head - tail) < want)
			return;
	}
	ring_wake(r, r->writer_waiting);
}

/* Would read() return something other than -EAGAIN? */
static bool read_ready(const struct sbp_ring *r, uint64_t min)
{
	uint64_t head, tail;

	if (!line0_ok(r))
		return true;
	if (LOAD_ACQ(&H(r)->flags) & (SBP_RING_WRITER_CLOSED | SBP_RING_RESET | SBP_RING_LINKED))
		return true;
	head = LOAD_ACQ(&H(r)->head);
	tail = LOAD(&H(r)->tail);
	if (min > r->cap)
		min = r->cap;           /* a full ring is as much as can come */
	return !positions_sane(r, head, tail) || head - tail >= (min ? min : 1);
}

/* Would write() return something other than -EAGAIN? */
static bool write_ready(const struct sbp_ring *r, uint64_t min)
{
	uint64_t head, tail;

	if (!line0_ok(r))
		return true;
	if (LOAD_ACQ(&H(r)->flags) & (SBP_RING_READER_CLOSED | SBP_RING_WRITER_CLOSED | SBP_RING_RESET))
		return true;
	head = LOAD(&H(r)->head);
	tail = LOAD_ACQ(&H(r)->tail);
	(void)min;
	return !positions_sane(r, head, tail) || head - tail < r->cap;
}

/* Adaptive spin: a wait satisfied while spinning doubles the budget (at
 * least to twice what it took), up to the maximum; one that had to sleep
 * halves it, down to 1/32 of the maximum but not below twice what the
 * satisfied waits took. Every 16th sleep in a row, the next wait spins the
 * full budget once: a budget that fell below the peer's answer time (a
 * peer that started late, a few hiccups) would otherwise never see a hit
 * again (a 16 KiB ping-pong across cores, 5 us a round trip, then took
 * 64 us, two futex wake-ups, in 4 runs of 6). Ping-pong traffic keeps
 * spinning, an idle or slow peer costs little. */
static void spin_hit(struct sbp_ring *r, uint32_t took_ns)
{
	uint64_t s = (uint64_t)r->spin_ns * 2;

	r->misses = 0;
	r->hit_ewma_ns = r->hit_ewma_ns ? r->hit_ewma_ns - r->hit_ewma_ns / 8 + took_ns / 8 : took_ns;
	if (s < 2 * (uint64_t)took_ns)
		s = 2 * (uint64_t)took_ns;
	r->spin_ns = s > r->spin_max_ns ? r->spin_max_ns : (uint32_t)s;
}

static void spin_miss(struct sbp_ring *r)
{
	uint32_t floor = r->spin_max_ns / 32, hits = r->hit_ewma_ns * 2;

	if (++r->misses % 16 == 0) {
		r->spin_ns = r->spin_max_ns;    /* the probe */
		return;
	}
	if (hits > floor)
		floor = hits < r->spin_max_ns ? hits : r->spin_max_ns;
	r->spin_ns = r->spin_ns / 2 > floor ? r->spin_ns / 2 : floor;
}

#define SPIN_ROUNDS 64		/* ready checks between two looks at the clock */
#define ITER_NS_GUESS 50	/* a round's cost until one was measured */

/* Peer's CPU unknown: how long to spin before mixing in sched_yield(). */
#define SBP_RING_PURE_SPIN_NS 2000

/* Doorbell mode's spin (ring.h, sbp_ring_set_bell_cost). */

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
	if (!(r->armed_read ? read_ready(r, 1) : write_ready(r, 0)))
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
static int spin_until(struct sbp_ring *r, bool (*ready)(const struct sbp_ring *, uint64_t),
		      uint64_t min, const uint32_t *peer_cpu, int64_t start, int64_t deadline)
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
	for (int64_t last = start;;) {
		uint32_t peer = r->doorbell ? 0 : LOAD(peer_cpu);
		int me = sched_getcpu();
		bool same = peer && me >= 0 && peer == (uint32_t)me + 1;
		int rounds = same ? 1 : SPIN_ROUNDS;
		int64_t t;

		for (int i = 0; i < rounds; i++) {
			if (ready(r, min)) {
				/* no clock read on this path: the rounds since the
				 * last look, at their measured cost */
				spin_hit(r, (uint32_t)(last - start) +
					 (uint32_t)i * (r->iter_ns ? r->iter_ns : ITER_NS_GUESS));
				if (r->doorbell)
					bell_wait_done(r, now_ns());
				return 0;
			}
			cpu_relax();
		}
		t = now_ns();
		if (rounds == SPIN_ROUNDS && t - last < 1000 * SPIN_ROUNDS)
			r->iter_ns = (uint32_t)((t - last) / SPIN_ROUNDS);	/* (not preempted meanwhile) */
		last = t;
		if (t >= spin_end)
			break;
		if (same || (!peer && t >= start + SBP_RING_PURE_SPIN_NS)) {
			sched_yield();
			last = now_ns();
		}
	}
	spin_miss(r);
	return -EAGAIN;
}

static int wait_for(struct sbp_ring *r, bool (*ready)(const struct sbp_ring *, uint64_t),
		    uint64_t min, uint32_t *word, const uint32_t *peer_cpu, int64_t timeout_ns)
{
	int64_t start, deadline;
	int64_t poll_ns = 20000;   /* futex-less fallback: sleep, doubling to 1 ms */
	bool skip_spin = r->spun;

	r->spun = 0;
	if (ready(r, min)) {
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
	if (!skip_spin && spin_until(r, ready, min, peer_cpu, start, deadline) == 0)
		return 0;

	if (r->doorbell) {
		/* The caller sleeps on its TCP socket; the peer rings. */
		__atomic_fetch_or(word, SBP_WAIT_DOORBELL, __ATOMIC_SEQ_CST);
		/* SYNC POINT: arm -> re-check (pairs with ring_wake's fence). */
		FULL_FENCE();
		if (ready(r, min)) {
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
		/* SYNC POINT: arm -> re-check (pairs with ring_wake's fence). */
		FULL_FENCE();
		if (ready(r, min)) {
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
			rc = sys_futex_wait(word, val, left);
			if (rc == -EFAULT || rc == -ENOSYS)
				r->futex_broken = 1;
		}
		if (rc == -EFAULT || rc == -ENOSYS) {
			/* No shared futex on this memory (a mapping the kernel
			 * cannot key a futex on): sleep in short steps instead. */
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
			return ready(r, min) ? 0 : -EINTR;
		}
		if (ready(r, min)) {         /* the usual wake-up: the waker disarmed us */
			__atomic_fetch_and(word, ~SBP_WAIT_FUTEX, __ATOMIC_RELAXED);
			return 0;
		}
		/* spurious, -EAGAIN (word changed), -ETIMEDOUT: re-arm and re-check */
	}
}

int sbp_ring_wait_readable_min(struct sbp_ring *r, size_t min, int64_t timeout_ns)
{
	if (!r->hdr)
		return -EINVAL;
	return wait_for(r, read_ready, min, r->reader_waiting, &H(r)->writer_cpu, timeout_ns);
}

int sbp_ring_wait_readable(struct sbp_ring *r, int64_t timeout_ns)
{
	return sbp_ring_wait_readable_min(r, 1, timeout_ns);
}

int sbp_ring_wait_writable(struct sbp_ring *r, int64_t timeout_ns)
{
	if (!r->hdr)
		return -EINVAL;
	return wait_for(r, write_ready, 0, r->writer_waiting, &H(r)->reader_cpu, timeout_ns);
}

static int spin_only(struct sbp_ring *r, bool (*ready)(const struct sbp_ring *, uint64_t),
		     uint64_t min, const uint32_t *peer_cpu)
{
	int rc;

	if (ready(r, min))
		return 0;
	rc = spin_until(r, ready, min, peer_cpu, now_ns(), INT64_MAX);
	r->spun = rc != 0;
	return rc;
}

int sbp_ring_spin_readable_min(struct sbp_ring *r, size_t min)
{
	if (!r->hdr)
		return -EINVAL;
	return spin_only(r, read_ready, min, &H(r)->writer_cpu);
}

int sbp_ring_spin_readable(struct sbp_ring *r)
{
	return sbp_ring_spin_readable_min(r, 1);
}

int sbp_ring_spin_writable(struct sbp_ring *r)
{
	if (!r->hdr)
		return -EINVAL;
	return spin_only(r, write_ready, 0, &H(r)->reader_cpu);
}

static int arm(struct sbp_ring *r, bool (*ready)(const struct sbp_ring *, uint64_t), uint64_t min,
	       uint32_t *word)
{
	if (!r->hdr)
		return 1;
	__atomic_fetch_or(word, SBP_WAIT_DOORBELL, __ATOMIC_SEQ_CST);
	/* SYNC POINT: arm -> re-check (pairs with ring_wake's fence). */
	FULL_FENCE();
	if (ready(r, min)) {
		__atomic_fetch_and(word, ~SBP_WAIT_DOORBELL, __ATOMIC_RELAXED);
		return 1;
	}
	return 0;
}

int sbp_ring_arm_readable_min(struct sbp_ring *r, size_t min)
{
	return arm(r, read_ready, min, r->reader_waiting);
}

int sbp_ring_arm_readable(struct sbp_ring *r)
{
	return sbp_ring_arm_readable_min(r, 1);
}

int sbp_ring_arm_writable(struct sbp_ring *r)
{
	return arm(r, write_ready, 0, r->writer_waiting);
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

/* A writer that waits for a minimum of room. */

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
	/* SYNC POINT: arm -> re-check (pairs with ring_wake_writer's fence). */
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
