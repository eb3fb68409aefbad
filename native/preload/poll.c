// SPDX-License-Identifier: GPL-2.0
/* poll.c: poll, ppoll, select and pselect over sets that hold shm-tier
 * sockets (select goes through poll, as in Linux). */
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "channel.h"
#include "control.h"
#include "fdclass.h"
#include "fdtable.h"
#include "poll.h"
#include "ready.h"
#include "setup.h"
#include "testhooks.h"

struct pent {
	nfds_t i;
	short events;
	int fd;
	struct chan *ch;
};

static int shm_revents(struct pollfd *fds, struct pent *pe, int cnt)
{
	int ready = 0;

	for (int j = 0; j < cnt; j++) {
		uint32_t m = chan_poll_mask(pe[j].fd, pe[j].ch) &
			     ((uint32_t)(unsigned short)pe[j].events | POLLHUP | POLLERR);

		fds[pe[j].i].revents = (short)m;
		ready += m != 0;
	}
	return ready;
}

static int count_revents(struct pollfd *fds, nfds_t n)
{
	int c = 0;

	for (nfds_t i = 0; i < n; i++)
		c += fds[i].revents != 0;
	return c;
}

/* The poll loop over a set with shm sockets in it (pe: cnt of them). */
static int poll_loop(struct pollfd *fds, nfds_t n, struct pent *pe, int cnt, int64_t tmo,
		     const sigset_t *mask)
{
	static __thread int64_t ewma;
	int64_t start = now_ns(), deadline = tmo < 0 ? DL_NONE : start + tmo;
	int64_t spin = g.epoll_spin_ns ? spin_budget(ewma) : 0;
	int r, ready, err;

	for (;;) {
		int64_t cap = -1, left = -1;

		ready = shm_revents(fds, pe, cnt);
		if (!ready && spin > 0 && deadline != 0) {
			/* spin on the rings: the peer is probably running */
			int64_t end = now_ns() + spin;

			spin = 0;
			do {
				ready = shm_revents(fds, pe, cnt);
			} while (!ready && now_ns() < end);
		}
		if (ready || (deadline != DL_NONE && now_ns() >= deadline)) {
			if (ready && tmo != 0)
				note_wait(&ewma, now_ns() - start);
			/* the other fds, without waiting */
			if ((nfds_t)cnt == n) {
				shm_revents(fds, pe, cnt);
				return count_revents(fds, n);
			}
			for (int j = 0; j < cnt; j++)
				fds[pe[j].i].fd = ~pe[j].fd;
			r = sys_ppoll(fds, n, 0, NULL);
			err = errno;
			for (int j = 0; j < cnt; j++)
				fds[pe[j].i].fd = pe[j].fd;
			if (r < 0) {
				errno = err;
				return -1;
			}
			shm_revents(fds, pe, cnt);
			return count_revents(fds, n);
		}
		test_arm_delay();
		for (int j = 0; j < cnt; j++) {
			if (chan_arm(pe[j].ch, (uint32_t)(unsigned short)pe[j].events, 0, 0, &cap))
				ready = 1;
		}
		if (ready)
			continue;
		for (int j = 0; j < cnt; j++) {
			struct pollfd *p = &fds[pe[j].i];

			if (ctl_usable(pe[j].ch)) {
				p->events = POLLIN | POLLRDHUP;
			} else {
				p->fd = ~pe[j].fd;
				cap = ns_min(cap, CAP_NOBELL);
			}
		}
		if (deadline != DL_NONE) {
			left = deadline - now_ns();
			if (left < 0)
				left = 0;
		}
		r = sys_ppoll(fds, n, ns_min(left, cap), mask);
		err = errno;
		for (int j = 0; j < cnt; j++) {
			struct pollfd *p = &fds[pe[j].i];

			p->fd = pe[j].fd;
			p->events = pe[j].events;
			if (p->revents) {
				ctl_drain(pe[j].fd, pe[j].ch);
				p->revents = 0;
			}
		}
		if (r < 0) {
			errno = err;
			return -1;
		}
		r = count_revents(fds, n) + shm_revents(fds, pe, cnt);
		if (r) {
			note_wait(&ewma, now_ns() - start);
			return count_revents(fds, n);
		}
		if (deadline != DL_NONE && now_ns() >= deadline)
			return 0;
	}
}

int do_poll(struct pollfd *fds, nfds_t n, int64_t tmo, const sigset_t *mask, int *handled)
{
	struct pent stack[64], *pe = stack;
	size_t bytes = 0;
	int cnt = 0, r, err;

	*handled = 0;
	if (!g.enabled || !fds)
		return 0;
	for (nfds_t i = 0; i < n; i++) {
		struct chan *ch;

		if (fds[i].fd < 0 || fd_class(fds[i].fd, &ch) != K_SHM)
			continue;
		if (cnt == 64 && pe == stack) {
			bytes = n * sizeof(*pe);
			pe = anon_alloc(bytes);
			if (!pe) {
				pe = stack;
				chan_put(ch);
				continue;       /* no memory: this one is polled as TCP */
			}
			memcpy(pe, stack, sizeof(stack));
		}
		pe[cnt].i = i;
		pe[cnt].events = fds[i].events;
		pe[cnt].fd = fds[i].fd;
		pe[cnt].ch = ch;
		cnt++;
	}
	if (!cnt)
		return 0;
	*handled = 1;
	for (nfds_t i = 0; i < n; i++)
		fds[i].revents = 0;
	r = poll_loop(fds, n, pe, cnt, tmo, mask);
	err = errno;
	for (int j = 0; j < cnt; j++)
		chan_put(pe[j].ch);
	if (pe != stack)
		munmap(pe, bytes);
	errno = err;
	return r;
}

int sets_have_shm(int nfds, fd_set *r, fd_set *w, fd_set *e)
{
	if (!g.enabled)
		return 0;
	for (int fd = 0; fd < nfds && fd < FD_SETSIZE; fd++) {
		uint64_t v;

		if (!((r && FD_ISSET(fd, r)) || (w && FD_ISSET(fd, w)) || (e && FD_ISSET(fd, e))))
			continue;
		v = fdt_load(fd);
		if (FD_KIND(v) == K_SHM || FD_KIND(v) == K_PENDING || FD_KIND(v) == K_UNKNOWN) {
			struct chan *ch;

			if (fd_class(fd, &ch) == K_SHM) {
				chan_put(ch);
				return 1;
			}
		}
	}
	return 0;
}

/* The pollfds a select() asks about (pf NULL: only count them). */
static int select_fds(int nfds, fd_set *r, fd_set *w, fd_set *e, struct pollfd *pf)
{
	int n = 0;

	for (int fd = 0; fd < nfds && fd < FD_SETSIZE; fd++) {
		short ev = 0;

		if (r && FD_ISSET(fd, r))
			ev |= POLLIN;
		if (w && FD_ISSET(fd, w))
			ev |= POLLOUT;
		if (e && FD_ISSET(fd, e))
			ev |= POLLPRI;
		if (!ev)
			continue;
		if (pf)
			pf[n] = (struct pollfd){ .fd = fd, .events = ev };
		n++;
	}
	return n;
}

#define SELECT_FAST 64  /* pollfds on the stack; more on the heap (a small stack may call select) */

/* select over pf[0..n): poll it, then write the sets back. */
static int select_pf(fd_set *r, fd_set *w, fd_set *e, int64_t tmo, const sigset_t *mask,
		     struct pollfd *pf, int n)
{
	int handled, rc, count = 0;

	rc = do_poll(pf, (nfds_t)n, tmo, mask, &handled);
	if (!handled)
		rc = sys_ppoll(pf, (nfds_t)n, tmo, mask);
	if (rc < 0)
		return rc;
	for (int i = 0; i < n; i++) {
		if (pf[i].revents & POLLNVAL) {
			errno = EBADF;
			return -1;
		}
	}
	if (r)
		FD_ZERO(r);
	if (w)
		FD_ZERO(w);
	if (e)
		FD_ZERO(e);
	for (int i = 0; i < n; i++) {
		short rv = pf[i].revents, ev = pf[i].events;

		if ((ev & POLLIN) && (rv & (POLLIN | POLLRDNORM | POLLRDBAND | POLLHUP | POLLERR))) {
			FD_SET(pf[i].fd, r);
			count++;
		}
		if ((ev & POLLOUT) && (rv & (POLLOUT | POLLWRNORM | POLLWRBAND | POLLERR))) {
			FD_SET(pf[i].fd, w);
			count++;
		}
		if ((ev & POLLPRI) && (rv & POLLPRI)) {
			FD_SET(pf[i].fd, e);
			count++;
		}
	}
	return count;
}

/* select through our poll (Linux's own POLLIN_SET/POLLOUT_SET/POLLEX_SET). */
int select_via_poll(int nfds, fd_set *r, fd_set *w, fd_set *e, int64_t tmo,
		    const sigset_t *mask)
{
	struct pollfd fast[SELECT_FAST], *pf = fast;
	int n = select_fds(nfds, r, w, e, NULL), rc;

	if (n > SELECT_FAST && !(pf = malloc((size_t)n * sizeof(*pf)))) {
		errno = ENOMEM;
		return -1;
	}
	select_fds(nfds, r, w, e, pf);
	rc = select_pf(r, w, e, tmo, mask, pf, n);
	if (pf != fast)
		free(pf);
	return rc;
}

int poll_select(int nfds, fd_set *r, fd_set *w, fd_set *e, struct timeval *tv)
{
	int64_t tmo, start;
	int rc, err;

	tmo = tv ? (int64_t)tv->tv_sec * NS_PER_S + (int64_t)tv->tv_usec * 1000 : -1;
	start = now_ns();
	rc = select_via_poll(nfds, r, w, e, tmo, NULL);
	err = errno;
	if (tv) {       /* Linux writes back the time left */
		int64_t left = tmo - (now_ns() - start);

		if (left < 0)
			left = 0;
		tv->tv_sec = left / NS_PER_S;
		tv->tv_usec = (left % NS_PER_S) / 1000;
	}
	errno = err;
	return rc;
}
