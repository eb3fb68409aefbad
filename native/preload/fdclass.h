/* SPDX-License-Identifier: GPL-2.0 */
/* fdclass.h: what an fd is to us. */
#ifndef SBP_PRELOAD_FDCLASS_H
#define SBP_PRELOAD_FDCLASS_H

#include "channel.h"
#include "fdtable.h"
#include "setup.h"

/* What fd is (enum fd_kind); for K_SHM *chp is a referenced channel
 * (chan_put it). Probes unknown fds, finishes pending connects, and moves
 * channels that can go live, on the way. */
int fd_class(int fd, struct chan **chp);
/* The same for the data calls: a channel still on TCP (K_PENDING) comes
 * back too (*chp set), since its bytes must be counted. */
int fd_io_class_slow(int fd, struct chan **chp);

/* Inline, the two common cases: an fd that is not ours, and a live
 * channel of a process with one thread (no other call can change the
 * entry meanwhile). The rest: fd_io_class_slow. */
static inline int fd_io_class(int fd, struct chan **chp)
{
	uint64_t v = fdt_load(fd);
	struct chan *ch = FD_PTR(v);

	if (FD_KIND(v) == K_PLAIN) {
		*chp = NULL;
		return K_PLAIN;
	}
	if (FD_KIND(v) == K_SHM && __libc_single_threaded && g.enabled && chan_tryget(ch)) {
		if (likely(!(atomic_load(&ch->sh->flags) & CH_REVERTED))) {
			*chp = ch;
			return K_SHM;
		}
		chan_put(ch);
	}
	return fd_io_class_slow(fd, chp);
}
/* fd is established (connect returned, or accept): settle its kind. The
 * table entry holds K_BUSY (the caller owns it) on entry. */
void resolve_established(int fd, int rediscovered);

#endif
