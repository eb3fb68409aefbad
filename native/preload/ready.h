/* SPDX-License-Identifier: GPL-2.0 */
/* ready.h: readiness of one shm-tier socket for poll/select/epoll. */
#ifndef SBP_PRELOAD_READY_H
#define SBP_PRELOAD_READY_H

#include <poll.h>
#include <stdint.h>
#include <sys/epoll.h>

#include "channel.h"

#define IN_BITS   (POLLIN | POLLRDNORM)
#define OUT_BITS  (POLLOUT | POLLWRNORM)
/* How long a waiter may sleep where no doorbell will wake it (ns): */
#define CAP_ETIN  1000000       /* ET reader left data unread: re-check every 1 ms */
#define CAP_NOBELL 1000000      /* no doorbell can come (TCP side shut) */

/* Same values in poll and epoll (Linux uses one mask for both). */
_Static_assert(POLLIN == EPOLLIN && POLLOUT == EPOLLOUT && POLLRDHUP == EPOLLRDHUP &&
	       POLLHUP == EPOLLHUP && POLLERR == EPOLLERR && POLLRDNORM == EPOLLRDNORM &&
	       POLLWRNORM == EPOLLWRNORM, "poll and epoll bits agree");

/* Bring the rx view up to date (the peer's ring found, a link followed) if
 * rx_lock is free; 1 if the ring is linked and could not be followed now. */
int rx_look(int fd, struct chan *ch);
/* Current poll mask of a shm socket (POLLIN/OUT/RDHUP/HUP/ERR bits). */
uint32_t chan_poll_mask(int fd, struct chan *ch);
/* Arm what a waiter wants. Returns 1 if something is ready already; *cap
 * lowered where no doorbell will come. in_et_seen: the ET reader was told
 * about the data it still has (do not arm: that would be ready at once).
 * out_et_seen: likewise for room to write. */
int chan_arm(struct chan *ch, uint32_t events, int in_et_seen, int out_et_seen, int64_t *cap);
/* The spin before a sleep, from the waits' EWMA (ns); and a wait that ended
 * after `waited` ns feeds the EWMA. */
int64_t spin_budget(int64_t ewma);
void note_wait(int64_t *ewma, int64_t waited);

/* The smaller of two durations where < 0 means none. */
static inline int64_t ns_min(int64_t a, int64_t b)
{
	if (a < 0)
		return b;
	if (b < 0)
		return a;
	return a < b ? a : b;
}

#endif
