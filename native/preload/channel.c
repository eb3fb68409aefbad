// SPDX-License-Identifier: GPL-2.0
/* channel.c: a shm-tier connection's channel: its memory (allocation,
 * references, the page pool across fork), its two ring views (set up from
 * sk_state, the peer's attached once formatted), and breaking it. */
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sched.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "channel.h"
#include "fdtable.h"
#include "setup.h"

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

int chan_tryget(struct chan *ch)
{
	int r = atomic_load_explicit(&ch->refs, memory_order_relaxed);

	while (r > 0)
		if (atomic_compare_exchange_weak(&ch->refs, &r, r + 1))
			return 1;
	return 0;
}

void chan_put(struct chan *ch)
{
	void *sh;

	if (atomic_fetch_sub_explicit(&ch->refs, 1, memory_order_acq_rel) != 1)
		return;
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

int rx_try_attach(int fd, struct chan *ch)
{
	struct chan_sh *sh = ch->sh;
	struct sbp_ring tmp;
	uint32_t zero = 0;
	int rc;

	if (atomic_load_explicit(&sh->flags, memory_order_acquire) & CH_RX_ATTACHED)
		return 1;
	rc = sbp_ring_attach(&tmp, sh->rx_slot, sh->slot_size, sh->rx_gen);
	if (rc == -EAGAIN)
		return 0;
	/* Until the peer has formatted it, the slot holds whatever its last
	 * user (or anyone) left there: a bad header means "not yet". The peer
	 * formats before it sends anything on TCP, so once a byte came from
	 * it, a bad header is corruption. */
	if (rc == -EPROTO && !(atomic_load(&sh->flags) & CH_BELL_SEEN))
		return 0;
	if (rc < 0) {
		chan_break(fd, ch, SBP_RESET_CORRUPT, "the peer's ring header is bad");
		return 0;
	}
	/* Nobody touches sh->rx before CH_RX_ATTACHED says it is there, so
	 * the one thread that wins this flag may write it. */
	if (!atomic_compare_exchange_strong(&sh->attaching, &zero, 1))
		return !!(atomic_load_explicit(&sh->flags, memory_order_acquire) & CH_RX_ATTACHED);
	if (!(atomic_load(&sh->flags) & CH_RX_ATTACHED)) {
		sbp_ring_set_spin(&tmp, g.spin_ns);
		region_wake_words(&tmp, sh->rx_idx);
		sbp_ring_doorbell_mode(&tmp, g.doorbell);
		if (g.doorbell)
			sbp_ring_set_bell_cost(&tmp, bell_seed_ns(fd));
		sh->rx = tmp;
		/* SYNC POINT: the view is complete before the flag says so. */
		atomic_fetch_or_explicit(&sh->flags, CH_RX_ATTACHED, memory_order_release);
	}
	return 1;
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
	sbp_ring_reset(&sh->tx, reason);
	if (atomic_load(&sh->flags) & CH_RX_ATTACHED)
		sbp_ring_reset(&sh->rx, reason);
	if (fd >= 0) {
		/* a peer asleep in poll/epoll learns from the FIN below */
		int saved = errno;

		syscall(SYS_shutdown, fd, SHUT_RDWR);
		errno = saved;
	}
}

/* What the app set: from our own notes when we saw the socket made, else
 * from the kernel. Doorbells are single bytes: Nagle would hold one back
 * until the peer's delayed ACK (40 ms), a cork (nginx' tcp_nopush) for
 * 200 ms. So NODELAY on, CORK off; the app's own values are kept for
 * getsockopt (its data no longer uses TCP). */
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

/* The ring we write: NULL when it is ready, else why not. A new connection
 * formats it. One found again (after exec) attaches: the ring may already
 * carry our data; it formats only if the slot still shows another
 * generation. */
static const char *tx_ring_setup(const struct sbp_sk *st, struct chan_sh *sh, int rediscovered)
{
	void *tx = sbp_region_slot(&g.info, g.region, st->tx_slot);
	void *rx = sbp_region_slot(&g.info, g.region, st->rx_slot);
	int rc;

	sh->tx_slot = tx;
	sh->rx_slot = rx;
	if (st->region_id && st->region_id != g.info.region_id)
		return "the handshake named another region";
	if (!tx || !rx || st->tx_slot == st->rx_slot)
		return "slot numbers out of range";
	rc = rediscovered ? sbp_ring_attach(&sh->tx, tx, sh->slot_size, st->tx_gen) : -EAGAIN;
	if (rc == -EAGAIN) {
		if (g.wake) {
			uint32_t *rw = sbp_region_wake_word(g.wake, g.wake_size, st->tx_slot, 0);
			uint32_t *ww = sbp_region_wake_word(g.wake, g.wake_size, st->tx_slot, 1);

			if (rw && ww)
				*rw = *ww = 0;
		}
		rc = sbp_ring_format(tx, sh->slot_size, st->tx_gen);
		if (rc == 0)
			rc = sbp_ring_attach(&sh->tx, tx, sh->slot_size, st->tx_gen);
	}
	if (rc < 0)
		return "cannot format the ring we write";
	sbp_ring_set_spin(&sh->tx, g.spin_ns);
	region_wake_words(&sh->tx, st->tx_slot);
	sbp_ring_doorbell_mode(&sh->tx, g.doorbell);
	return NULL;
}

/* The control connection where the peer may be another kernel. */
static void tune_ctl(int fd, const struct sbp_sk *st, struct chan_sh *sh)
{
	if (g.part_count && (st->rx_slot < g.part_first || st->rx_slot - g.part_first >= g.part_count)) {
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
		sbp_ring_set_bell_cost(&sh->tx, bell_seed_ns(fd));
		/* A peer VM that dies sends no FIN: TCP keepalives find it. */
		int on = 1, idle = 2, intvl = 1, cnt = 3;

		syscall(SYS_setsockopt, fd, SOL_SOCKET, SO_KEEPALIVE, &on, sizeof(on));
		syscall(SYS_setsockopt, fd, IPPROTO_TCP, TCP_KEEPIDLE, &idle, sizeof(idle));
		syscall(SYS_setsockopt, fd, IPPROTO_TCP, TCP_KEEPINTVL, &intvl, sizeof(intvl));
		syscall(SYS_setsockopt, fd, IPPROTO_TCP, TCP_KEEPCNT, &cnt, sizeof(cnt));
	}
}

struct chan *chan_setup(int fd, const struct sbp_sk *st, int rediscovered)
{
	struct chan *ch = chan_alloc();
	struct chan_sh *sh;
	const char *why;

	if (!ch)
		return NULL;
	sh = ch->sh;
	sh->slot_size = g.info.slot_size;
	sh->tx_idx = st->tx_slot;
	sh->rx_idx = st->rx_slot;
	sh->tx_gen = st->tx_gen;
	sh->rx_gen = st->rx_gen;
	keep_app_opts(fd, sh);
	why = tx_ring_setup(st, sh, rediscovered);
	if (why) {
		memset(&sh->tx, 0, sizeof(sh->tx));
		chan_break(fd, ch, SBP_RESET_CORRUPT, why);
		return ch;
	}
	tune_ctl(fd, st, sh);
	rx_try_attach(fd, ch);
	if (!(atomic_load(&sh->flags) & CH_BROKEN))
		DBG("fd %d: shm tier: tx slot %u gen %#llx, rx slot %u gen %#llx%s", fd, st->tx_slot,
		    (unsigned long long)st->tx_gen, st->rx_slot, (unsigned long long)st->rx_gen,
		    atomic_load(&sh->flags) & CH_RX_ATTACHED ? "" : " (peer not attached yet)");
	return ch;
}
