/* SPDX-License-Identifier: GPL-2.0 */
/* channel.h: the channel of a shm-tier connection (two streams and the
 * state both ends' holders share), its memory and its set-up. */
#ifndef SBP_PRELOAD_CHANNEL_H
#define SBP_PRELOAD_CHANNEL_H

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/single_threaded.h>
#include <sys/types.h>

#include "memory.h"
#include "ring.h"
#include "stream.h"
#include "../../bpf/bypass.h"

/*
 * The application's fd stays the real TCP socket. A connection BPF paired
 * in the shm tier gets a *channel*. It starts on TCP (phase CAND): the
 * passive end offers memory (memory.c), the active end takes it, and each
 * end moves its own sending direction to rings as soon as the peer holds
 * the memory: the active end when it takes the offer, the passive end when
 * it sees that taken (phase LIVE). A reader reads TCP until the stream
 * position where the writer's ring starts (the writer formats its ring at
 * the byte count it sent over TCP, then rings one doorbell), then the ring.
 * So every byte sent before either side was ready simply went over TCP, a
 * connection whose peer never takes the memory is plain TCP, and nothing
 * blocks waiting for the peer. Afterwards the TCP connection carries only
 * doorbell bytes, and its FIN/RST say when the peer is gone (control.c).
 */

/* Channel state flags (chan_sh.flags). */
#define CH_RX_ATTACHED  0x0001u  /* rx reads the ring now (the TCP part is read) */
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
#define CH_RX_KNOWN     0x1000u  /* we know where the peer's ring is (rx_areas) */
#define CH_RX_OPEN      0x2000u  /* the peer's ring is attached: rx_tcp_end is its start */
#define CH_ACTIVE       0x4000u  /* we connected (the peer offers the memory) */
#define CH_SLOTS        0x8000u  /* a VM pair: region slots, live from the start */
#define CH_TX_TCP       0x10000u /* we send over TCP for good (back to TCP, revert.c) */
#define CH_RX_TCP       0x20000u /* we read TCP for good (the peer's ring linked to TCP) */
#define CH_REVERTED     0x40000u /* this end gave the socket back: plain TCP for every holder */
#define CH_BELLS_CLOSED 0x80000u /* no doorbell may be sent any more (bells_sent is final) */
#define CH_RST_DUE      0x100000u /* the peer closed and we wrote again: its RST is in, sends fail */
#define CH_RESET_TOLD   0x200000u /* a call reported ECONNRESET: later ones see a closed socket */

/* chan_sh.phase */
#define CH_CAND 0u      /* we send over TCP; the kernel watches the socket */
#define CH_LIVE 1u      /* we send through our ring */

/* Shared between the processes that hold the socket after fork(): one
 * MAP_SHARED anonymous page per channel. Locks are process-shared and
 * robust (a holder killed mid-call does not wedge the others). */
struct chan_sh {
	pthread_mutex_t rx_lock;        /* one reader at a time (the ring is SPSC) */
	pthread_mutex_t tx_lock;        /* one writer at a time */
	_Atomic uint32_t rx_sleeping;   /* the rx lock holder is waiting for data */
	_Atomic uint32_t tx_sleeping;   /* the tx lock holder is waiting for room */
	_Atomic uint32_t flags;         /* CH_* */
	_Atomic uint32_t phase;         /* CH_CAND / CH_LIVE */
	uint32_t reason;                /* CH_BROKEN: why (SBP_RESET_*, or ours) */
	int kick[2];                    /* doorbell mode: eventfd per direction (rx, tx), or -1 */
	struct sbp_stream rx;           /* views (guarded by the locks) */
	struct sbp_stream tx;
	struct sbp_stream_areas rx_areas; /* where the peer's ring is (CH_RX_KNOWN) */
	struct sbp_stream_areas tx_areas;
	uint64_t rx_gen, tx_gen;        /* the generations both rings carry */
	struct mem_ref mem;             /* the pair-memory block (one host), or empty */
	struct sbp_block_hdr *blk;      /* its header (shared, untrusted), or NULL */
	uint64_t cookie;                /* our socket's cookie */
	uint64_t tx_tcp;                /* payload bytes we sent over TCP (tx_lock) */
	uint64_t rx_tcp;                /* payload bytes we read from TCP (rx_lock) */
	uint64_t rx_tcp_end;            /* where the peer's TCP payload ends (CH_RX_OPEN) */
	int tx_bell_due;                /* ring a doorbell with the first ring write */
	int64_t tx_grown_ns;            /* when the ring we write last grew */
	uint64_t tx_full_tail;          /* the reader's position when we last found it full */
	int64_t tx_full_ns;             /* ... and since when it has not moved */
	uint32_t tx_part, rx_part;      /* VM pairs: the slot numbers (tests, VM linger) */
	uint64_t rx_consumed;           /* bytes we took from rx (epoll edge detection) */
	uint64_t tx_written;            /* bytes we put in tx */
	int64_t slice_ns[2];            /* chan_wait back-off when no doorbell can come */
	int64_t last_probe_ns;
	/* Doorbells are TCP bytes the peer must skip when either side goes
	 * back to TCP (revert.c): both counts are exact. */
	pthread_mutex_t bell_lock;      /* held around sending one (and closing the count) */
	uint64_t bells_sent;            /* since our ring went live (bell_lock) */
	pthread_mutex_t drain_lock;     /* held around eating some outside rx_lock */
	_Atomic uint64_t bells_eaten;   /* TCP bytes read past the peer's payload */
	_Atomic uint32_t rcvlowat;      /* SO_RCVLOWAT as the kernel took it (0: 1) */
};

/* How many ring bytes make the socket readable (SO_RCVLOWAT). */
static inline size_t chan_rcvlowat(const struct chan_sh *sh)
{
	uint32_t v = atomic_load_explicit(&sh->rcvlowat, memory_order_relaxed);

	return v ? v : 1;
}

/* Per process (private memory, type-stable: never unmapped, only reused). */
struct chan {
	_Atomic int refs;       /* fd table entries + calls in flight; 0 = free */
	unsigned sh_epoch;      /* fork epoch when sh was made (pooled only if unchanged) */
	_Atomic int nfds;       /* fds of this process naming this channel */
	_Atomic int shared;     /* another process may hold the socket (fork, exec, SCM_RIGHTS) */
	struct chan_sh *sh;
	struct chan *next_free;
};

void chan_note_rcvlowat(int fd, struct chan_sh *sh);
void chan_free(struct chan *ch);

/* A call's reference (fd table entries hold one each): 1 if taken.
 * Inline: every data call takes and puts one. With one thread, no other
 * call can touch refs while this one does: a plain load and store (an
 * atomic read-modify-write costs 13 ns a call pair here). A signal handler
 * that closes the socket between the two would make the count one too
 * high: the channel then leaks, it is never freed early. */
static inline int chan_tryget(struct chan *ch)
{
	int r = atomic_load_explicit(&ch->refs, memory_order_relaxed);

	if (__libc_single_threaded) {
		if (r <= 0)
			return 0;
		atomic_store_explicit(&ch->refs, r + 1, memory_order_relaxed);
		return 1;
	}
	while (r > 0)
		if (atomic_compare_exchange_weak(&ch->refs, &r, r + 1))
			return 1;
	return 0;
}

static inline void chan_put(struct chan *ch)
{
	if (__libc_single_threaded) {
		int r = atomic_load_explicit(&ch->refs, memory_order_relaxed);

		atomic_store_explicit(&ch->refs, r - 1, memory_order_relaxed);
		if (r != 1)
			return;
	} else if (atomic_fetch_sub_explicit(&ch->refs, 1, memory_order_acq_rel) != 1) {
		return;
	}
	chan_free(ch);
}

/* Take a process-shared robust lock (a holder killed mid-call leaves the
 * state it guards consistent: every such section publishes with one
 * store). lock_take waits; lock_try does not (1 if taken). */
void lock_take(pthread_mutex_t *m);
int lock_try(pthread_mutex_t *m);
/* ... waiting until deadline (CLOCK_MONOTONIC ns): 1 if taken. */
int lock_until(pthread_mutex_t *m, int64_t deadline);

/* No other call can run on this channel while ours does: this process has
 * one thread (glibc's count: threads made by a raw clone() are not seen,
 * docs/CONFORMANCE.md) and no other process holds the socket (no fork
 * since it was set up, not sent). Only this thread can change either, and
 * not in the middle of a call. The data path then takes no direction lock:
 * a process-shared robust lock and unlock cost 19 ns, four a round trip. */
static inline int chan_solo(const struct chan *ch)
{
	return __libc_single_threaded && !atomic_load_explicit(&ch->shared, memory_order_relaxed);
}

/* chan_put (which keeps errno): for returning r from a call that held ch. */
static inline ssize_t put_ret(struct chan *ch, ssize_t r)
{
	chan_put(ch);
	return r;
}

/* A connection BPF put in the shm tier (in: its SBP_SO_INFO): the passive
 * end offers memory, the active end waits for the offer; both on TCP for
 * now (CH_CAND), or a VM pair's slots, live at once. NULL: not possible
 * here (the caller keeps it plain TCP; nothing was promised yet). */
struct chan *chan_setup(int fd, const struct sbp_info *in);
/* A CH_CAND channel: can it go live now (the active end: an offer came;
 * the passive end: the offer was taken)? Takes tx_lock if free (else
 * later). 1 if it is live now. */
int chan_try_live(int fd, struct chan *ch);
/* The same with tx_lock held; now: look at the inbox even if it was
 * looked at microseconds ago. */
int chan_live_locked(int fd, struct chan *ch, int now);
/* The rx side, with rx_lock held: once the peer's ring exists, learn where
 * its TCP part ends; once that much was read, read the ring
 * (CH_RX_ATTACHED). 1 if rx is on the ring now. */
int rx_progress(int fd, struct chan *ch);
/* Set-up failed or a ring is corrupt: both rings reset, the TCP connection
 * shut down (the peer learns it), ECONNRESET from now on. */
void chan_break(int fd, struct chan *ch, uint32_t reason, const char *why);
/* Our direction and the peer's in the block (SBP_DIR_*). */
static inline int chan_tx_dir(const struct chan_sh *sh)
{
	return sh->mem.active ? SBP_DIR_A2P : SBP_DIR_P2A;
}

static inline int chan_rx_dir(const struct chan_sh *sh)
{
	return 1 - chan_tx_dir(sh);
}

/* The peer asked our writer to go back to TCP (revert.c answers)? One
 * load; every path that writes a ring looks before it does. */
static inline int revert_asked(const struct chan_sh *sh)
{
	return sh->blk && __atomic_load_n(&sh->blk->revert[chan_tx_dir(sh)], __ATOMIC_RELAXED) ==
				  SBP_REVERT_ASKED;
}

/* The ring we write was full: counted for status/metrics, in the block
 * header both ends share (one relaxed add; nothing reads it back). */
static inline void chan_count_full(struct chan_sh *sh)
{
	if (sh->blk)
		__atomic_fetch_add(&sh->blk->full[chan_tx_dir(sh)], 1, __ATOMIC_RELAXED);
}

/* This end's and the peer's bit in the block's done and closing words. */
static inline uint32_t chan_end_bit(const struct chan_sh *sh, int peer)
{
	return (sh->mem.active ^ !!peer) ? SBP_DONE_ACTIVE : SBP_DONE_PASSIVE;
}

/* Start writing our ring at the byte count we sent over TCP (tx_lock held). */
int tx_go_live(int fd, struct chan_sh *sh);
/* Tell the peer's writer how much of its TCP part we have read (rx_lock
 * held, after each read there). */
void publish_tcp_read(struct chan_sh *sh);
/* The last holder closes: this end is done with the memory. */
void chan_done(struct chan *ch);

/* fork(): channel pages made before it are mapped in two processes. */
void chan_atfork_prepare(void);
void chan_atfork_parent(void);
void chan_atfork_child(void);

#endif
