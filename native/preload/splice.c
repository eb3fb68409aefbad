// SPDX-License-Identifier: GPL-2.0
/* splice.c: sendfile and splice into and out of shm-tier sockets: over
 * TCP (the kernel's call) until a direction is live, then straight between
 * the source or the pipe and the ring. */
#include <fcntl.h>
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
#include "splice.h"
#include "wait.h"

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
	if (capture_on())
		capture_data(sh->cookie, SBP_CAP_TX, sbp_ring_head_pos(&sh->tx.ring) - (uint64_t)r, piece,
			     piece[1].iov_len ? 2 : 1, (size_t)r);
	tx_bells(out, ch);
	sh->tx_written += r;
	if (pos)
		*pos += r;
	atomic_fetch_or(&sh->flags, CH_DATA);
	return r;
}

/* Move up to count bytes from in (a file at *pos, or a pipe/stream when pos
 * is NULL) into the ring. one: return after the first chunk (splice).
 * SBP_RING_GO_NEXT (errno untouched): our direction went back to TCP
 * before anything moved; the caller makes the kernel's call instead. */
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

		if (unlikely(revert_asked(sh)))
			tx_answer(out, ch);     /* the peer gives its socket away */
		if (atomic_load(&sh->phase) != CH_LIVE) {
			pthread_mutex_unlock(&sh->tx_lock);
			return done ? (ssize_t)done : SBP_RING_GO_NEXT;  /* on TCP again: the kernel's call */
		}
		err = tx_state_err(sh, atomic_load(&sh->flags));
		if (err && !done)
			err = tx_peer_closed(sh, err) ?: EPIPE;  /* no bytes to drop here */
		if (err)
			break;
		room = sbp_ring_reserve(&sh->tx.ring, piece, want);
		if (room == -EAGAIN) {
			if (one && done)
				break;          /* splice returns what it moved */
			if (tx_grow(sh, b.nonblock))
				continue;
			chan_count_full(sh);      /* the ring is full */
			tx_switch_bell(out, ch);
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

/* A capture runs: the n bytes the kernel just sent over TCP from the file
 * in, at start (-1: not a file we can read again), go into the captured
 * stream at tx_at, read back from the file. */
static void capture_tcp_part(struct chan_sh *sh, int in, off_t start, size_t n, uint64_t tx_at)
{
	char buf[4096];         /* (the caller may run on a small stack) */
	size_t done = 0;

	while (start >= 0 && done < n) {
		ssize_t k = pread(in, buf, n - done < sizeof(buf) ? n - done : sizeof(buf),
				  start + (off_t)done);

		if (k <= 0)
			break;
		capture_data(sh->cookie, SBP_CAP_TX, tx_at + done, &(struct iovec){ buf, (size_t)k },
			     1, (size_t)k);
		done += (size_t)k;
	}
	capture_missed(n - done);
}

/* sendfile/splice into a socket that is not live yet: the kernel's call,
 * counted (and captured while a capture runs). 1 and *ret if it was done
 * so, 0 if the socket is live (tx_lock released either way). src, src_at:
 * the source and its offset argument (NULL: its file position). */
static int tcp_move(struct chan *ch, int src, const off_t *src_at, long nr, long a1, long a2,
		    long a3, long a4, long a5, long a6, ssize_t *ret)
{
	struct chan_sh *sh = ch->sh;
	off_t start = -1;
	long n;

	if (atomic_load_explicit(&sh->phase, memory_order_acquire) != CH_CAND)
		return 0;
	pthread_mutex_lock(&sh->tx_lock);
	if (atomic_load(&sh->phase) != CH_CAND) {
		pthread_mutex_unlock(&sh->tx_lock);
		return 0;
	}
	if (capture_on())
		start = src_at ? *src_at : lseek(src, 0, SEEK_CUR);     /* a pipe: -1 */
	n = syscall(nr, a1, a2, a3, a4, a5, a6);
	if (n > 0 && capture_on())
		capture_tcp_part(sh, src, start, (size_t)n, sh->tx_tcp);
	if (n > 0)
		sh->tx_tcp += (uint64_t)n;
	pthread_mutex_unlock(&sh->tx_lock);
	*ret = n;
	return 1;
}

ssize_t shm_sendfile(int out, struct chan *ch, int in, off_t *offset, size_t count)
{
	int nonblock = !!(atomic_load(&ch->sh->flags) & CH_NONBLOCK);
	off_t pos;
	ssize_t r;
	int e;

	for (;;) {
		if (tcp_move(ch, in, offset, SYS_sendfile, out, in, (long)offset,
			     (long)(count < TCP_PIECE ? count : TCP_PIECE), 0, 0, &r))
			return r;
		if (offset) {
			if (*offset < 0)
				return fail(EINVAL, MSG_NOSIGNAL);
			pos = *offset;
			r = into_ring(out, ch, in, &pos, count, nonblock, 0, 0);
			if (r > 0)
				*offset = pos;
		} else {
			/* No offset: read from the file position and advance it by
			 * what was sent (pread + lseek, so a short send does not eat
			 * file data). */
			pos = lseek(in, 0, SEEK_CUR);
			if (pos < 0) {
				r = into_ring(out, ch, in, NULL, count, nonblock, 0, 0);
			} else {
				r = into_ring(out, ch, in, &pos, count, nonblock, 0, 0);
				e = errno;
				if (r > 0)
					lseek(in, pos, SEEK_SET);
				errno = e;
			}
		}
		if (r != SBP_RING_GO_NEXT)
			return r;
	}
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
	publish_tcp_read(sh);
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
			r = sbp_stream_follow(&sh->rx);
			if (r == 1)
				continue;
			if (r == SBP_RING_GO_NEXT)      /* ... or back to TCP */
				return rx_to_tcp(in, ch) < 0 ? -ECONNRESET : SBP_RING_GO_NEXT;
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
	if (r == SBP_RING_GO_NEXT) {            /* the peer went back to TCP */
		r = tcp_part_splice(in, ch, out, len,
				    (nonblock ? SPLICE_F_NONBLOCK : 0) | (out_nonblock ? SPLICE_F_NONBLOCK : 0));
		pthread_mutex_unlock(&sh->rx_lock);
		return r < 0 ? fail((int)-r, 0) : r;
	}
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
					rx_bell(in, ch);
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
		for (;;) {
			ssize_t r;

			if (tcp_move(cout, in, off_in, SYS_splice, in, (long)off_in, out, 0,
				     (long)(len < TCP_PIECE ? len : TCP_PIECE), flags, &r))
				return put_ret(cout, r);
			r = into_ring(out, cout, in, off_in, len,
				      nb || (atomic_load(&cout->sh->flags) & CH_NONBLOCK), 1, nb);
			if (r != SBP_RING_GO_NEXT)
				return put_ret(cout, r);
		}
	}
	if (off_in) {
		chan_put(cin);
		errno = ESPIPE;
		return -1;
	}
	return put_ret(cin, out_of_ring(in, cin, out, len,
					nb || (atomic_load(&cin->sh->flags) & CH_NONBLOCK), nb));
}
