/* SPDX-License-Identifier: GPL-2.0 */
/* epoll.h: epoll_ctl and epoll_wait over sets that hold shm-tier sockets. */
#ifndef SBP_PRELOAD_EPOLL_H
#define SBP_PRELOAD_EPOLL_H

#include <signal.h>
#include <stdint.h>
#include <sys/epoll.h>

/* epoll_ctl, as the real one would answer (the library is enabled). */
int ep_ctl(int epfd, int op, int fd, struct epoll_event *ev);
/* 1: handled (*ret is the result); 0: no shm sockets here, make the real
 * call. tmo in ns, < 0 forever. */
int ep_wait(int epfd, struct epoll_event *evs, int max, int64_t tmo, const sigset_t *mask,
	    int *ret);

#endif
