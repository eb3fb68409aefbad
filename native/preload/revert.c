// SPDX-License-Identifier: GPL-2.0
/* revert.c: bringing a shm-tier connection back to plain TCP, every byte in
 * order (revert.h; docs/NEGOTIATION.md, "Back to TCP").
 *
 * Needed when the socket may reach a program that cannot read our rings:
 * exec (the new image has none of this image's mappings), SCM_RIGHTS to
 * another process, posix_spawn. The end that gives the socket away (E):
 *  1. asks its peer (P), in the block header, to stop writing its ring at
 *     the stream position E has read to (revert_pos);
 *  2. links its own ring to TCP after the doorbells it sent (counted; its
 *     ring goes live for that if it was not, so P learns where E's TCP
 *     part ends), ringing one more so that P wakes;
 *  3. waits for P's answer: P links its ring likewise, sends again over TCP
 *     what E had not read, and from then writes TCP; it answers with the
 *     number of doorbells it sent (revert_bells);
 *  4. reads and drops P's doorbells still queued (those it did not eat).
 * What E's successor then reads on TCP is P's stream from where E stopped.
 * P's reader, when it drains E's ring up to the link, drops E's doorbells
 * the same way (rx_to_tcp) and reads TCP from then on. A doorbell never
 * sits in front of payload E has not read (the switch doorbell waits until
 * the reader has read the TCP part, channel.c tx_go_live), so step 4 never
 * has to skip payload; if it would, the connection is reset instead.
 * Everything read from the block header is untrusted: a lying peer can
 * only garble its own stream, never make us read or write out of bounds.
 */
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "control.h"
#include "epset.h"
#include "fdtable.h"
#include "revert.h"
#include "setup.h"

#define REVERT_WAIT_NS (2 * NS_PER_S)   /* for the peer's answer */

/* Wake the peer wherever it may sleep on its ring: a writer waiting for
 * room in any of its areas (a reader is woken by our link). */
static void kick_peer(struct chan_sh *sh)
{
	for (int a = 0; a < sh->rx_areas.n; a++) {
		struct sbp_ring t;

		if (sbp_ring_attach(&t, sh->rx_areas.slot[a], sh->rx_areas.size[a], sh->rx_gen) == 0)
			sbp_ring_kick(&t);
	}
}

/* Has the peer's ring ever been live (its first area formatted)? */
static int peer_went_live(struct chan_sh *sh)
{
	struct sbp_ring t;

	return sh->rx_areas.n &&
	       sbp_ring_attach(&t, sh->rx_areas.slot[0], sh->rx_areas.size[0], sh->rx_gen) == 0;
}

/* Where the peer's ring starts (the end of its TCP part); 0 if not live. */
static uint64_t peer_ring_start(struct chan_sh *sh)
{
	if (atomic_load(&sh->flags) & CH_RX_OPEN)
		return sh->rx_tcp_end;
	return UINT64_MAX;      /* unknown: rx_tcp is below it */
}

/* Read and drop n bytes of TCP (doorbells the peer sent before its link),
 * waiting for them until the deadline. 0 or -errno. */
static int tcp_skip(int fd, uint64_t n, int64_t deadline)
{
	char buf[256];

	while (n) {
		long k = syscall(SYS_recvfrom, fd, buf, n < sizeof(buf) ? n : sizeof(buf), MSG_DONTWAIT,
				 NULL, NULL);
		int64_t left;

		if (k > 0) {
			n -= (uint64_t)k;
			continue;
		}
		if (k == 0)
			return -ECONNRESET;     /* the peer's FIN before its doorbells */
		if (errno == EINTR)
			continue;
		if (errno != EAGAIN)
			return -errno;
		left = deadline - now_ns();
		if (left <= 0)
			return -ETIMEDOUT;
		sys_ppoll(&(struct pollfd){ fd, POLLIN, 0 }, 1, left, NULL);
	}
	return 0;
}

/* One doorbell byte, waiting for room until the deadline (it is counted
 * already: it must go). */
static int tcp_send_one(int fd, int64_t deadline)
{
	for (;;) {
		int rc = ctl_doorbell(fd);
		int64_t left = deadline - now_ns();

		if (rc != -EAGAIN)
			return rc;
		if (left <= 0)
			return -ETIMEDOUT;
		sys_ppoll(&(struct pollfd){ fd, POLLOUT, 0 }, 1, left, NULL);
	}
}

/* All of iov over TCP, waiting for room as a blocking send would. */
static void tcp_send_all(int fd, struct iovec *iov, int n)
{
	int first = 0;

	while (first < n) {
		struct msghdr m = { .msg_iov = iov + first, .msg_iovlen = (size_t)(n - first) };
		long k = syscall(SYS_sendmsg, fd, &m, MSG_NOSIGNAL);

		if (k < 0 && errno == EAGAIN) {
			sys_ppoll(&(struct pollfd){ fd, POLLOUT, 0 }, 1, -1, NULL);
			continue;
		}
		if (k < 0 && errno == EINTR)
			continue;
		if (k < 0)
			return;         /* the peer is gone: it reads nothing more */
		while (first < n && (size_t)k >= iov[first].iov_len)
			k -= (long)iov[first++].iov_len;
		if (first < n) {
			iov[first].iov_base = (char *)iov[first].iov_base + k;
			iov[first].iov_len -= (size_t)k;
		}
	}
}

/* Both directions are on TCP: every holder treats the socket as plain. */
static void both_on_tcp(struct chan *ch)
{
	struct chan_sh *sh = ch->sh;

	if ((atomic_load(&sh->flags) & (CH_TX_TCP | CH_RX_TCP)) != (CH_TX_TCP | CH_RX_TCP))
		return;
	if (atomic_fetch_or(&sh->flags, CH_REVERTED) & CH_REVERTED)
		return;
	chan_done(ch);
}

int tx_answer(int fd, struct chan *ch)
{
	struct chan_sh *sh = ch->sh;
	struct sbp_block_hdr *h = sh->blk;
	struct iovec iov[2 * SBP_AREAS];
	int d = chan_tx_dir(sh), n = 0;
	uint64_t bells, from;
	size_t total = 0;

	if (!revert_asked(sh))
		return 0;
	from = __atomic_load_n(&h->revert_pos[d], __ATOMIC_ACQUIRE);
	if (atomic_load(&sh->phase) == CH_LIVE) {
		bells = ctl_bells_close(ch);
		sbp_stream_to_tcp(&sh->tx, bells);
	} else {
		bells = sh->bells_sent;         /* final, or 0: never live */
	}
	if (sh->tx.ring.hdr) {
		/* our ring was live: what the reader has not taken, again */
		n = sbp_stream_unread(&sh->tx, from, iov, &total);
		if (n < 0) {
			chan_break(fd, ch, SBP_RESET_CORRUPT,
				   "the peer asked to go back to TCP from a position we never wrote");
			return 1;
		}
	}
	sh->tx_bell_due = 0;
	atomic_store(&sh->phase, CH_CAND);
	atomic_fetch_or(&sh->flags, CH_TX_TCP);
	__atomic_store_n(&h->revert_bells[d], bells, __ATOMIC_RELAXED);
	/* SYNC POINT: the count before the answer; the peer reads our
	 * doorbells, then what follows as payload. */
	__atomic_store_n(&h->revert[d], SBP_REVERT_DONE, __ATOMIC_RELEASE);
	DBG("fd %d: back to TCP at the peer's request: %zu bytes again, after %llu doorbells", fd,
	    total, (unsigned long long)bells);
	tcp_send_all(fd, iov, n);
	both_on_tcp(ch);
	return 1;
}

int rx_to_tcp(int fd, struct chan *ch)
{
	struct chan_sh *sh = ch->sh;
	uint64_t bells, eaten;
	int rc;

	if (sbp_stream_tcp_bells(&sh->rx, &bells) < 0)
		return -EPROTO;
	/* No eater any more: what follows the doorbells is payload. */
	lock_take(&sh->drain_lock);
	atomic_fetch_and(&sh->flags, ~(CH_RX_ATTACHED | CH_RX_OPEN));
	atomic_fetch_or(&sh->flags, CH_RX_TCP);
	eaten = atomic_load(&sh->bells_eaten);
	pthread_mutex_unlock(&sh->drain_lock);
	rc = bells < eaten ? -EPROTO : tcp_skip(fd, bells - eaten, now_ns() + REVERT_WAIT_NS);
	if (rc < 0) {
		chan_break(fd, ch, SBP_RESET_CORRUPT, "the peer's ring led back to TCP, but not its doorbells");
		return rc;
	}
	DBG("fd %d: the peer went back to TCP (%llu doorbells skipped)", fd,
	    (unsigned long long)(bells - eaten));
	/* It gave the socket away, or answered our request: our side too. */
	if (lock_try(&sh->tx_lock)) {
		tx_answer(fd, ch);
		pthread_mutex_unlock(&sh->tx_lock);
	}
	both_on_tcp(ch);
	return 0;
}

/* Step 2: our direction on TCP, after the doorbells we sent. Our ring goes
 * live for it if it was not (the peer learns where our TCP part ends from
 * it). -errno if our memory cannot be used. */
static int tx_back(int fd, struct chan *ch, int64_t deadline)
{
	struct chan_sh *sh = ch->sh;

	if (atomic_load(&sh->phase) != CH_LIVE) {
		if (atomic_load(&sh->flags) & CH_TX_TCP)
			return 0;
		if (tx_go_live(fd, sh) < 0)
			return -EPROTO;
	}
	/* The link first, counting one more doorbell, then that doorbell: it
	 * wakes the peer wherever it sleeps (on TCP, in doorbell mode) after
	 * the link is there to see. */
	sbp_stream_to_tcp(&sh->tx, ctl_bells_close(ch) + 1);
	if (tcp_send_one(fd, deadline) < 0)
		return -EPIPE;
	sh->tx_bell_due = 0;
	atomic_store(&sh->phase, CH_CAND);
	atomic_fetch_or(&sh->flags, CH_TX_TCP);
	return 0;
}

/* Steps 3 and 4, rx_lock held: the peer's answer, then its doorbells. */
static int rx_back(int fd, struct chan *ch, int64_t deadline)
{
	struct chan_sh *sh = ch->sh;
	struct sbp_block_hdr *h = sh->blk;
	int d = chan_rx_dir(sh);
	uint64_t bells = 0, eaten;
	int64_t next_kick = 0;

	/* A peer not live yet sees the request when it formats its ring
	 * (SYNC POINT with tx_go_live: request stored, then its ring looked
	 * at) and answers at once, having sent no doorbell. */
	if (peer_went_live(sh)) {
		while (__atomic_load_n(&h->revert[d], __ATOMIC_ACQUIRE) != SBP_REVERT_DONE) {
			int64_t t = now_ns();

			if (t >= deadline)
				return -ETIMEDOUT;
			if (t >= next_kick) {
				kick_peer(sh);
				next_kick = t + 10000000;
			}
			/* both ends giving the socket away at once */
			if (revert_asked(sh))
				tx_answer(fd, ch);
			sys_ppoll(NULL, 0, 100000, NULL);
		}
		bells = __atomic_load_n(&h->revert_bells[d], __ATOMIC_RELAXED);
	}
	lock_take(&sh->drain_lock);
	atomic_fetch_and(&sh->flags, ~(CH_RX_ATTACHED | CH_RX_OPEN));
	atomic_fetch_or(&sh->flags, CH_RX_TCP);
	eaten = atomic_load(&sh->bells_eaten);
	pthread_mutex_unlock(&sh->drain_lock);
	if (bells < eaten)
		return -EPROTO;
	/* Doorbells behind payload we have not read: only a peer that broke
	 * the switch rule sends them; we cannot take them out. */
	if (bells > eaten && sh->rx_tcp < peer_ring_start(sh) && peer_ring_start(sh) != UINT64_MAX)
		return -EPROTO;
	return tcp_skip(fd, bells - eaten, deadline);
}

/* The socket goes to a program that cannot read the rings, and its bytes
 * could not all be put back on TCP: abort the TCP connection (RST to the
 * peer, our queue of doorbells dropped, ECONNRESET for the next reader;
 * tcp_disconnect), so that the loss is an error and never a doorbell byte
 * followed by EOF. */
static void abort_for_successor(int fd)
{
	struct sockaddr sa = { .sa_family = AF_UNSPEC };
	int saved = errno;

	syscall(SYS_connect, fd, &sa, sizeof(sa));
	errno = saved;
}

void chan_reset_for_successor(int fd, struct chan *ch, const char *why)
{
	chan_break(fd, ch, SBP_RESET_APP, why);
	abort_for_successor(fd);
	chan_went_plain(ch);
}

/* Has the peer sent its FIN (TCP says so)? Then what it wrote is final. */
static int peer_fin(int fd)
{
	struct tcp_info ti;
	socklen_t len = sizeof(ti);

	if (syscall(SYS_getsockopt, fd, IPPROTO_TCP, TCP_INFO, &ti, &len) < 0)
		return 0;
	return ti.tcpi_state == TCP_CLOSE_WAIT || ti.tcpi_state == TCP_LAST_ACK ||
	       ti.tcpi_state == TCP_CLOSING || ti.tcpi_state == TCP_TIME_WAIT ||
	       ti.tcpi_state == TCP_CLOSE;
}

/* The peer will never answer a request to go back to TCP: it closed its
 * last fd of the connection (its block's done bit) and its FIN is here. */
static int peer_finished(int fd, struct chan *ch)
{
	struct sbp_block_hdr *h = ch->sh->blk;
	uint32_t bit = (atomic_load(&ch->sh->flags) & CH_ACTIVE) ? SBP_DONE_PASSIVE : SBP_DONE_ACTIVE;

	return h && (__atomic_load_n(&h->done, __ATOMIC_ACQUIRE) & bit) && peer_fin(fd);
}

/* The socket is in use by another thread for longer than we may wait:
 * reset rather than let the new holder read a doorbell or miss bytes. */
static int give_up(int fd, struct chan *ch, pthread_mutex_t *held)
{
	chan_break(fd, ch, SBP_RESET_APP, "another thread kept the socket busy while this one gave "
		   "it to a program that cannot read the rings");
	abort_for_successor(fd);
	if (held)
		pthread_mutex_unlock(held);
	chan_went_plain(ch);
	return -EBUSY;
}

int chan_give_back(int fd, struct chan *ch)
{
	struct chan_sh *sh = ch->sh;
	int64_t deadline = now_ns() + REVERT_WAIT_NS;
	uint32_t f = atomic_load(&sh->flags);
	int rc = 0;

	if (f & (CH_REVERTED | CH_BROKEN))
		return 0;       /* plain already, or reset: nothing flows through rings */
	if (f & CH_SLOTS)
		return -ENOTSUP;
	/* Another thread may be in a call on the socket (asleep in recv
	 * holds rx_lock): it gets the time we give the peer. */
	if (!lock_until(&sh->tx_lock, deadline))
		return give_up(fd, ch, NULL);
	if (!lock_until(&sh->rx_lock, deadline))
		return give_up(fd, ch, &sh->tx_lock);
	if (peer_finished(fd, ch)) {
		rc = -ESHUTDOWN;
	} else if (!sh->blk || mem_withdraw(&sh->mem)) {
		/* No memory was ever shared (the active end took no offer, or
		 * we withdrew ours now): both directions were TCP all along. */
		atomic_fetch_or(&sh->flags, CH_TX_TCP | CH_RX_TCP);
	} else {
		struct sbp_block_hdr *h = sh->blk;
		int d = chan_rx_dir(sh);
		uint64_t pos = (atomic_load(&sh->flags) & CH_RX_ATTACHED) ? sbp_ring_tail_pos(&sh->rx.ring)
									   : sh->rx_tcp;

		__atomic_store_n(&h->revert_pos[d], pos, __ATOMIC_RELAXED);
		__atomic_store_n(&h->revert[d], SBP_REVERT_ASKED, __ATOMIC_SEQ_CST);
		rc = tx_back(fd, ch, deadline);
		if (rc == 0)
			rc = rx_back(fd, ch, deadline);
	}
	if (rc == -ETIMEDOUT && peer_fin(fd)) {
		rc = -ESHUTDOWN;        /* it shut down and makes no call: its stream is final */
	} else if (rc < 0 && rc != -ESHUTDOWN) {
		chan_break(fd, ch, SBP_RESET_APP, rc == -ETIMEDOUT ?
			   "the peer did not agree to go back to TCP in time (it gives the socket to "
			   "a program that cannot read the rings; a peer that closed with bytes still "
			   "in its ring cannot answer)" :
			   "the peer's answer to go back to TCP did not add up");
		abort_for_successor(fd);
	}
	both_on_tcp(ch);
	pthread_mutex_unlock(&sh->rx_lock);
	pthread_mutex_unlock(&sh->tx_lock);
	if (rc == -ESHUTDOWN)
		return rc;      /* the channel stays: the caller reads the rest */
	if (rc == 0)
		DBG("fd %d: back to plain TCP (the socket leaves this program)", fd);
	chan_went_plain(ch);
	return rc;
}

void chan_went_plain(struct chan *ch)
{
	int hi = fdt_max();

	for (int fd = 0; fd < hi; fd++) {
		uint64_t v = fdt_load(fd);

		if ((FD_KIND(v) == K_SHM || FD_KIND(v) == K_PENDING) && FD_PTR(v) == ch &&
		    fdt_cas(fd, v, K_PLAIN)) {
			ep_fd_became_plain(fd);
			atomic_fetch_sub(&ch->nfds, 1);
			chan_put(ch);
		}
	}
}
