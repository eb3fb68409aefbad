// SPDX-License-Identifier: GPL-2.0
/*
 * Readiness of shm-tier sockets in poll/ppoll/select/pselect/epoll.
 *
 * The kernel sees only the TCP control connection, which is always writable
 * and readable only when a doorbell byte (or FIN/RST) arrived. So for each
 * shm socket in a set we compute readiness from the rings ourselves, and
 * before sleeping in the real call we arm the rings (the peer then sends a
 * doorbell when it publishes) and let the kernel watch the TCP socket for
 * POLLIN only. A short spin first: a peer on another CPU usually answers
 * within microseconds, and a sleep/wake costs tens.
 *
 * epoll: each app epoll fd that holds shm sockets gets a *shadow* epoll fd
 * (ours, level-triggered) with their TCP sockets; the shadow sits in the
 * app's set under a marker value, so a doorbell wakes the app's epoll_wait.
 * Registrations of shm sockets live in our table (events, data, ET and
 * ONESHOT state), not in the kernel's.
 */
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "interpose.h"

#define IN_BITS   (POLLIN | POLLRDNORM)
#define OUT_BITS  (POLLOUT | POLLWRNORM)
#define CAP_ETIN  1000000       /* ET reader left data unread: re-check every 1 ms */
#define CAP_NOBELL 1000000      /* no doorbell can come (TCP side shut) */
#define CAP_ATTACH 10000000     /* peer's ring not formatted yet */

/* Same values in poll and epoll (Linux uses one mask for both). */
_Static_assert(POLLIN == EPOLLIN && POLLOUT == EPOLLOUT && POLLRDHUP == EPOLLRDHUP &&
	       POLLHUP == EPOLLHUP && POLLERR == EPOLLERR && POLLRDNORM == EPOLLRDNORM &&
	       POLLWRNORM == EPOLLWRNORM, "poll and epoll bits agree");

/* Writable means at least this much room (a quarter of the ring), as TCP
 * reports EPOLLOUT only past a low-water mark: a writer woken for every
 * small read of its peer (wrk reads 8 KiB at a time) pays a wake-up and a
 * doorbell per 8 KiB. */
static inline size_t tx_low_water(const struct chan_sh *sh)
{
	return (size_t)(sh->tx.cap / 4);
}

uint32_t chan_poll_mask(int fd, struct chan *ch)
{
	struct chan_sh *sh = ch->sh;
	uint32_t f, m = 0, rf = 0, tf;
	int rd_shut, wr_shut;

	rx_try_attach(fd, ch);
	f = atomic_load_explicit(&sh->flags, memory_order_acquire);
	if (f & CH_BROKEN)
		return IN_BITS | OUT_BITS | POLLERR | POLLHUP | POLLRDHUP;
	if (f & CH_RX_ATTACHED) {
		if (sbp_ring_corrupt(&sh->rx))
			return IN_BITS | OUT_BITS | POLLERR | POLLHUP | POLLRDHUP;
		rf = sbp_ring_flags(&sh->rx);
		if (sbp_ring_readable(&sh->rx) || (rf & (SBP_RING_WRITER_CLOSED | SBP_RING_RESET)))
			m |= IN_BITS;
	}
	/* like tcp_poll(): RDHUP once the peer's FIN is in, HUP when both
	 * directions are shut, ERR after a reset */
	rd_shut = (f & (CH_SHUT_RD | CH_TCP_EOF | CH_TCP_RST | CH_PEER_GONE)) ||
		  (rf & SBP_RING_WRITER_CLOSED);
	if (rd_shut)
		m |= IN_BITS | POLLRDHUP;
	tf = sbp_ring_flags(&sh->tx);
	wr_shut = (f & (CH_SHUT_WR | CH_PEER_GONE)) || sbp_ring_corrupt(&sh->tx) ||
		  (tf & (SBP_RING_READER_CLOSED | SBP_RING_RESET));
	if (wr_shut || sbp_ring_writable(&sh->tx) >= tx_low_water(sh))
		m |= OUT_BITS;
	if (rd_shut && wr_shut)
		m |= POLLHUP;
	if (((rf | tf) & SBP_RING_RESET) || (f & CH_GONE_RESET))
		m |= POLLERR | POLLHUP;
	return m;
}

/* Tests only (SHMBYPASS_TEST_ARM_DELAY_NS): sleep this long between the
 * last look at the rings and arming them, so a peer that frees room or
 * sends data meanwhile is certain to do it inside that window (the window
 * is otherwise a few hundred ns; the lost wake-up it hid showed only under
 * load). Read once at load; 0 costs one predictable branch per sleep. */
static int64_t test_arm_delay_ns;

__attribute__((constructor)) static void poll_test_hooks(void)
{
	const char *v = getenv("SHMBYPASS_TEST_ARM_DELAY_NS");

	if (v && *v)
		test_arm_delay_ns = strtoll(v, NULL, 10);
}

static void test_arm_delay(void)
{
	if (unlikely(test_arm_delay_ns > 0)) {
		struct timespec ts = { test_arm_delay_ns / 1000000000, test_arm_delay_ns % 1000000000 };
		int saved = errno;

		nanosleep(&ts, NULL);
		errno = saved;
	}
}

/* Arm what a waiter wants. Returns 1 if something is ready already; *cap
 * lowered where no doorbell will come. in_et_seen: the ET reader was told
 * about the data it still has (do not arm: that would be ready at once).
 * out_et_seen: likewise for room to write. */
static int chan_arm(struct chan *ch, uint32_t events, int in_et_seen, int out_et_seen,
		    int64_t *cap)
{
	struct chan_sh *sh = ch->sh;
	uint32_t f = atomic_load(&sh->flags);
	int ready = 0;

	if (events & IN_BITS) {
		if (!(f & CH_RX_ATTACHED)) {
			if (*cap < 0 || *cap > CAP_ATTACH)
				*cap = CAP_ATTACH;
		} else if (in_et_seen) {
			if (*cap < 0 || *cap > CAP_ETIN)
				*cap = CAP_ETIN;
		} else if (sbp_ring_arm_readable(&sh->rx)) {
			ready = 1;
		}
	}
	if (events & OUT_BITS) {
		if (sbp_ring_writable(&sh->tx) < tx_low_water(sh)) {
			/* the reader rings once that much is free */
			if (sbp_ring_arm_writable_min(&sh->tx, tx_low_water(sh)))
				ready = 1;
			else if (peer_tx_shut(ch) && (*cap < 0 || *cap > CAP_NOBELL))
				*cap = CAP_NOBELL;
		} else if (!out_et_seen) {
			/* Room appeared after the caller's last look (the
			 * reader runs on the other CPU): look again. Not arming
			 * and not saying so slept with no doorbell to come:
			 * nginx's sendfile stalled until some other wake-up. */
			ready = 1;
		}
	}
	return ready;
}

/* Can the TCP socket still bring doorbells? */
static int ctl_usable(struct chan *ch)
{
	return !(atomic_load(&ch->sh->flags) & (CH_TCP_EOF | CH_TCP_RST | CH_SHUT_RD | CH_BROKEN));
}

static int64_t ns_min(int64_t a, int64_t b)
{
	if (a < 0)
		return b;
	if (b < 0)
		return a;
	return a < b ? a : b;
}

static int sys_ppoll(struct pollfd *fds, nfds_t n, int64_t ns, const sigset_t *mask)
{
	struct timespec ts, *tp = NULL;

	if (ns >= 0) {
		ts.tv_sec = ns / 1000000000;
		ts.tv_nsec = ns % 1000000000;
		tp = &ts;
	}
	return (int)syscall(SYS_ppoll, fds, n, tp, mask, 8);
}

/* The spin before a sleep follows what waits take while there is traffic:
 * about twice the usual wait, at most SHMBYPASS_EPOLL_SPIN_NS (a request/
 * response peer answers within it, so no sleep, no wake-up, no syscall).
 * Waits longer than the limit (a slow or idle peer) make the spin short:
 * spinning would only burn the CPU. */
#define ACTIVE_WAIT_NS 2000000

static int64_t spin_budget(int64_t ewma)
{
	int64_t max = g.epoll_spin_ns;

	if (ewma > max)
		return max / 16;
	return ewma * 2 + 2000 < max ? ewma * 2 + 2000 : max;
}

static void note_wait(int64_t *ewma, int64_t waited)
{
	if (waited < ACTIVE_WAIT_NS)
		*ewma = (*ewma * 7 + waited) / 8;
	else
		*ewma = (*ewma * 7 + g.epoll_spin_ns * 2) / 8;     /* idle: spin little */
}

/* ---- poll ----------------------------------------------------------------------- */

struct pent {
	nfds_t i;
	short events;
	int fd;
	struct chan *ch;
};

static void *scratch_alloc(size_t bytes)
{
	void *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

	return p == MAP_FAILED ? NULL : p;
}

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

/* poll/ppoll with shm sockets in the set; *handled = 0 when there are none
 * (the caller then makes the real call). */
static int do_poll(struct pollfd *fds, nfds_t n, int64_t tmo, const sigset_t *mask, int *handled)
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
			pe = scratch_alloc(bytes);
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

EXPORT int poll(struct pollfd *fds, nfds_t n, int timeout)
{
	int handled, r = do_poll(fds, n, timeout < 0 ? -1 : (int64_t)timeout * 1000000, NULL, &handled);

	return handled ? r : REAL(poll)(fds, n, timeout);
}

EXPORT int __poll_chk(struct pollfd *fds, nfds_t n, int timeout, size_t fdslen)
{
	if (fdslen / sizeof(*fds) < n)
		return REAL(__poll_chk)(fds, n, timeout, fdslen);       /* aborts */
	return poll(fds, n, timeout);
}

static int64_t ts_ns(const struct timespec *ts)
{
	if (!ts)
		return -1;
	return (int64_t)ts->tv_sec * 1000000000 + ts->tv_nsec;
}

EXPORT int ppoll(struct pollfd *fds, nfds_t n, const struct timespec *ts, const sigset_t *mask)
{
	int handled, r;

	if (ts && (ts->tv_sec < 0 || ts->tv_nsec < 0 || ts->tv_nsec >= 1000000000))
		return REAL(ppoll)(fds, n, ts, mask);   /* EINVAL */
	r = do_poll(fds, n, ts_ns(ts), mask, &handled);
	return handled ? r : REAL(ppoll)(fds, n, ts, mask);
}

EXPORT int __ppoll_chk(struct pollfd *fds, nfds_t n, const struct timespec *ts,
		       const sigset_t *mask, size_t fdslen)
{
	if (fdslen / sizeof(*fds) < n)
		return REAL(__ppoll_chk)(fds, n, ts, mask, fdslen);
	return ppoll(fds, n, ts, mask);
}

/* ---- select ---------------------------------------------------------------------- */

static int sets_have_shm(int nfds, fd_set *r, fd_set *w, fd_set *e)
{
	if (!g.enabled)
		return 0;
	for (int fd = 0; fd < nfds && fd < FD_SETSIZE; fd++) {
		uint64_t v;

		if (!((r && FD_ISSET(fd, r)) || (w && FD_ISSET(fd, w)) || (e && FD_ISSET(fd, e))))
			continue;
		v = fdt_load(fd);
		if (FD_KIND(v) == K_SHM || FD_KIND(v) == K_CONNECTING || FD_KIND(v) == K_UNKNOWN) {
			struct chan *ch;

			if (fd_class(fd, &ch) == K_SHM) {
				chan_put(ch);
				return 1;
			}
		}
	}
	return 0;
}

/* select through our poll (Linux's own POLLIN_SET/POLLOUT_SET/POLLEX_SET). */
static int select_via_poll(int nfds, fd_set *r, fd_set *w, fd_set *e, int64_t tmo,
			   const sigset_t *mask)
{
	struct pollfd pf[FD_SETSIZE];
	int n = 0, handled, rc, count = 0;

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
		pf[n].fd = fd;
		pf[n].events = ev;
		pf[n].revents = 0;
		n++;
	}
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

EXPORT int select(int nfds, fd_set *r, fd_set *w, fd_set *e, struct timeval *tv)
{
	int64_t tmo, start;
	int rc, err;

	if (nfds < 0 || nfds > FD_SETSIZE || !sets_have_shm(nfds, r, w, e) ||
	    (tv && (tv->tv_sec < 0 || tv->tv_usec < 0)))
		return REAL(select)(nfds, r, w, e, tv);
	tmo = tv ? (int64_t)tv->tv_sec * 1000000000 + (int64_t)tv->tv_usec * 1000 : -1;
	start = now_ns();
	rc = select_via_poll(nfds, r, w, e, tmo, NULL);
	err = errno;
	if (tv) {       /* Linux writes back the time left */
		int64_t left = tmo - (now_ns() - start);

		if (left < 0)
			left = 0;
		tv->tv_sec = left / 1000000000;
		tv->tv_usec = (left % 1000000000) / 1000;
	}
	errno = err;
	return rc;
}

EXPORT int pselect(int nfds, fd_set *r, fd_set *w, fd_set *e, const struct timespec *ts,
		   const sigset_t *mask)
{
	if (nfds < 0 || nfds > FD_SETSIZE || !sets_have_shm(nfds, r, w, e) ||
	    (ts && (ts->tv_sec < 0 || ts->tv_nsec < 0 || ts->tv_nsec >= 1000000000)))
		return REAL(pselect)(nfds, r, w, e, ts, mask);
	return select_via_poll(nfds, r, w, e, ts_ns(ts), mask);
}

/* ---- epoll ------------------------------------------------------------------------- */

#define EP_MARKER 0x5342505f53484457ULL    /* "WDHS_PBS": not a user-space pointer */
#define EP_STATE_BITS (EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLHUP | EPOLLERR)

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
	uint32_t spin_ns;       /* unused (kept for layout) */
	int64_t wait_ewma;      /* how long waits with traffic take (ns) */
	unsigned cursor;
	int64_t last_real_ns;   /* last look at the app's other fds */
	unsigned bells;         /* marker wake-ups since the last harvest */
	struct ep *next;
};

/* Marker wake-ups between harvests. Leaving doorbell bytes unread while
 * wake-ups keep finding ring data would save two syscalls per wake-up, but
 * measured here: with the kernel tier's sk_msg redirect on the control
 * connection, unread doorbells make the next ones arrive milliseconds late
 * (p99 of an epoll ping-pong went from 80 us to 11 ms). So: every time. */
#define HARVEST_EVERY 1

/* While shm sockets keep the app busy, its other fds are looked at this often
 * (not on every call: that would cost the syscall the rings save). */
#define MERGE_EVERY_NS 50000

static pthread_mutex_t ep_list_lock = PTHREAD_MUTEX_INITIALIZER;
static struct ep *ep_list;

static struct ep *ep_of(int epfd)
{
	uint64_t v = fdt_load(epfd);

	return FD_KIND(v) == K_EPOLL ? FD_PTR(v) : NULL;
}

static int sys_epoll_ctl(int epfd, int op, int fd, struct epoll_event *ev)
{
	return (int)syscall(SYS_epoll_ctl, epfd, op, fd, ev);
}

static void shadow_add(struct ep *ep, struct epreg *r)
{
	/* Edge-triggered: one marker per burst of doorbells; the harvest
	 * (ep_settle_bells) eats them. */
	struct epoll_event se = { .events = EPOLLIN | EPOLLRDHUP | EPOLLET,
				  .data.u64 = (uint64_t)r->fd };
	int saved = errno;

	if (!r->in_shadow && r->ch && ctl_usable(r->ch) &&
	    sys_epoll_ctl(ep->shadow, EPOLL_CTL_ADD, r->fd, &se) == 0)
		r->in_shadow = 1;
	errno = saved;
}

static void shadow_del(struct ep *ep, struct epreg *r)
{
	int saved = errno;

	if (r->in_shadow)
		sys_epoll_ctl(ep->shadow, EPOLL_CTL_DEL, r->fd, NULL);
	r->in_shadow = 0;
	errno = saved;
}

static struct epreg *ep_find(struct ep *ep, int fd)
{
	for (int i = 0; i < ep->n; i++)
		if (ep->regs[i].fd == fd)
			return &ep->regs[i];
	return NULL;
}

static struct epreg *ep_add(struct ep *ep, int fd)
{
	if (ep->n == ep->cap) {
		int ncap = ep->cap ? ep->cap * 2 : 64;
		size_t bytes = (size_t)ncap * sizeof(struct epreg);
		struct epreg *nr = scratch_alloc(bytes);

		if (!nr)
			return NULL;
		if (ep->regs) {
			memcpy(nr, ep->regs, (size_t)ep->n * sizeof(struct epreg));
			munmap(ep->regs, ep->regs_bytes);
		}
		ep->regs = nr;
		ep->regs_bytes = bytes;
		ep->cap = ncap;
	}
	memset(&ep->regs[ep->n], 0, sizeof(struct epreg));
	ep->regs[ep->n].fd = fd;
	return &ep->regs[ep->n++];
}

static void ep_remove(struct ep *ep, struct epreg *r)
{
	shadow_del(ep, r);
	if (r->ch)
		chan_put(r->ch);
	*r = ep->regs[--ep->n];
}

static struct ep *ep_get(int epfd)
{
	struct epoll_event mk = { .events = EPOLLIN | EPOLLET, .data.u64 = EP_MARKER };
	uint64_t v = fdt_load(epfd);
	pthread_mutexattr_t ma;
	struct ep *ep;
	int sh;

	if (FD_KIND(v) == K_EPOLL)
		return FD_PTR(v);
	if (FD_KIND(v) == K_SHM || FD_KIND(v) == K_BUSY)
		return NULL;
	sh = (int)syscall(SYS_epoll_create1, EPOLL_CLOEXEC);
	if (sh < 0)
		return NULL;
	sh = sbp_internal_fd(sh);
	if (sys_epoll_ctl(epfd, EPOLL_CTL_ADD, sh, &mk) < 0) {
		fdt_store(sh, K_UNKNOWN);
		syscall(SYS_close, sh);
		return NULL;    /* not an epoll fd: the real call will say so */
	}
	ep = scratch_alloc(sizeof(*ep));
	if (!ep) {
		sys_epoll_ctl(epfd, EPOLL_CTL_DEL, sh, NULL);
		fdt_store(sh, K_UNKNOWN);
		syscall(SYS_close, sh);
		return NULL;
	}
	ep->epfd = epfd;
	ep->shadow = sh;
	ep->spin_ns = g.epoll_spin_ns;
	pthread_mutexattr_init(&ma);
	pthread_mutex_init(&ep->lock, &ma);
	pthread_mutexattr_destroy(&ma);
	if (!fdt_cas(epfd, v, (uint64_t)(uintptr_t)ep | K_EPOLL)) {
		/* another thread won */
		sys_epoll_ctl(epfd, EPOLL_CTL_DEL, sh, NULL);
		fdt_store(sh, K_UNKNOWN);
		syscall(SYS_close, sh);
		munmap(ep, sizeof(*ep));
		return ep_of(epfd);
	}
	pthread_mutex_lock(&ep_list_lock);
	ep->next = ep_list;
	ep_list = ep;
	pthread_mutex_unlock(&ep_list_lock);
	return ep;
}

void ep_free(void *p)
{
	struct ep *ep = p, **pp;

	pthread_mutex_lock(&ep_list_lock);
	for (pp = &ep_list; *pp; pp = &(*pp)->next) {
		if (*pp == ep) {
			*pp = ep->next;
			break;
		}
	}
	pthread_mutex_unlock(&ep_list_lock);
	pthread_mutex_lock(&ep->lock);
	while (ep->n)
		ep_remove(ep, &ep->regs[ep->n - 1]);
	pthread_mutex_unlock(&ep->lock);
	fdt_store(ep->shadow, K_UNKNOWN);
	syscall(SYS_close, ep->shadow);
	if (ep->regs)
		munmap(ep->regs, ep->regs_bytes);
	munmap(ep, sizeof(*ep));
}

void ep_forget_fd(int fd)
{
	pthread_mutex_lock(&ep_list_lock);
	for (struct ep *ep = ep_list; ep; ep = ep->next) {
		struct epreg *r;

		pthread_mutex_lock(&ep->lock);
		r = ep_find(ep, fd);
		if (r)
			ep_remove(ep, r);
		pthread_mutex_unlock(&ep->lock);
	}
	pthread_mutex_unlock(&ep_list_lock);
}

void ep_fd_became_shm(int fd)
{
	pthread_mutex_lock(&ep_list_lock);
	for (struct ep *ep = ep_list; ep; ep = ep->next) {
		struct epreg *r;

		pthread_mutex_lock(&ep->lock);
		r = ep_find(ep, fd);
		if (r && !r->ch) {
			uint64_t v = fdt_load(fd);
			struct chan *ch = FD_PTR(v);

			if (FD_KIND(v) == K_SHM && chan_tryget(ch)) {
				/* from the kernel's set (direct, while connecting) to ours */
				sys_epoll_ctl(ep->epfd, EPOLL_CTL_DEL, fd, NULL);
				r->ch = ch;
				r->fresh = 1;
				shadow_add(ep, r);
			} else {
				/* plain TCP after all: the kernel's registration stays */
				ep_remove(ep, r);
			}
		}
		pthread_mutex_unlock(&ep->lock);
	}
	pthread_mutex_unlock(&ep_list_lock);
}

void ep_atfork_child(void)
{
	/* a thread of the parent may have held these at fork */
	pthread_mutex_init(&ep_list_lock, NULL);
	for (struct ep *ep = ep_list; ep; ep = ep->next)
		pthread_mutex_init(&ep->lock, NULL);
}

EXPORT int epoll_ctl(int epfd, int op, int fd, struct epoll_event *ev)
{
	struct epreg *r;
	struct chan *ch;
	struct ep *ep;
	int k, rc = 0, err = 0;

	if (!g.enabled)
		return REAL(epoll_ctl)(epfd, op, fd, ev);
	k = fd_class(fd, &ch);
	if (k != K_SHM && k != K_CONNECTING) {
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
	if (k == K_CONNECTING) {
		/* The kernel watches it until it is established (then we move
		 * it, see ep_fd_became_shm); we only remember it. */
		rc = REAL(epoll_ctl)(epfd, op, fd, ev);
		if (rc < 0 || !(ep = ep_get(epfd)))
			return rc;
		pthread_mutex_lock(&ep->lock);
		r = ep_find(ep, fd);
		if (op == EPOLL_CTL_DEL) {
			if (r)
				ep_remove(ep, r);
		} else if (r || (r = ep_add(ep, fd))) {
			r->events = ev->events;
			r->data = ev->data;
			r->fresh = 1;
			r->disabled = 0;
		}
		pthread_mutex_unlock(&ep->lock);
		return rc;
	}
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
	r = ep_find(ep, fd);
	switch (op) {
	case EPOLL_CTL_ADD:
		if (r && r->dormant && r->ch == ch) {
			r->dormant = 0;         /* back: its shadow entry never left */
		} else if (r && r->dormant) {
			ep_remove(ep, r);       /* a different socket under that number */
			r = NULL;
		} else if (r) {
			err = EEXIST;
			break;
		}
		if (!r) {
			r = ep_add(ep, fd);
			if (!r) {
				err = ENOMEM;
				break;
			}
			r->ch = ch;     /* the registration keeps our reference */
			ch = NULL;
		}
		r->events = ev->events;
		r->data = ev->data;
		r->fresh = 1;
		r->disabled = 0;
		shadow_add(ep, r);
		break;
	case EPOLL_CTL_MOD:
		if (!r || r->dormant) {
			err = ENOENT;
			break;
		}
		if (ev->events & EPOLLEXCLUSIVE) {
			err = EINVAL;
			break;
		}
		r->events = ev->events;
		r->data = ev->data;
		r->fresh = 1;
		r->disabled = 0;
		break;
	case EPOLL_CTL_DEL:
		if (!r || r->dormant)
			err = ENOENT;
		else if (r->in_shadow)
			r->dormant = 1;         /* event loops often DEL and ADD again */
		else
			ep_remove(ep, r);
		break;
	default:
		err = EINVAL;
	}
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
							 sbp_ring_readable(&sh->rx) : 0);
			uint64_t tx = sh->tx_written - sbp_ring_readable(&sh->tx);
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
			  sbp_ring_readable(&r->ch->sh->rx);
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
	if (!collected) {
		pthread_mutex_lock(&ep->lock);
		n = ep_collect(ep, evs, max);
		pthread_mutex_unlock(&ep->lock);
	}
	if (marker && ((n == 0 && !collected) || ++ep->bells >= HARVEST_EVERY)) {
		ep_harvest(ep);
		if (n == 0 && !collected) {
			pthread_mutex_lock(&ep->lock);
			n = ep_collect(ep, evs, max);
			pthread_mutex_unlock(&ep->lock);
		}
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
		else if (FD_KIND(fdt_load(fds[i])) != K_CONNECTING) {
			/* plain after all: forget it, the kernel has it */
			pthread_mutex_lock(&ep->lock);
			struct epreg *r = ep_find(ep, fds[i]);

			if (r && !r->ch)
				ep_remove(ep, r);
			pthread_mutex_unlock(&ep->lock);
		}
	}
}

static int sys_epoll_wait_ns(int epfd, struct epoll_event *evs, int max, int64_t ns,
			     const sigset_t *mask)
{
	struct timespec ts, *tp = NULL;
	long r;

	if (ns >= 0) {
		ts.tv_sec = ns / 1000000000;
		ts.tv_nsec = ns % 1000000000;
		tp = &ts;
	}
	r = syscall(SYS_epoll_pwait2, epfd, evs, max, tp, mask, 8);
	if (r < 0 && errno == ENOSYS)
		r = syscall(SYS_epoll_pwait, epfd, evs, max,
			    ns < 0 ? -1 : (int)((ns + 999999) / 1000000), mask, 8);
	return (int)r;
}

/* 1: handled (*ret is the result); 0: no shm sockets here, make the real call. */
static int ep_wait(int epfd, struct epoll_event *evs, int max, int64_t tmo, const sigset_t *mask,
		   int *ret)
{
	struct ep *ep;
	int64_t deadline;
	int n, r, spun = 0;
	int64_t t_start;

	if (!g.enabled || !(ep = ep_of(epfd)) || max <= 0 || !evs)
		return 0;
	if (!ep->n)
		return 0;
	ep_settle_connecting(ep);
	t_start = now_ns();
	deadline = tmo < 0 ? DL_NONE : t_start + tmo;
	for (;;) {
		int64_t cap = -1, left = -1;
		int ready;

		pthread_mutex_lock(&ep->lock);
		n = ep_collect(ep, evs, max);
		pthread_mutex_unlock(&ep->lock);
		if (!n && !spun && g.epoll_spin_ns && tmo != 0) {
			/* spin on the rings before paying for a sleep */
			int64_t end = now_ns() + spin_budget(ep->wait_ewma);

			spun = 1;
			do {
				pthread_mutex_lock(&ep->lock);
				n = ep_collect(ep, evs, max);
				pthread_mutex_unlock(&ep->lock);
			} while (!n && now_ns() < end);
		}
		if (n || tmo == 0 || (deadline != DL_NONE && now_ns() >= deadline)) {
			/* the app's other fds, without waiting (rate-limited while
			 * shm sockets have events) */
			int64_t t = now_ns();

			if (n < max && (!n || t - ep->last_real_ns >= MERGE_EVERY_NS)) {
				int marker = 0;

				ep->last_real_ns = t;
				r = sys_epoll_wait_ns(epfd, evs + n, max - n, 0, NULL);
				if (r > 0) {
					r = ep_filter(evs + n, r, &marker);
					n += r;
					if (marker)
						n += ep_settle_bells(ep, 1, evs + n, max - n, n - r);
				}
			}
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
		{
			int marker = 0;

			r = ep_filter(evs, r, &marker);
			n = ep_settle_bells(ep, marker, evs + r, max - r, 0);
		}
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

EXPORT int epoll_wait(int epfd, struct epoll_event *evs, int max, int timeout)
{
	int ret;

	if (ep_wait(epfd, evs, max, timeout < 0 ? -1 : (int64_t)timeout * 1000000, NULL, &ret))
		return ret;
	return REAL(epoll_wait)(epfd, evs, max, timeout);
}

EXPORT int epoll_pwait(int epfd, struct epoll_event *evs, int max, int timeout,
		       const sigset_t *mask)
{
	int ret;

	if (ep_wait(epfd, evs, max, timeout < 0 ? -1 : (int64_t)timeout * 1000000, mask, &ret))
		return ret;
	return REAL(epoll_pwait)(epfd, evs, max, timeout, mask);
}

EXPORT int epoll_pwait2(int epfd, struct epoll_event *evs, int max, const struct timespec *ts,
			const sigset_t *mask)
{
	int ret;

	if (ep_wait(epfd, evs, max, ts_ns(ts), mask, &ret))
		return ret;
	return REAL(epoll_pwait2)(epfd, evs, max, ts, mask);
}
