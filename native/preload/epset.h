/* SPDX-License-Identifier: GPL-2.0 */
/* epset.h: the shadow epoll sets: registrations of shm-tier sockets in the
 * app's epoll fds, kept by us, and the shadow fd that watches their TCP
 * sockets for doorbells. */
#ifndef SBP_PRELOAD_EPSET_H
#define SBP_PRELOAD_EPSET_H

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/epoll.h>

#include "channel.h"

/*
 * Each app epoll fd that holds shm sockets gets a *shadow* epoll fd (ours,
 * edge-triggered) with their TCP sockets; the shadow sits in the app's set
 * under a marker value, so a doorbell wakes the app's epoll_wait.
 * Registrations of shm sockets live in our table (events, data, ET and
 * ONESHOT state), not in the kernel's.
 */
#define EP_MARKER 0x5342505f53484457ULL    /* "WDHS_PBS": not a user-space pointer */

struct epreg {
	int fd;
	uint32_t events;        /* the app's interest and flags (ET, ONESHOT...) */
	epoll_data_t data;
	struct chan *ch;        /* referenced; NULL while the socket is connecting */
	uint64_t seen_rx;       /* ET: positions and mask at the last look */
	uint64_t seen_tx;
	uint32_t seen_mask;
	uint8_t fresh;          /* ET: report the current state once (after ADD/MOD) */
	uint8_t disabled;       /* EPOLLONESHOT fired */
	uint8_t in_shadow;      /* its TCP socket is in the shadow set */
	uint8_t dormant;        /* the app deleted it; kept in the shadow for a cheap re-ADD */
};

struct ep {
	int epfd;
	int shadow;
	pthread_mutex_t lock;
	int n, cap;
	struct epreg *regs;
	size_t regs_bytes;
	int64_t wait_ewma;      /* how long waits with traffic take (ns) */
	unsigned cursor;
	int64_t last_real_ns;   /* last look at the app's other fds */
	unsigned bells;         /* marker wake-ups since the last harvest */
	struct ep *next;
};

/* The set of an app epoll fd: NULL if it holds no shm socket (yet). */
struct ep *ep_of(int epfd);
/* ... made on first need; NULL if epfd is not an epoll fd (or no memory). */
struct ep *ep_get(int epfd);
/* A registration of fd (call with ep->lock held): found, added, removed. */
struct epreg *ep_find(struct ep *ep, int fd);
struct epreg *ep_add(struct ep *ep, int fd);
void ep_remove(struct ep *ep, struct epreg *r);
/* Its TCP socket into / out of the shadow set. */
void shadow_add(struct ep *ep, struct epreg *r);
void shadow_del(struct ep *ep, struct epreg *r);

void ep_forget_fd(int fd);              /* close(): drop fd from every epoll set */
void ep_free(void *ep);                 /* close() of an epoll fd */
/* An fd registered in epoll sets while connecting became a shm socket. */
void ep_fd_became_shm(int fd);
/* A shm socket went back to plain TCP: its registrations to the kernel. */
void ep_fd_became_plain(int fd);
void ep_atfork_child(void);

#endif
