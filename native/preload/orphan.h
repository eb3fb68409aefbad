/* SPDX-License-Identifier: GPL-2.0 */
/* orphan.h: the block of a shared socket closed here waits until no process
 * holds the socket (orphan.c). */
#ifndef SBP_PRELOAD_ORPHAN_H
#define SBP_PRELOAD_ORPHAN_H

#include <stdint.h>

#include "memory.h"

/* The last fd here of a socket another process may hold is being closed
 * (fd still open): its block (ref; grown: what its writer grew into,
 * charged here) is done once no process holds it. */
void orphan_add(int fd, const struct mem_ref *ref, uint64_t cookie, uint64_t grown);
/* Ask the kernel about at most max of them; give up the blocks of those
 * nobody holds any more. Not with memory.c's lock held. */
void orphan_check(int max);
void orphan_atfork_child(void);

#endif
