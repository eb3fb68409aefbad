/* SPDX-License-Identifier: GPL-2.0 */
/* channel.h: the channel of a shm-tier connection (two ring views and the
 * state both ends' holders share), its memory and its set-up. */
#ifndef SBP_PRELOAD_CHANNEL_H
#define SBP_PRELOAD_CHANNEL_H

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "ring.h"
#include "../../bpf/bypass.h"

/*
 * The application's fd stays the real TCP socket. A connection the BPF
 * handshake put in the shm tier gets a *channel*: two rings in the region
 * (tx: we write, rx: we read). The TCP connection stays open as the control
 * channel: after the handshake it carries only doorbell bytes (wake-ups),
 * and its FIN/RST tell us when the peer is gone (control.c).
 */

/* Channel state flags (chan_sh.flags). */
#define CH_RX_ATTACHED  0x0001u  /* rx ring attached (the peer formatted it) */
#define CH_NONBLOCK     0x0002u  /* O_NONBLOCK on the file description */
#define CH_SHUT_RD      0x0004u  /* our shutdown(SHUT_RD) */
#define CH_SHUT_WR      0x0008u  /* our shutdown(SHUT_WR) */
#define CH_TCP_EOF      0x0010u  /* the TCP control connection said FIN */
#define CH_TCP_RST      0x0020u  /* ... or reset */
#define CH_PEER_GONE    0x0040u  /* the peer's socket is closed (FIN/RST without a ring FIN) */
#define CH_GONE_RESET   0x0080u  /* ... and TCP would have said ECONNRESET */
#define CH_BROKEN       0x0100u  /* set-up failed or a ring was corrupt: ECONNRESET */
#define CH_DATA         0x0200u  /* data has flowed through the rings */
#define CH_APP_NODELAY  0x0400u  /* what the app set with TCP_NODELAY (we keep it on) */
#define CH_APP_CORK     0x0800u  /* what the app set with TCP_CORK (never applied) */
#define CH_BELL_SEEN    0x1000u  /* a byte came from the peer: it has formatted its ring */

/* Shared between the processes that hold the socket after fork(): one
 * MAP_SHARED anonymous page per channel. Locks are process-shared and
 * robust (a holder killed mid-call does not wedge the others). */
struct chan_sh {
	pthread_mutex_t rx_lock;        /* one reader at a time (the ring is SPSC) */
	pthread_mutex_t tx_lock;        /* one writer at a time */
	_Atomic uint32_t rx_sleeping;   /* the rx lock holder is waiting for data */
	_Atomic uint32_t tx_sleeping;   /* the tx lock holder is waiting for room */
	_Atomic uint32_t flags;         /* CH_* */
	_Atomic uint32_t attaching;     /* one thread attaches the rx view */
	uint32_t reason;                /* CH_BROKEN: why (SBP_RESET_*, or ours) */
	int kick[2];                    /* doorbell mode: eventfd per direction (rx, tx), or -1 */
	struct sbp_ring rx;             /* views (guarded by the locks) */
	struct sbp_ring tx;
	void *rx_slot, *tx_slot;
	uint32_t rx_idx, tx_idx;
	uint64_t rx_gen, tx_gen;
	size_t slot_size;
	uint64_t rx_consumed;           /* bytes we took from rx (epoll edge detection) */
	uint64_t tx_written;            /* bytes we put in tx */
	int64_t slice_ns[2];            /* chan_wait back-off when no doorbell can come */
	int64_t last_probe_ns;
};

/* Per process (private memory, type-stable: never unmapped, only reused). */
struct chan {
	_Atomic int refs;       /* fd table entries + calls in flight; 0 = free */
	unsigned sh_epoch;      /* fork epoch when sh was made (pooled only if unchanged) */
	_Atomic int nfds;       /* fds of this process naming this channel */
	_Atomic int shared;     /* another process may hold the socket (fork, exec, SCM_RIGHTS) */
	struct chan_sh *sh;
	struct chan *next_free;
};

int chan_tryget(struct chan *ch);
void chan_put(struct chan *ch);

/* chan_put, keeping errno: for returning r from a call that held ch. */
static inline ssize_t put_ret(struct chan *ch, ssize_t r)
{
	int e = errno;

	chan_put(ch);
	errno = e;
	return r;
}

/* Build the channel for a socket the handshake put in the shm tier (st: its
 * sk_state). NULL only if no memory; a channel that cannot work comes back
 * broken (CH_BROKEN). rediscovered: found again after exec (attach to the
 * ring we write instead of formatting it). */
struct chan *chan_setup(int fd, const struct sbp_sk *st, int rediscovered);
/* 1 once the peer's ring (rx) is attached; fd -1 if unknown. */
int rx_try_attach(int fd, struct chan *ch);
/* Set-up failed or a ring is corrupt: both rings reset, the TCP connection
 * shut down (the peer learns it), ECONNRESET from now on. */
void chan_break(int fd, struct chan *ch, uint32_t reason, const char *why);

/* fork(): channel pages made before it are mapped in two processes. */
void chan_atfork_prepare(void);
void chan_atfork_parent(void);
void chan_atfork_child(void);

#endif
