// SPDX-License-Identifier: GPL-2.0
/* control.c: the TCP control connection of a shm-tier socket: doorbell
 * bytes out and in, and what its FIN/RST say about the peer. */
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "channel.h"
#include "control.h"
#include "setup.h"

int ctl_doorbell(int fd)
{
	static const char bell = 0;
	int saved = errno, rc;

	/* SYNC POINT: the ring was published before this syscall; the peer
	 * re-checks the ring after it wakes on the byte. */
	rc = syscall(SYS_sendto, fd, &bell, 1, MSG_DONTWAIT | MSG_NOSIGNAL, NULL, 0) == 1 ? 0 : -errno;
	errno = saved;
	return rc;
}

/* A doorbell is counted where the peer sees it (block bells[]) before it
 * is sent, and sent only if the peer has not begun its last close; the
 * closer marks that, then eats as many as were counted (ctl_close_bells).
 * Either the sender sees the mark or the closer sees the count: a doorbell
 * never arrives after close(), which would make the kernel answer RST
 * where TCP closes with FIN. 0 or -errno. bell_lock held. */
static int send_bell(int fd, struct chan_sh *sh)
{
	struct sbp_block_hdr *b = sh->blk;
	uint64_t *count = b ? &b->bells[chan_tx_dir(sh)] : NULL;
	int rc;

	if (count) {
		__atomic_fetch_add(count, 1, __ATOMIC_SEQ_CST);
		/* SYNC POINT: count, then look (the closer: mark, then count). */
		if (__atomic_load_n(&b->closing, __ATOMIC_SEQ_CST) & chan_end_bit(sh, 1)) {
			__atomic_fetch_sub(count, 1, __ATOMIC_SEQ_CST);
			return -EPIPE;
		}
	}
	rc = ctl_doorbell(fd);
	if (rc && count)
		__atomic_fetch_sub(count, 1, __ATOMIC_SEQ_CST);
	return rc;
}

int ctl_bell(int fd, struct chan *ch)
{
	struct chan_sh *sh = ch->sh;
	int rc;

	/* Before our ring is live, a TCP byte of ours is payload. */
	if (atomic_load_explicit(&sh->phase, memory_order_acquire) != CH_LIVE)
		return -EAGAIN;
	lock_take(&sh->bell_lock);
	if (atomic_load(&sh->flags) & CH_BELLS_CLOSED)
		rc = -EPIPE;
	else if ((rc = send_bell(fd, sh)) == 0)
		sh->bells_sent++;
	pthread_mutex_unlock(&sh->bell_lock);
	return rc;
}

#define CLOSE_BELLS_NS 20000000 /* the count is the peer's (untrusted): the wait is bounded */

void ctl_close_bells(int fd, struct chan *ch)
{
	struct chan_sh *sh = ch->sh;
	struct sbp_block_hdr *b = sh->blk;
	int64_t deadline;

	if (!b || !(atomic_load(&sh->flags) & CH_RX_ATTACHED))
		return;
	__atomic_fetch_or(&b->closing, chan_end_bit(sh, 0), __ATOMIC_SEQ_CST);
	/* SYNC POINT: mark, then count (the sender: count, then look). */
	deadline = now_ns() + CLOSE_BELLS_NS;
	while (atomic_load(&sh->bells_eaten) <
	       __atomic_load_n(&b->bells[chan_rx_dir(sh)], __ATOMIC_SEQ_CST)) {
		struct pollfd p = { fd, POLLIN, 0 };

		if (now_ns() >= deadline) {
			DBG("fd %d: closing without %llu doorbells the peer counted", fd,
			    (unsigned long long)(__atomic_load_n(&b->bells[chan_rx_dir(sh)], __ATOMIC_SEQ_CST) -
						 atomic_load(&sh->bells_eaten)));
			break;
		}
		sys_ppoll(&p, 1, 1000000, NULL);        /* 1 ms */
		if (ctl_drain(fd, ch))
			break;          /* FIN or RST: the peer sends nothing more */
	}
}

uint64_t ctl_bells_close(struct chan *ch)
{
	struct chan_sh *sh = ch->sh;
	uint64_t n;

	lock_take(&sh->bell_lock);
	atomic_fetch_or(&sh->flags, CH_BELLS_CLOSED);
	n = sh->bells_sent;
	pthread_mutex_unlock(&sh->bell_lock);
	return n;
}

int peer_tx_shut(struct chan *ch)
{
	uint32_t f = atomic_load_explicit(&ch->sh->flags, memory_order_acquire);

	if (f & (CH_TCP_EOF | CH_TCP_RST | CH_PEER_GONE | CH_BROKEN))
		return 1;
	return (f & CH_RX_ATTACHED) && (sbp_ring_flags(&ch->sh->rx.ring) & SBP_RING_WRITER_CLOSED);
}

/* What a recv says when the connection was reset: the error itself, once;
 * after that (a send of ours took it) only that the socket is closed. */
static int tcp_gone(int err)
{
	return err == ECONNRESET || err == ETIMEDOUT || err == EPIPE || err == ENOTCONN;
}

/* The TCP connection ended (FIN or RST). If the ring we read carries no FIN,
 * the peer did not shut down its side through us: its socket is gone (the
 * process died, or it closed a descriptor it shared with another process).
 * Then reads drain the ring and end like TCP would: ECONNRESET if the peer
 * left data of ours unread (TCP would have sent RST), else EOF. */
static void note_tcp_end(int fd, struct chan *ch, uint32_t bit)
{
	struct chan_sh *sh = ch->sh;
	int fin;

	(void)fd;
	fin = (atomic_load(&sh->flags) & CH_RX_ATTACHED) &&
	      (sbp_ring_flags(&sh->rx.ring) & SBP_RING_WRITER_CLOSED);
	if (!fin || bit == CH_TCP_RST) {
		uint32_t more = CH_PEER_GONE;

		if (!fin && sbp_ring_readable(&sh->tx.ring) > 0)
			more |= CH_GONE_RESET;
		bit |= more;
	}
	if (!(atomic_fetch_or(&sh->flags, bit) & CH_PEER_GONE) && (bit & CH_PEER_GONE))
		DBG("peer's socket closed (TCP %s%s)", bit & CH_TCP_RST ? "RST" : "FIN",
		    bit & CH_GONE_RESET ? ", our data unread: ECONNRESET" : "");
}

void ctl_probe(int fd, struct chan *ch)
{
	struct chan_sh *sh = ch->sh;
	int64_t t = now_ns();
	int rc;

	if (t - sh->last_probe_ns < 200000000)
		return;
	sh->last_probe_ns = t;
	rc = ctl_bell(fd, ch);
	if (rc == -EPIPE || rc == -ECONNRESET)
		note_tcp_end(fd, ch, CH_TCP_RST);
}

/* While we still read the peer's bytes from TCP, nothing there is ours to
 * eat: only look whether the connection ended. Its FIN, once the bytes
 * before it are read, or while bytes wait (the socket's state says so:
 * readers still get them first, from the kernel); a reset, even with bytes
 * waiting (a writer of ours must not wait for a reader that is gone). */
static uint32_t tcp_part_end(int fd, struct chan *ch)
{
	struct chan_sh *sh = ch->sh;
	int saved = errno, st;
	long n;
	char c;

	n = syscall(SYS_recvfrom, fd, &c, 1, MSG_PEEK | MSG_DONTWAIT, NULL, NULL);
	if (n < 0 && tcp_gone(errno)) {
		note_tcp_end(fd, ch, CH_TCP_RST);
	} else if (n > 0) {
		st = sock_tcp_state(fd);
		if (st == TCP_CLOSE)
			note_tcp_end(fd, ch, CH_TCP_RST);
		else if ((st == TCP_CLOSE_WAIT || st == TCP_LAST_ACK) && !(atomic_load(&sh->flags) & CH_SHUT_RD))
			atomic_fetch_or(&sh->flags, CH_TCP_EOF);
	} else if (n == 0 && !(atomic_load(&sh->flags) & CH_SHUT_RD)) {
		/* The peer's FIN: it may only have shut its writing (a
		 * writer of ours probes, see wait.c) */
		atomic_fetch_or(&sh->flags, CH_TCP_EOF);
	}
	errno = saved;
	return atomic_load(&sh->flags) & (CH_TCP_EOF | CH_TCP_RST);
}

uint32_t ctl_drain(int fd, struct chan *ch)
{
	struct chan_sh *sh = ch->sh;
	uint32_t f = atomic_load(&sh->flags);
	char buf[256];
	int saved = errno;

	if (f & (CH_TCP_EOF | CH_TCP_RST))
		return f & (CH_TCP_EOF | CH_TCP_RST);
	if (!(f & CH_RX_ATTACHED))
		return tcp_part_end(fd, ch);
	/* One eater at a time, and none once rx went back to TCP (revert.c
	 * counts what was eaten, then reads what follows as payload). */
	if (!lock_try(&sh->drain_lock))
		return f & (CH_TCP_EOF | CH_TCP_RST);
	if (!(atomic_load(&sh->flags) & CH_RX_ATTACHED)) {
		pthread_mutex_unlock(&sh->drain_lock);
		return tcp_part_end(fd, ch);
	}
	for (;;) {
		long n = syscall(SYS_recvfrom, fd, buf, sizeof(buf), MSG_DONTWAIT, NULL, NULL);

		if (n > 0)
			atomic_fetch_add(&sh->bells_eaten, (uint64_t)n);

		if (n > 0 && g.doorbell) {
			/* The bytes may have been for a sleeper of the other
			 * direction, asleep on this socket too: kick it. */
			for (int d = 0; d < 2; d++) {
				int k = sh->kick[d];

				if (k >= 0 && atomic_load(d ? &sh->tx_sleeping : &sh->rx_sleeping)) {
					uint64_t one = 1;

					syscall(SYS_write, k, &one, sizeof(one));
				}
			}
		}
		if (n == (long)sizeof(buf))
			continue;
		if (n > 0)
			break;
		if (n == 0) {
			/* After our own SHUT_RD a 0 says nothing about the peer. */
			if (!(f & CH_SHUT_RD))
				note_tcp_end(fd, ch, CH_TCP_EOF);
			break;
		}
		if (errno == EINTR)
			continue;
		if (tcp_gone(errno))
			note_tcp_end(fd, ch, CH_TCP_RST);
		break;
	}
	pthread_mutex_unlock(&sh->drain_lock);
	errno = saved;
	return atomic_load(&sh->flags) & (CH_TCP_EOF | CH_TCP_RST);
}

/* Look at the TCP side without waiting: FIN/RST (and doorbells) noted. */
void ctl_check(int fd, struct chan *ch)
{
	struct pollfd p = { fd, POLLIN | POLLRDHUP, 0 };
	int saved = errno;

	if (!(atomic_load(&ch->sh->flags) & (CH_TCP_EOF | CH_TCP_RST)) &&
	    sys_ppoll(&p, 1, 0, NULL) > 0)
		ctl_drain(fd, ch);
	errno = saved;
}

/* Can the TCP socket still bring doorbells? */
int ctl_usable(struct chan *ch)
{
	return !(atomic_load(&ch->sh->flags) & (CH_TCP_EOF | CH_TCP_RST | CH_SHUT_RD | CH_BROKEN));
}
