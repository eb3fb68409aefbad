/* SPDX-License-Identifier: GPL-2.0 */
/* fdclass.h: what an fd is to us. */
#ifndef SBP_PRELOAD_FDCLASS_H
#define SBP_PRELOAD_FDCLASS_H

#include "channel.h"

/* What fd is (enum fd_kind); for K_SHM *chp is a referenced channel
 * (chan_put it). Probes unknown fds and finishes pending connects on the way. */
int fd_class(int fd, struct chan **chp);
/* fd is established (connect returned, or accept): settle its kind. The
 * table entry holds K_BUSY (the caller owns it) on entry. */
void resolve_established(int fd, int rediscovered);

#endif
