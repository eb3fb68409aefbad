// SPDX-License-Identifier: GPL-2.0
/* epoll.c: epoll_ctl and epoll_wait over sets that hold shm-tier sockets:
 * readiness from the rings, doorbells through the shadow set (epset.c). */
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "channel.h"
#include "control.h"
#include "epoll.h"
#include "epset.h"
#include "fdclass.h"
#include "fdtable.h"
#include "ready.h"
#include "setup.h"
#include "testhooks.h"

#define EP_STATE_BITS (EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLHUP | EPOLLERR)

/* Marker wake-ups between harvests. Leaving doorbell bytes unread while
 * wake-ups keep finding ring data would save two syscalls per wake-up, but
 * measured here: with the kernel tier's sk_msg redirect on the control
 * connection, unread doorbells make the next ones arrive milliseconds late
 * (p99 of an epoll ping-pong went from 80 us to 11 ms). So: every time. */
#define HARVEST_EVERY 1

/* While shm sockets keep the app busy, its other fds are looked at this often
 * (not on every call: that would cost the syscall the rings save). */
#define MERGE_EVERY_NS 50000

/* What the app asks for (ADD/MOD): reported once as it is now. */
static void reg_set(struct epreg *r, const struct epoll_event *ev)
{
	r->events = ev->events;
	r->data = ev->data;
	r->fresh = 1;
	r->disabled = 0;
}

/* A connecting socket: the kernel watches it until it is established (then
 * it moves to our table, see ep_fd_became_shm); we only remember it. */
static int ctl_connecting(int epfd, int op, int fd, struct epoll_event *ev)
{
	int rc = REAL(epoll_ctl)(epfd, op, fd, ev);
	struct epreg *r;
	struct ep *ep;

	if (rc < 0 || !(ep = ep_get(epfd)))
		return rc;
	pthread_mutex_lock(&ep->lock);
	r = ep_find(ep, fd);
	if (op == EPOLL_CTL_DEL) {
		if (r)
			ep_remove(ep, r);
	} else if (r || (r = ep_add(ep, fd))) {
		reg_set(r, ev);
	}
	pthread_mutex_unlock(&ep->lock);
	return rc;
}

/* A shm socket's registration, in our table only: 0 or the errno. *chp: the
 * caller's reference, taken (NULL) when a registration keeps it. Call with
 * ep->lock held. */
static int ctl_shm(struct ep *ep, int op, int fd, struct epoll_event *ev, struct chan **chp)
{
	struct epreg *r = ep_find(ep, fd);

	switch (op) {
	case EPOLL_CTL_ADD:
		if (r && r->dormant && r->ch == *chp) {
			r->dormant = 0;         /* back: its shadow entry never left */
		} else if (r && r->dormant) {
			ep_remove(ep, r);       /* a different socket under that number */
			r = NULL;
		} else if (r) {
			return EEXIST;
		}
		if (!r) {
			r = ep_add(ep, fd);
			if (!r)
				return ENOMEM;
			r->ch = *chp;   /* the registration keeps our reference */
			*chp = NULL;
		}
		reg_set(r, ev);
		shadow_add(ep, r);
		return 0;
	case EPOLL_CTL_MOD:
		if (!r || r->dormant)
			return ENOENT;
		if (ev->events & EPOLLEXCLUSIVE)
			return EINVAL;
		if (!r->ch) {
			/* still in the kernel's set (a one-shot registration
			 * made while the socket was on TCP): to ours now */
			sys_epoll_ctl(ep->epfd, EPOLL_CTL_DEL, fd, NULL);
			r->ch = *chp;
			*chp = NULL;
			reg_set(r, ev);
			r->fresh = 1;
			shadow_add(ep, r);
			return 0;
		}
		reg_set(r, ev);
		return 0;
	case EPOLL_CTL_DEL:
		if (r && !r->ch) {
			sys_epoll_ctl(ep->epfd, EPOLL_CTL_DEL, fd, NULL);
			ep_remove(ep, r);
			return 0;
		}
		if (!r || r->dormant)
			return ENOENT;
		if (r->in_shadow)
			r->dormant = 1;         /* event loops often DEL and ADD again */
		else
			ep_remove(ep, r);
		return 0;
	default:
		return EINVAL;
	}
}

int ep_ctl(int epfd, int op, int fd, struct epoll_event *ev)
{
	struct epreg *r;
	struct chan *ch;
	struct ep *ep;
	int k, err;

	k = fd_class(fd, &ch);
	if (k != K_SHM && k != K_PENDING) {
		ep = ep_of(epfd);
		if (ep && op == EPOLL_CTL_DEL) {
			/* it was a connecting socket we tracked */
			pthread_mutex_lock(&ep->lock);
			r = ep_find(ep, fd);
			if (r)
				ep_remove(ep, r);
			pthread_mutex_unlock(&ep->lock);
		}
		return REAL(epoll_ctl)(epfd, op, fd, ev);
	}
	if ((op == EPOLL_CTL_ADD || op == EPOLL_CTL_MOD) && !ev) {
		if (ch)
			chan_put(ch);
		errno = EFAULT;
		return -1;
	}
	if (k == K_PENDING)
		return ctl_connecting(epfd, op, fd, ev);
	if (fd == epfd) {
		chan_put(ch);
		errno = EINVAL;
		return -1;
	}
	ep = ep_get(epfd);
	if (!ep) {
		chan_put(ch);
		return REAL(epoll_ctl)(epfd, op, fd, ev);       /* EBADF/EINVAL as the kernel says */
	}
	pthread_mutex_lock(&ep->lock);
	err = ctl_shm(ep, op, fd, ev, &ch);
	pthread_mutex_unlock(&ep->lock);
	if (ch)
		chan_put(ch);
	if (err) {
		errno = err;
		return -1;
	}
	return 0;
}

/* Ready shm registrations into evs (at most max). Call with ep->lock. */
static int ep_collect(struct ep *ep, struct epoll_event *evs, int max)
{
	int n = 0, total = ep->n;

	for (int j = 0; j < total && n < max; j++) {
		struct epreg *r = &ep->regs[(ep->cursor + j) % total];
		uint32_t m, rev;

		if (!r->ch || r->disabled || r->dormant)
			continue;
		m = chan_poll_mask(r->fd, r->ch);
		rev = m & ((r->events & ~(EPOLLET | EPOLLONESHOT | EPOLLEXCLUSIVE | EPOLLWAKEUP)) |
			   EPOLLHUP | EPOLLERR);
		if (!rev && !(r->events & EPOLLET))
			continue;
		if (r->events & EPOLLET) {
			/* Edge: report when something new happened since the
			 * last look: data arrived, room appeared, a state bit
			 * came up. Positions only grow. */
			struct chan_sh *sh = r->ch->sh;
			uint64_t rx = sh->rx_consumed + ((atomic_load(&sh->flags) & CH_RX_ATTACHED) ?
							 sbp_ring_readable(&sh->rx.ring) : 0);
			uint64_t tx = sh->tx_written - sbp_ring_readable(&sh->tx.ring);
			uint32_t fresh = 0;

			if (r->fresh)
				fresh = rev;
			if ((rev & EPOLLIN) && rx != r->seen_rx)
				fresh |= EPOLLIN;
			if ((rev & EPOLLOUT) && tx != r->seen_tx)
				fresh |= EPOLLOUT;
			fresh |= rev & ~r->seen_mask & EP_STATE_BITS;
			r->seen_rx = rx;
			r->seen_tx = tx;
			r->seen_mask = rev;
			r->fresh = 0;
			if (!fresh)
				continue;
		}
		evs[n].events = rev;
		evs[n].data = r->data;
		n++;
		if (r->events & EPOLLONESHOT)
			r->disabled = 1;
	}
	if (total)
		ep->cursor = (ep->cursor + 1) % (unsigned)total;
	return n;
}

static int ep_collect_locked(struct ep *ep, struct epoll_event *evs, int max)
{
	int n;

	pthread_mutex_lock(&ep->lock);
	n = ep_collect(ep, evs, max);
	pthread_mutex_unlock(&ep->lock);
	return n;
}

/* Arm every registration; 1 if one turned out ready. *cap: see chan_arm. */
static int ep_arm(struct ep *ep, int64_t *cap)
{
	int ready = 0;

	for (int i = 0; i < ep->n; i++) {
		struct epreg *r = &ep->regs[i];
		int et_seen, out_seen;

		if (!r->ch || r->disabled || r->dormant)
			continue;
		/* An ET reader that was told about data it has not read yet
		 * wants to hear of *new* data: arming would be ready at once. */
		et_seen = (r->events & EPOLLET) && (r->seen_mask & EPOLLIN) &&
			  (atomic_load(&r->ch->sh->flags) & CH_RX_ATTACHED) &&
			  sbp_ring_readable(&r->ch->sh->rx.ring);
		/* Same for room: an ET writer told about room it has not
		 * filled hears of more room only when it fills it. */
		out_seen = (r->events & EPOLLET) && (r->seen_mask & EPOLLOUT);
		if (chan_arm(r->ch, r->events, et_seen, out_seen, cap))
			ready = 1;
		if (!r->in_shadow && (r->events & (IN_BITS | OUT_BITS)))
			*cap = ns_min(*cap, CAP_NOBELL);
	}
	return ready;
}

/* Drop our marker events; *marker says whether there was one. */
static int ep_filter(struct epoll_event *evs, int n, int *marker)
{
	int out = 0;

	for (int i = 0; i < n; i++) {
		if (evs[i].data.u64 == EP_MARKER) {
			*marker = 1;
			continue;
		}
		evs[out++] = evs[i];
	}
	return out;
}

/* Eat the doorbells of the sockets the shadow names (those with an edge since
 * the last harvest), noting FIN/RST. */
static void ep_harvest(struct ep *ep)
{
	ep->bells = 0;
	for (;;) {
		struct epoll_event tmp[64];
		int k = (int)syscall(SYS_epoll_pwait, ep->shadow, tmp, 64, 0, NULL, 8);

		for (int i = 0; i < k; i++) {
			int fd = (int)tmp[i].data.u64;
			struct chan *ch = NULL;
			struct epreg *r;

			pthread_mutex_lock(&ep->lock);
			r = ep_find(ep, fd);
			if (r && r->ch && chan_tryget(r->ch))
				ch = r->ch;
			pthread_mutex_unlock(&ep->lock);
			if (!ch) {
				/* stale: not ours any more */
				sys_epoll_ctl(ep->shadow, EPOLL_CTL_DEL, fd, NULL);
				continue;
			}
			if (ctl_drain(fd, ch) || !ctl_usable(ch)) {
				/* TCP ended: nothing more can come that way */
				pthread_mutex_lock(&ep->lock);
				r = ep_find(ep, fd);
				if (r && r->ch == ch)
					shadow_del(ep, r);
				pthread_mutex_unlock(&ep->lock);
			}
			chan_put(ch);
		}
		if (k < 64)
			break;
	}
}

/* After a marker: collect what the rings say (into evs, at most max). A
 * wake-up that found nothing may have been a FIN/RST (or a stale bell):
 * harvest then, and every HARVEST_EVERY wake-ups anyway. */
static int ep_settle_bells(struct ep *ep, int marker, struct epoll_event *evs, int max,
			   int collected)
{
	int n = 0;

	/* Never collect twice in one batch: a level-triggered registration
	 * would be reported twice (an app reading it twice gets EAGAIN). */
	if (!collected)
		n = ep_collect_locked(ep, evs, max);
	if (marker && ((n == 0 && !collected) || ++ep->bells >= HARVEST_EVERY)) {
		ep_harvest(ep);
		if (n == 0 && !collected)
			n = ep_collect_locked(ep, evs, max);
	}
	return n;
}

/* Connecting sockets in the set: finish them (fd_class does) outside the lock. */
static void ep_settle_connecting(struct ep *ep)
{
	int fds[64], n = 0;

	pthread_mutex_lock(&ep->lock);
	for (int i = 0; i < ep->n && n < 64; i++)
		if (!ep->regs[i].ch)
			fds[n++] = ep->regs[i].fd;
	pthread_mutex_unlock(&ep->lock);
	for (int i = 0; i < n; i++) {
		struct chan *ch;

		if (fd_class(fds[i], &ch) == K_SHM)
			chan_put(ch);
		else if (FD_KIND(fdt_load(fds[i])) != K_PENDING) {
			/* plain after all: forget it, the kernel has it */
			pthread_mutex_lock(&ep->lock);
			struct epreg *r = ep_find(ep, fds[i]);

			if (r && !r->ch)
				ep_remove(ep, r);
			pthread_mutex_unlock(&ep->lock);
		}
	}
}

/* The shm sockets gave n events (or the wait is over): add the app's other
 * fds, without waiting (rate-limited while shm sockets have events). */
static int ep_merge_others(struct ep *ep, int epfd, struct epoll_event *evs, int n, int max)
{
	int64_t t = now_ns();
	int marker = 0, r;

	if (n >= max || (n && t - ep->last_real_ns < MERGE_EVERY_NS))
		return n;
	ep->last_real_ns = t;
	r = sys_epoll_wait_ns(epfd, evs + n, max - n, 0, NULL);
	if (r > 0) {
		r = ep_filter(evs + n, r, &marker);
		n += r;
		if (marker)
			n += ep_settle_bells(ep, 1, evs + n, max - n, n - r);
	}
	return n;
}

int ep_wait(int epfd, struct epoll_event *evs, int max, int64_t tmo, const sigset_t *mask,
	    int *ret)
{
	struct ep *ep;
	int64_t deadline, t_start;
	int n, r, spun = 0;

	if (!g.enabled || !(ep = ep_of(epfd)) || max <= 0 || !evs)
		return 0;
	if (!ep->n)
		return 0;
	ep_settle_connecting(ep);
	t_start = now_ns();
	deadline = tmo < 0 ? DL_NONE : t_start + tmo;
	for (;;) {
		int64_t cap = -1, left = -1;
		int ready, marker = 0;

		n = ep_collect_locked(ep, evs, max);
		if (!n && !spun && g.epoll_spin_ns && tmo != 0) {
			/* spin on the rings before paying for a sleep */
			int64_t end = now_ns() + spin_budget(ep->wait_ewma);

			spun = 1;
			do {
				n = ep_collect_locked(ep, evs, max);
			} while (!n && now_ns() < end);
		}
		if (n || tmo == 0 || (deadline != DL_NONE && now_ns() >= deadline)) {
			n = ep_merge_others(ep, epfd, evs, n, max);
			if (n && tmo != 0)
				note_wait(&ep->wait_ewma, now_ns() - t_start);
			*ret = n;
			return 1;
		}
		test_arm_delay();
		pthread_mutex_lock(&ep->lock);
		ready = ep_arm(ep, &cap);
		pthread_mutex_unlock(&ep->lock);
		if (ready)
			continue;
		if (deadline != DL_NONE) {
			left = deadline - now_ns();
			if (left < 0)
				left = 0;
		}
		r = sys_epoll_wait_ns(epfd, evs, max, ns_min(left, cap), mask);
		ep->last_real_ns = now_ns();
		if (r < 0) {
			*ret = -1;
			return 1;
		}
		r = ep_filter(evs, r, &marker);
		n = ep_settle_bells(ep, marker, evs + r, max - r, 0);
		if (r + n) {
			note_wait(&ep->wait_ewma, now_ns() - t_start);
			*ret = r + n;
			return 1;
		}
		if (deadline != DL_NONE && now_ns() >= deadline) {
			*ret = 0;
			return 1;
		}
	}
}
