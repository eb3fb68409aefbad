/* SPDX-License-Identifier: GPL-2.0 */
/* poll.h: poll/ppoll/select/pselect over sets that hold shm-tier sockets. */
#ifndef SBP_PRELOAD_POLL_H
#define SBP_PRELOAD_POLL_H

#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <sys/select.h>
#include <sys/time.h>

/* poll/ppoll (tmo in ns, < 0 forever); *handled = 0 when the set holds no
 * shm socket (the caller then makes the real call). */
int do_poll(struct pollfd *fds, nfds_t n, int64_t tmo, const sigset_t *mask, int *handled);
/* Do the sets name a shm socket? (else the real select is the answer) */
int sets_have_shm(int nfds, fd_set *r, fd_set *w, fd_set *e);
/* select/pselect through our poll (tmo in ns, < 0 forever). */
int select_via_poll(int nfds, fd_set *r, fd_set *w, fd_set *e, int64_t tmo,
		    const sigset_t *mask);
/* select: through our poll, writing back the time left as Linux does. */
int poll_select(int nfds, fd_set *r, fd_set *w, fd_set *e, struct timeval *tv);

#endif
