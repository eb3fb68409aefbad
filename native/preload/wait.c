// SPDX-License-Identifier: GPL-2.0
/* wait.c: how a blocking call of one channel waits: the spin before any
 * syscall, then futex sleeps in slices (or, in doorbell mode, sleeps on the
 * TCP socket), looking at the TCP side between them; timeouts and signals. */
#include <sched.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "channel.h"
#include "control.h"
#include "fdtable.h"
#include "setup.h"
#include "wait.h"

/* After a signal interrupted a blocking wait: would the kernel restart the
 * call (every installed handler has SA_RESTART)? */
static int restartable(void)
{
	/* EINTR is rare: ask the kernel about every handler rather than track
	 * sigaction()/signal() (glibc's signal() calls sigaction internally,
	 * out of our reach). */
	for (int sig = 1; sig < 65; sig++) {
		struct {
			void *handler;
			unsigned long flags;
			void *restorer;
			uint64_t mask;
		} ka;

		if (syscall(SYS_rt_sigaction, sig, NULL, &ka, 8) < 0)
			continue;
		if (ka.handler != (void *)SIG_DFL && ka.handler != (void *)SIG_IGN &&
		    !(ka.flags & SA_RESTART))
			return 0;
	}
	return 1;
}

/* -1 when the socket has no SO_RCVTIMEO/SO_SNDTIMEO (optname), else ns. */
static int64_t sock_timeout_ns(int fd, int optname)
{
	struct timeval tv = { 0, 0 };
	socklen_t len = sizeof(tv);
	int saved = errno;

	if (syscall(SYS_getsockopt, fd, SOL_SOCKET, optname, &tv, &len) < 0)
		tv.tv_sec = tv.tv_usec = 0;
	errno = saved;
	if (!tv.tv_sec && !tv.tv_usec)
		return -1;
	return (int64_t)tv.tv_sec * 1000000000 + (int64_t)tv.tv_usec * 1000;
}

/* Blocking calls sleep on the ring's futex word (one per direction, so a
 * reader and a writer thread never steal each other's wake-up). A futex
 * cannot say that the peer process died; its TCP socket can. So the sleep
 * is cut in slices (10 ms, doubling to 1 s while nothing happens) and the
 * TCP socket is looked at between them. */
#define SLICE_MIN_NS    10000000
#define SLICE_MAX_NS    1000000000

/* Doorbell mode (no futex across VMs): spin, arm, and sleep on the TCP
 * socket plus this direction's kick eventfd (another thread that eats a
 * doorbell meant for us kicks it). Where no doorbell can come (the peer's
 * TCP side is shut), look in slices backing off to 20 ms. */
static int kick_fd(struct chan_sh *sh, int dir)
{
	int k = sh->kick[dir];

	if (k < 0) {
		k = (int)syscall(SYS_eventfd2, 0, EFD_CLOEXEC | EFD_NONBLOCK);
		if (k >= 0)
			k = sbp_internal_fd(k);
		sh->kick[dir] = k;      /* under the direction lock */
	}
	return k;
}

static int doorbell_wait(int fd, struct chan *ch, int dir, size_t min, int64_t deadline)
{
	struct chan_sh *sh = ch->sh;
	_Atomic uint32_t *sleeping = dir ? &sh->tx_sleeping : &sh->rx_sleeping;
	int64_t left = -1, sleep_ns = -1;
	uint32_t f = atomic_load(&sh->flags);
	struct pollfd p[2];
	int rc;

	if (deadline != DL_NONE) {
		left = deadline - now_ns();
		if (left <= 0)
			return -ETIMEDOUT;
	}
	/* SYNC POINT: "sleeping" before the ring is armed: whoever eats the
	 * doorbell that the arming brings sees it and kicks us. */
	p[1].fd = kick_fd(sh, dir);
	p[1].events = POLLIN;
	atomic_store(sleeping, 1);
	rc = dir ? sbp_ring_wait_writable(&sh->tx.ring, left) : sbp_ring_wait_readable_min(&sh->rx.ring, min, left);
	if (rc == 0 || rc == -ETIMEDOUT) {
		atomic_store(sleeping, 0);
		return rc;      /* else -EAGAIN: armed, sleep */
	}
	p[0].fd = fd;
	p[0].events = POLLIN | POLLRDHUP;
	p[0].revents = p[1].revents = 0;
	f = atomic_load(&sh->flags);
	if ((f & (CH_TCP_EOF | CH_TCP_RST | CH_SHUT_RD)) || (dir && peer_tx_shut(ch))) {
		if (dir && !(f & (CH_TCP_RST | CH_PEER_GONE | CH_SHUT_WR)))
			ctl_probe(fd, ch);
		if (sh->slice_ns[dir] < 50000)
			sh->slice_ns[dir] = 50000;
		sleep_ns = sh->slice_ns[dir];
		if (sh->slice_ns[dir] < 20000000)
			sh->slice_ns[dir] *= 2;
		p[0].events = 0;
		if (f & (CH_TCP_EOF | CH_TCP_RST))
			p[0].fd = -1;
	} else {
		sh->slice_ns[dir] = 0;
	}
	if (left >= 0 && (sleep_ns < 0 || sleep_ns > left))
		sleep_ns = left;
	rc = sys_ppoll(p, 2, sleep_ns, NULL);
	atomic_store(sleeping, 0);
	if (rc > 0 && p[1].revents) {
		uint64_t v;

		syscall(SYS_read, p[1].fd, &v, sizeof(v));
	}
	if (rc > 0 && p[0].revents && p[0].fd >= 0)
		ctl_drain(fd, ch);
	/* how long the doorbell took: the spin's calibration */
	sbp_ring_note_wakeup(dir ? &sh->tx.ring : &sh->rx.ring);
	if (rc < 0 && errno == EINTR)
		return -EINTR;
	if (sh->slice_ns[dir] && (dir ? sbp_ring_writable(&sh->tx.ring) : sbp_ring_readable(&sh->rx.ring)))
		sh->slice_ns[dir] = 50000;      /* it moved: stay quick */
	return 0;
}

static int futex_wait_sliced(int fd, struct chan *ch, int dir, size_t min, int64_t deadline)
{
	struct chan_sh *sh = ch->sh;
	_Atomic uint32_t *sleeping = dir ? &sh->tx_sleeping : &sh->rx_sleeping;
	int64_t left = -1, slice;
	uint32_t f = atomic_load(&sh->flags);
	int rc;

	if (deadline != DL_NONE) {
		left = deadline - now_ns();
		if (left <= 0)
			return -ETIMEDOUT;
	}
	if (sh->slice_ns[dir] < SLICE_MIN_NS)
		sh->slice_ns[dir] = SLICE_MIN_NS;
	slice = sh->slice_ns[dir];
	if (left >= 0 && left < slice)
		slice = left;
	atomic_store(sleeping, 1);
	rc = dir ? sbp_ring_wait_writable(&sh->tx.ring, slice) : sbp_ring_wait_readable_min(&sh->rx.ring, min, slice);
	atomic_store(sleeping, 0);
	if (rc == 0) {
		sh->slice_ns[dir] = SLICE_MIN_NS;
		return 0;
	}
	if (rc == -EINTR)
		return -EINTR;
	/* A slice went by: is the peer still there? */
	if (sh->slice_ns[dir] < SLICE_MAX_NS)
		sh->slice_ns[dir] *= 2;
	if (dir && peer_tx_shut(ch) && !(f & (CH_TCP_RST | CH_PEER_GONE | CH_SHUT_WR)))
		ctl_probe(fd, ch);
	ctl_check(fd, ch);
	if (deadline != DL_NONE && now_ns() >= deadline)
		return -ETIMEDOUT;
	return 0;
}

/* Sleep until a wake-up (futex or doorbell) or a state change. dir 0: wait
 * for rx data; 1: wait for tx room. 0 woken (re-check), -ETIMEDOUT, -EINTR. */
static int chan_wait(int fd, struct chan *ch, int dir, size_t min, int64_t deadline)
{
	if (g.doorbell)
		return doorbell_wait(fd, ch, dir, min, deadline);
	return futex_wait_sliced(fd, ch, dir, min, deadline);
}

/* The spin of a blocking wait, before the work (TCP look, timeout
 * look-up) that precedes a sleep. Counts as asleep for non-blocking
 * callers of the same direction, as the spin inside chan_wait does. */
static int ring_spin(struct sbp_ring *r, _Atomic uint32_t *sleeping, int dir, size_t min)
{
	int rc;

	atomic_store_explicit(sleeping, 1, memory_order_relaxed);
	rc = dir ? sbp_ring_spin_writable(r) : sbp_ring_spin_readable_min(r, min);
	atomic_store_explicit(sleeping, 0, memory_order_relaxed);
	return rc;
}

/* A socket with a timeout is never restarted (socket(7)); else it is when
 * every handler asked for SA_RESTART. */
static int restart_ok(int64_t deadline)
{
	return deadline == DL_NONE && restartable();
}

static int64_t deadline_for(int fd, int opt)
{
	int64_t t = sock_timeout_ns(fd, opt);

	return t < 0 ? DL_NONE : now_ns() + t;
}

int chan_nap(struct blocking *b)
{
	struct timespec nap = { 0, 50000 };

	if (b->nonblock)
		return EAGAIN;
	if (!b->deadline)
		b->deadline = deadline_for(b->fd, b->dir ? SO_SNDTIMEO : SO_RCVTIMEO);
	if (now_ns() >= b->deadline)
		return EAGAIN;
	if (syscall(SYS_nanosleep, &nap, NULL) < 0 && errno == EINTR && !restart_ok(b->deadline))
		return EINTR;
	return 0;
}

/* The spin before the first sleep, no syscall: a peer that answers within
 * microseconds (a request/response loop) is caught here; the TCP look and
 * the timeout look-up below cost more than the whole round trip on the
 * ring. 0: look again. (A reader waits here only once it reads the ring:
 * before that it reads TCP, where the kernel does the waiting.) */
int chan_spin(struct chan *ch, struct blocking *b)
{
	struct chan_sh *sh = ch->sh;

	b->spun = 1;
	return b->dir ? ring_spin(&sh->tx.ring, &sh->tx_sleeping, 1, 0)
		      : ring_spin(&sh->rx.ring, &sh->rx_sleeping, 0, b->min);
}

int tcp_block(struct blocking *b, short events)
{
	int64_t left = -1;
	int rc;

	if (!b->deadline)
		b->deadline = deadline_for(b->fd, b->dir ? SO_SNDTIMEO : SO_RCVTIMEO);
	if (b->deadline != DL_NONE) {
		left = b->deadline - now_ns();
		if (left <= 0)
			return EAGAIN;
	}
	rc = sys_ppoll(&(struct pollfd){ b->fd, events, 0 }, 1, left, NULL);
	if (rc < 0 && errno == EINTR)
		return restart_ok(b->deadline) ? 0 : EINTR;
	return rc == 0 ? EAGAIN : 0;
}

int chan_block(struct chan *ch, struct blocking *b, size_t done)
{
	int rc;

	if (!b->nonblock && !b->spun && chan_spin(ch, b) == 0)
		return 0;
	if (b->dir == 0 && !b->looked) {
		/* Empty: did the TCP side end (the peer died)? Also eats
		 * doorbells. One look per call. */
		b->looked = 1;
		ctl_drain(b->fd, ch);
		return 0;
	}
	if (b->nonblock)
		return EAGAIN;
	if (!b->deadline)
		b->deadline = deadline_for(b->fd, b->dir ? SO_SNDTIMEO : SO_RCVTIMEO);
	rc = chan_wait(b->fd, ch, b->dir, b->min, b->deadline);
	if (rc == -EINTR && !done && restart_ok(b->deadline))
		return 0;               /* SA_RESTART: the kernel would go on */
	if (rc == -ETIMEDOUT)
		return EAGAIN;
	if (rc == -EINTR)
		return EINTR;
	b->looked = 1;                  /* chan_wait looked at TCP */
	return 0;
}
