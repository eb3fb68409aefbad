// SPDX-License-Identifier: GPL-2.0
/* capture.c: `shmbypass capture` of the shm tier (docs/CAPTURE.md, the
 * calls: capture.h). While a capture runs, each send's bytes are copied
 * into a ring of this process's own, /run/<instance>/capture.d/
 * <pid>-<generation>-<random> (ours, mode 0600), which the capture command
 * reads. Threads share the ring (a compare-and-swap reserves); nothing
 * here ever waits: a full ring, a ring that cannot be made, a ring being
 * made by another thread all drop the record and count it. The command
 * trusts nothing in the ring (shmbypass/capture/rings.py); this side
 * trusts only its own header fields and the reader's tail, and keeps every
 * position inside the data area by masking. */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "capture.h"
#include "sys.h"

#define RING_DEFAULT (4u << 20)
#define REC_MAX (64u << 10)	/* data bytes per record (a quarter of a small ring at most) */
#define CAS_TRIES 64		/* writers racing for room: then the record is dropped */

static const uint32_t off_word;
const volatile uint32_t *capture_word = &off_word;
static const volatile struct sbp_cap_ctl *ctl;
static char ring_dir[256];

/* Two ring slots: the current generation's and the one before, which is
 * unmapped only once no writer is inside it (else it is left mapped). */
struct ring {
	struct sbp_cap_ring *hdr;
	uint8_t *data;
	uint64_t size;
	size_t map_len;
	uint32_t gen;
	uint32_t writers;	/* threads writing into it now */
};

enum { R_NONE, R_MAKING, R_READY, R_FAILED };

static struct ring rings[2];
static uint32_t cur;		/* index of the current ring */
static uint32_t state;		/* R_*, of rings[cur] */
static uint32_t failed_gen;	/* R_FAILED: for this generation */
static uint64_t lost, lost_bytes;	/* dropped while no ring could take them */

static void drop(size_t n)
{
	__atomic_fetch_add(&lost, 1, __ATOMIC_RELAXED);
	__atomic_fetch_add(&lost_bytes, n, __ATOMIC_RELAXED);
}

static void unmap(struct ring *r)
{
	if (r->hdr)
		munmap(r->hdr, r->map_len);
	memset(r, 0, sizeof(*r));
}

/* The child of a fork writes its own ring (its pid, and its uid if it
 * changes it): forget the parent's. No other thread exists here. */
static void capture_atfork_child(void)
{
	unmap(&rings[0]);
	unmap(&rings[1]);
	state = R_NONE;
	lost = lost_bytes = 0;
}

void capture_init(void)
{
	static uint32_t done;
	const volatile struct sbp_cap_ctl *c;
	const char *inst;
	char path[320];
	struct stat st;
	int fd, saved = errno;
	void *p;

	if (__atomic_exchange_n(&done, 1, __ATOMIC_ACQ_REL))
		return;
	inst = getenv("SHMBYPASS_INSTANCE");
	if (!inst || !*inst)
		inst = "shmbypass";
	if (strchr(inst, '/') || strlen(inst) > 200)
		goto out;
	snprintf(path, sizeof(path), "/run/%s/capture", inst);
	fd = (int)syscall(SYS_openat, AT_FDCWD, path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
	if (fd < 0)
		goto out;		/* no instance, or one from before capture: never on */
	/* root's (`up` made it in root's run directory) and big enough */
	if (fstat(fd, &st) || !S_ISREG(st.st_mode) || st.st_uid != 0 ||
	    st.st_size < (off_t)sizeof(struct sbp_cap_ctl)) {
		syscall(SYS_close, fd);
		goto out;
	}
	p = mmap(NULL, sizeof(struct sbp_cap_ctl), PROT_READ, MAP_SHARED, fd, 0);
	syscall(SYS_close, fd);
	if (p == MAP_FAILED)
		goto out;
	c = p;
	if (c->magic != SBP_CAPCTL_MAGIC || c->version != SBP_CAP_VERSION) {
		munmap(p, sizeof(struct sbp_cap_ctl));
		goto out;
	}
	snprintf(ring_dir, sizeof(ring_dir), "/run/%s/capture.d", inst);
	ctl = c;
	pthread_atfork(NULL, NULL, capture_atfork_child);
	__atomic_store_n(&capture_word, &c->on, __ATOMIC_RELEASE);
out:
	errno = saved;
}

/* Make this process's ring for generation gen in r; 0 or -1. */
static int ring_make(struct ring *r, uint32_t gen)
{
	uint64_t size = ctl->ring_bytes, rnd;
	char path[sizeof(ring_dir) + 64];
	struct sbp_cap_ring *h;
	size_t len;
	void *p;
	int fd;

	if (size < SBP_CAPRING_MIN || size > SBP_CAPRING_MAX || (size & (size - 1)))
		size = RING_DEFAULT;
	len = SBP_CAPRING_DATA + size;
	if (getrandom(&rnd, sizeof(rnd), GRND_NONBLOCK) != sizeof(rnd))
		rnd = (uint64_t)now_ns() ^ ((uint64_t)getpid() << 32);
	/* The random part: another process cannot take our name first. */
	snprintf(path, sizeof(path), "%s/%d-%u-%016llx", ring_dir, (int)getpid(), gen,
		 (unsigned long long)rnd);
	fd = (int)syscall(SYS_openat, AT_FDCWD, path,
			  O_RDWR | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
	if (fd < 0)
		return -1;
	/* Allocated now: a full /run fails here, not as SIGBUS in a send. */
	if (syscall(SYS_fallocate, fd, 0, (off_t)0, (off_t)len)) {
		syscall(SYS_close, fd);
		syscall(SYS_unlinkat, AT_FDCWD, path, 0);
		return -1;
	}
	p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	syscall(SYS_close, fd);
	if (p == MAP_FAILED) {
		syscall(SYS_unlinkat, AT_FDCWD, path, 0);
		return -1;
	}
	h = p;
	h->version = SBP_CAP_VERSION;
	h->generation = gen;
	h->pid = (uint32_t)getpid();
	h->size = size;
	r->hdr = h;
	r->data = (uint8_t *)p + SBP_CAPRING_DATA;
	r->size = size;
	r->map_len = len;
	r->gen = gen;
	/* SYNC POINT: the reader looks at nothing before the magic. */
	__atomic_store_n(&h->magic, SBP_CAPRING_MAGIC, __ATOMIC_RELEASE);
	return 0;
}

/* The current ring of generation gen with this thread counted as one of
 * its writers, or NULL (the record is then dropped). */
static struct ring *ring_get(uint32_t gen)
{
	uint32_t s = __atomic_load_n(&state, __ATOMIC_ACQUIRE), i, next;
	struct ring *r;

	if (s == R_READY) {
		i = __atomic_load_n(&cur, __ATOMIC_ACQUIRE);
		r = &rings[i];
		__atomic_fetch_add(&r->writers, 1, __ATOMIC_SEQ_CST);
		/* SYNC POINT: counted first, then checked; the maker switches
		 * state first, then looks at the old ring's writers. */
		if (__atomic_load_n(&state, __ATOMIC_SEQ_CST) == R_READY &&
		    __atomic_load_n(&cur, __ATOMIC_SEQ_CST) == i && r->gen == gen)
			return r;
		__atomic_fetch_sub(&r->writers, 1, __ATOMIC_RELEASE);
		s = __atomic_load_n(&state, __ATOMIC_ACQUIRE);
	}
	if (s == R_MAKING || (s == R_FAILED && __atomic_load_n(&failed_gen, __ATOMIC_RELAXED) == gen))
		return NULL;
	/* A new capture (or the first): this thread makes its ring. */
	if (!__atomic_compare_exchange_n(&state, &s, R_MAKING, 0, __ATOMIC_SEQ_CST,
					 __ATOMIC_RELAXED))
		return NULL;
	next = 1 - __atomic_load_n(&cur, __ATOMIC_RELAXED);
	r = &rings[next];
	if (r->hdr) {
		if (__atomic_load_n(&r->writers, __ATOMIC_SEQ_CST))
			memset(r, 0, sizeof(*r));	/* still written: leave it mapped */
		else
			unmap(r);
	}
	if (ring_make(r, gen)) {
		__atomic_store_n(&failed_gen, gen, __ATOMIC_RELAXED);
		__atomic_store_n(&state, R_FAILED, __ATOMIC_RELEASE);
		return NULL;
	}
	__atomic_store_n(&cur, next, __ATOMIC_RELEASE);
	__atomic_store_n(&state, R_READY, __ATOMIC_RELEASE);
	return ring_get(gen);
}

static void ring_done(struct ring *r)
{
	__atomic_fetch_sub(&r->writers, 1, __ATOMIC_RELEASE);
}

/* Copy n bytes to ring position pos (wrapping at the end of the data area). */
static void put(struct ring *r, uint64_t pos, const void *src, size_t n)
{
	size_t at = pos & (r->size - 1), first = n < r->size - at ? n : r->size - at;

	memcpy(r->data + at, src, first);
	memcpy(r->data, (const uint8_t *)src + first, n - first);
}

struct cursor {
	const struct iovec *iov;
	int left;		/* iovecs from iov on */
	size_t off;		/* into iov[0] */
};

/* Move the cursor over the next n bytes of the caller's iovecs (n <= what
 * they hold), copying them to pos unless r is NULL. */
static void put_iov(struct ring *r, uint64_t pos, struct cursor *c, size_t n)
{
	while (n && c->left > 0) {
		size_t k = c->iov->iov_len - c->off;

		if (k > n)
			k = n;
		if (r)
			put(r, pos, (const uint8_t *)c->iov->iov_base + c->off, k);
		pos += k;
		n -= k;
		c->off += k;
		if (c->off == c->iov->iov_len) {
			c->iov++;
			c->left--;
			c->off = 0;
		}
	}
}

static void skip_iov(struct cursor *c, size_t n)
{
	put_iov(NULL, 0, c, n);
}

/* One record: reserve, write, publish. */
static void record(struct ring *r, const struct sbp_cap_rec *rec, struct cursor *c)
{
	struct sbp_cap_ring *h = r->hdr;
	uint64_t need = (sizeof(struct sbp_cap_slot) + sizeof(*rec) + rec->len + 7) & ~7ULL;
	uint64_t head, tail, used;
	uint32_t len = (uint32_t)sizeof(*rec) + rec->len;
	int i;

	for (i = 0;; i++) {
		head = __atomic_load_n(&h->head, __ATOMIC_RELAXED);
		tail = __atomic_load_n(&h->tail, __ATOMIC_ACQUIRE);
		used = head - tail;
		if (i == CAS_TRIES || used > r->size || need > r->size - used) {
			__atomic_fetch_add(&h->dropped, 1, __ATOMIC_RELAXED);
			__atomic_fetch_add(&h->dropped_bytes, rec->len, __ATOMIC_RELAXED);
			skip_iov(c, rec->len);
			return;
		}
		if (__atomic_compare_exchange_n(&h->head, &head, head + need, 0, __ATOMIC_ACQUIRE,
						__ATOMIC_RELAXED))
			break;
	}
	/* [head, head + need) is ours: positions are 8-aligned and the data
	 * area a power of two, so each 8-byte word of the slot header lies
	 * whole inside it. */
	put(r, head + sizeof(struct sbp_cap_slot), rec, sizeof(*rec));
	put_iov(r, head + sizeof(struct sbp_cap_slot) + sizeof(*rec), c, rec->len);
	*(uint32_t *)(r->data + (head & (r->size - 1))) = len;
	/* SYNC POINT: producer. The reader takes the record once pos is its own. */
	__atomic_store_n((uint64_t *)(r->data + ((head + 8) & (r->size - 1))), head,
			 __ATOMIC_RELEASE);
}

void capture_missed(size_t n)
{
	if (ctl && ctl->on && n)
		drop(n);
}

void capture_data(uint64_t cookie, int dir, uint64_t offset, const struct iovec *iov,
		  int iovcnt, size_t n)
{
	const volatile struct sbp_cap_ctl *c = ctl;
	struct cursor cur_iov = { iov, iovcnt, 0 };
	struct sbp_cap_rec rec = { 0 };
	struct ring *r;
	size_t done = 0, max;
	uint64_t k;
	int saved = errno;

	if (!c || !n || !c->on)
		return;
	if ((uint64_t)now_ns() > __atomic_load_n(&c->lease_ns, __ATOMIC_ACQUIRE)) {
		drop(n);	/* the capture stopped renewing: it died, or it stalls */
		goto out;
	}
	r = ring_get(c->generation);
	if (!r) {
		drop(n);
		goto out;
	}
	/* What could not be written before this ring existed. Either count
	 * may be the one left (a drop between the two exchanges below). */
	if (__atomic_load_n(&lost, __ATOMIC_RELAXED) || __atomic_load_n(&lost_bytes, __ATOMIC_RELAXED)) {
		k = __atomic_exchange_n(&lost, 0, __ATOMIC_RELAXED);
		__atomic_fetch_add(&r->hdr->dropped, k, __ATOMIC_RELAXED);
		k = __atomic_exchange_n(&lost_bytes, 0, __ATOMIC_RELAXED);
		__atomic_fetch_add(&r->hdr->dropped_bytes, k, __ATOMIC_RELAXED);
	}
	max = r->size / 4 < REC_MAX ? r->size / 4 : REC_MAX;
	rec.ts = (uint64_t)now_ns();
	rec.cookie = cookie;
	rec.kind = SBP_CAP_DATA;
	while (done < n) {
		rec.len = (uint32_t)(n - done < max ? n - done : max);
		rec.offset = offset + done;
		rec.flags = (dir == SBP_CAP_RX ? SBP_CAP_F_RX : 0) |
			    (done + rec.len == n ? SBP_CAP_F_PUSH : 0);
		record(r, &rec, &cur_iov);
		done += rec.len;
	}
	ring_done(r);
out:
	errno = saved;
}
