/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * sbp-ringbench: the raw ring, no sockets: the physical limit the bench
 * compares every transport against.
 *
 * Two processes (fork) share one region (native/region.c) holding two rings
 * (native/ring.c), slot 0 for A -> B and slot 1 for B -> A, and use the same
 * calls the interposer uses: sbp_ring_write/read and sbp_ring_wait_* (bounded
 * adaptive spin, then a futex sleep).
 *
 * Usage
 *   sbp-ringbench [--mode rtt|stream|self] [--size BYTES] [--iters N] [--warmup N]
 *                 [--bytes N] [--warmup-bytes N] [--cpu-a N] [--cpu-b M]
 *                 [--region anon|posix] [--slot-size BYTES] [--spin-ns NS]
 *
 *   --mode rtt        ping-pong: A sends --size bytes, B echoes them, A waits
 *                     for all of them. --iters round trips (default 100000)
 *                     after --warmup (default 10000). Reports p50/p99/p999,
 *                     mean, min, max in ns per round trip.
 *   --mode stream     A sends --bytes (default 1 GiB) in --size byte writes
 *                     (default 65536) after --warmup-bytes (default 64 MiB);
 *                     B reads with a --size buffer and acknowledges the end.
 *                     Reports GB/s (1e9 bytes/s, key "gbps", as sbp-pingpong)
 *                     and Gbit/s.
 *   --mode self       one process, one ring: --iters times (default 100000)
 *                     a write and a read of --size bytes after --warmup;
 *                     reports "ns_per_pair": the ring calls' cost with
 *                     nothing to wait for (sbp-pingpong self is the same
 *                     through sockets).
 *   --size BYTES      message size (default 64 for rtt, 65536 for stream);
 *                     rtt needs size <= ring capacity.
 *   --cpu-a N         pin A (the measuring side) to CPU N (default: unpinned)
 *   --cpu-b M         pin B to CPU M
 *   --region anon     anonymous MAP_SHARED mapping inherited by fork (default)
 *   --region posix    POSIX shm segment /sbp-ringbench-<pid>; B unmaps the
 *                     inherited mapping and maps it again by name; unlinked
 *                     at the end
 *   --slot-size BYTES slot size (default 4 KiB + 256 KiB, the shm tier's: a 256 KiB ring)
 *   --spin-ns NS      upper bound of the adaptive spin before sleeping
 *                     (default: the ring's, 30000; 0 = sleep at once)
 *
 * Output: ONE JSON line on stdout, e.g.
 *   {"tool": "sbp-ringbench", "op": "rtt", "size": 64, "iters": 100000, ...,
 *    "p50_ns": 410, "p99_ns": 900, "p999_ns": 4000, "mean_ns": ..., "min_ns": ...,
 *    "max_ns": ..., "wall_s": ..., "cpu_a_s": ..., "cpu_b_s": ..., "cpu_s": ...,
 *    "cpu_ns_per_op": ..., "cpu_a": 0, "cpu_b": 1, "region": "anon",
 *    "spin_ns": 30000, "capacity": 1048576}
 * CPU seconds are getrusage(RUSAGE_SELF) user+system of each process over
 * the measured window only (B reports its own through a shared page).
 * Exit status 0 on success, 1 with a message on stderr otherwise.
 */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "region.h"
#include "ring.h"
#include "sys.h"
#include "tool.h"

struct opts {
	int stream, self;
	uint64_t size, iters, warmup, bytes, warmup_bytes;
	int cpu_a, cpu_b;
	int posix;              /* --region posix */
	uint64_t slot_size;
	int64_t spin_ns;
};

/* Shared control page (not part of the rings): B's CPU time and status. */
struct control {
	volatile uint64_t b_cpu_ns;
	volatile int b_done;
	volatile int b_mapped;
	volatile int b_err;
	char b_msg[200];
};

static void fail(const char *fmt, const char *arg)
{
	fprintf(stderr, "sbp-ringbench: ");
	fprintf(stderr, fmt, arg);
	fprintf(stderr, "\n");
	exit(1);
}

static uint64_t cpu_ns(void)
{
	struct rusage ru;

	getrusage(RUSAGE_SELF, &ru);
	return (uint64_t)(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) * 1000000000u +
	       (uint64_t)(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) * 1000u;
}

static void pin(int cpu)
{
	if (pin_to_cpu(cpu) < 0)
		fail("cannot pin to CPU %s", strerror(errno));
}

static uint64_t num(const char *s, const char *what)
{
	char *end;
	unsigned long long v;

	errno = 0;
	v = strtoull(s, &end, 0);
	if (errno || *end || end == s)
		fail("bad number for %s", what);
	return v;
}

/* Blocking helpers over the non-blocking ring calls. A wait that times out
 * (10 s) means the other process is gone or stuck. */
static void send_all(struct sbp_ring *r, const char *buf, uint64_t n)
{
	uint64_t off = 0;

	while (off < n) {
		ssize_t k = sbp_ring_write(r, buf + off, n - off);

		if (k > 0) {
			off += (uint64_t)k;
		} else if (k == -EAGAIN) {
			if (sbp_ring_wait_writable(r, 10000000000LL) == -ETIMEDOUT)
				fail("%s", "peer stopped reading");
		} else {
			fail("write: %s", strerror((int)-k));
		}
	}
}

static void recv_all(struct sbp_ring *r, char *buf, uint64_t n)
{
	uint64_t off = 0;

	while (off < n) {
		ssize_t k = sbp_ring_read(r, buf + off, n - off, 0);

		if (k > 0) {
			off += (uint64_t)k;
		} else if (k == -EAGAIN) {
			if (sbp_ring_wait_readable(r, 10000000000LL) == -ETIMEDOUT)
				fail("%s", "peer stopped writing");
		} else {
			fail("read: %s", k == 0 ? "unexpected EOF" : strerror((int)-k));
		}
	}
}

/* Read and discard n bytes in reads of at most chunk bytes. */
static void drain(struct sbp_ring *r, char *buf, uint64_t chunk, uint64_t n)
{
	while (n) {
		ssize_t k = sbp_ring_read(r, buf, n < chunk ? n : chunk, 0);

		if (k > 0) {
			n -= (uint64_t)k;
		} else if (k == -EAGAIN) {
			if (sbp_ring_wait_readable(r, 10000000000LL) == -ETIMEDOUT)
				fail("%s", "peer stopped writing");
		} else {
			fail("read: %s", k == 0 ? "unexpected EOF" : strerror((int)-k));
		}
	}
}

static void attach(struct sbp_ring *r, void *base, const struct sbp_region_info *info,
		   uint32_t slot, const struct opts *o)
{
	void *p = sbp_region_slot(info, base, slot);
	int rc;

	if (!p || (rc = sbp_ring_attach(r, p, info->slot_size, 1)) != 0)
		fail("%s", "cannot attach a ring");
	if (o->spin_ns >= 0)
		sbp_ring_set_spin(r, (uint32_t)o->spin_ns);
}

static void side_b(void *base, const struct sbp_region_info *info, const struct opts *o,
		   struct control *ctl)
{
	struct sbp_ring in, out;
	char *buf = malloc(o->size);
	uint64_t c0;

	if (!buf)
		fail("%s", "out of memory");
	attach(&in, base, info, 0, o);
	attach(&out, base, info, 1, o);
	if (!o->stream) {
		for (uint64_t i = 0; i < o->warmup; i++) {
			recv_all(&in, buf, o->size);
			send_all(&out, buf, o->size);
		}
		c0 = cpu_ns();
		for (uint64_t i = 0; i < o->iters; i++) {
			recv_all(&in, buf, o->size);
			send_all(&out, buf, o->size);
		}
	} else {
		drain(&in, buf, o->size, o->warmup_bytes);
		send_all(&out, "w", 1);             /* warm-up done */
		c0 = cpu_ns();
		drain(&in, buf, o->size, o->bytes);
		send_all(&out, "e", 1);             /* all received */
	}
	ctl->b_cpu_ns = cpu_ns() - c0;
	__atomic_thread_fence(__ATOMIC_SEQ_CST);
	ctl->b_done = 1;
	free(buf);
}

static int cmp_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;

	return x < y ? -1 : x > y;
}

/* The command line into *o (exits on a bad one; 0 after --help). */
static void parse_opts(int argc, char **argv, struct opts *o)
{
	static const struct option longopts[] = {
		{ "mode", required_argument, 0, 'm' }, { "size", required_argument, 0, 's' },
		{ "iters", required_argument, 0, 'i' }, { "warmup", required_argument, 0, 'w' },
		{ "bytes", required_argument, 0, 'b' }, { "warmup-bytes", required_argument, 0, 'W' },
		{ "cpu-a", required_argument, 0, 'A' }, { "cpu-b", required_argument, 0, 'B' },
		{ "region", required_argument, 0, 'r' }, { "slot-size", required_argument, 0, 'S' },
		{ "spin-ns", required_argument, 0, 'p' }, { "help", no_argument, 0, 'h' },
		{ 0, 0, 0, 0 } };
	int c, have_size = 0;

	while ((c = getopt_long(argc, argv, "h", longopts, NULL)) != -1) {
		switch (c) {
		case 'm':
			if (strcmp(optarg, "rtt") && strcmp(optarg, "stream") && strcmp(optarg, "self"))
				fail("--mode is rtt, stream or self, not %s", optarg);
			o->stream = !strcmp(optarg, "stream");
			o->self = !strcmp(optarg, "self");
			break;
		case 's': o->size = num(optarg, "--size"); have_size = 1; break;
		case 'i': o->iters = num(optarg, "--iters"); break;
		case 'w': o->warmup = num(optarg, "--warmup"); break;
		case 'b': o->bytes = num(optarg, "--bytes"); break;
		case 'W': o->warmup_bytes = num(optarg, "--warmup-bytes"); break;
		case 'A': o->cpu_a = (int)num(optarg, "--cpu-a"); break;
		case 'B': o->cpu_b = (int)num(optarg, "--cpu-b"); break;
		case 'r':
			/* shm: the posix backend's old name */
			if (strcmp(optarg, "anon") && strcmp(optarg, "posix") && strcmp(optarg, "shm"))
				fail("--region is anon or posix, not %s", optarg);
			o->posix = strcmp(optarg, "anon") != 0;
			break;
		case 'S': o->slot_size = num(optarg, "--slot-size"); break;
		case 'p': o->spin_ns = (int64_t)num(optarg, "--spin-ns"); break;
		default:
			fprintf(stderr, "usage: see the comment at the top of native/tools/sbp-ringbench.c\n");
			exit(c == 'h' ? 0 : 1);
		}
	}
	if (!have_size)
		o->size = o->stream ? 65536 : 64;
	if (o->size == 0 || o->size > (1u << 30) || o->iters == 0 || o->bytes == 0)
		fail("%s", "--size, --iters and --bytes must be positive");
	if (o->slot_size > SBP_REGION_MAX_SLOT)
		fail("%s", "--slot-size too large");
}

/* The region (header + two slots, size bytes), both rings formatted; for
 * --region posix a segment named name. */
static void *make_region(const struct opts *o, size_t size, const char *name,
			 struct sbp_region_info *info)
{
	void *base;

	if (o->posix) {
		int fd = shm_open(name, O_RDWR | O_CREAT | O_EXCL, 0600);

		if (fd < 0 || ftruncate(fd, (off_t)size) < 0)
			fail("posix shm segment: %s", strerror(errno));
		base = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	} else {
		base = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	}
	if (base == MAP_FAILED)
		fail("mmap: %s", strerror(errno));
	if (sbp_region_format(base, size, (uint32_t)o->slot_size, 1) != 0 ||
	    sbp_region_check(base, size, info) != 0)
		fail("%s", "bad --slot-size (a multiple of 4096, at least 8192)");
	if (!o->stream && o->size > info->ring_capacity)
		fail("%s", "rtt --size must not exceed the ring capacity (raise --slot-size)");
	for (uint32_t s = 0; s < 2; s++)
		sbp_ring_format(sbp_region_slot(info, base, s), info->slot_size, 1);
	return base;
}

/* Side B in the forked child: --region posix maps the segment again by
 * name (a mapping of its own), then echoes (side_b). Does not return. */
static void run_b(void *base, size_t size, const char *name, struct sbp_region_info *info,
		  const struct opts *o, struct control *ctl)
{
	alarm(600);
	pin(o->cpu_b);
	if (o->posix) {
		int f;

		munmap(base, size);
		f = shm_open(name, O_RDWR, 0);
		base = f < 0 ? MAP_FAILED : mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, f, 0);
		if (base == MAP_FAILED)
			fail("B: map posix shm: %s", strerror(errno));
		close(f);
		if (sbp_region_check(base, size, info) != 0)
			fail("%s", "B: bad region header");
	}
	ctl->b_mapped = 1;
	side_b(base, info, o, ctl);
	_exit(0);
}

/* total bytes from buf in writes of at most chunk. */
static void send_bytes(struct sbp_ring *out, char *buf, uint64_t total, uint64_t chunk)
{
	for (uint64_t left = total; left; ) {
		uint64_t n = left < chunk ? left : chunk;

		send_all(out, buf, n);
		left -= n;
	}
}

/* What side A measured. */
struct result {
	uint64_t t0, t1, c0, c1, ops;
	uint64_t *samples;      /* rtt: one round trip each */
};

/* Side A: round trips of o->size bytes (rtt), or o->bytes streamed to B
 * and one byte back (stream); warm-ups first. */
static void run_a(struct sbp_ring *out, struct sbp_ring *in, const struct opts *o,
		  char *buf, struct result *res)
{
	char ack;

	if (!o->stream) {
		for (uint64_t i = 0; i < o->warmup; i++) {
			send_all(out, buf, o->size);
			recv_all(in, buf, o->size);
		}
		res->c0 = cpu_ns();
		res->t0 = now_ns();
		uint64_t prev = res->t0;
		for (uint64_t i = 0; i < o->iters; i++) {
			send_all(out, buf, o->size);
			recv_all(in, buf, o->size);
			uint64_t t = now_ns();
			res->samples[i] = t - prev;
			prev = t;
		}
		res->t1 = prev;
		res->c1 = cpu_ns();
		res->ops = o->iters;
		return;
	}
	send_bytes(out, buf, o->warmup_bytes, o->size);
	recv_all(in, &ack, 1);
	res->c0 = cpu_ns();
	res->t0 = now_ns();
	send_bytes(out, buf, o->bytes, o->size);
	recv_all(in, &ack, 1);
	res->t1 = now_ns();
	res->c1 = cpu_ns();
	res->ops = (o->bytes + o->size - 1) / o->size;
}

/* --mode self: a writer's and a reader's view of slot 0, in this process. */
static int run_self(void *base, const struct sbp_region_info *info, const struct opts *o)
{
	struct sbp_ring w, r;
	char *buf = calloc(1, o->size);
	uint64_t t0;

	if (!buf)
		fail("%s", "out of memory");
	pin(o->cpu_a);
	attach(&w, base, info, 0, o);
	attach(&r, base, info, 0, o);
	for (uint64_t i = 0; i < o->warmup; i++) {
		send_all(&w, buf, o->size);
		recv_all(&r, buf, o->size);
	}
	t0 = now_ns();
	for (uint64_t i = 0; i < o->iters; i++) {
		send_all(&w, buf, o->size);
		recv_all(&r, buf, o->size);
	}
	printf("{\"tool\": \"sbp-ringbench\", \"op\": \"self\", \"size\": %" PRIu64 ", \"iters\": %" PRIu64
	       ", \"ns_per_pair\": %.1f}\n", o->size, o->iters, (double)(now_ns() - t0) / (double)o->iters);
	free(buf);
	return 0;
}

/* One JSON line on stdout. */
static void report(const struct opts *o, struct result *res, uint64_t b_cpu_ns, uint64_t capacity)
{
	double wall_s = (double)(res->t1 - res->t0) / 1e9;
	double cpu_a = (double)(res->c1 - res->c0) / 1e9, cpu_b = (double)b_cpu_ns / 1e9;
	uint64_t *samples = res->samples;

	printf("{\"tool\": \"sbp-ringbench\", \"op\": \"%s\", \"size\": %" PRIu64, o->stream ? "stream" : "rtt", o->size);
	if (!o->stream) {
		double sum = 0;
		for (uint64_t i = 0; i < o->iters; i++)
			sum += (double)samples[i];
		qsort(samples, o->iters, sizeof(*samples), cmp_u64);
#define PCT(p) samples[(uint64_t)((double)(o->iters - 1) * (p))]
		printf(", \"iters\": %" PRIu64 ", \"warmup\": %" PRIu64 ", \"p50_ns\": %" PRIu64
		       ", \"p99_ns\": %" PRIu64 ", \"p999_ns\": %" PRIu64 ", \"mean_ns\": %.1f"
		       ", \"min_ns\": %" PRIu64 ", \"max_ns\": %" PRIu64,
		       o->iters, o->warmup, PCT(0.50), PCT(0.99), PCT(0.999), sum / (double)o->iters,
		       samples[0], samples[o->iters - 1]);
#undef PCT
	} else {
		printf(", \"bytes\": %" PRIu64 ", \"warmup_bytes\": %" PRIu64 ", \"gbps\": %.4f, \"gbit_s\": %.3f",
		       o->bytes, o->warmup_bytes, (double)o->bytes / wall_s / 1e9, (double)o->bytes * 8 / wall_s / 1e9);
	}
	printf(", \"wall_s\": %.6f, \"cpu_a_s\": %.6f, \"cpu_b_s\": %.6f, \"cpu_s\": %.6f"
	       ", \"cpu_ns_per_op\": %.1f, \"cpu_a\": %d, \"cpu_b\": %d, \"region\": \"%s\""
	       ", \"spin_ns\": %" PRId64 ", \"capacity\": %" PRIu64 "}\n",
	       wall_s, cpu_a, cpu_b, cpu_a + cpu_b, (cpu_a + cpu_b) * 1e9 / (double)res->ops,
	       o->cpu_a, o->cpu_b, o->posix ? "posix" : "anon",
	       o->spin_ns >= 0 ? o->spin_ns : (int64_t)SBP_RING_SPIN_DEFAULT_NS, capacity);
}

int main(int argc, char **argv)
{
	struct opts o = { .cpu_a = -1, .cpu_b = -1, .iters = 100000, .warmup = 10000,
			  .bytes = 1ULL << 30, .warmup_bytes = 64ULL << 20,
			  .slot_size = SBP_SLOT_SIZE_DEFAULT, .spin_ns = -1 };
	struct sbp_region_info info;
	struct result res = { 0 };
	struct sbp_ring out, in;
	char name[64] = "";
	size_t size;
	void *base;
	char *buf;
	int status;

	parse_opts(argc, argv, &o);
	size = SBP_REGION_HDR_SIZE + 2 * o.slot_size;
	snprintf(name, sizeof(name), "/sbp-ringbench-%d", (int)getpid());
	base = make_region(&o, size, name, &info);
	if (o.self)
		return run_self(base, &info, &o);
	struct control *ctl = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	if (ctl == MAP_FAILED)
		fail("mmap: %s", strerror(errno));

	pid_t pid = fork();
	if (pid < 0)
		fail("fork: %s", strerror(errno));
	if (pid == 0)
		run_b(base, size, name, &info, &o, ctl);
	alarm(600);
	pin(o.cpu_a);
	if (o.posix) {   /* once B has its own mapping, the name can go */
		while (!ctl->b_mapped && waitpid(pid, NULL, WNOHANG) == 0)
			usleep(100);
		shm_unlink(name);
	}

	buf = malloc(o.size);
	res.samples = o.stream ? NULL : malloc(o.iters * sizeof(uint64_t));
	if (!buf || (!o.stream && !res.samples))
		fail("%s", "out of memory");
	memset(buf, 0x5a, o.size);
	attach(&out, base, &info, 0, &o);
	attach(&in, base, &info, 1, &o);
	run_a(&out, &in, &o, buf, &res);

	if (waitpid(pid, &status, 0) < 0 || !WIFEXITED(status) || WEXITSTATUS(status) || !ctl->b_done)
		fail("%s", "side B failed");
	report(&o, &res, ctl->b_cpu_ns, info.ring_capacity);
	free(buf);
	free(res.samples);
	return 0;
}
