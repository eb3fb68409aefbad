// SPDX-License-Identifier: GPL-2.0
/* ready.c: readiness of one shm-tier socket for poll/select/epoll: its poll
 * mask from the rings, arming its rings for doorbells, and how long a
 * waiter spins before it sleeps.
 *
 * The kernel sees only the TCP control connection, which is always writable
 * and readable only when a doorbell byte (or FIN/RST) arrived. So for each
 * shm socket in a set we compute readiness from the rings ourselves, and
 * before sleeping in the real call we arm the rings (the peer then sends a
 * doorbell when it publishes) and let the kernel watch the TCP socket for
 * POLLIN only. A short spin first: a peer on another CPU usually answers
 * within microseconds, and a sleep/wake costs tens. */
#include <pthread.h>

#include "channel.h"
#include "control.h"
#include "revert.h"
#include "ready.h"
#include "setup.h"

/* Writable means at least this much room (a quarter of the ring), as TCP
 * reports EPOLLOUT only past a low-water mark: a writer woken for every
 * small read of its peer (wrk reads 8 KiB at a time) pays a wake-up and a
 * doorbell per 8 KiB. */
static inline size_t tx_low_water(const struct chan_sh *sh)
{
	return (size_t)(sh->tx.ring.cap / 4);
}

/* The rx side still reads the peer's bytes from TCP: readiness as the
 * kernel sees it (POLLIN/RDHUP/HUP/ERR of the socket), except that bytes
 * past where the peer's ring starts are doorbells, not data. */
static uint32_t tcp_part_mask(int fd, struct chan *ch)
{
	struct chan_sh *sh = ch->sh;
	struct pollfd p = { fd, POLLIN | POLLRDHUP, 0 };
	uint32_t m = 0;

	if (sys_ppoll(&p, 1, 0, NULL) <= 0)
		return 0;
	m = p.revents & (IN_BITS | POLLRDHUP | POLLHUP | POLLERR);
	if (!(m & IN_BITS) || !(atomic_load(&sh->flags) & CH_RX_OPEN))
		return m;
	if (sh->rx_tcp == sh->rx_tcp_end && !(p.revents & (POLLRDHUP | POLLHUP | POLLERR)))
		m &= ~IN_BITS;          /* only doorbells: the ring decides */
	return m;
}

/* The socket as the kernel sees it (poll bits). */
static uint32_t kernel_mask(int fd)
{
	struct pollfd p = { fd, POLLIN | POLLOUT | POLLRDHUP, 0 };

	return sys_ppoll(&p, 1, 0, NULL) > 0 ? (uint32_t)p.revents : 0;
}

/* Bring the rx view up to date: the peer's ring found, or the area it
 * moved to followed (a drained, linked ring has nothing to arm: the data
 * goes to the next one). Needs rx_lock: tried; a reader that holds it
 * does this itself. 0 if the view is current, else the ring is linked and
 * could not be followed now (report readable: the read will). */
int rx_look(int fd, struct chan *ch)
{
	struct chan_sh *sh = ch->sh;
	int rc, attached = !!(atomic_load(&sh->flags) & CH_RX_ATTACHED);

	if (attached && !(sbp_ring_flags(&sh->rx.ring) & SBP_RING_LINKED))
		return 0;
	rc = pthread_mutex_trylock(&sh->rx_lock);
	if (rc == EOWNERDEAD)
		pthread_mutex_consistent(&sh->rx_lock);
	if (rc != 0 && rc != EOWNERDEAD)
		return attached;
	if (!rx_progress(fd, ch)) {
		pthread_mutex_unlock(&sh->rx_lock);
		return 0;
	}
	while (sbp_stream_follow(&sh->rx) == 1)
		;
	pthread_mutex_unlock(&sh->rx_lock);
	return 0;
}

uint32_t chan_poll_mask(int fd, struct chan *ch)
{
	struct chan_sh *sh = ch->sh;
	uint32_t f, m = 0, rf = 0, tf;
	int rd_shut, wr_shut;

	if (revert_asked(sh) && lock_try(&sh->tx_lock)) {
		tx_answer(fd, ch);              /* the peer gives its socket away */
		pthread_mutex_unlock(&sh->tx_lock);
	}
	if (rx_look(fd, ch))
		m |= IN_BITS;
	f = atomic_load_explicit(&sh->flags, memory_order_acquire);
	if (f & CH_REVERTED)
		return kernel_mask(fd);         /* plain TCP now */
	if (f & CH_BROKEN)      /* ERR until a call reported the reset, as sk_err */
		return IN_BITS | OUT_BITS | POLLHUP | POLLRDHUP | ((f & CH_RESET_TOLD) ? 0 : POLLERR);
	if (!(f & CH_RX_ATTACHED))
		m |= tcp_part_mask(fd, ch);
	if (f & CH_RX_ATTACHED) {
		if (sbp_ring_corrupt(&sh->rx.ring))
			return IN_BITS | OUT_BITS | POLLERR | POLLHUP | POLLRDHUP;
		rf = sbp_ring_flags(&sh->rx.ring);
		size_t lowat = chan_rcvlowat(sh);

		if (lowat > sh->rx.ring.cap)
			lowat = sh->rx.ring.cap;
		if (sbp_ring_readable(&sh->rx.ring) >= lowat ||
		    (rf & (SBP_RING_WRITER_CLOSED | SBP_RING_RESET)))
			m |= IN_BITS;
	}
	/* like tcp_poll(): RDHUP once the peer's FIN is in, HUP when both
	 * directions are shut, ERR after a reset */
	rd_shut = (f & (CH_SHUT_RD | CH_TCP_EOF | CH_TCP_RST | CH_PEER_GONE)) ||
		  (rf & SBP_RING_WRITER_CLOSED);
	if (rd_shut)
		m |= IN_BITS | POLLRDHUP;
	tf = sbp_ring_flags(&sh->tx.ring);
	wr_shut = (f & (CH_SHUT_WR | CH_PEER_GONE)) || sbp_ring_corrupt(&sh->tx.ring) ||
		  (tf & (SBP_RING_READER_CLOSED | SBP_RING_RESET));
	if (f & CH_TX_TCP)
		m |= kernel_mask(fd) & (OUT_BITS | POLLERR);   /* we write TCP again */
	else if (wr_shut || sbp_ring_writable(&sh->tx.ring) >= tx_low_water(sh))
		m |= OUT_BITS;
	/* HUP needs our own SHUT_WR (or the RST that answered a send after
	 * the peer's close): a peer's close alone leaves us in CLOSE_WAIT */
	if (rd_shut && ((f & (CH_SHUT_WR | CH_RST_DUE)) || sbp_ring_corrupt(&sh->tx.ring) ||
			(tf & SBP_RING_RESET)))
		m |= POLLHUP;
	if (((rf | tf) & SBP_RING_RESET) || (f & CH_GONE_RESET))
		m |= POLLHUP | ((f & CH_RESET_TOLD) ? 0 : POLLERR);
	return m;
}

int chan_arm(struct chan *ch, uint32_t events, int in_et_seen, int out_et_seen, int64_t *cap)
{
	struct chan_sh *sh = ch->sh;
	uint32_t f = atomic_load(&sh->flags);
	int ready = 0;

	if (events & IN_BITS) {
		if (!(f & CH_RX_ATTACHED)) {
			/* TCP bytes wake the shadow set: payload, or the
			 * doorbell that comes with the peer's first ring write */
		} else if (in_et_seen) {
			if (*cap < 0 || *cap > CAP_ETIN)
				*cap = CAP_ETIN;
		} else if (sbp_ring_arm_readable_min(&sh->rx.ring, chan_rcvlowat(sh))) {
			ready = 1;
		}
	}
	if (events & OUT_BITS) {
		if (f & CH_TX_TCP) {
			/* writing TCP again, for the moment until the socket is
			 * plain: the shadow set watches only its input */
			if (*cap < 0 || *cap > CAP_NOBELL)
				*cap = CAP_NOBELL;
		} else if (sbp_ring_writable(&sh->tx.ring) < tx_low_water(sh)) {
			/* the reader rings once that much is free */
			if (sbp_ring_arm_writable_min(&sh->tx.ring, tx_low_water(sh)))
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

/* The spin before a sleep follows what waits take while there is traffic:
 * about twice the usual wait, at most SHMBYPASS_EPOLL_SPIN_NS (a request/
 * response peer answers within it, so no sleep, no wake-up, no syscall).
 * Waits longer than the limit (a slow or idle peer) make the spin short:
 * spinning would only burn the CPU. */
#define ACTIVE_WAIT_NS 2000000

int64_t spin_budget(int64_t ewma)
{
	int64_t max = g.epoll_spin_ns;

	if (ewma > max)
		return max / 16;
	return ewma * 2 + 2000 < max ? ewma * 2 + 2000 : max;
}

void note_wait(int64_t *ewma, int64_t waited)
{
	if (waited < ACTIVE_WAIT_NS)
		*ewma = (*ewma * 7 + waited) / 8;
	else
		*ewma = (*ewma * 7 + g.epoll_spin_ns * 2) / 8;     /* idle: spin little */
}
