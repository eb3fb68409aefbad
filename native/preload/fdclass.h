/* SPDX-License-Identifier: GPL-2.0 */
/* fdclass.h: what an fd is to us. */
#ifndef SBP_PRELOAD_FDCLASS_H
#define SBP_PRELOAD_FDCLASS_H

#include "channel.h"

/* What fd is (enum fd_kind); for K_SHM *chp is a referenced channel
 * (chan_put it). Probes unknown fds, finishes pending connects, and moves
 * channels that can go live, on the way. */
int fd_class(int fd, struct chan **chp);
/* The same for the data calls: a channel still on TCP (K_PENDING) comes
 * back too (*chp set), since its bytes must be counted. */
int fd_io_class(int fd, struct chan **chp);
/* fd is established (connect returned, or accept): settle its kind. The
 * table entry holds K_BUSY (the caller owns it) on entry. */
void resolve_established(int fd, int rediscovered);

#endif
