// SPDX-License-Identifier: GPL-2.0-only
/* client.c: sbp-pingpong's client: rtt, stream and connrate measurements,
 * from the command line or commands on stdin, one JSON line each. */
#include <errno.h>
#include <inttypes.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "pingpong.h"

struct window {
	uint64_t t0, u0, s0;
	struct machine m0;
};

static void window_start(struct window *w)
{
	w->m0 = machine_now();
	cpu_ns(&w->u0, &w->s0);
	w->t0 = now_ns();
}

/* Prints the fields every result shares: wall, both CPU figures, machine. */
static void window_end(const struct window *w, const struct stats *st, double *wall_s, char *out, size_t n)
{
	uint64_t t1 = now_ns(), u1, s1;
	cpu_ns(&u1, &s1);
	struct machine m1 = machine_now();
	*wall_s = (double)(t1 - w->t0) / 1e9;
	double ccpu = (double)((u1 - w->u0) + (s1 - w->s0)) / 1e9;
	double scpu = st ? (double)(st->cpu_user_ns + st->cpu_sys_ns) / 1e9 : -1.0;
	int ok = w->m0.ok && m1.ok;
	snprintf(out, n,
		 "\"wall_s\": %.6f, \"client_cpu_s\": %.6f, \"server_cpu_s\": %.6f, "
		 "\"machine_busy_s\": %.3f, \"machine_steal_s\": %.3f, \"ncpu\": %ld, "
		 "\"client_cpu\": %d, \"spurious_eagain\": %lu",
		 *wall_s, ccpu, scpu, ok ? m1.busy - w->m0.busy : -1.0,
		 ok ? m1.steal - w->m0.steal : -1.0, sysconf(_SC_NPROCESSORS_ONLN),
		 sched_getcpu(), spurious_eagain);
}

static void send_hello(int fd, uint16_t op, uint32_t size, uint64_t count)
{
	struct hello h = {.magic = HELLO_MAGIC, .version = PROTO_VERSION, .op = op,
			  .size = size, .count = count};
	send_all(fd, &h, sizeof(h));
}

static void recv_stats(int fd, struct stats *st)
{
	if (!recv_all(fd, st, sizeof(*st)) || st->magic != STATS_MAGIC)
		fail("server did not answer with stats (is it `sbp-pingpong server`?)");
}

/* count round trips; if samples != NULL store each one. Returns wall ns. */
static uint64_t rtt_op(int fd, char *buf, uint32_t size, uint64_t count, uint64_t *samples,
		       struct stats *st)
{
	send_hello(fd, OP_RTT, size, count);
	uint64_t start = now_ns(), prev = start;
	for (uint64_t i = 0; i < count; i++) {
		send_all(fd, buf, size);
		if (!recv_all(fd, buf, size))
			fail("server closed during rtt");
		if (samples) {
			uint64_t t = now_ns();
			samples[i] = t - prev;
			prev = t;
		}
	}
	uint64_t wall = now_ns() - start;
	recv_stats(fd, st);
	return wall;
}

/* Pace of earlier runs on this connection, per message size, so each
 * repetition lasts about the requested time even when a short warm-up ran
 * faster or slower than the steady state. */
struct pace { uint32_t op, size; double per_unit_ns; };
static struct pace paces[16];

static struct pace *pace_for(uint32_t op, uint32_t size)
{
	for (size_t i = 0; i < sizeof(paces) / sizeof(paces[0]); i++) {
		if (paces[i].size == 0) {
			paces[i].op = op;
			paces[i].size = size;
			return &paces[i];
		}
		if (paces[i].op == op && paces[i].size == size)
			return &paces[i];
	}
	return &paces[0]; /* table full: share a slot, only the sizing suffers */
}

static void cmd_rtt(int fd, uint32_t size, uint64_t iters, double duration, uint64_t warmup)
{
	struct stats st;
	struct pace *pace = pace_for(OP_RTT, size);
	char *buf = calloc(1, size);
	if (!buf)
		fail("out of memory");
	if (warmup == 0 && iters == 0 && pace->per_unit_ns == 0)
		warmup = 100; /* need a pace to size the run from */
	uint64_t wall = warmup ? rtt_op(fd, buf, size, warmup, NULL, &st) : 0;
	if (iters == 0) {
		double per = pace->per_unit_ns > 0 ? pace->per_unit_ns : (double)wall / (double)warmup;
		iters = (uint64_t)(duration * 1e9 / (per > 1 ? per : 1));
		if (iters < 200)
			iters = 200;
	}
	if (iters > MAX_RTT_SAMPLES)
		iters = MAX_RTT_SAMPLES;
	uint64_t *samples = malloc(iters * sizeof(*samples));
	if (!samples)
		fail("out of memory");

	struct window w;
	double wall_s;
	char common[512];
	window_start(&w);
	/* The per-sample timing starts at the first send, after the hello. */
	wall = rtt_op(fd, buf, size, iters, samples, &st);
	window_end(&w, &st, &wall_s, common, sizeof(common));
	pace->per_unit_ns = (double)wall / (double)iters;

	double sum = 0;
	for (uint64_t i = 0; i < iters; i++)
		sum += (double)samples[i];
	qsort(samples, iters, sizeof(*samples), cmp_u64);
#define PCT(p) samples[(uint64_t)((double)(iters - 1) * (p))]
	printf("{\"op\": \"rtt\", \"size\": %u, \"iters\": %" PRIu64 ", \"warmup\": %" PRIu64
	       ", \"p50_ns\": %" PRIu64 ", \"p99_ns\": %" PRIu64 ", \"p999_ns\": %" PRIu64
	       ", \"mean_ns\": %.1f, \"min_ns\": %" PRIu64 ", \"max_ns\": %" PRIu64 ", %s}\n",
	       size, iters, warmup, PCT(0.50), PCT(0.99), PCT(0.999), sum / (double)iters,
	       samples[0], samples[iters - 1], common);
#undef PCT
	fflush(stdout);
	free(samples);
	free(buf);
}

/* Returns wall ns for sending count bytes and getting the server's stats. */
static uint64_t stream_op(int fd, char *buf, uint32_t size, uint64_t count, struct stats *st)
{
	uint64_t start = now_ns(), left = count;
	send_hello(fd, OP_STREAM, size, count);
	while (left > 0) {
		size_t n = left < size ? (size_t)left : size;
		send_all(fd, buf, n);
		left -= n;
	}
	recv_stats(fd, st);
	return now_ns() - start;
}

static void cmd_stream(int fd, uint32_t size, uint64_t bytes, double duration, uint64_t warmup)
{
	struct stats st;
	struct pace *pace = pace_for(OP_STREAM, size);
	char *buf = malloc(size);
	if (!buf)
		fail("out of memory");
	memset(buf, 0x5a, size);
	if (warmup == 0 && bytes == 0) {
		/* A quarter of the run, at least 16 MiB: enough to get past what the
		 * socket buffers absorb at once. */
		warmup = 16u << 20;
		if (pace->per_unit_ns > 0 && duration * 0.25e9 / pace->per_unit_ns > (double)warmup)
			warmup = (uint64_t)(duration * 0.25e9 / pace->per_unit_ns);
	}
	if (warmup && warmup < size)
		warmup = size;
	uint64_t wall = warmup ? stream_op(fd, buf, size, warmup, &st) : 0;
	if (bytes == 0) {
		double per = pace->per_unit_ns > 0 ? pace->per_unit_ns : (double)wall / (double)warmup;
		bytes = (uint64_t)(duration * 1e9 / (per > 0 ? per : 1));
		if (bytes < 4ull * size)
			bytes = 4ull * size;
	}
	struct window w;
	double wall_s;
	char common[512];
	window_start(&w);
	wall = stream_op(fd, buf, size, bytes, &st);
	window_end(&w, &st, &wall_s, common, sizeof(common));
	pace->per_unit_ns = (double)wall / (double)bytes;
	if (st.bytes != bytes)
		fail("server counted a different number of bytes");
	printf("{\"op\": \"stream\", \"size\": %u, \"bytes\": %" PRIu64 ", \"gbps\": %.4f, %s}\n",
	       size, bytes, (double)bytes / wall_s / 1e9, common);
	fflush(stdout);
	free(buf);
}

/* connect, one 64 B exchange, close. Works against `server` (OP_PING hello)
 * and against `echo` (it echoes the 64 bytes). */
static void cmd_connrate(const struct addr *a, uint64_t count, double duration)
{
	uint64_t cap = count ? count : 2000000, n = 0;
	uint64_t *samples = malloc(cap * sizeof(*samples));
	if (!samples)
		fail("out of memory");
	struct hello h = {.magic = HELLO_MAGIC, .version = PROTO_VERSION, .op = OP_PING, .size = 64};
	struct hello back;
	struct window w;
	double wall_s;
	char common[512];
	uint64_t end = duration > 0 ? now_ns() + (uint64_t)(duration * 1e9) : 0;
	window_start(&w);
	while (n < cap) {
		uint64_t t0 = now_ns();
		if (end && t0 >= end)
			break;
		int fd = connect_to(a);
		send_all(fd, &h, sizeof(h));
		if (!recv_all(fd, &back, sizeof(back)) || memcmp(&h, &back, sizeof(h)) != 0)
			fail("connrate: the server did not echo the 64 B message");
		close(fd);
		samples[n++] = now_ns() - t0;
	}
	window_end(&w, NULL, &wall_s, common, sizeof(common));
	if (n == 0)
		fail("connrate: no connection made");
	qsort(samples, n, sizeof(*samples), cmp_u64);
	printf("{\"op\": \"connrate\", \"count\": %" PRIu64 ", \"conns_per_s\": %.1f, \"p50_ns\": %" PRIu64
	       ", \"p99_ns\": %" PRIu64 ", %s}\n",
	       n, (double)n / wall_s, samples[(n - 1) / 2], samples[(uint64_t)((double)(n - 1) * 0.99)], common);
	fflush(stdout);
	free(samples);
}

int run_client(const char *addr_text, const char *mode, uint32_t size, uint64_t iters,
		      double duration, long long warmup, uint64_t bytes, int reps, int use_stdin, int hold)
{
	struct addr a;
	parse_addr(addr_text, &a);
	pin_cpu(opt_cpu);
	signal(SIGPIPE, SIG_IGN);
	int fd = -1;

	if (use_stdin) {
		char line[256];
		while (fgets(line, sizeof(line), stdin)) {
			char op[32];
			unsigned long long sz = 0, wu = 0;
			double secs = 0;
			int k = sscanf(line, "%31s %llu %lf %llu", op, &sz, &secs, &wu);
			if (k < 1)
				continue;
			if (strcmp(op, "quit") == 0)
				break;
			if (strcmp(op, "connrate") == 0) {
				if (sscanf(line, "%31s %lf", op, &secs) != 2 || secs <= 0)
					fail("usage: connrate SECONDS");
				/* A one-at-a-time server must be free to accept. */
				if (fd >= 0)
					close(fd);
				fd = -1;
				cmd_connrate(&a, 0, secs);
				continue;
			}
			if (k < 3 || sz == 0 || sz > MAX_SIZE || secs <= 0)
				fail("usage: rtt SIZE SECONDS [WARMUP] | stream SIZE SECONDS | connrate SECONDS | quit");
			if (fd < 0)
				fd = connect_to(&a);
			if (strcmp(op, "rtt") == 0)
				cmd_rtt(fd, (uint32_t)sz, 0, secs, k >= 4 ? wu : 1000);
			else if (strcmp(op, "stream") == 0)
				cmd_stream(fd, (uint32_t)sz, 0, secs, 0);
			else
				fail("unknown command on stdin");
		}
		hold = 0; /* stdin is already at EOF (or quit) */
	} else {
		for (int r = 0; r < reps; r++) {
			if (strcmp(mode, "connrate") == 0) {
				cmd_connrate(&a, iters, iters ? 0 : duration);
				continue;
			}
			if (fd < 0)
				fd = connect_to(&a);
			if (strcmp(mode, "rtt") == 0)
				cmd_rtt(fd, size, iters, duration, warmup < 0 ? 1000 : (uint64_t)warmup);
			else
				cmd_stream(fd, size, bytes, duration, warmup < 0 ? 0 : (uint64_t)warmup);
		}
	}
	if (hold) {
		char c[256];
		while (fread(c, 1, sizeof(c), stdin) > 0)
			;
	}
	if (fd >= 0)
		close(fd);
	return 0;
}
