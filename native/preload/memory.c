// SPDX-License-Identifier: GPL-2.0
/* memory.c: connection memory (memory.h).
 *
 * The passive end of a connection allocates: per peer process (named by
 * its inbox token, which BPF relays and which no other process has) it
 * keeps pair regions: memfds it created and sealed against shrinking and
 * growing, mapped here and sent once to that peer. A new connection with
 * the same peer takes a free block of them: no mmap, no fd, one datagram.
 *
 * The active end receives: its inbox brings offers (and a region memfd the
 * first time); an offer is believed only after the socket's own
 * SBP_SO_INFO says that the sender's pid (SCM_CREDENTIALS: the kernel's)
 * is the one that asked for the peer socket and the cookies match. The
 * memory is then checked like all shared memory (pairmem.h, stream.h).
 *
 * All state here is process-private and guarded by one lock; it is taken
 * only when a connection starts or ends, never on the data path. */
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "ask.h"
#include "fdtable.h"
#include "inbox.h"
#include "memory.h"
#include "setup.h"

#define REGION_BLOCKS_FIRST 8u          /* blocks in a peer's first region */
#define REGION_BLOCKS_MAX   256u        /* each further region doubles, up to this */
#define MAX_REGIONS         4096        /* made + received, per process */
#define PENDING_MAX         512         /* offers read before their socket asked */
#define WAITING_MIN         1024u       /* slots of the waiting table, at first */
#define CLAIM_EVERY_NS      20000       /* inbox reads on the data path, at most */

struct region {
	void *base;
	size_t size;
	struct sbp_pair_info pi;
	uint8_t token[SBP_INBOX_LEN];   /* made for this peer (ours), or 0 */
	pid_t from;                     /* received from this pid (theirs), or 0 */
	uint32_t cursor;                /* next block to look at (ours) */
	uint32_t users;                 /* connections here holding one of its blocks */
	int64_t looked_ns;              /* when reap_gone_locked last asked about its peer */
	int memfd;                      /* ours, until the peer has it; else -1 */
};

struct pending {
	struct sbp_inbox_msg msg;
	pid_t pid;
	int used;
};

/* An active socket of ours waiting for its offer (mem_expect), and the
 * offer once it came. Offers for sockets that wait are kept here, never
 * evicted, however many connections wait; only offers read before their
 * socket asked go to `pend`, two places per cookie (a third forgets the
 * older: such offers are rare, a connection's own race with its accept). */
struct waiting {
	uint64_t cookie;                /* 0: empty slot */
	struct sbp_inbox_msg msg;
	pid_t pid;
	uint32_t state;                 /* WAIT_* */
	uint64_t peer_cookie;           /* as SBP_SO_INFO said at connect */
	pid_t peer_tgid;
};

#define WAIT_GONE  1u   /* a removed entry: lookups go on past it */
#define WAIT_EMPTY 2u   /* waits, no offer yet */
#define WAIT_OFFER 3u   /* waits, msg and pid hold its offer */

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static struct sbp_inbox inbox = { .fd = -1, .tx = -1 };
static int inbox_state;                 /* 0 not tried, 1 open, -1 failed */
static struct region *regions;          /* MAX_REGIONS entries, anon_alloc'd */
static int nregions;
static struct pending *pend;            /* PENDING_MAX entries */
static _Atomic int64_t last_claim_ns;
static struct waiting *waiting;         /* open addressing, wait_cap slots */
static uint32_t wait_cap, wait_used, wait_live;  /* used: live + WAIT_GONE */

static char inbox_dir[200];              /* /run/<instance>/inbox: made once */

/* A block's base: its header and both directions' first areas. */
#define BLOCK_BASE (SBP_BLOCK_HDR_SIZE + 2 * sbp_area_cap(0))

static uint64_t mem_max;                /* up --memory-max (0: none), read once */
static _Atomic uint64_t mem_used;

/* /run/<instance>/memory-max: bytes, in decimal, written by `up`. */
static void read_cap(void)
{
	char path[200], buf[32];
	long n;
	int fd;

	snprintf(path, sizeof(path), "/run/%s/memory-max", g.instance);
	fd = (int)syscall(SYS_openat, AT_FDCWD, path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return;
	n = syscall(SYS_read, fd, buf, sizeof(buf) - 1);
	syscall(SYS_close, fd);
	if (n > 0) {
		buf[n] = 0;
		mem_max = strtoull(buf, NULL, 10);
	}
}

int mem_charge(uint64_t n, int force)
{
	uint64_t u = atomic_load(&mem_used);

	do {
		if (mem_max && u + n > mem_max && !force)
			return -EDQUOT;
	} while (!atomic_compare_exchange_weak(&mem_used, &u, u + n));
	return 0;
}

void mem_uncharge(uint64_t n)
{
	uint64_t u = atomic_load(&mem_used);

	while (!atomic_compare_exchange_weak(&mem_used, &u, u > n ? u - n : 0))
		;
}

static int tables(void)
{
	if (!regions) {
		read_cap();
		regions = anon_alloc(MAX_REGIONS * sizeof(*regions));
	}
	if (!pend)
		pend = anon_alloc(PENDING_MAX * sizeof(*pend));
	return regions && pend ? 0 : -ENOMEM;
}

static int open_inbox_locked(void)
{
	int rc;

	if (inbox_state)
		return inbox_state > 0 ? 0 : -EIO;
	snprintf(inbox_dir, sizeof(inbox_dir), "/run/%s/inbox", g.instance);
	rc = tables();
	if (rc == 0)
		rc = sbp_inbox_open(&inbox, inbox_dir);
	if (rc < 0) {
		WARN("shm tier off: cannot open an inbox in %s: %s", inbox_dir, strerror(-rc));
		inbox_state = -1;
		return rc;
	}
	inbox.fd = sbp_internal_fd(inbox.fd);
	inbox.tx = sbp_internal_fd(inbox.tx);
	inbox_state = 1;
	return 0;
}

int mem_inbox_token(uint8_t out[SBP_INBOX_LEN])
{
	int rc;

	pthread_mutex_lock(&lock);
	rc = open_inbox_locked();
	if (rc == 0)
		memcpy(out, inbox.token, SBP_INBOX_LEN);
	pthread_mutex_unlock(&lock);
	return rc;
}

static int zero_token(const uint8_t t[SBP_INBOX_LEN])
{
	for (int i = 0; i < SBP_INBOX_LEN; i++)
		if (t[i])
			return 0;
	return 1;
}

/* A free entry of the region table: one a retired region left, or a new
 * one. NULL when all MAX_REGIONS are in use. lock held. */
static struct region *region_slot(void)
{
	for (int i = 0; i < nregions; i++)
		if (!regions[i].base)
			return &regions[i];
	return nregions < MAX_REGIONS ? &regions[nregions++] : NULL;
}

/* Unmap a region and free its entry (matching no peer and no sender). */
static void drop_region(struct region *r)
{
	munmap(r->base, r->size);
	memset(r, 0, sizeof(*r));
	memset(r->token, 0xff, SBP_INBOX_LEN);
	r->memfd = -1;
}

/* Regions that no connection here uses and whose other process is gone:
 * unmapped. Ours (made for a peer): its inbox refuses (it exited or
 * exec'd). Received: its maker exited (it may still offer blocks of it
 * while it lives, and sends its memfd only once). Else a server kept a
 * mapping (and the pages its blocks touched) for every client process it
 * ever served, a client one for every server, and neither made or took a
 * region past MAX_REGIONS of them. A few looked at per connection, each
 * at most every REAP_EVERY_NS (a live peer's region, unused between two
 * connections, would cost each connection a few system calls). lock
 * held. */
#define REAP_EVERY_NS 100000000

static void reap_gone_locked(int max)
{
	static int next;
	int saved = errno;
	int64_t now = now_ns();

	for (int k = 0; k < max && k < nregions; k++) {
		struct region *r = &regions[next++ % nregions];

		if (!r->base || r->users || now - r->looked_ns < REAP_EVERY_NS)
			continue;
		r->looked_ns = now;
		if (zero_token(r->token) ? r->from > 0 && syscall(SYS_kill, r->from, 0) < 0 &&
					   errno == ESRCH
					 : r->memfd < 0 && sbp_inbox_alive(inbox_dir, r->token) == 0)
			drop_region(r);         /* (a maker whose pid we cannot see stays) */
	}
	errno = saved;
}

/* ---- the passive end: regions made for a peer ------------------------------ */

static int make_region(const uint8_t token[SBP_INBOX_LEN], uint32_t nblocks, struct region **out)
{
	uint64_t size = sbp_pair_region_size(nblocks);
	struct region *r;
	uint64_t id;
	void *p;
	int fd;

	r = region_slot();
	if (!r)
		return -ENOSPC;
	fd = (int)syscall(SYS_memfd_create, "shmbypass", MFD_CLOEXEC | MFD_ALLOW_SEALING);
	if (fd < 0)
		return -errno;
	if (ftruncate(fd, (off_t)size) < 0 ||
	    syscall(SYS_fcntl, fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) < 0)
		goto fail;
	p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	if (p == MAP_FAILED)
		goto fail;
	if (getrandom(&id, sizeof(id), 0) != sizeof(id) || sbp_pair_format(p, size, id, nblocks) ||
	    sbp_pair_check(p, size, &r->pi)) {
		munmap(p, size);
		errno = EIO;
		goto fail;
	}
	r->base = p;
	r->size = size;
	memcpy(r->token, token, SBP_INBOX_LEN);
	r->from = 0;
	r->cursor = 0;
	r->users = 0;
	r->memfd = sbp_internal_fd(fd);
	*out = r;
	return 0;
fail:
	syscall(SYS_close, fd);
	return -errno;
}

/* A block of r that no connection uses: free, withdrawn, or done at both
 * ends. Its state is set to OFFERED with the next generation. */
static int take_block(struct region *r, uint32_t *block, uint32_t *gen)
{
	for (uint32_t i = 0; i < r->pi.block_count; i++) {
		uint32_t b = (r->cursor + i) % r->pi.block_count;
		struct sbp_block_hdr *h = sbp_pair_block(&r->pi, r->base, b);
		uint64_t st = __atomic_load_n(&h->state, __ATOMIC_ACQUIRE);
		uint32_t s = (uint32_t)st, g2 = (uint32_t)(st >> 32) + 1;

		if (s != SBP_BLOCK_FREE && s != SBP_BLOCK_WITHDRAWN &&
		    !(s == SBP_BLOCK_ATTACHED &&
		      (__atomic_load_n(&h->done, __ATOMIC_ACQUIRE) & 3) == 3))
			continue;
		if (!g2)
			g2 = 1;
		/* SYNC POINT: the new generation before anything else is
		 * written: a late attach of the old offer fails its CAS. */
		if (!__atomic_compare_exchange_n(&h->state, &st, SBP_BLOCK_STATE(g2, SBP_BLOCK_OFFERED),
						 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
			continue;
		__atomic_store_n(&h->done, 0, __ATOMIC_RELEASE);
		memset(h->tcp_read, 0, sizeof(h->tcp_read));
		memset(h->revert_pos, 0, sizeof(h->revert_pos));
		memset(h->revert_bells, 0, sizeof(h->revert_bells));
		memset(h->revert, 0, sizeof(h->revert));
		memset(h->full, 0, sizeof(h->full));
		memset(h->bells, 0, sizeof(h->bells));
		__atomic_store_n(&h->closing, 0, __ATOMIC_RELEASE);
		r->cursor = b + 1;
		*block = b;
		*gen = g2;
		return 0;
	}
	return -ENOSPC;
}

/* The message for a block of r; the region's memfd rides along until the
 * peer has it. lock held. 0, -EAGAIN (the peer's inbox is full), -errno. */
static int send_offer(struct region *r, uint32_t block, uint32_t gen)
{
	struct sbp_block_hdr *h = sbp_pair_block(&r->pi, r->base, block);
	struct sbp_inbox_msg msg;
	int rc;

	memset(&msg, 0, sizeof(msg));
	msg.magic = SBP_INBOX_MSG_MAGIC;
	msg.version = SBP_INBOX_MSG_VERSION;
	msg.active_cookie = h->active_cookie;
	msg.passive_cookie = h->passive_cookie;
	msg.region_id = r->pi.region_id;
	msg.region_size = r->size;
	msg.block = block;
	msg.gen = gen;
	rc = sbp_inbox_send(&inbox, inbox_dir, r->token, &msg, r->memfd);
	if (rc == 0 && r->memfd >= 0) {
		/* the peer has it now (its inbox holds the fd): ours can go */
		fdt_store(r->memfd, K_UNKNOWN);
		syscall(SYS_close, r->memfd);
		r->memfd = -1;
	}
	if (rc < 0 && rc != -EAGAIN)    /* nobody will take it: free again */
		__atomic_store_n(&h->state, SBP_BLOCK_STATE(gen, SBP_BLOCK_WITHDRAWN), __ATOMIC_RELEASE);
	return rc;
}

static void retire_locked(struct region *r);

int mem_offer(int fd, const struct sbp_info *in, struct mem_ref *out)
{
	struct sbp_block_hdr *h;
	struct region *r = NULL;
	uint32_t block = 0, gen = 0, nblocks = REGION_BLOCKS_FIRST;
	int rc = -ENOSPC;

	(void)fd;
	if (zero_token(in->peer_inbox))
		return -EINVAL;
	pthread_mutex_lock(&lock);
	if (open_inbox_locked() < 0) {
		pthread_mutex_unlock(&lock);
		return -EIO;
	}
	if (mem_charge(BLOCK_BASE, 0)) {
		pthread_mutex_unlock(&lock);
		return -EDQUOT;
	}
	reap_gone_locked(2);
	for (int i = 0; i < nregions && rc; i++) {
		if (!regions[i].base || memcmp(regions[i].token, in->peer_inbox, SBP_INBOX_LEN))
			continue;
		rc = take_block(&regions[i], &block, &gen);
		if (rc == 0)
			r = &regions[i];
		if (regions[i].pi.block_count * 2 > nblocks)
			nblocks = regions[i].pi.block_count * 2;
	}
	if (rc) {
		if (nblocks > REGION_BLOCKS_MAX)
			nblocks = REGION_BLOCKS_MAX;
		rc = make_region(in->peer_inbox, nblocks, &r);
		if (rc == 0)
			rc = take_block(r, &block, &gen);
	}
	if (rc) {
		mem_uncharge(BLOCK_BASE);
		pthread_mutex_unlock(&lock);
		return rc;
	}
	h = sbp_pair_block(&r->pi, r->base, block);
	h->active_cookie = in->peer_cookie;
	h->passive_cookie = in->cookie;
	rc = send_offer(r, block, gen);
	if (rc < 0 && rc != -EAGAIN) {
		retire_locked(r);       /* (a new region nothing reached) */
		mem_uncharge(BLOCK_BASE);
		pthread_mutex_unlock(&lock);
		return rc;
	}
	r->users++;
	pthread_mutex_unlock(&lock);
	out->base = r->base;
	out->pi = r->pi;
	out->block = block;
	out->gen = gen;
	out->active = 0;
	out->unsent = rc == -EAGAIN;
	out->region = (uint16_t)(r - regions);
	atomic_store(&out->charged, 1);
	atomic_store(&out->held, 1);
	return 0;
}

#define UNSENT_NEVER 2      /* mem_ref.unsent: withdrawn, never sent */

int mem_deliver(struct mem_ref *ref)
{
	struct region *r;
	int rc;

	if (!ref->unsent)
		return 1;
	if (ref->unsent == UNSENT_NEVER)
		return -EPIPE;
	pthread_mutex_lock(&lock);
	r = ref->region < nregions ? &regions[ref->region] : NULL;
	rc = r && r->base == ref->base ? send_offer(r, ref->block, ref->gen) : -ESTALE;
	pthread_mutex_unlock(&lock);
	if (rc == -EAGAIN)
		return 0;
	/* < 0: withdrawn (send_offer), the peer is gone; the reference
	 * stays (the channel still points into the block) for mem_done,
	 * which unmaps the region if no offer of it ever reached the peer
	 * (else its memfd would stay among our fds for good) */
	ref->unsent = rc < 0 ? UNSENT_NEVER : 0;
	return rc < 0 ? rc : 1;
}

/* ---- the active end: offers and the regions they name ----------------------- */

/* The two places an offer for this active cookie may be kept. */
static struct pending *pend_pair(uint64_t cookie)
{
	return &pend[(uint32_t)(cookie * 0x9E3779B97F4A7C15ull >> 32) & (PENDING_MAX - 2)];
}

/* The offer read before its socket asked, if any: taken out. */
static int pend_take(uint64_t cookie, struct pending *out)
{
	struct pending *p = pend ? pend_pair(cookie) : NULL;
	int found = 0;

	for (int i = 1; p && i >= 0; i--)       /* [0] is the newer */
		if (p[i].used && p[i].msg.active_cookie == cookie) {
			*out = p[i];
			p[i].used = 0;
			found = 1;
		}
	return found;
}

static void pend_put(const struct sbp_inbox_rx *rx)
{
	struct pending *p = pend_pair(rx->msg.active_cookie);

	/* a newer offer for the same socket wins; else the older of two goes */
	if (p[0].used && p[0].msg.active_cookie != rx->msg.active_cookie)
		p[1] = p[0];
	p[0].msg = rx->msg;
	p[0].pid = rx->pid;
	p[0].used = 1;
}

/* The waiting table (lock held): linear probing on the cookie. */
static struct waiting *wait_find(uint64_t cookie)
{
	if (!waiting || !cookie)
		return NULL;
	for (uint32_t i = (uint32_t)(cookie * 0x9E3779B97F4A7C15ull >> 32) & (wait_cap - 1);;
	     i = (i + 1) & (wait_cap - 1)) {
		if (!waiting[i].cookie)
			return NULL;
		if (waiting[i].cookie == cookie && waiting[i].state != WAIT_GONE)
			return &waiting[i];
	}
}

static struct waiting *wait_slot(struct waiting *tab, uint32_t cap, uint64_t cookie)
{
	uint32_t i = (uint32_t)(cookie * 0x9E3779B97F4A7C15ull >> 32) & (cap - 1);

	while (tab[i].cookie)
		i = (i + 1) & (cap - 1);
	return &tab[i];
}

/* Room for one more (at most half full, removed entries included); a new
 * table drops the removed ones. -ENOMEM: the socket just stays on TCP. */
static int wait_room(void)
{
	struct waiting *tab;
	uint32_t cap = wait_cap;

	if (waiting && (wait_used + 1) * 2 <= wait_cap)
		return 0;
	while (cap < WAITING_MIN || (wait_live + 1) * 4 > cap)
		cap = cap ? cap * 2 : WAITING_MIN;
	tab = anon_alloc((size_t)cap * sizeof(*tab));
	if (!tab)
		return -ENOMEM;
	for (uint32_t i = 0; waiting && i < wait_cap; i++)
		if (waiting[i].cookie && waiting[i].state != WAIT_GONE)
			*wait_slot(tab, cap, waiting[i].cookie) = waiting[i];
	if (waiting)
		munmap(waiting, (size_t)wait_cap * sizeof(*waiting));
	waiting = tab;
	wait_cap = cap;
	wait_used = wait_live;
	return 0;
}

void mem_expect(const struct sbp_info *in)
{
	uint64_t cookie = in->cookie;
	struct pending early;
	struct waiting *w;

	pthread_mutex_lock(&lock);
	if (regions)
		reap_gone_locked(2);
	if (!cookie || wait_find(cookie) || wait_room() < 0) {
		pthread_mutex_unlock(&lock);
		return;
	}
	w = wait_slot(waiting, wait_cap, cookie);
	w->cookie = cookie;
	w->state = WAIT_EMPTY;
	w->peer_cookie = in->peer_cookie;
	w->peer_tgid = (pid_t)in->peer.tgid;
	wait_used++;
	wait_live++;
	/* an offer read before we asked */
	if (pend_take(cookie, &early)) {
		w->msg = early.msg;
		w->pid = early.pid;
		w->state = WAIT_OFFER;
	}
	pthread_mutex_unlock(&lock);
}

static void wait_remove_locked(struct waiting *w)
{
	w->state = WAIT_GONE;           /* the cookie stays: probing goes on past it */
	wait_live--;
}

void mem_forget(uint64_t cookie)
{
	struct waiting *w;

	pthread_mutex_lock(&lock);
	if ((w = wait_find(cookie)))
		wait_remove_locked(w);
	pthread_mutex_unlock(&lock);
}

static struct region *received(pid_t from, uint64_t region_id)
{
	for (int i = 0; i < nregions; i++)
		if (regions[i].from == from && regions[i].pi.region_id == region_id)
			return &regions[i];
	return NULL;
}

/* Map a region a peer sent: sealed (it cannot shrink under us, so no
 * SIGBUS), the size it says, a header that checks. */
static void map_received(const struct sbp_inbox_rx *rx)
{
	struct sbp_pair_info pi;
	struct stat st;
	struct region *r;
	void *p;
	int seals;

	if (received(rx->pid, rx->msg.region_id))
		return;
	seals = (int)syscall(SYS_fcntl, rx->fd, F_GET_SEALS);
	if (seals < 0 || (seals & (F_SEAL_SHRINK | F_SEAL_GROW)) != (F_SEAL_SHRINK | F_SEAL_GROW) ||
	    fstat(rx->fd, &st) < 0 || (uint64_t)st.st_size != rx->msg.region_size ||
	    rx->msg.region_size > sbp_pair_region_size(SBP_PAIR_MAX_BLOCKS))
		return;
	p = mmap(NULL, st.st_size, PROT_READ | PROT_WRITE, MAP_SHARED, rx->fd, 0);
	if (p == MAP_FAILED)
		return;
	if (sbp_pair_check(p, st.st_size, &pi) || pi.region_id != rx->msg.region_id ||
	    !(r = region_slot())) {
		munmap(p, st.st_size);
		return;
	}
	r->base = p;
	r->size = st.st_size;
	r->pi = pi;
	memset(r->token, 0, SBP_INBOX_LEN);
	r->from = rx->pid;
	r->memfd = -1;
}

static void read_inbox_locked(void)
{
	struct sbp_inbox_rx rx;

	if (inbox_state <= 0)
		return;
	while (sbp_inbox_recv(&inbox, &rx) == 1) {
		struct waiting *w;

		if (rx.fd >= 0) {
			map_received(&rx);
			syscall(SYS_close, rx.fd);
		}
		if ((w = wait_find(rx.msg.active_cookie))) {
			w->msg = rx.msg;        /* (a newer offer wins, as in pend) */
			w->pid = rx.pid;
			w->state = WAIT_OFFER;
			continue;
		}
		pend_put(&rx);
	}
}

int mem_claim(int fd, uint64_t cookie, int now, struct mem_ref *out)
{
	struct sbp_block_hdr *h;
	struct pending *p = NULL, one;
	struct waiting *w;
	struct sbp_info in;
	struct region *r;
	uint64_t st;
	int64_t t = now_ns();
	int known = 0;

	if (!now && t - atomic_load_explicit(&last_claim_ns, memory_order_relaxed) < CLAIM_EVERY_NS)
		return 0;
	atomic_store_explicit(&last_claim_ns, t, memory_order_relaxed);
	pthread_mutex_lock(&lock);
	read_inbox_locked();
	if ((w = wait_find(cookie))) {
		if (w->state == WAIT_OFFER) {
			one.msg = w->msg;
			one.pid = w->pid;
			p = &one;
			known = w->peer_tgid > 0 && w->peer_tgid == one.pid &&
				w->peer_cookie == one.msg.passive_cookie;
			w->state = WAIT_EMPTY;  /* taken or refused below; a new one may come */
		}
	} else if (pend_take(cookie, &one)) {
		p = &one;
	}
	if (!p) {
		pthread_mutex_unlock(&lock);
		return 0;
	}
	/* Believe it only if BPF says the sender is who asked for our peer:
	 * as it said at connect (the listener's owner, whose child the peer
	 * is until another process accepts it and asks), or as it says now. */
	if ((!known && (ask_info(fd, &in) < 0 || in.tier != SBP_TIER_SHM || in.cookie != cookie ||
			in.peer_cookie != p->msg.passive_cookie || (pid_t)in.peer.tgid != p->pid)) ||
	    !(r = received(p->pid, p->msg.region_id)) || p->msg.block >= r->pi.block_count) {
		pthread_mutex_unlock(&lock);
		DBG("fd %d: an offer from pid %d did not check out: tcp", fd, (int)p->pid);
		return -EPROTO;
	}
	h = sbp_pair_block(&r->pi, r->base, p->msg.block);
	st = SBP_BLOCK_STATE(p->msg.gen, SBP_BLOCK_OFFERED);
	/* SYNC POINT: attach vs the passive end's withdraw: one CAS wins. */
	if (!__atomic_compare_exchange_n(&h->state, &st,
					 SBP_BLOCK_STATE(p->msg.gen, SBP_BLOCK_ATTACHED), 0,
					 __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
		pthread_mutex_unlock(&lock);
		return -ESTALE;
	}
	out->base = r->base;
	out->pi = r->pi;
	out->block = p->msg.block;
	out->gen = p->msg.gen;
	out->active = 1;
	out->region = (uint16_t)(r - regions);
	r->users++;
	atomic_store(&out->held, 1);
	if (w)
		wait_remove_locked(w);
	pthread_mutex_unlock(&lock);
	return 1;
}

struct sbp_block_hdr *mem_block(const struct mem_ref *ref)
{
	return ref->base ? sbp_pair_block(&ref->pi, ref->base, ref->block) : NULL;
}

int mem_taken(const struct mem_ref *ref)
{
	struct sbp_block_hdr *h = mem_block(ref);

	return h && __atomic_load_n(&h->state, __ATOMIC_ACQUIRE) ==
		    SBP_BLOCK_STATE(ref->gen, SBP_BLOCK_ATTACHED);
}

/* A region none of whose offers reached the peer (its inbox stayed full,
 * or it is gone) and no connection of ours uses any more: nobody else maps
 * it, and its memfd is still ours (a descriptor the app would see). Unmap
 * it; the next connection with that peer makes a new one. A region some
 * connection still uses stays: its channel points into its block. lock
 * held. */
static void retire_locked(struct region *r)
{
	if (r->memfd < 0 || r->users)
		return;
	fdt_store(r->memfd, K_UNKNOWN);
	syscall(SYS_close, r->memfd);
	drop_region(r);
}

/* The passive end's connection no longer uses its block's region. */
static void region_release(struct mem_ref *ref)
{
	struct region *r;

	if (!atomic_exchange(&ref->held, 0))
		return;         /* released already: a second done must not count twice */
	pthread_mutex_lock(&lock);
	r = ref->region < nregions ? &regions[ref->region] : NULL;
	if (r && r->base == ref->base) {
		if (r->users)
			r->users--;
		retire_locked(r);
	}
	pthread_mutex_unlock(&lock);
}

int mem_withdraw(const struct mem_ref *ref)
{
	struct sbp_block_hdr *h = mem_block(ref);
	uint64_t offered = SBP_BLOCK_STATE(ref->gen, SBP_BLOCK_OFFERED);

	return h && !ref->active &&
	       __atomic_compare_exchange_n(&h->state, &offered,
					   SBP_BLOCK_STATE(ref->gen, SBP_BLOCK_WITHDRAWN), 0,
					   __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
}

void mem_done(struct mem_ref *ref)
{
	struct sbp_block_hdr *h = mem_block(ref);
	uint64_t offered = SBP_BLOCK_STATE(ref->gen, SBP_BLOCK_OFFERED);

	if (!h)
		return;
	if (ref->active) {
		if ((uint32_t)(__atomic_load_n(&h->state, __ATOMIC_ACQUIRE) >> 32) == ref->gen)
			__atomic_fetch_or(&h->done, SBP_DONE_ACTIVE, __ATOMIC_RELEASE);
		region_release(ref);
		return;
	}
	if (atomic_exchange(&ref->charged, 0))
		mem_uncharge(BLOCK_BASE);
	/* never taken (or withdrawn by mem_deliver): free again; else done */
	if (!__atomic_compare_exchange_n(&h->state, &offered,
					 SBP_BLOCK_STATE(ref->gen, SBP_BLOCK_WITHDRAWN), 0,
					 __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE) &&
	    ref->unsent != UNSENT_NEVER &&
	    (uint32_t)(__atomic_load_n(&h->state, __ATOMIC_ACQUIRE) >> 32) == ref->gen)
		__atomic_fetch_or(&h->done, SBP_DONE_PASSIVE, __ATOMIC_RELEASE);
	region_release(ref);
}

/* A forked child keeps the mappings (connections made before the fork go
 * on in both), but gets its own inbox and makes its own regions: the
 * allocation state here is the parent's. */
void mem_atfork_child(void)
{
	pthread_mutex_init(&lock, NULL);
	/* the memory cap counts what this process charges from now on: the
	 * parent's connections stay charged to the parent */
	atomic_store(&mem_used, 0);
	if (inbox_state > 0) {
		fdt_store(inbox.fd, K_UNKNOWN);
		fdt_store(inbox.tx, K_UNKNOWN);
		syscall(SYS_close, inbox.fd);
		syscall(SYS_close, inbox.tx);
	}
	inbox.fd = inbox.tx = -1;
	inbox_state = 0;
	for (int i = 0; i < nregions; i++)
		memset(regions[i].token, 0xff, SBP_INBOX_LEN);  /* never offered from again */
	memset(pend, 0, pend ? PENDING_MAX * sizeof(*pend) : 0);
	if (waiting)    /* the parent's sockets wait in the parent */
		munmap(waiting, (size_t)wait_cap * sizeof(*waiting));
	waiting = NULL;
	wait_cap = wait_used = wait_live = 0;
}
