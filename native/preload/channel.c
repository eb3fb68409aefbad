// SPDX-License-Identifier: GPL-2.0
/* channel.c: a shm-tier connection's channel: its memory (allocation,
 * references, the page pool across fork), its set-up (on TCP until the
 * peer holds the memory, then live), its two streams, and breaking it. */
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sched.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "ask.h"
#include "channel.h"
#include "fdtable.h"
#include "orphan.h"
#include "setup.h"

void lock_take(pthread_mutex_t *m)
{
	if (pthread_mutex_lock(m) == EOWNERDEAD)
		pthread_mutex_consistent(m);
}

int lock_until(pthread_mutex_t *m, int64_t deadline)
{
	struct timespec ts = { deadline / NS_PER_S, deadline % NS_PER_S };
	int rc = pthread_mutex_clocklock(m, CLOCK_MONOTONIC, &ts);

	if (rc == EOWNERDEAD)
		pthread_mutex_consistent(m);
	return rc == 0 || rc == EOWNERDEAD;
}

int lock_try(pthread_mutex_t *m)
{
	int rc = pthread_mutex_trylock(m);

	if (rc == EOWNERDEAD)
		pthread_mutex_consistent(m);
	return rc == 0 || rc == EOWNERDEAD;
}

static atomic_flag slab_lock = ATOMIC_FLAG_INIT;
static struct chan *chan_free_list;

static void slab_acquire(void)
{
	while (atomic_flag_test_and_set_explicit(&slab_lock, memory_order_acquire))
		sched_yield();
}

static void slab_release(void)
{
	atomic_flag_clear_explicit(&slab_lock, memory_order_release);
}

/* Channel pages (MAP_SHARED, so a forked child shares them) are kept for
 * reuse: a fresh one costs a shmem page-cache insert, a fault and a free.
 * Only pages no other process can have: none made before the last fork. */
#define SH_BYTES ((sizeof(struct chan_sh) + 4095) & ~(size_t)4095)
#define SH_POOL_MAX 256
static _Atomic unsigned fork_epoch;
static void *sh_pool[SH_POOL_MAX];
static unsigned sh_pool_n;

static struct chan *chan_alloc(void)
{
	pthread_mutexattr_t ma;
	struct chan_sh *sh = NULL;
	struct chan *ch;

	slab_acquire();
	if (sh_pool_n)
		sh = sh_pool[--sh_pool_n];
	slab_release();
	if (sh) {
		memset(sh, 0, sizeof(*sh));
	} else {
		sh = mmap(NULL, SH_BYTES, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
		if (sh == MAP_FAILED)
			return NULL;
	}
	slab_acquire();
	if (!chan_free_list) {
		size_t sz = 65536, each = (sizeof(struct chan) + 63) & ~(size_t)63;
		char *p = mmap(NULL, sz, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

		if (p == MAP_FAILED) {
			slab_release();
			munmap(sh, SH_BYTES);
			return NULL;
		}
		for (size_t off = 0; off + each <= sz; off += each) {
			struct chan *c = (struct chan *)(p + off);

			c->next_free = chan_free_list;
			chan_free_list = c;
		}
	}
	ch = chan_free_list;
	chan_free_list = ch->next_free;
	slab_release();

	pthread_mutexattr_init(&ma);
	pthread_mutexattr_setpshared(&ma, PTHREAD_PROCESS_SHARED);
	pthread_mutexattr_setrobust(&ma, PTHREAD_MUTEX_ROBUST);
	pthread_mutex_init(&sh->rx_lock, &ma);
	pthread_mutex_init(&sh->tx_lock, &ma);
	pthread_mutex_init(&sh->bell_lock, &ma);
	pthread_mutex_init(&sh->drain_lock, &ma);
	pthread_mutexattr_destroy(&ma);
	sh->kick[0] = sh->kick[1] = -1;
	ch->sh = sh;
	ch->sh_epoch = atomic_load(&fork_epoch);
	ch->next_free = NULL;
	atomic_store(&ch->nfds, 0);
	atomic_store(&ch->shared, 0);
	atomic_store_explicit(&ch->refs, 1, memory_order_release);
	return ch;
}

/* The last reference went (chan_put): the channel's pages back to the
 * pool. errno kept: a data call's result may be on its way out. */
void chan_free(struct chan *ch)
{
	int saved = errno;
	void *sh;

	/* Our view only: the rings live on in the region for the peer. */
	sh = ch->sh;
	ch->sh = NULL;
	for (int d = 0; d < 2; d++) {
		int k = ((struct chan_sh *)sh)->kick[d];

		if (k >= 0 && ch->sh_epoch == atomic_load(&fork_epoch)) {
			/* ours alone (no fork since): close it */
			fdt_store(k, K_UNKNOWN);
			syscall(SYS_close, k);
		}
	}
	slab_acquire();
	if (ch->sh_epoch == atomic_load(&fork_epoch) && sh_pool_n < SH_POOL_MAX) {
		sh_pool[sh_pool_n++] = sh;
		sh = NULL;
	}
	ch->next_free = chan_free_list;
	chan_free_list = ch;
	slab_release();
	if (sh)
		munmap(sh, SH_BYTES);
	errno = saved;
}

/* fork: pooled pages are now mapped in two processes; neither may reuse them. */
static void sh_pool_drop(void)
{
	atomic_fetch_add(&fork_epoch, 1);
	while (sh_pool_n)
		munmap(sh_pool[--sh_pool_n], SH_BYTES);
}

void chan_atfork_prepare(void)
{
	slab_acquire();
}

void chan_atfork_parent(void)
{
	sh_pool_drop();
	slab_release();
}

void chan_atfork_child(void)
{
	sh_pool_drop();
	slab_release();
}

/* Doorbell mode: the first guess at what a doorbell wake-up costs, the
 * connection's smoothed RTT as the kernel measured it on the handshake (a
 * doorbell is one segment plus a wake-up); 0 (ring default) if unknown. */
static uint32_t bell_seed_ns(int fd)
{
	struct tcp_info ti;
	socklen_t len = sizeof(ti);
	int saved = errno;

	memset(&ti, 0, sizeof(ti));
	if (syscall(SYS_getsockopt, fd, IPPROTO_TCP, TCP_INFO, &ti, &len) < 0)
		ti.tcpi_rtt = 0;
	errno = saved;
	return ti.tcpi_rtt > SBP_RING_SPIN_DOORBELL_MAX_NS / 1000 ? SBP_RING_SPIN_DOORBELL_MAX_NS
								: ti.tcpi_rtt * 1000;
}

void chan_break(int fd, struct chan *ch, uint32_t reason, const char *why)
{
	struct chan_sh *sh = ch->sh;

	if (atomic_fetch_or(&sh->flags, CH_BROKEN) & CH_BROKEN)
		return;
	sh->reason = reason;
	WARN("fd %d: shm channel reset: %s%s", fd, why,
	     atomic_load(&sh->flags) & CH_DATA ? "" : " (before any data)");
	/* Both rings say RESET (if their headers still make sense), and the
	 * TCP connection ends so a peer sleeping on it wakes. */
	if (atomic_load(&sh->phase) == CH_LIVE)
		sbp_ring_reset(&sh->tx.ring, reason);
	if (atomic_load(&sh->flags) & CH_RX_OPEN)
		sbp_ring_reset(&sh->rx.ring, reason);
	if (fd >= 0) {
		/* a peer asleep in poll/epoll learns from the FIN below */
		int saved = errno;

		syscall(SYS_shutdown, fd, SHUT_RDWR);
		errno = saved;
	}
}

/* SO_RCVLOWAT as the kernel keeps it (clamped; accepted sockets inherit
 * the listener's): recv and poll apply it to the ring. */
void chan_note_rcvlowat(int fd, struct chan_sh *sh)
{
	int v = 1, saved = errno;
	socklen_t len = sizeof(v);

	if (syscall(SYS_getsockopt, fd, SOL_SOCKET, SO_RCVLOWAT, &v, &len) == 0 && v > 0)
		atomic_store(&sh->rcvlowat, (uint32_t)v);
	errno = saved;
}

/* What the app set: from our own notes when we saw the socket made, else
 * from the kernel. Once our data leaves TCP, the socket carries doorbells:
 * single bytes that Nagle would hold back until the peer's delayed ACK
 * (40 ms) and a cork (nginx' tcp_nopush) for 200 ms. So NODELAY on, CORK
 * off; the app's own values are kept for getsockopt. */
static void keep_app_opts(int fd, struct chan_sh *sh)
{
	unsigned o = fdo_get(fd);
	int nonblock, nodelay, cork, one = 1, zero = 0;

	if (o & FDO_KNOWN) {
		nonblock = !!(o & FDO_NONBLOCK);
		nodelay = !!(o & FDO_NODELAY);
		cork = !!(o & FDO_CORK);
	} else {
		socklen_t len = sizeof(int);
		int fl = (int)syscall(SYS_fcntl, fd, F_GETFL, 0);

		nonblock = fl >= 0 && (fl & O_NONBLOCK);
		nodelay = cork = 0;
		syscall(SYS_getsockopt, fd, IPPROTO_TCP, TCP_NODELAY, &nodelay, &len);
		len = sizeof(int);
		syscall(SYS_getsockopt, fd, IPPROTO_TCP, TCP_CORK, &cork, &len);
	}
	if (!(o & FDO_KNOWN) || (o & FDO_RCVLOWAT))
		chan_note_rcvlowat(fd, sh);     /* (else it is 1, sh's default) */
	if (nonblock)
		atomic_fetch_or(&sh->flags, CH_NONBLOCK);
	if (nodelay)
		atomic_fetch_or(&sh->flags, CH_APP_NODELAY);
	else
		syscall(SYS_setsockopt, fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	if (cork) {
		atomic_fetch_or(&sh->flags, CH_APP_CORK);
		syscall(SYS_setsockopt, fd, IPPROTO_TCP, TCP_CORK, &zero, sizeof(zero));
	}
}

/* The control connection where the peer is another kernel (a VM pair). */
static void tune_ctl(int fd, struct chan_sh *sh)
{
	if (g.part_count && (sh->rx_part < g.part_first || sh->rx_part - g.part_first >= g.part_count)) {
		/* The peer is another kernel (its slot is in another part), which
		 * holds no reference on our slot: ours comes back at our socket's
		 * TCP_CLOSE. After close() an orphan reaches it as soon as its FIN
		 * is ACKed (FIN_WAIT2 turns into a time-wait sock when
		 * tcp_fin_timeout <= 60 s), while the peer may still be reading
		 * our ring. A linger2 over 60 s keeps the orphan a full socket in
		 * FIN_WAIT2 until the peer's FIN (it closed: done reading) or
		 * 60 s, so the slot is not reused under a late reader
		 * (docs/NEGOTIATION.md, "VM pairs"). */
		int linger2 = 120;

		syscall(SYS_setsockopt, fd, IPPROTO_TCP, TCP_LINGER2, &linger2, sizeof(linger2));
	}
	if (g.doorbell) {
		sbp_ring_set_bell_cost(&sh->tx.ring, bell_seed_ns(fd));
		/* A peer VM that dies sends no FIN: TCP keepalives find it. */
		int on = 1, idle = 2, intvl = 1, cnt = 3;

		syscall(SYS_setsockopt, fd, SOL_SOCKET, SO_KEEPALIVE, &on, sizeof(on));
		syscall(SYS_setsockopt, fd, IPPROTO_TCP, TCP_KEEPIDLE, &idle, sizeof(idle));
		syscall(SYS_setsockopt, fd, IPPROTO_TCP, TCP_KEEPINTVL, &intvl, sizeof(intvl));
		syscall(SYS_setsockopt, fd, IPPROTO_TCP, TCP_KEEPCNT, &cnt, sizeof(cnt));
	}
}

void publish_tcp_read(struct chan_sh *sh)
{
	/* SYNC POINT: with the writer's look after it formats its ring
	 * (tx_go_live): it rings the switch doorbell, or we see the ring. */
	if (sh->blk)
		__atomic_store_n(&sh->blk->tcp_read[chan_rx_dir(sh)], sh->rx_tcp, __ATOMIC_SEQ_CST);
}

int tx_go_live(int fd, struct chan_sh *sh)
{
	sh->tx.spin_ns = g.spin_ns;
	sh->tx.doorbell = g.doorbell;
	if (sbp_stream_writer_open(&sh->tx, &sh->tx_areas, sh->tx_gen, sh->tx_tcp) < 0)
		return -EPROTO;
	keep_app_opts(fd, sh);
	if (atomic_load(&sh->flags) & CH_SHUT_WR)
		sbp_ring_close_writer(&sh->tx.ring);    /* our FIN went over TCP already */
	/* SYNC POINT: the ring is formatted before anyone sends through it. */
	atomic_store_explicit(&sh->phase, CH_LIVE, memory_order_release);
	/* The switch doorbell wakes a reader asleep on TCP; it is due only if
	 * the reader has read all we sent over TCP (else it is not asleep
	 * for long: it finds the ring when it has), so that no doorbell ever
	 * sits in front of payload (revert.c relies on it). */
	__atomic_thread_fence(__ATOMIC_SEQ_CST);
	sh->tx_bell_due = !sh->blk ||
			  __atomic_load_n(&sh->blk->tcp_read[chan_tx_dir(sh)], __ATOMIC_SEQ_CST) == sh->tx_tcp;
	return 0;
}

/* One host: the block's two directions, ours to write and the peer's. */
static void block_streams(struct chan_sh *sh, int active)
{
	int txd = active ? SBP_DIR_A2P : SBP_DIR_P2A;

	sbp_stream_areas_pair(&sh->tx_areas, &sh->mem.pi, sh->mem.base, sh->mem.block, txd);
	sbp_stream_areas_pair(&sh->rx_areas, &sh->mem.pi, sh->mem.base, sh->mem.block, 1 - txd);
	sh->tx_gen = sbp_stream_gen(sh->mem.gen, txd);
	sh->rx_gen = sbp_stream_gen(sh->mem.gen, 1 - txd);
	sh->blk = mem_block(&sh->mem);
	publish_tcp_read(sh);
	atomic_fetch_or(&sh->flags, CH_RX_KNOWN);
}

/* A VM pair: the slots of the handshake, in the region mapped at start. */
static struct chan *setup_slots(int fd, struct chan *ch, const struct sbp_info *in)
{
	struct chan_sh *sh = ch->sh;
	void *tx, *rx;

	if (!sbp_region_ready()) {
		chan_break(fd, ch, SBP_RESET_CORRUPT, "a VM pair's handshake, but no region here");
		return ch;
	}
	tx = sbp_region_slot(&g.info, g.region, in->tx_slot);
	rx = sbp_region_slot(&g.info, g.region, in->rx_slot);
	if (!tx || !rx || in->tx_slot == in->rx_slot ||
	    (in->region_id && in->region_id != g.info.region_id)) {
		chan_break(fd, ch, SBP_RESET_CORRUPT, "the handshake named slots we do not have");
		return ch;
	}
	sbp_stream_areas_slot(&sh->tx_areas, tx, g.info.slot_size);
	sbp_stream_areas_slot(&sh->rx_areas, rx, g.info.slot_size);
	sh->tx_gen = in->tx_gen;
	sh->rx_gen = in->rx_gen;
	sh->tx_part = in->tx_slot;
	sh->rx_part = in->rx_slot;
	atomic_fetch_or(&sh->flags, CH_SLOTS | CH_RX_KNOWN);
	if (tx_go_live(fd, sh) < 0) {
		chan_break(fd, ch, SBP_RESET_CORRUPT, "cannot format the ring we write");
		return ch;
	}
	tune_ctl(fd, sh);
	return ch;
}

/* The passive end may not make memory for one more connection (up
 * --memory-max): it stays on TCP, and status says why (both rows). */
static void memory_cap_reached(int fd)
{
	static _Atomic int told;

	ask_kept(fd, SBP_REASON_MEMORY_CAP);
	if (!atomic_exchange(&told, 1))
		sbp_log("shm tier: this process reached its memory cap (up --memory-max): "
			"new connections stay on TCP until some close");
}

struct chan *chan_setup(int fd, const struct sbp_info *in)
{
	struct chan *ch;
	struct chan_sh *sh;
	int rc;

	orphan_check(4);        /* blocks of shared sockets closed here before */
	ch = chan_alloc();
	if (!ch)
		return NULL;
	sh = ch->sh;
	sh->cookie = in->cookie;
	if (in->mem == SBP_MEM_SLOTS)
		return setup_slots(fd, ch, in);
	if (in->role == SBP_ROLE_ACTIVE) {
		atomic_fetch_or(&sh->flags, CH_ACTIVE);
		mem_expect(in);
		return ch;              /* the offer comes to our inbox */
	}
	rc = mem_offer(fd, in, &sh->mem);
	if (rc == -EDQUOT)
		memory_cap_reached(fd);
	if (rc < 0) {
		chan_put(ch);
		return NULL;            /* nothing offered: plain TCP at both ends */
	}
	block_streams(sh, 0);
	return ch;
}

/* Can the active end take memory now? (Not if another process holds the
 * socket: it could not map memory that comes now; it stays on TCP.) */
static int have_memory(int fd, struct chan *ch, int now)
{
	struct chan_sh *sh = ch->sh;
	struct mem_ref m;

	if (sh->mem.base)
		return 1;
	if (atomic_load(&ch->shared) || mem_claim(fd, sh->cookie, now, &m) != 1)
		return 0;
	sh->mem = m;
	block_streams(sh, 1);
	return 1;
}

int chan_live_locked(int fd, struct chan *ch, int now)
{
	struct chan_sh *sh = ch->sh;
	uint32_t f = atomic_load(&sh->flags);

	if (atomic_load_explicit(&sh->phase, memory_order_acquire) == CH_LIVE)
		return 1;
	if (f & (CH_BROKEN | CH_TX_TCP))
		return 0;
	if (!(f & CH_ACTIVE) && sh->mem.unsent && mem_deliver(&sh->mem) <= 0)
		return 0;
	if ((f & CH_ACTIVE) ? !have_memory(fd, ch, now) : !mem_taken(&sh->mem))
		return 0;
	if (tx_go_live(fd, sh) < 0) {
		chan_break(fd, ch, SBP_RESET_CORRUPT, "cannot format the ring we write");
		return 0;
	}
	DBG("fd %d: writes through its ring from byte %llu", fd, (unsigned long long)sh->tx_tcp);
	return 1;
}

int chan_try_live(int fd, struct chan *ch)
{
	struct chan_sh *sh = ch->sh;
	int live;

	if (atomic_load_explicit(&sh->phase, memory_order_acquire) == CH_LIVE)
		return 1;
	if (!lock_try(&sh->tx_lock))
		return 0;       /* a writer holds it: it goes live itself */
	live = chan_live_locked(fd, ch, 0);
	pthread_mutex_unlock(&sh->tx_lock);
	return live;
}

int rx_progress(int fd, struct chan *ch)
{
	struct chan_sh *sh = ch->sh;
	uint32_t f = atomic_load_explicit(&sh->flags, memory_order_acquire);

	if (f & CH_RX_ATTACHED)
		return 1;
	if (!(f & CH_RX_KNOWN) || (f & CH_RX_TCP))
		return 0;
	if (!(f & CH_RX_OPEN)) {
		/* Until the peer formats it, the area holds zeros or a past
		 * connection's ring: "not yet", whatever it holds. */
		sh->rx.spin_ns = g.spin_ns;
		sh->rx.doorbell = g.doorbell;
		if (sbp_stream_reader_open(&sh->rx, &sh->rx_areas, sh->rx_gen) < 0)
			return 0;
		if (g.doorbell)
			sbp_ring_set_bell_cost(&sh->rx.ring, bell_seed_ns(fd));
		sh->rx_tcp_end = sbp_ring_tail_pos(&sh->rx.ring);
		if (sh->rx_tcp_end < sh->rx_tcp) {
			chan_break(fd, ch, SBP_RESET_CORRUPT,
				   "the peer's ring starts before what it sent over TCP");
			return 0;
		}
		atomic_fetch_or_explicit(&sh->flags, CH_RX_OPEN, memory_order_release);
	}
	if (sh->rx_tcp != sh->rx_tcp_end)
		return 0;
	/* SYNC POINT: the view is complete before the flag says so. */
	atomic_fetch_or_explicit(&sh->flags, CH_RX_ATTACHED, memory_order_release);
	return 1;
}

void chan_done(struct chan *ch)
{
	struct chan_sh *sh = ch->sh;

	if ((atomic_load(&sh->flags) & CH_ACTIVE) && !sh->mem.base)
		mem_forget(sh->cookie);         /* it will not claim its offer now */
	if (sh->mem.base && sh->tx.area > 0)    /* what our writer grew into */
		mem_uncharge(sbp_area_cap(sh->tx.area) - sbp_area_cap(0));
	mem_done(&sh->mem);
}
