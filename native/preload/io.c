// SPDX-License-Identifier: GPL-2.0
/* io.c: the data path of shm-tier sockets: the send and recv families,
 * over TCP until a direction is live, then through the rings (sendfile
 * and splice: splice.c).
 *
 * One writer and one reader at a time per ring (SPSC): each direction has a
 * process-shared lock. A blocking call keeps its lock while it waits (other
 * blocking callers queue behind it, as they would on the socket); a
 * non-blocking caller that finds the holder asleep gets EAGAIN at once.
 * A call that nothing can overlap (chan_solo) takes no lock.
 *
 * TCP semantics kept: blocking send() moves everything (or stops at a signal
 * or SO_SNDTIMEO with a partial count); recv() returns what is there;
 * MSG_WAITALL/PEEK/DONTWAIT/TRUNC/NOSIGNAL; EPIPE raises SIGPIPE unless
 * MSG_NOSIGNAL; after the peer is gone, what it wrote is still delivered. */
#include <fcntl.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <sys/sendfile.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "capture.h"
#include "channel.h"
#include "control.h"
#include "io.h"
#include "revert.h"
#include "setup.h"
#include "wait.h"

#ifndef UIO_MAXIOV
#define UIO_MAXIOV 1024
#endif

int dir_lock(pthread_mutex_t *m, _Atomic uint32_t *sleeping, int nonblock)
{
	int rc;

	if (!nonblock) {
		rc = pthread_mutex_lock(m);
	} else {
		for (;;) {
			rc = pthread_mutex_trylock(m);
			if (rc != EBUSY)
				break;
			/* The holder sleeps for the ring: nothing for us either. */
			if (atomic_load(sleeping))
				return -EAGAIN;
			sched_yield();
		}
	}
	if (rc == EOWNERDEAD) {
		/* A holder died mid-call; the ring itself is consistent (every
		 * ring call publishes with one store). */
		pthread_mutex_consistent(m);
		rc = 0;
	}
	return -rc;
}

/* A call's own copy of the caller's iovec array, which it advances as
 * bytes move: on the stack up to IOV_FAST pieces, else on the heap, as the
 * kernel does (UIO_FASTIOV). A frame of UIO_MAXIOV pieces (16 KiB) would
 * overflow a small thread stack or a signal handler's sigaltstack, where
 * send() on TCP takes no user stack at all. */
#define IOV_FAST 32

struct iov_copy {
	struct iovec *v;
	struct iovec fast[IOV_FAST];
};

static int iov_copy(struct iov_copy *c, const struct iovec *iov, int cnt)
{
	c->v = cnt <= IOV_FAST ? c->fast : malloc((size_t)cnt * sizeof(*iov));
	if (!c->v)
		return -ENOMEM;
	for (int i = 0; i < cnt; i++)   /* (one or two, mostly: no memcpy call) */
		c->v[i] = iov[i];
	return 0;
}

static void iov_copy_free(struct iov_copy *c)
{
	if (c->v != c->fast)
		free(c->v);
}

/* Shorten our copy v[0..cnt) to at most max bytes: the pieces that are
 * left; *was: the length of the last one before (put it back after). */
static int iov_limit(struct iovec *v, int cnt, size_t max, size_t *was)
{
	size_t got = 0;
	int i;

	for (i = 0; i < cnt && got < max; i++) {
		*was = v[i].iov_len;
		if (v[i].iov_len > max - got)
			v[i].iov_len = max - got;
		got += v[i].iov_len;
	}
	return i;
}

/* Skip n bytes of an iovec array (in place). */
static void iov_advance(struct iovec *v, int *first, int cnt, size_t n)
{
	while (n && *first < cnt) {
		if (v[*first].iov_len <= n) {
			n -= v[*first].iov_len;
			v[*first].iov_len = 0;
			(*first)++;
		} else {
			v[*first].iov_base = (char *)v[*first].iov_base + n;
			v[*first].iov_len -= n;
			n = 0;
		}
	}
	while (*first < cnt && v[*first].iov_len == 0)
		(*first)++;
}

static int iov_total(const struct iovec *iov, int cnt, size_t *total)
{
	size_t t = 0;

	if (cnt < 0 || cnt > UIO_MAXIOV || (cnt && !iov))
		return -EINVAL;
	for (int i = 0; i < cnt; i++) {
		if (iov[i].iov_len > (size_t)SSIZE_MAX - t)
			return -EINVAL;
		t += iov[i].iov_len;
	}
	*total = t;
	return 0;
}

ssize_t fail(int err, int flags)
{
	if (err == EPIPE && !(flags & MSG_NOSIGNAL))
		raise(SIGPIPE);     /* like the kernel: to this thread */
	errno = err;
	return -1;
}

/* A ring call said something other than data/full/empty/EOF: map it. */
int ring_error(int fd, struct chan *ch, ssize_t n, int dir)
{
	if (n == -EPIPE)
		return EPIPE;
	if (n == -ECONNRESET)
		return ECONNRESET;
	chan_break(fd, ch, SBP_RESET_CORRUPT,
		   dir ? "the ring we write is corrupt" : "the ring we read is corrupt");
	return ECONNRESET;
}

/* Why the ring we write takes no more: 0 (it may), or the errno. */
int tx_state_err(struct chan_sh *sh, uint32_t f)
{
	if (f & CH_BROKEN)
		return ECONNRESET;
	if (f & CH_SHUT_WR) {
		sbp_ring_close_writer(&sh->tx.ring);     /* shutdown() may not have had the lock */
		return EPIPE;
	}
	if (f & CH_PEER_GONE)
		return EPIPE;
	return 0;
}

/* Our send found the peer's reading end closed (err EPIPE). TCP sends
 * the first write after the peer's close() and only the RST it brings back
 * fails later calls; a peer that closed (or died) with bytes of ours unread
 * resets at once: ECONNRESET, then EPIPE. Returns the errno for this call,
 * or 0: count the bytes as sent (the peer would have dropped them). */
int tx_peer_closed(struct chan_sh *sh, int err)
{
	uint32_t f = atomic_load(&sh->flags);

	if (err != EPIPE || (f & (CH_SHUT_WR | CH_RST_DUE)))
		return err;
	atomic_fetch_or(&sh->flags, CH_RST_DUE);
	if ((f & CH_GONE_RESET) || sbp_ring_readable(&sh->tx.ring))
		return ECONNRESET;
	return 0;
}

/* TCP reports a reset once (sk_err is cleared as it is read); later calls
 * see a closed socket: recv() EOF (0 here), send() EPIPE. */
static int reset_once(struct chan_sh *sh, int err, int dir)
{
	if (err != ECONNRESET)
		return err;
	if (atomic_fetch_or(&sh->flags, CH_RESET_TOLD) & CH_RESET_TOLD)
		return dir ? EPIPE : 0;
	return err;
}

/* The ring we read is empty: is the reading over? 0 (EOF), ECONNRESET, or
 * -1 (no: wait). */
int rx_over(uint32_t f)
{
	if (f & CH_SHUT_RD)
		return 0;               /* our SHUT_RD: EOF once empty */
	if (f & CH_PEER_GONE)       /* what the peer wrote is delivered; then EOF or reset */
		return (f & CH_GONE_RESET) ? ECONNRESET : 0;
	return -1;
}

/* A raw sendmsg/recvmsg on the socket (not through our own hooks), with
 * the direction marked asleep while the kernel may block, so that a
 * non-blocking caller of the same direction does not spin on the lock. */
static ssize_t tcp_io(int fd, struct chan *ch, struct iovec *v, int cnt, int flags, int dir)
{
	_Atomic uint32_t *sleeping = dir ? &ch->sh->tx_sleeping : &ch->sh->rx_sleeping;
	struct msghdr m;
	ssize_t n;

	memset(&m, 0, sizeof(m));
	m.msg_iov = v;
	m.msg_iovlen = (size_t)cnt;
	atomic_store_explicit(sleeping, 1, memory_order_relaxed);
	n = syscall(dir ? SYS_sendmsg : SYS_recvmsg, fd, &m, flags);
	atomic_store_explicit(sleeping, 0, memory_order_relaxed);
	return n < 0 ? -errno : n;
}

/* Our bytes before our ring: over TCP, counted (tx_lock held). The count
 * is where our ring will start, so every byte on TCP must pass here. */

static ssize_t tcp_send(int fd, struct chan *ch, struct iovec *v, int cnt, int flags, size_t max)
{
	size_t was = 0;
	int n_iov = iov_limit(v, cnt, max, &was);
	ssize_t n = tcp_io(fd, ch, v, n_iov, flags | MSG_NOSIGNAL, 1);

	if (n > 0) {
		/* the TCP part belongs to the captured stream too */
		if (capture_on())
			capture_data(ch->sh->cookie, SBP_CAP_TX, ch->sh->tx_tcp, v, n_iov, (size_t)n);
		ch->sh->tx_tcp += (uint64_t)n;
	}
	if (n_iov)
		v[n_iov - 1].iov_len = was;
	return n;
}

/* The peer's bytes before its ring (rx_lock held): read from TCP, never
 * past where its ring starts. Once the ring exists that point is known (it
 * was formatted at the byte count the peer sent over TCP); until then any
 * TCP byte is payload, except those that came after the peer switched,
 * which are doorbells: so look for the ring again after reading. */
static ssize_t tcp_part(int fd, struct chan *ch, struct iovec *v, int cnt, int flags)
{
	struct chan_sh *sh = ch->sh;
	uint64_t left = UINT64_MAX;
	size_t was = 0;
	int n_iov, opened;
	ssize_t n;

	opened = !!(atomic_load(&sh->flags) & CH_RX_OPEN);
	if (opened)
		left = sh->rx_tcp_end - sh->rx_tcp;
	n_iov = iov_limit(v, cnt, left, &was);
	n = tcp_io(fd, ch, v, n_iov, flags & ~MSG_WAITALL, 0);
	if (n_iov)
		v[n_iov - 1].iov_len = was;
	if (n <= 0)
		return n;
	if (!opened) {
		rx_progress(fd, ch);
		if ((atomic_load(&sh->flags) & CH_RX_OPEN) && sh->rx_tcp + (uint64_t)n > sh->rx_tcp_end) {
			/* the rest were doorbells */
			if (!(flags & MSG_PEEK))
				atomic_fetch_add(&sh->bells_eaten, sh->rx_tcp + (uint64_t)n - sh->rx_tcp_end);
			n = (ssize_t)(sh->rx_tcp_end - sh->rx_tcp);
		}
	}
	if (!(flags & MSG_PEEK)) {
		sh->rx_tcp += (uint64_t)n;
		publish_tcp_read(sh);
		rx_progress(fd, ch);
	}
	return n;
}

/* The doorbell a switch owes: the peer may sleep on TCP until it sees our
 * ring. (Owed again if TCP had no room for it: the peer has TCP bytes to
 * read then, and looks for our ring when they are read.) 1 if rung. */
int tx_switch_bell(int fd, struct chan *ch)
{
	struct chan_sh *sh = ch->sh;

	if (!sh->tx_bell_due)
		return 0;
	if (ctl_bell(fd, ch) == 0)
		sh->tx_bell_due = 0;
	return 1;
}

/* After a ring write: the doorbell a switch owes, or one the peer armed
 * for. */
void tx_bells(int fd, struct chan *ch)
{
	struct chan_sh *sh = ch->sh;

	if (tx_switch_bell(fd, ch)) {
		sbp_stream_peer_waiting(&sh->tx);
		return;
	}
	if (sbp_stream_peer_waiting(&sh->tx))
		ctl_bell(fd, ch);
}

/* We freed room in the peer's ring and it sleeps on TCP (doorbell mode):
 * wake it. A byte from us is payload until our own ring is live: go live
 * first (we read its ring, so we hold the memory), or leave the wake-up
 * to the writer that holds our tx lock, which goes live at its next piece
 * and rings the switch doorbell. */
void rx_bell(int fd, struct chan *ch)
{
	if (ctl_bell(fd, ch) == -EAGAIN && chan_try_live(fd, ch))
		ctl_bell(fd, ch);
}

#define GROW_AFTER_NS 1000000 /* a full ring whose reader freed nothing this long */

/* Past 256 KiB only for a reader that does not keep up: the ring was full
 * GROW_AFTER_NS ago and its reader has freed no room since (it writes too,
 * or sleeps). A reader that keeps up keeps the stream where the caches hold
 * it: a stream in an 8 MiB area ran at 12 GB/s across cores, in 256 KiB at
 * 17.5 (the raw ring: 18). tx_lock held. */
static int tx_may_grow(struct chan_sh *sh)
{
	uint64_t tail = sbp_ring_tail_pos(&sh->tx.ring);
	int64_t t = now_ns();

	if (sh->tx.area < 1)
		return 1;
	if (tail != sh->tx_full_tail || !sh->tx_full_ns) {
		sh->tx_full_tail = tail;
		sh->tx_full_ns = t;
		return 0;
	}
	return t - sh->tx_full_ns >= GROW_AFTER_NS;
}

/* The ring we write is full and the spin did not help: a larger area
 * instead of a sleep (past 256 KiB only if the reader does not keep up),
 * up to 1 MiB for a non-blocking writer and to the largest for a blocking
 * one (whose peer may be writing too: loopback TCP would buffer megabytes
 * before either blocks). */
int tx_grow(struct chan_sh *sh, int nonblock)
{
	uint64_t was = sbp_area_cap(sh->tx.area), next = sbp_area_cap(sh->tx.area + 1);

	if ((nonblock && sh->tx.area >= 2) || !tx_may_grow(sh))
		return 0;
	if (!next || mem_charge(next - was, 0))
		return 0;       /* the largest already, or up --memory-max: wait instead */
	if (sbp_stream_grow(&sh->tx) != 1) {
		mem_uncharge(next - was);
		return 0;
	}
	if (sbp_area_cap(sh->tx.area) > next)   /* it went past a busy area */
		mem_charge(sbp_area_cap(sh->tx.area) - next, 1);
	sh->tx_grown_ns = now_ns();
	return 1;
}

/* An empty ring larger than the smallest, a second after it last grew:
 * back to the smallest (its memory goes back to the system). */
static void tx_shrink(struct chan_sh *sh)
{
	uint64_t was = sbp_area_cap(sh->tx.area);

	if (sh->tx.area && now_ns() - sh->tx_grown_ns > NS_PER_S && sbp_stream_shrink(&sh->tx) == 1)
		mem_uncharge(was - sbp_area_cap(0));
}

/* n bytes went into our ring: counted, and the doorbell it may owe. */
static inline void tx_wrote(int fd, struct chan *ch, uint32_t f, ssize_t n)
{
	struct chan_sh *sh = ch->sh;

	sh->tx_written += n;
	tx_bells(fd, ch);
	if (!(f & CH_DATA))
		atomic_fetch_or(&sh->flags, CH_DATA);
}

static ssize_t send_long(int fd, struct chan *ch, const struct iovec *iov, int iovcnt, int flags,
			 size_t moved);

/* The common send in one step: one piece into a live ring with room,
 * no other call possible on the channel (chan_solo), nothing in the way
 * (a state to report, a revert asked, a capture, a larger area to
 * shrink). Anything else, or what did not fit, goes the long way. */
ssize_t shm_send(int fd, struct chan *ch, const struct iovec *iov, int iovcnt, int flags)
{
	struct chan_sh *sh = ch->sh;
	uint32_t f = atomic_load_explicit(&sh->flags, memory_order_acquire);
	ssize_t n;

	if (iovcnt != 1 || (flags & ~(MSG_NOSIGNAL | MSG_DONTWAIT)) || !chan_solo(ch) ||
	    (f & (CH_BROKEN | CH_SHUT_WR | CH_PEER_GONE)) || sh->tx.area || capture_on() ||
	    atomic_load_explicit(&sh->phase, memory_order_acquire) != CH_LIVE || revert_asked(sh))
		return send_long(fd, ch, iov, iovcnt, flags, 0);
	n = sbp_ring_write(&sh->tx.ring, iov[0].iov_base, iov[0].iov_len);
	if (n <= 0)
		return send_long(fd, ch, iov, iovcnt, flags, 0);        /* nothing moved */
	tx_wrote(fd, ch, f, n);
	if ((size_t)n == iov[0].iov_len)
		return n;
	return send_long(fd, ch, iov, iovcnt, flags, (size_t)n);        /* the rest */
}

/* moved: bytes of iov the one step already wrote (the call's count goes
 * on from there, as TCP's does: a failure after them is none of this
 * call's, and the reset is told to the next). */
static ssize_t send_long(int fd, struct chan *ch, const struct iovec *iov, int iovcnt, int flags,
			 size_t moved)
{
	struct chan_sh *sh = ch->sh;
	struct iov_copy c;
	struct iovec *v;
	struct blocking b = { .fd = fd, .dir = 1 };
	size_t total, done = moved;
	int err = 0, first = 0, rc, solo;

	rc = iov_total(iov, iovcnt, &total);
	if (rc < 0)
		return fail(-rc, MSG_NOSIGNAL);
	if (flags & MSG_OOB)
		return fail(EOPNOTSUPP, MSG_NOSIGNAL);  /* urgent data has no ring equivalent */
	b.nonblock = (flags & MSG_DONTWAIT) || (atomic_load(&sh->flags) & CH_NONBLOCK);
	if (iov_copy(&c, iov, iovcnt))
		return fail(ENOMEM, MSG_NOSIGNAL);
	v = c.v;
	solo = chan_solo(ch);
	if (!solo && dir_lock(&sh->tx_lock, &sh->tx_sleeping, b.nonblock)) {
		iov_copy_free(&c);
		return fail(EAGAIN, flags);
	}
	if (done)
		iov_advance(v, &first, iovcnt, done);
	else
		while (first < iovcnt && !v[first].iov_len)
			first++;        /* (iov_advance by 0, without a call) */
	for (;;) {
		uint32_t f = atomic_load_explicit(&sh->flags, memory_order_acquire);
		ssize_t n;

		if (unlikely(revert_asked(sh)))
			tx_answer(fd, ch);      /* the peer gives its socket away */
		if (atomic_load_explicit(&sh->phase, memory_order_acquire) == CH_CAND &&
		    !(done && chan_live_locked(fd, ch, 1))) {
			/* not live yet: plain TCP, counted, in pieces, so that a
			 * long send moves to the ring as soon as it can */
			n = tcp_send(fd, ch, v + first, iovcnt - first, flags, TCP_PIECE);
			if (n > 0) {
				done += n;
				iov_advance(v, &first, iovcnt, n);
				if (done < total && !b.nonblock)
					continue;
			} else if (!done) {
				err = (int)-n;
			}
			break;
		}
		err = tx_state_err(sh, f);
		if (err && !done && !(err = tx_peer_closed(sh, err)))
			done = total;
		if (err || done == total)
			break;
		if (done == 0 && sh->tx.area && sbp_ring_readable(&sh->tx.ring) == 0)
			tx_shrink(sh);  /* (the area first: readable() reads the reader's line) */
		n = sbp_ring_writev(&sh->tx.ring, v + first, iovcnt - first);
		if (n > 0) {
			if (capture_on())
				capture_data(sh->cookie, SBP_CAP_TX, sbp_ring_head_pos(&sh->tx.ring) - (uint64_t)n,
					     v + first, iovcnt - first, (size_t)n);
			done += n;
			tx_wrote(fd, ch, f, n);
			if (done == total)
				break;
			iov_advance(v, &first, iovcnt, n);
			continue;
		}
		if (n == -EAGAIN) {
			if (!b.nonblock && !b.spun && chan_spin(ch, &b) == 0)
				continue;
			if (tx_grow(sh, b.nonblock))
				continue;
			chan_count_full(sh);      /* the ring is full */
			tx_switch_bell(fd, ch);
			rc = chan_block(ch, &b, done);
			if (rc) {
				if (!done)
					err = rc;
				break;
			}
			continue;
		}
		err = ring_error(fd, ch, n, 1);
		if (!done && !(err = tx_peer_closed(sh, err)))
			done = total;
		break;
	}
	if (!solo)
		pthread_mutex_unlock(&sh->tx_lock);
	iov_copy_free(&c);
	if (done || !err)
		return (ssize_t)done;
	return fail(reset_once(sh, err, 1), flags);
}

/* MSG_TRUNC on TCP: drop up to len bytes without copying them out. */
static ssize_t ring_discard(struct sbp_stream *s, size_t len)
{
	char scratch[1024];      /* small: a send() may run on a small stack */
	ssize_t got = 0;

	while ((size_t)got < len) {
		size_t n = len - got < sizeof(scratch) ? len - got : sizeof(scratch);
		struct iovec one = { scratch, n };
		ssize_t k = sbp_stream_readv(s, &one, 1, 0);

		if (k <= 0)
			return got ? got : k;
		got += k;
	}
	return got;
}

/* More may come where the peer writes now (a peek that waits for it ends). */
static int peek_may_grow(struct chan_sh *sh, uint32_t f)
{
	return rx_over(f) < 0 && sbp_stream_peek_may_grow(&sh->rx);
}

/* Like tcp_recvmsg's target: a blocking call returns once it has this
 * many bytes (MSG_WAITALL: all; else SO_RCVLOWAT); a non-blocking one
 * returns what is there. */
static size_t recv_target(const struct chan_sh *sh, size_t total, int flags, int nonblock)
{
	size_t t = (flags & MSG_WAITALL) ? total : chan_rcvlowat(sh);

	if (nonblock)
		return 1;
	return t > total ? total : t;
}

/* n bytes came out of the ring (or were peeked at). */
static void rx_took(int fd, struct chan *ch, ssize_t n, uint32_t f, int peek)
{
	struct chan_sh *sh = ch->sh;

	if (!peek) {
		sh->rx_consumed += n;
		if (sbp_ring_peer_waiting(&sh->rx.ring))
			rx_bell(fd, ch);
	}
	if (!(f & CH_DATA))
		atomic_fetch_or(&sh->flags, CH_DATA);
}

static ssize_t recv_long(int fd, struct chan *ch, const struct iovec *iov, int iovcnt, int flags);

/* The common recv in one step: one piece from a live ring that has bytes,
 * for a call that returns whatever is there (no MSG_* but DONTWAIT, a low
 * water mark of 1 or a non-blocking call), no other call possible on the
 * channel. Anything else, or an empty ring, goes the long way. */
ssize_t shm_recv(int fd, struct chan *ch, const struct iovec *iov, int iovcnt, int flags)
{
	struct chan_sh *sh = ch->sh;
	uint32_t f = atomic_load_explicit(&sh->flags, memory_order_acquire);
	ssize_t n;

	if (iovcnt != 1 || !iov[0].iov_len || (flags & ~MSG_DONTWAIT) || !chan_solo(ch) ||
	    (f & (CH_BROKEN | CH_RX_ATTACHED)) != CH_RX_ATTACHED ||
	    (chan_rcvlowat(sh) > 1 && !(flags & MSG_DONTWAIT) && !(f & CH_NONBLOCK)))
		return recv_long(fd, ch, iov, iovcnt, flags);
	n = sbp_stream_readv(&sh->rx, iov, 1, 0);
	if (n <= 0)
		return recv_long(fd, ch, iov, iovcnt, flags);   /* nothing taken: as if from the start */
	rx_took(fd, ch, n, f, 0);
	return n;
}

/* long: one loop over where the peer's bytes are (its TCP part, its ring,
 * the link to its next area or back to TCP), as tcp_recvmsg is one loop:
 * every exit reports what was moved, or the one errno TCP would give. */
static ssize_t recv_long(int fd, struct chan *ch, const struct iovec *iov, int iovcnt, int flags)
{
	struct chan_sh *sh = ch->sh;
	struct iov_copy c;
	struct iovec *v;
	struct blocking b = { .fd = fd, .dir = 0 };
	size_t total, target, done = 0;
	int peek, err = 0, first = 0, rc, solo;

	rc = iov_total(iov, iovcnt, &total);
	if (rc < 0)
		return fail(-rc, 0);
	if (flags & MSG_OOB)
		return fail(EINVAL, 0);         /* no urgent data, ever */
	if (flags & MSG_ERRQUEUE)
		return fail(EAGAIN, 0);
	peek = !!(flags & MSG_PEEK);
	b.nonblock = (flags & MSG_DONTWAIT) || (atomic_load(&sh->flags) & CH_NONBLOCK);
	target = recv_target(sh, total, flags, b.nonblock);
	if (atomic_load(&sh->flags) & CH_BROKEN) {
		err = reset_once(sh, ECONNRESET, 0);
		return err ? fail(err, 0) : 0;
	}
	if (total == 0)
		return 0;
	if (iov_copy(&c, iov, iovcnt))
		return fail(ENOMEM, 0);
	v = c.v;
	solo = chan_solo(ch);
	if (!solo && dir_lock(&sh->rx_lock, &sh->rx_sleeping, b.nonblock)) {
		iov_copy_free(&c);
		return fail(EAGAIN, 0);
	}
	while (first < iovcnt && !v[first].iov_len)
		first++;                /* (iov_advance by 0, without a call) */
	for (;;) {
		uint32_t f = atomic_load_explicit(&sh->flags, memory_order_acquire);
		ssize_t n;

		if (f & CH_BROKEN) {
			err = done ? 0 : ECONNRESET;
			break;
		}
		if (!(f & CH_RX_ATTACHED) && !rx_progress(fd, ch)) {
			/* the peer's bytes that went over TCP first */
			n = tcp_part(fd, ch, v + first, iovcnt - first, flags);
			if (n > 0) {
				done += n;
				if (peek || done >= target)
					break;
				iov_advance(v, &first, iovcnt, n);
				continue;
			}
			if (n == 0 && (atomic_load(&sh->flags) & CH_RX_ATTACHED))
				continue;               /* it ended where the ring begins */
			if (n < 0 && !done)
				err = (int)-n;
			break;                          /* EOF, or an error as TCP said it */
		}
		if (flags & MSG_TRUNC)
			n = ring_discard(&sh->rx, total - done);
		else
			n = sbp_stream_readv(&sh->rx, v + first, iovcnt - first, peek ? SBP_PEEK : 0);
		if (n == SBP_RING_GO_NEXT) {
			/* the peer's stream goes on over TCP (revert.c) */
			if (rx_to_tcp(fd, ch) == 0)
				continue;
			if (!done)
				err = ECONNRESET;
			break;
		}
		if (n > 0 && peek && (size_t)n < target && peek_may_grow(sh, f)) {
			/* MSG_PEEK with a target: wait until it is all there,
			 * then peek again from the start */
			b.min = target;
			/* the rest comes in a later area, whose wake-ups only
			 * its reader can arm, or will once the writer finds
			 * this one full: look again after a nap */
			if ((sbp_ring_flags(&sh->rx.ring) & SBP_RING_LINKED) ||
			    sbp_ring_readable(&sh->rx.ring) == sh->rx.ring.cap)
				rc = chan_nap(&b);
			else
				rc = chan_block(ch, &b, 0);
			if (!rc)
				continue;
		}
		if (n > 0) {
			done += n;
			rx_took(fd, ch, n, f, peek);
			if (peek || done >= target)
				break;
			iov_advance(v, &first, iovcnt, n);
			continue;
		}
		if (n == 0)
			break;                          /* EOF: the peer's FIN, drained */
		if (n == -EAGAIN) {
			rc = rx_over(f);
			if (rc < 0) {
				rc = chan_block(ch, &b, done);
				if (!rc)
					continue;
			}
			if (!done)
				err = rc;
			break;
		}
		rc = n == -ECONNRESET ? ECONNRESET : ring_error(fd, ch, n, 0);
		if (!done)
			err = rc;
		break;
	}
	if (!solo)
		pthread_mutex_unlock(&sh->rx_lock);
	iov_copy_free(&c);
	if (!done && err)
		err = reset_once(sh, err, 0);
	if (done || !err)
		return (ssize_t)done;
	return fail(err, 0);
}

/* sendmsg/recvmsg refuse more than UIO_MAXIOV pieces with EMSGSIZE
 * (readv/writev: EINVAL, as iov_total says). */
ssize_t shm_sendmsg(int fd, struct chan *ch, const struct msghdr *m, int flags)
{
	if (m->msg_iovlen > UIO_MAXIOV)
		return fail(EMSGSIZE, MSG_NOSIGNAL);
	return shm_send(fd, ch, m->msg_iov, (int)m->msg_iovlen, flags);
}

ssize_t shm_recvmsg(int fd, struct chan *ch, struct msghdr *m, int flags)
{
	ssize_t r;

	if (m->msg_iovlen > UIO_MAXIOV)
		return fail(EMSGSIZE, 0);
	r = shm_recv(fd, ch, m->msg_iov, (int)m->msg_iovlen, flags);

	if (r >= 0) {
		if (m->msg_name)
			m->msg_namelen = 0;
		m->msg_controllen = 0;
		m->msg_flags = 0;
	}
	return r;
}

int shm_recvmmsg(int fd, struct chan *ch, struct mmsghdr *vec, unsigned int vlen, int flags)
{
	unsigned int i;
	ssize_t r;

	for (i = 0; i < vlen; i++) {
		int fl = flags & ~MSG_WAITFORONE;

		if (i && (flags & MSG_WAITFORONE))
			fl |= MSG_DONTWAIT;
		r = shm_recvmsg(fd, ch, &vec[i].msg_hdr, fl);
		if (r < 0) {
			if (i == 0)
				return -1;
			break;
		}
		vec[i].msg_len = (unsigned int)r;
		if (r == 0) {
			i++;
			break;
		}
	}
	return (int)i;
}

int shm_sendmmsg(int fd, struct chan *ch, struct mmsghdr *vec, unsigned int vlen, int flags)
{
	unsigned int i;
	ssize_t r;

	for (i = 0; i < vlen; i++) {
		r = shm_sendmsg(fd, ch, &vec[i].msg_hdr, flags | (i ? MSG_NOSIGNAL : 0));
		if (r < 0) {
			if (i == 0)
				return -1;
			break;
		}
		vec[i].msg_len = (unsigned int)r;
	}
	return (int)i;
}
