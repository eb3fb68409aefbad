// SPDX-License-Identifier: GPL-2.0
/* io.c: the data path of shm-tier sockets: the send and recv families
 * through the rings, and sendfile/splice straight into and out of them.
 *
 * One writer and one reader at a time per ring (SPSC): each direction has a
 * process-shared lock. A blocking call keeps its lock while it waits (other
 * blocking callers queue behind it, as they would on the socket); a
 * non-blocking caller that finds the holder asleep gets EAGAIN at once.
 *
 * TCP semantics kept: blocking send() moves everything (or stops at a signal
 * or SO_SNDTIMEO with a partial count); recv() returns what is there;
 * MSG_WAITALL/PEEK/DONTWAIT/TRUNC/NOSIGNAL; EPIPE raises SIGPIPE unless
 * MSG_NOSIGNAL; after the peer is gone, what it wrote is still delivered. */
#include <fcntl.h>
#include <limits.h>
#include <string.h>
#include <sys/sendfile.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "channel.h"
#include "control.h"
#include "io.h"
#include "setup.h"
#include "wait.h"

#ifndef UIO_MAXIOV
#define UIO_MAXIOV 1024
#endif

static int dir_lock(pthread_mutex_t *m, _Atomic uint32_t *sleeping, int nonblock)
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

static ssize_t fail(int err, int flags)
{
	if (err == EPIPE && !(flags & MSG_NOSIGNAL))
		raise(SIGPIPE);     /* like the kernel: to this thread */
	errno = err;
	return -1;
}

/* A ring call said something other than data/full/empty/EOF: map it. */
static int ring_error(int fd, struct chan *ch, ssize_t n, int dir)
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
static int tx_state_err(struct chan_sh *sh, uint32_t f)
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

/* The ring we read is empty: is the reading over? 0 (EOF), ECONNRESET, or
 * -1 (no: wait). */
static int rx_over(uint32_t f)
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
#define TCP_PIECE (256u << 10)     /* the most one send puts on TCP before a look */

static ssize_t tcp_send(int fd, struct chan *ch, struct iovec *v, int cnt, int flags, size_t max)
{
	struct iovec lim[UIO_MAXIOV];
	size_t got = 0;
	int n_iov = 0;
	ssize_t n;

	for (int i = 0; i < cnt && got < max; i++) {
		lim[n_iov] = v[i];
		if (lim[n_iov].iov_len > max - got)
			lim[n_iov].iov_len = max - got;
		got += lim[n_iov++].iov_len;
	}
	n = tcp_io(fd, ch, lim, n_iov, flags | MSG_NOSIGNAL, 1);

	if (n > 0)
		ch->sh->tx_tcp += (uint64_t)n;
	return n;
}

/* The peer's bytes before its ring (rx_lock held): read from TCP, never
 * past where its ring starts. Once the ring exists that point is known (it
 * was formatted at the byte count the peer sent over TCP); until then any
 * TCP byte is payload, except those that came after the peer switched,
 * which are doorbells: so look for the ring again after reading. */
static ssize_t tcp_part(int fd, struct chan *ch, const struct iovec *iov, int cnt, int flags)
{
	struct chan_sh *sh = ch->sh;
	struct iovec lim[UIO_MAXIOV];
	uint64_t left = UINT64_MAX, got = 0;
	int n_iov = 0, opened;
	ssize_t n;

	opened = !!(atomic_load(&sh->flags) & CH_RX_OPEN);
	if (opened)
		left = sh->rx_tcp_end - sh->rx_tcp;
	for (int i = 0; i < cnt && got < left; i++) {
		lim[n_iov] = iov[i];
		if (lim[n_iov].iov_len > left - got)
			lim[n_iov].iov_len = left - got;
		got += lim[n_iov++].iov_len;
	}
	n = tcp_io(fd, ch, lim, n_iov, flags & ~MSG_WAITALL, 0);
	if (n <= 0)
		return n;
	if (!opened) {
		rx_progress(fd, ch);
		if ((atomic_load(&sh->flags) & CH_RX_OPEN) && sh->rx_tcp + (uint64_t)n > sh->rx_tcp_end)
			n = (ssize_t)(sh->rx_tcp_end - sh->rx_tcp);     /* the rest were doorbells */
	}
	if (!(flags & MSG_PEEK)) {
		sh->rx_tcp += (uint64_t)n;
		rx_progress(fd, ch);
	}
	return n;
}

/* The doorbell a switch owes: the peer may sleep on TCP until it sees our
 * ring. (Owed again if TCP had no room for it: the peer has TCP bytes to
 * read then, and looks for our ring when they are read.) 1 if rung. */
static int tx_switch_bell(int fd, struct chan_sh *sh)
{
	if (!sh->tx_bell_due)
		return 0;
	if (ctl_doorbell(fd) == 0)
		sh->tx_bell_due = 0;
	return 1;
}

/* After a ring write: the doorbell a switch owes, or one the peer armed
 * for. */
static void tx_bells(int fd, struct chan_sh *sh)
{
	if (tx_switch_bell(fd, sh)) {
		sbp_stream_peer_waiting(&sh->tx);
		return;
	}
	if (sbp_stream_peer_waiting(&sh->tx))
		ctl_doorbell(fd);
}

/* The ring we write is full and the spin did not help: a larger area
 * instead of a sleep, up to 1 MiB for a non-blocking writer and to the
 * largest for a blocking one (whose peer may be writing too: loopback TCP
 * would buffer megabytes before either blocks). */
static int tx_grow(struct chan_sh *sh, int nonblock)
{
	if (nonblock && sh->tx.area >= 2)
		return 0;
	if (sbp_stream_grow(&sh->tx) != 1)
		return 0;
	sh->tx_grown_ns = now_ns();
	return 1;
}

/* An empty ring larger than the smallest, a second after it last grew:
 * back to the smallest (its memory goes back to the system). */
static void tx_shrink(struct chan_sh *sh)
{
	if (sh->tx.area && now_ns() - sh->tx_grown_ns > NS_PER_S)
		sbp_stream_shrink(&sh->tx);
}

ssize_t shm_send(int fd, struct chan *ch, const struct iovec *iov, int iovcnt, int flags)
{
	struct chan_sh *sh = ch->sh;
	struct iovec v[UIO_MAXIOV];
	struct blocking b = { .fd = fd, .dir = 1 };
	size_t total, done = 0;
	int err = 0, first = 0, rc;

	rc = iov_total(iov, iovcnt, &total);
	if (rc < 0)
		return fail(-rc, MSG_NOSIGNAL);
	if (flags & MSG_OOB)
		return fail(EOPNOTSUPP, MSG_NOSIGNAL);  /* urgent data has no ring equivalent */
	b.nonblock = (flags & MSG_DONTWAIT) || (atomic_load(&sh->flags) & CH_NONBLOCK);
	if (dir_lock(&sh->tx_lock, &sh->tx_sleeping, b.nonblock))
		return fail(EAGAIN, flags);
	memcpy(v, iov, (size_t)iovcnt * sizeof(*v));
	iov_advance(v, &first, iovcnt, 0);
	for (;;) {
		uint32_t f = atomic_load_explicit(&sh->flags, memory_order_acquire);
		ssize_t n;

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
		if (err || done == total)
			break;
		if (done == 0 && sbp_ring_readable(&sh->tx.ring) == 0)
			tx_shrink(sh);
		n = sbp_ring_writev(&sh->tx.ring, v + first, iovcnt - first);
		if (n > 0) {
			done += n;
			sh->tx_written += n;
			tx_bells(fd, sh);
			if (!(f & CH_DATA))
				atomic_fetch_or(&sh->flags, CH_DATA);
			iov_advance(v, &first, iovcnt, n);
			continue;
		}
		if (n == -EAGAIN) {
			if (!b.nonblock && !b.spun && chan_spin(ch, &b) == 0)
				continue;
			if (tx_grow(sh, b.nonblock))
				continue;
			tx_switch_bell(fd, sh);
			rc = chan_block(ch, &b, done);
			if (rc) {
				if (!done)
					err = rc;
				break;
			}
			continue;
		}
		err = ring_error(fd, ch, n, 1);
		break;
	}
	pthread_mutex_unlock(&sh->tx_lock);
	if (done || !err)
		return (ssize_t)done;
	return fail(err, flags);
}

/* MSG_TRUNC on TCP: drop up to len bytes without copying them out. */
static ssize_t ring_discard(struct sbp_stream *s, size_t len)
{
	char scratch[4096];
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

ssize_t shm_recv(int fd, struct chan *ch, const struct iovec *iov, int iovcnt, int flags)
{
	struct chan_sh *sh = ch->sh;
	struct iovec v[UIO_MAXIOV];
	struct blocking b = { .fd = fd, .dir = 0 };
	size_t total, done = 0;
	int peek, waitall, err = 0, first = 0, rc;

	rc = iov_total(iov, iovcnt, &total);
	if (rc < 0)
		return fail(-rc, 0);
	if (flags & MSG_OOB)
		return fail(EINVAL, 0);         /* no urgent data, ever */
	if (flags & MSG_ERRQUEUE)
		return fail(EAGAIN, 0);
	peek = !!(flags & MSG_PEEK);
	b.nonblock = (flags & MSG_DONTWAIT) || (atomic_load(&sh->flags) & CH_NONBLOCK);
	waitall = (flags & MSG_WAITALL) && !b.nonblock && !peek;
	if (atomic_load(&sh->flags) & CH_BROKEN)
		return fail(ECONNRESET, 0);
	if (total == 0)
		return 0;
	if (dir_lock(&sh->rx_lock, &sh->rx_sleeping, b.nonblock))
		return fail(EAGAIN, 0);
	memcpy(v, iov, (size_t)iovcnt * sizeof(*v));
	iov_advance(v, &first, iovcnt, 0);
	for (;;) {
		uint32_t f = atomic_load_explicit(&sh->flags, memory_order_acquire);
		ssize_t n;

		if (f & CH_BROKEN) {
			if (!done)
				err = ECONNRESET;
			break;
		}
		if (!(f & CH_RX_ATTACHED) && !rx_progress(fd, ch)) {
			/* the peer's bytes that went over TCP first */
			n = tcp_part(fd, ch, v + first, iovcnt - first, flags);
			if (n > 0) {
				done += n;
				if (!waitall || done == total)
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
		if (n > 0) {
			done += n;
			if (!peek) {
				sh->rx_consumed += n;
				if (sbp_ring_peer_waiting(&sh->rx.ring))
					ctl_doorbell(fd);
			}
			if (!(f & CH_DATA))
				atomic_fetch_or(&sh->flags, CH_DATA);
			if (!waitall || done == total)
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
	pthread_mutex_unlock(&sh->rx_lock);
	if (done || !err)
		return (ssize_t)done;
	return fail(err, 0);
}

ssize_t shm_recvmsg(int fd, struct chan *ch, struct msghdr *m, int flags)
{
	ssize_t r = shm_recv(fd, ch, m->msg_iov, (int)m->msg_iovlen, flags);

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
		r = shm_recv(fd, ch, vec[i].msg_hdr.msg_iov, (int)vec[i].msg_hdr.msg_iovlen, fl);
		if (r < 0) {
			if (i == 0)
				return -1;
			break;
		}
		vec[i].msg_len = (unsigned int)r;
		vec[i].msg_hdr.msg_controllen = 0;
		vec[i].msg_hdr.msg_flags = 0;
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
		r = shm_send(fd, ch, vec[i].msg_hdr.msg_iov, (int)vec[i].msg_hdr.msg_iovlen,
			     flags | (i ? MSG_NOSIGNAL : 0));
		if (r < 0) {
			if (i == 0)
				return -1;
			break;
		}
		vec[i].msg_len = (unsigned int)r;
	}
	return (int)i;
}

/* sendfile / splice: the source is read straight into the free part of the ring (pread/readv
 * into the pieces sbp_ring_reserve describes, then commit what came), and a
 * pipe is written straight from the readable part: one copy, as the kernel
 * would do, not two through a bounce buffer. Never more than the ring has
 * room for, so nothing read from the source is lost when the ring fills. */

#define SPLICE_CHUNK (128u * 1024)  /* per syscall: the reader starts on it meanwhile */

/* One piece of a sendfile/splice into the ring: read the source (a file at
 * *pos, or a pipe/stream when pos is NULL) into the room reserved (piece,
 * room bytes) and publish what came. Bytes, 0 at the end of the source, or
 * -errno: the source's (-EAGAIN: a non-blocking source has nothing), or
 * the ring's (a reset/close under us, or a hostile header). */
static ssize_t fill_ring(int out, struct chan *ch, int in, off_t *pos, struct iovec piece[2],
			 ssize_t room, int in_nonblock)
{
	struct chan_sh *sh = ch->sh;
	ssize_t r, c;

	if (in_nonblock) {
		struct pollfd p = { in, POLLIN, 0 };

		if (sys_ppoll(&p, 1, 0, NULL) == 0)
			return -EAGAIN;
	}
	/* Raw syscalls: readv is ours (in may be a socket of ours). */
	r = pos ? syscall(SYS_preadv, in, piece, piece[1].iov_len ? 2 : 1, (long)*pos, 0L)
		: syscall(SYS_readv, in, piece, piece[1].iov_len ? 2 : 1);
	if (r <= 0)
		return r < 0 ? -errno : 0;
	if (r > room)
		r = room;               /* cannot happen; never publish more */
	c = sbp_ring_commit(&sh->tx.ring, (size_t)r);
	if (c != r)
		return -(c < 0 ? ring_error(out, ch, c, 1) : ECONNRESET);
	tx_bells(out, sh);
	sh->tx_written += r;
	if (pos)
		*pos += r;
	atomic_fetch_or(&sh->flags, CH_DATA);
	return r;
}

/* Move up to count bytes from in (a file at *pos, or a pipe/stream when pos
 * is NULL) into the ring. one: return after the first chunk (splice). */
static ssize_t into_ring(int out, struct chan *ch, int in, off_t *pos, size_t count,
			 int nonblock, int one, int in_nonblock)
{
	struct chan_sh *sh = ch->sh;
	struct blocking b = { .fd = out, .dir = 1, .nonblock = nonblock };
	size_t done = 0;
	int err = 0;

	if (dir_lock(&sh->tx_lock, &sh->tx_sleeping, nonblock))
		return fail(EAGAIN, 0);
	while (done < count) {
		struct iovec piece[2];
		size_t want = count - done < SPLICE_CHUNK ? count - done : SPLICE_CHUNK;
		ssize_t room, r;

		err = tx_state_err(sh, atomic_load(&sh->flags));
		if (err)
			break;
		room = sbp_ring_reserve(&sh->tx.ring, piece, want);
		if (room == -EAGAIN) {
			if (one && done)
				break;          /* splice returns what it moved */
			if (tx_grow(sh, b.nonblock))
				continue;
			tx_switch_bell(out, sh);
			err = chan_block(ch, &b, done);
			if (err)
				break;
			continue;
		}
		if (room <= 0) {
			err = ring_error(out, ch, room ? room : -EPROTO, 1);
			break;
		}
		r = fill_ring(out, ch, in, pos, piece, room, in_nonblock);
		if (r == -EINTR && !done)
			continue;
		if (r <= 0) {
			err = (int)-r;  /* 0: the end of the source */
			break;
		}
		done += r;
		if (one)
			break;
	}
	pthread_mutex_unlock(&sh->tx_lock);
	if (done || !err)
		return (ssize_t)done;
	return fail(err, 0);
}

/* sendfile/splice into a socket that is not live yet: the kernel's call,
 * counted. 1 and *ret if it was done so, 0 if the socket is live (tx_lock
 * released either way). */
static int tcp_move(int out, struct chan *ch, long nr, long a1, long a2, long a3, long a4,
		    long a5, long a6, ssize_t *ret)
{
	struct chan_sh *sh = ch->sh;
	long n;

	if (atomic_load_explicit(&sh->phase, memory_order_acquire) != CH_CAND)
		return 0;
	pthread_mutex_lock(&sh->tx_lock);
	if (atomic_load(&sh->phase) != CH_CAND) {
		pthread_mutex_unlock(&sh->tx_lock);
		return 0;
	}
	n = syscall(nr, a1, a2, a3, a4, a5, a6);
	if (n > 0)
		sh->tx_tcp += (uint64_t)n;
	pthread_mutex_unlock(&sh->tx_lock);
	*ret = n;
	(void)out;
	return 1;
}

ssize_t shm_sendfile(int out, struct chan *ch, int in, off_t *offset, size_t count)
{
	int nonblock = !!(atomic_load(&ch->sh->flags) & CH_NONBLOCK);
	off_t pos;
	ssize_t r;
	int e;

	if (tcp_move(out, ch, SYS_sendfile, out, in, (long)offset,
		     (long)(count < TCP_PIECE ? count : TCP_PIECE), 0, 0, &r))
		return r;

	if (offset) {
		if (*offset < 0)
			return fail(EINVAL, MSG_NOSIGNAL);
		pos = *offset;
		r = into_ring(out, ch, in, &pos, count, nonblock, 0, 0);
		if (r > 0)
			*offset = pos;
		return r;
	}
	/* No offset: read from the file position and advance it by what was
	 * sent (pread + lseek, so a short send does not eat file data). */
	pos = lseek(in, 0, SEEK_CUR);
	if (pos < 0)
		return into_ring(out, ch, in, NULL, count, nonblock, 0, 0);
	r = into_ring(out, ch, in, &pos, count, nonblock, 0, 0);
	e = errno;
	if (r > 0)
		lseek(in, pos, SEEK_SET);
	errno = e;
	return r;
}

/* splice out of a socket whose peer's bytes still come over TCP (rx_lock
 * held): move only what is payload. A look first (MSG_PEEK), then where
 * the peer's ring starts: what the look saw came before that ring's
 * doorbell or the ring exists now (it is formatted before the doorbell). */
static ssize_t tcp_part_splice(int in, struct chan *ch, int out, size_t len, int flags)
{
	struct chan_sh *sh = ch->sh;
	struct blocking b = { .fd = in, .dir = 0 };
	char probe[4096];
	uint64_t left;
	ssize_t k, n;
	int err;

	for (;;) {
		k = syscall(SYS_recvfrom, in, probe, len < sizeof(probe) ? len : sizeof(probe),
			    MSG_PEEK | MSG_DONTWAIT, NULL, NULL);
		if (k > 0 || (k < 0 && errno != EAGAIN) || (flags & SPLICE_F_NONBLOCK) ||
		    (atomic_load(&sh->flags) & CH_NONBLOCK))
			break;
		if (k == 0)
			break;
		/* nothing on TCP: the peer's ring may have begun right here */
		if (rx_progress(in, ch))
			return -EAGAIN;
		err = tcp_block(&b, POLLIN | POLLRDHUP);
		if (err)
			return -err;
	}
	if (k <= 0)
		return k < 0 ? -errno : 0;
	rx_progress(in, ch);
	if (atomic_load(&sh->flags) & CH_RX_OPEN) {
		left = sh->rx_tcp_end - sh->rx_tcp;
		if ((uint64_t)k > left)
			k = (ssize_t)left;
		if (k == 0)
			return -EAGAIN;         /* only doorbells: the ring is next */
	}
	n = syscall(SYS_splice, in, NULL, out, NULL, (size_t)k, flags);
	if (n < 0)
		return -errno;
	sh->rx_tcp += (uint64_t)n;
	rx_progress(in, ch);
	return n;
}

/* Wait until the ring we read has bytes for a pipe: bytes described in
 * piece (at most len), 0 at EOF, or -errno. */
static ssize_t rx_peek(int in, struct chan *ch, struct iovec piece[2], size_t len, int nonblock)
{
	struct chan_sh *sh = ch->sh;
	struct blocking b = { .fd = in, .dir = 0, .nonblock = nonblock };

	for (;;) {
		uint32_t f = atomic_load(&sh->flags);
		ssize_t r;
		int err;

		if (f & CH_BROKEN)
			return -ECONNRESET;
		r = sbp_ring_peek_iov(&sh->rx.ring, piece, len);
		if (r == SBP_RING_GO_NEXT) {    /* the writer moved to another area */
			if (sbp_stream_follow(&sh->rx) == 1)
				continue;
			r = -EPROTO;
		}
		if (r >= 0)
			return r;
		if (r != -EAGAIN)
			return -(r == -ECONNRESET ? ECONNRESET : ring_error(in, ch, r, 0));
		err = rx_over(f);
		if (err >= 0)
			return -err;            /* 0: EOF */
		err = chan_block(ch, &b, 0);
		if (err)
			return -err;
	}
}

/* splice from a shm socket into a pipe: write the pipe straight from the
 * readable part of the ring, consume exactly what the pipe took. */
static ssize_t out_of_ring(int in, struct chan *ch, int out, size_t len, int nonblock,
			   int out_nonblock)
{
	struct chan_sh *sh = ch->sh;
	struct iovec piece[2];
	ssize_t r, w;
	int err = 0;

	if (len > SPLICE_CHUNK)
		len = SPLICE_CHUNK;
	if (dir_lock(&sh->rx_lock, &sh->rx_sleeping, nonblock))
		return fail(EAGAIN, 0);
	if (!rx_progress(in, ch)) {
		r = tcp_part_splice(in, ch, out, len,
				    (nonblock ? SPLICE_F_NONBLOCK : 0) | (out_nonblock ? SPLICE_F_NONBLOCK : 0));
		if (!(r == -EAGAIN && rx_progress(in, ch))) {
			pthread_mutex_unlock(&sh->rx_lock);
			return r < 0 ? fail((int)-r, 0) : r;
		}
		/* the TCP part is over: on to the ring */
	}
	r = rx_peek(in, ch, piece, len, nonblock);
	if (r < 0) {
		err = (int)-r;
	} else if (r > 0 && out_nonblock && !sys_ppoll(&(struct pollfd){ out, POLLOUT, 0 }, 1, 0, NULL)) {
		err = EAGAIN;
	} else if (r > 0) {
		/* writev is ours too: raw syscall */
		w = syscall(SYS_writev, out, piece, piece[1].iov_len ? 2 : 1);
		if (w < 0) {
			err = errno;
		} else {
			/* consume exactly what the pipe took */
			r = sbp_ring_consume(&sh->rx.ring, (size_t)(w > r ? r : w));
			if (r > 0) {
				sh->rx_consumed += r;
				if (sbp_ring_peer_waiting(&sh->rx.ring))
					ctl_doorbell(in);
			} else if (r < 0) {
				err = ring_error(in, ch, r, 0);
			}
		}
	}
	pthread_mutex_unlock(&sh->rx_lock);
	if (err)
		return fail(err, 0);
	return r;
}

ssize_t shm_splice(int in, struct chan *cin, off_t *off_in, int out, struct chan *cout,
		   off_t *off_out, size_t len, unsigned int flags)
{
	int nb = !!(flags & SPLICE_F_NONBLOCK);

	if (cin && cout) {
		/* two sockets: the kernel wants a pipe on one side */
		chan_put(cin);
		chan_put(cout);
		errno = EINVAL;
		return -1;
	}
	if (cout) {
		if (off_out) {
			chan_put(cout);
			errno = ESPIPE;
			return -1;
		}
		{
			ssize_t r;

			if (tcp_move(out, cout, SYS_splice, in, (long)off_in, out, 0,
				     (long)(len < TCP_PIECE ? len : TCP_PIECE), flags, &r))
				return put_ret(cout, r);
		}
		return put_ret(cout, into_ring(out, cout, in, off_in, len,
					       nb || (atomic_load(&cout->sh->flags) & CH_NONBLOCK), 1,
					       nb));
	}
	if (off_in) {
		chan_put(cin);
		errno = ESPIPE;
		return -1;
	}
	return put_ret(cin, out_of_ring(in, cin, out, len,
					nb || (atomic_load(&cin->sh->flags) & CH_NONBLOCK), nb));
}
