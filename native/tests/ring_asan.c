// SPDX-License-Identifier: GPL-2.0
/*
 * The ring and region C API under AddressSanitizer + UBSan
 * (tests/test_ring.py builds and runs it):
 *   gcc -fsanitize=address,undefined -fno-sanitize-recover=all -D_GNU_SOURCE \
 *       -Inative native/tests/ring_asan.c native/ring.c native/ring_wait.c native/region.c \
 *       native/pairmem.c native/stream.c -lpthread
 * Every slot and every buffer is a heap block of exactly its size, so any
 * access outside it is caught. Prints "ring_asan: ok" and exits 0 on success.
 */
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "pairmem.h"
#include "region.h"
#include "ring.h"
#include "stream.h"

#define CHECK(c) do { if (!(c)) { fprintf(stderr, "%s:%d: CHECK(%s) failed\n", \
	__FILE__, __LINE__, #c); exit(1); } } while (0)

static uint64_t rng_state = 0x9e3779b97f4a7c15ULL;

static uint64_t rnd(void)
{
	/* xorshift64*: small and deterministic */
	rng_state ^= rng_state >> 12;
	rng_state ^= rng_state << 25;
	rng_state ^= rng_state >> 27;
	return rng_state * 2685821657736338717ULL;
}

static void *slot_alloc(size_t size)
{
	void *p = aligned_alloc(4096, size);

	CHECK(p);
	memset(p, 0, size);
	return p;
}

static double now_s(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* --- single thread: semantics and wrap-around ------------------------------- */
static void test_basic(void)
{
	size_t slot_size = 4096 + 8192;
	void *slot = slot_alloc(slot_size);
	struct sbp_ring w, r;
	char buf[20000], out[20000];

	CHECK(sbp_ring_capacity_for(slot_size) == 8192);
	CHECK(sbp_ring_capacity_for(4096 + 4095) == 0);
	CHECK(sbp_ring_attach(&r, slot, slot_size, 1) == -EAGAIN);
	CHECK(sbp_ring_format(slot, 4096 + 100, 1) == -EINVAL);
	CHECK(sbp_ring_format(slot, slot_size, 1) == 0);
	CHECK(sbp_ring_attach(&w, slot, slot_size, 2) == -EAGAIN);
	CHECK(sbp_ring_attach(&w, slot, slot_size, 1) == 0);
	CHECK(sbp_ring_attach(&r, slot, slot_size, 1) == 0);
	CHECK(sbp_ring_read(&r, out, sizeof(out), 0) == -EAGAIN);

	for (size_t i = 0; i < sizeof(buf); i++)
		buf[i] = (char)rnd();
	/* many wrap-arounds with odd sizes, through both entry points */
	uint64_t wpos = 0, rpos = 0;
	for (int it = 0; it < 20000; it++) {
		size_t n = rnd() % 9000;
		ssize_t k;

		if (rnd() & 1) {
			struct iovec iov[3] = { { buf + (wpos % 7000), n / 3 },
						{ buf + (wpos % 7000) + n / 3, 0 },
						{ buf + (wpos % 7000) + n / 3, n - n / 3 } };
			/* iovecs point at consecutive bytes, so the stream stays buf[] */
			k = sbp_ring_writev(&w, iov, 3);
		} else {
			k = sbp_ring_write(&w, buf + (wpos % 7000), n);
		}
		CHECK(k >= 0 || k == -EAGAIN);
		if (k > 0) {
			wpos += (uint64_t)k;
			/* read it back immediately, sometimes peeking first */
			size_t want = (size_t)k;
			if (rnd() & 1) {
				ssize_t p = sbp_ring_read(&r, out, want, SBP_PEEK);
				CHECK(p == (ssize_t)want);
				CHECK(memcmp(out, buf + ((wpos - want) % 7000), want) == 0);
			}
			struct iovec riov[2] = { { out, want / 2 }, { out + want / 2, want - want / 2 } };
			ssize_t g = sbp_ring_readv(&r, riov, 2, 0);
			CHECK(g == (ssize_t)want);
			CHECK(memcmp(out, buf + ((wpos - want) % 7000), want) == 0);
			rpos += want;
		}
	}
	CHECK(wpos == rpos && wpos > 1000000);

	/* full, EOF, EPIPE, reset */
	CHECK(sbp_ring_write(&w, buf, 20000) == 8192);
	CHECK(sbp_ring_write(&w, buf, 1) == -EAGAIN);
	CHECK(sbp_ring_writable(&w) == 0 && sbp_ring_readable(&r) == 8192);
	CHECK(sbp_ring_wait_writable(&w, 1000000) == -ETIMEDOUT);
	sbp_ring_close_writer(&w);
	CHECK(sbp_ring_write(&w, buf, 1) == -EPIPE);
	CHECK(sbp_ring_read(&r, out, sizeof(out), 0) == 8192);
	CHECK(sbp_ring_read(&r, out, sizeof(out), 0) == 0);
	CHECK(sbp_ring_wait_readable(&r, -1) == 0);

	CHECK(sbp_ring_format(slot, slot_size, 2) == 0);
	CHECK(sbp_ring_read(&r, out, 1, 0) == -EPROTO);       /* stale view */
	CHECK(sbp_ring_attach(&w, slot, slot_size, 2) == 0);
	CHECK(sbp_ring_attach(&r, slot, slot_size, 2) == 0);
	sbp_ring_close_reader(&r);
	CHECK(sbp_ring_write(&w, buf, 1) == -EPIPE);
	CHECK(sbp_ring_format(slot, slot_size, 3) == 0);
	CHECK(sbp_ring_attach(&w, slot, slot_size, 3) == 0);
	CHECK(sbp_ring_attach(&r, slot, slot_size, 3) == 0);
	CHECK(sbp_ring_write(&w, "abc", 3) == 3);
	sbp_ring_reset(&w, 0);
	CHECK(sbp_ring_reset_reason(&r) == SBP_RESET_APP);
	CHECK(sbp_ring_write(&w, "d", 1) == -ECONNRESET);
	CHECK(sbp_ring_read(&r, out, 10, 0) == 3);
	CHECK(sbp_ring_read(&r, out, 10, 0) == -ECONNRESET);

	/* a view that was never attached (or was closed) is harmless */
	struct sbp_ring z;
	memset(&z, 0, sizeof(z));
	CHECK(sbp_ring_write(&z, "x", 1) == -EPROTO);
	CHECK(sbp_ring_read(&z, out, 1, 0) == -EPROTO);
	CHECK(sbp_ring_wait_readable(&z, 0) == -EINVAL);
	CHECK(sbp_ring_readable(&z) == 0 && sbp_ring_writable(&z) == 0);
	sbp_ring_close_writer(&z);
	sbp_ring_reset(&z, 1);
	CHECK(sbp_ring_writev(&w, NULL, 1) == -EINVAL);
	CHECK(sbp_ring_readv(&r, NULL, -1, 0) == -EINVAL);
	free(slot);
}

/* --- hostile header: random values, random operations ------------------------- */
static void scribble(struct sbp_ring_hdr *h, uint64_t cap)
{
	static const uint64_t big[] = { 0, 1, 4095, 4096, 4097, 1ULL << 31, UINT32_MAX,
					1ULL << 63, UINT64_MAX, UINT64_MAX - 1 };
	uint64_t v = (rnd() & 1) ? big[rnd() % 10] : rnd();

	switch (rnd() % 11) {
	case 0: __atomic_store_n(&h->magic, (rnd() & 3) ? SBP_RING_MAGIC : v, __ATOMIC_RELAXED); break;
	case 1: __atomic_store_n(&h->generation, (rnd() & 3) ? 7 : v, __ATOMIC_RELAXED); break;
	case 2: __atomic_store_n(&h->capacity, (rnd() & 3) ? cap : v, __ATOMIC_RELAXED); break;
	case 3: __atomic_store_n(&h->flags, (uint32_t)v, __ATOMIC_RELAXED); break;
	case 4: __atomic_store_n(&h->reset_reason, (uint32_t)v, __ATOMIC_RELAXED); break;
	case 5: __atomic_store_n(&h->head, v, __ATOMIC_RELAXED); break;
	case 6: __atomic_store_n(&h->tail, v, __ATOMIC_RELAXED); break;
	case 7: __atomic_store_n(&h->writer_waiting, (uint32_t)v, __ATOMIC_RELAXED); break;
	case 8: __atomic_store_n(&h->reader_waiting, (uint32_t)v, __ATOMIC_RELAXED); break;
	case 9: {   /* plausible but wrong positions */
		uint64_t t = rnd();
		__atomic_store_n(&h->tail, t, __ATOMIC_RELAXED);
		__atomic_store_n(&h->head, t + rnd() % (2 * cap), __ATOMIC_RELAXED);
		break;
	}
	default:
		__atomic_store_n(&h->version, (uint32_t)v, __ATOMIC_RELAXED);
	}
}

static void test_hostile(void)
{
	size_t slot_size = 4096 + 4096;
	unsigned char *slot = slot_alloc(slot_size);
	struct sbp_ring_hdr *h = (struct sbp_ring_hdr *)slot;
	uint64_t cap = sbp_ring_capacity_for(slot_size);
	struct sbp_ring w, r;
	int eproto = 0;

	for (int it = 0; it < 200000; it++) {
		if (it % 500 == 0) {
			CHECK(sbp_ring_format(slot, slot_size, 7) == 0);
			CHECK(sbp_ring_attach(&w, slot, slot_size, 7) == 0);
			CHECK(sbp_ring_attach(&r, slot, slot_size, 7) == 0);
			sbp_ring_set_spin(&w, 0);
			sbp_ring_set_spin(&r, 0);
		}
		scribble(h, cap);
		if (rnd() % 5 == 0) {   /* attach to garbage */
			struct sbp_ring x;
			int rc = sbp_ring_attach(&x, slot, slot_size, 7);
			CHECK(rc == 0 || rc == -EAGAIN || rc == -EPROTO);
		}
		size_t n = rnd() % (3 * cap);
		unsigned char *buf = malloc(n + 1);   /* exact size: ASan sees overruns */
		CHECK(buf);
		memset(buf, 0x33, n + 1);
		ssize_t k;
		switch (rnd() % 8) {
		case 0: k = sbp_ring_write(&w, buf, n); break;
		case 1: k = sbp_ring_read(&r, buf, n, 0); break;
		case 2: k = sbp_ring_read(&r, buf, n, SBP_PEEK); break;
		case 3: {
			struct iovec iov[2] = { { buf, n / 2 }, { buf + n / 2, n - n / 2 } };
			k = (rnd() & 1) ? sbp_ring_writev(&w, iov, 2) : sbp_ring_readv(&r, iov, 2, 0);
			break;
		}
		case 4: k = sbp_ring_wait_readable(&r, 0); break;
		case 5: k = sbp_ring_wait_writable(&w, 0); break;
		case 6: k = (ssize_t)(sbp_ring_readable(&r) + sbp_ring_writable(&w) +
				       (size_t)sbp_ring_corrupt(&r)); k = 0; break;
		default:
			k = sbp_ring_arm_readable(&r) + sbp_ring_arm_writable(&w);
			sbp_ring_disarm_readable(&r);
			sbp_ring_disarm_writable(&w);
		}
		CHECK(k >= 0 || k == -EAGAIN || k == -EPROTO || k == -EPIPE ||
		      k == -ECONNRESET || k == -ETIMEDOUT || k == SBP_RING_GO_NEXT);
		CHECK(k <= (ssize_t)cap);
		if (k == -EPROTO)
			eproto++;
		free(buf);
	}
	CHECK(eproto > 1000);
	free(slot);
}

/* --- regions --------------------------------------------------------------------- */
static void test_region(void)
{
	size_t size = 4096 + 3 * (4096 + 8192);
	unsigned char *base = slot_alloc(size);
	struct sbp_region_info info;

	CHECK(sbp_region_format(base, size, 4096 + 8192, 42) == 0);
	CHECK(sbp_region_check(base, size, &info) == 0);
	CHECK(info.slot_count == 3 && info.ring_capacity == 8192 && info.region_id == 42);
	CHECK(sbp_region_slot(&info, base, 2) == base + 4096 + 2 * (4096 + 8192));
	CHECK(sbp_region_slot(&info, base, 3) == NULL);
	CHECK(sbp_region_slot(&info, base, UINT32_MAX) == NULL);
	CHECK(sbp_region_check(base, 4095, &info) == -EPROTO);
	CHECK(sbp_region_format(base, size, 5000, 1) == -EINVAL);
	CHECK(sbp_region_format(base, 4096, 8192, 1) == -EINVAL);

	/* every ring in every slot stays inside its slot */
	for (uint32_t s = 0; s < 3; s++) {
		struct sbp_ring w;
		char buf[9000];

		void *p = sbp_region_slot(&info, base, s);
		CHECK(sbp_ring_format(p, info.slot_size, s) == 0);
		CHECK(sbp_ring_attach(&w, p, info.slot_size, s) == 0);
		memset(buf, (int)s, sizeof(buf));
		CHECK(sbp_ring_write(&w, buf, sizeof(buf)) == 8192);
	}

	/* garbage headers of every size: never read past the buffer */
	for (int it = 0; it < 20000; it++) {
		size_t n = (rnd() % 3) ? 4096 + rnd() % 40000 : rnd() % 5000;
		unsigned char *g = malloc(n ? n : 1);
		CHECK(g);
		for (size_t i = 0; i < n; i++)
			g[i] = (unsigned char)rnd();
		if (n >= sizeof(struct sbp_region_hdr) && (rnd() & 1)) {
			struct sbp_region_hdr *gh = (struct sbp_region_hdr *)g;
			memcpy(gh->magic, SBP_REGION_MAGIC, 8);
			gh->version = (rnd() & 3) ? SBP_REGION_VERSION : (uint32_t)rnd();
			gh->hdr_size = (rnd() & 3) ? 4096 : (uint32_t)rnd();
			gh->slot_size = (rnd() & 1) ? 8192 : (uint32_t)rnd();
			gh->slot_count = (uint32_t)(rnd() % 8);
			gh->region_size = (rnd() & 1) ? 4096 + (uint64_t)gh->slot_count * gh->slot_size : rnd();
			gh->nparts = (uint32_t)(rnd() % 20);
		}
		int rc = sbp_region_check(g, n, &info);
		CHECK(rc == 0 || rc == -EPROTO || rc == -EPROTONOSUPPORT);
		if (rc == 0) {
			CHECK(info.region_size <= n);
			for (uint32_t s = 0; s < info.slot_count; s++) {
				unsigned char *p = sbp_region_slot(&info, g, s);
				CHECK(p && p + info.slot_size <= g + n);
				p[0] = p[info.slot_size - 1] = 1;   /* in bounds or ASan says so */
			}
			CHECK(sbp_region_slot(&info, g, info.slot_count) == NULL);
		}
		free(g);
	}

	free(base);
}

/* --- two threads through a small ring, with futex sleeps ------------------------ */
struct xfer {
	void *slot;
	size_t slot_size;
	uint64_t total;
	uint64_t sum;           /* FNV-1a of the stream */
	uint64_t bytes;
	int err;
	volatile int stop;      /* hostile run: give up */
	pthread_barrier_t *attached;
};

static uint64_t fnv(uint64_t h, const unsigned char *p, size_t n)
{
	for (size_t i = 0; i < n; i++)
		h = (h ^ p[i]) * 0x100000001b3ULL;
	return h;
}

/* One side of the transfer: attached, the other side too, its spin set. */
static void join_transfer(struct xfer *x, struct sbp_ring *r, uint32_t spin_ns)
{
	CHECK(sbp_ring_attach(r, x->slot, x->slot_size, 9) == 0);
	pthread_barrier_wait(x->attached);
	sbp_ring_set_spin(r, spin_ns);
}

/* A wait for room or for data ends woken or timed out: either way, try again. */
static void waited(int rc)
{
	CHECK(rc == 0 || rc == -ETIMEDOUT);
}

static void *producer(void *arg)
{
	struct xfer *x = arg;
	struct sbp_ring w;
	unsigned char buf[5000];
	uint64_t h = 0xcbf29ce484222325ULL, sent = 0, seed = 1;

	join_transfer(x, &w, 2000);
	while (sent < x->total && !x->stop) {
		size_t n = 1 + (seed = seed * 6364136223846793005ULL + 1) % sizeof(buf);
		if (n > x->total - sent)
			n = (size_t)(x->total - sent);
		for (size_t i = 0; i < n; i++)
			buf[i] = (unsigned char)(sent + i) ^ (unsigned char)(seed >> 33);
		size_t off = 0;
		while (off < n && !x->stop) {
			ssize_t k = sbp_ring_write(&w, buf + off, n - off);
			if (k == -EAGAIN) {
				waited(sbp_ring_wait_writable(&w, 20000000));
				continue;
			}
			if (k < 0) {
				x->err = (int)-k;
				goto out;
			}
			h = fnv(h, buf + off, (size_t)k);
			off += (size_t)k;
			sent += (uint64_t)k;
		}
	}
	sbp_ring_close_writer(&w);
out:
	x->sum = h;
	x->bytes = sent;
	return NULL;
}

static void *consumer(void *arg)
{
	struct xfer *x = arg;
	struct sbp_ring r;
	unsigned char buf[7000];
	uint64_t h = 0xcbf29ce484222325ULL, got = 0, seed = 7;

	join_transfer(x, &r, 3000);
	while (!x->stop) {
		seed = seed * 6364136223846793005ULL + 1442695040888963407ULL;
		ssize_t k = sbp_ring_read(&r, buf, 1 + (seed >> 33) % sizeof(buf), 0);
		if (k == -EAGAIN) {
			waited(sbp_ring_wait_readable(&r, 20000000));
			continue;
		}
		if (k <= 0) {
			x->err = k < 0 ? (int)-k : 0;
			break;
		}
		h = fnv(h, buf, (size_t)k);
		got += (uint64_t)k;
	}
	x->sum = h;
	x->bytes = got;
	return NULL;
}

static void test_threads(int hostile)
{
	size_t slot_size = 4096 + 8192;
	struct xfer p = { 0 }, c = { 0 };
	pthread_t tp, tc;
	void *slot = slot_alloc(slot_size);
	pthread_barrier_t attached;

	CHECK(pthread_barrier_init(&attached, NULL, 3) == 0);
	p.attached = c.attached = &attached;
	CHECK(sbp_ring_format(slot, slot_size, 9) == 0);
	p.slot = c.slot = slot;
	p.slot_size = c.slot_size = slot_size;
	p.total = c.total = hostile ? UINT64_MAX : 48ULL << 20;
	CHECK(pthread_create(&tc, NULL, consumer, &c) == 0);
	CHECK(pthread_create(&tp, NULL, producer, &p) == 0);
	pthread_barrier_wait(&attached);
	if (hostile) {
		/* scribble on the live header for a while, then stop both sides */
		double end = now_s() + 1.0;
		while (now_s() < end) {
			scribble(slot, 8192);
			for (volatile int i = 0; i < 200; i++)
				;
		}
		p.stop = c.stop = 1;
		/* wake anyone asleep on a futex word we scribbled */
		struct sbp_ring x;
		memset(&x, 0, sizeof(x));
		sbp_ring_format(slot, slot_size, 1);
		CHECK(sbp_ring_attach(&x, slot, slot_size, 1) == 0);
		sbp_ring_reset(&x, 1);
	}
	CHECK(pthread_join(tp, NULL) == 0);
	CHECK(pthread_join(tc, NULL) == 0);
	if (!hostile) {
		CHECK(p.err == 0 && c.err == 0);
		CHECK(p.bytes == 48ULL << 20 && c.bytes == p.bytes);
		CHECK(p.sum == c.sum);
	}
	pthread_barrier_destroy(&attached);
	free(slot);
}

/* A stream whose area headers a hostile peer scribbles on while both
 * sides move between areas: every call stays inside the region (a heap
 * block of exactly its size) and returns one of its documented results. */
static void test_stream_hostile(void)
{
	uint64_t size = sbp_pair_region_size(1);
	void *base = slot_alloc(size);
	struct sbp_stream_areas areas;
	struct sbp_pair_info pi;
	struct sbp_stream w, r;
	uint64_t gen = sbp_stream_gen(3, SBP_DIR_A2P);
	int have_r = 0;

	CHECK(sbp_pair_format(base, size, 42, 1) == 0);
	CHECK(sbp_pair_check(base, size, &pi) == 0);
	CHECK(sbp_stream_areas_pair(&areas, &pi, base, 0, SBP_DIR_A2P) == 0);
	memset(&w, 0, sizeof(w));
	CHECK(sbp_stream_writer_open(&w, &areas, gen, 100) == 0);
	for (int i = 0; i < 20000; i++) {
		size_t n = rnd() % 70000;
		unsigned char *buf = malloc(n + 1);
		struct iovec iov = { buf, n };
		ssize_t k = 0;

		CHECK(buf);
		memset(buf, 0x5a, n + 1);
		if (!have_r) {
			memset(&r, 0, sizeof(r));
			have_r = sbp_stream_reader_open(&r, &areas, gen) == 0;
		}
		if (rnd() % 16 == 0) {
			/* the hostile part: any area header, any link field */
			struct sbp_ring_hdr *h = sbp_pair_area(&pi, base, 0, SBP_DIR_A2P,
							       (int)(rnd() % SBP_AREAS));
			switch (rnd() % 5) {
			case 0: h->next_kind = (uint32_t)rnd(); break;
			case 1: h->next_area = (uint32_t)(rnd() % 6); break;
			case 2: h->next_start = rnd() % 4 ? h->head : rnd(); break;
			case 3: h->flags ^= SBP_RING_LINKED; break;
			default: h->head += rnd() % 3; break;
			}
		}
		switch (rnd() % 7) {
		case 0: case 1: k = sbp_ring_write(&w.ring, buf, n); break;
		case 2: k = sbp_stream_grow(&w); break;
		case 3: k = sbp_stream_shrink(&w); break;
		case 4: case 5:
			if (have_r)
				k = sbp_stream_readv(&r, &iov, 1, rnd() & 1 ? SBP_PEEK : 0);
			break;
		default:
			if (have_r)
				k = sbp_stream_follow(&r);
		}
		CHECK(k >= 0 || k == -EAGAIN || k == -EPROTO || k == -EPIPE || k == -ECONNRESET ||
		      k == -EINVAL || k == SBP_RING_GO_NEXT);
		CHECK(k <= 70000);
		free(buf);
		if (k == -EPROTO && rnd() % 4 == 0) {   /* start over, as a reset would */
			memset(&w, 0, sizeof(w));
			CHECK(sbp_stream_writer_open(&w, &areas, gen, 100) == 0);
			have_r = 0;
		}
	}
	free(base);
}

int main(void)
{
	test_basic();
	printf("basic ok\n");
	test_hostile();
	test_stream_hostile();
	printf("hostile ok\n");
	test_region();
	printf("region ok\n");
	test_threads(0);
	printf("threads ok\n");
	test_threads(1);
	printf("hostile threads ok\n");
	printf("ring_asan: ok\n");
	return 0;
}
