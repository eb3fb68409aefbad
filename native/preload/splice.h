/* SPDX-License-Identifier: GPL-2.0 */
/* splice.h: sendfile and splice with a shm-tier socket on one side. Each
 * call takes the channel hooks.c found (referenced; the call puts it or
 * the caller does, as said) and returns what the libc call returns. */
#ifndef SBP_PRELOAD_SPLICE_H
#define SBP_PRELOAD_SPLICE_H

#include <sys/types.h>

#include "channel.h"

ssize_t shm_sendfile(int out, struct chan *ch, int in, off_t *offset, size_t count);
/* splice with a shm socket on one side (cin or cout, the other NULL) or
 * both (then EINVAL, as the kernel wants a pipe). Puts the channels. */
ssize_t shm_splice(int in, struct chan *cin, off_t *off_in, int out, struct chan *cout,
		   off_t *off_out, size_t len, unsigned int flags);

#endif
