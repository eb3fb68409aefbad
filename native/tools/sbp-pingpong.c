/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * sbp-pingpong: a plain socket ping-pong / stream / echo program.
 *
 * It is the "unmodified application" of the benchmark: it uses only socket,
 * bind, listen, accept, connect, send, recv, shutdown and close, so it runs
 * the same on loopback TCP, a Unix stream socket, under the kernel tier
 * (`shmbypass run --tier kernel -- sbp-pingpong ...`) and under the LD_PRELOAD
 * shm tier, and the numbers compare like with like.
 *
 * Usage
 *   sbp-pingpong server ADDR [--cpu N] [--poll[=US]] [--once] [--threads]
 *                            [--stats-file PATH]
 *   sbp-pingpong echo   ADDR [same options as server]
 *   sbp-pingpong client ADDR [--cpu N] [--poll[=US]] [--stdin] [--hold]
 *                            [--mode rtt|stream|connrate] [--size BYTES]
 *                            [--iters N | --duration SEC] [--warmup N]
 *                            [--bytes N] [--reps N]
 *
 * ADDR is HOST:PORT (IPv4 or a name), [V6ADDR]:PORT, unix:/path or unix:@abstract.
 * A server on port 0 picks a free port. Every server prints one JSON line on
 * stdout once it listens: {"listening": "127.0.0.1:40123"}.
 *
 * Server modes
 *   server  speaks the bench protocol below (rtt, stream, ping ops);
 *   echo    sends back whatever it receives (for connrate and app tests).
 *   --once         exit after the first connection closes
 *   --threads      one thread per connection (default: one at a time)
 *   --stats-file   on exit (SIGINT/SIGTERM or --once) write JSON with the
 *                  server's CPU seconds, connections and bytes
 *
 * Client
 *   --mode rtt       ping-pong of --size bytes (default 64); --iters N, or
 *                    --duration SEC (iterations sized from the warm-up).
 *                    Prints p50/p99/p999/mean/min/max ns per round trip.
 *   --mode stream    one-way stream of --size byte sends (default 65536) for
 *                    --bytes N or --duration SEC; prints GB/s (1e9 bytes/s).
 *   --mode connrate  connect, one 64 B exchange, close, for --iters N
 *                    connections or --duration SEC; prints connections/s.
 *   --warmup N       rtt: warm-up round trips before each measurement
 *                    (default 1000); stream: warm-up bytes (default 16 MiB)
 *   --reps N         repeat the measurement N times on the same connection,
 *                    one JSON line each
 *   --stdin          read commands from stdin instead, one per line, run each
 *                    on the same connection and print one JSON line per command:
 *                      rtt SIZE SECONDS [WARMUP_ITERS]
 *                      stream SIZE SECONDS
 *                      connrate SECONDS
 *                      quit
 *   --hold           after the last measurement, keep the connection open until
 *                    stdin reaches EOF (lets a caller inspect the live connection)
 *
 * Common
 *   --cpu N          pin this process to CPU N (sched_setaffinity)
 *   --poll[=US]      busy-poll recv(MSG_DONTWAIT) for up to US microseconds
 *                    (default 50) before a blocking recv
 *
 * Every JSON result carries the client's and the server's CPU seconds over the
 * measured window (getrusage; the server sends its figure back in-band) and
 * the machine's busy and steal time over the same window (/proc/stat), so the
 * caller can tell when other processes were using the CPU.
 *
 * Bench protocol (server mode): the client sends a 64-byte hello naming one
 * op; the server performs it and answers with a 64-byte stats block. Many ops
 * may follow on one connection; EOF ends it.
 *   OP_RTT:    count round trips of `size` bytes each way
 *   OP_STREAM: the client sends `count` bytes; the server reads them all
 *   OP_PING:   the hello itself is the 64 B request; the server echoes it
 *              (no stats block), used for connection-rate runs
 */
#include <errno.h>
#include <getopt.h>
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

#include "sys.h"
#include "tool.h"

#define HELLO_MAGIC 0x50504253u /* "SBPP" little-endian */
#define STATS_MAGIC 0x54534253u /* "SBST" */
#define PROTO_VERSION 1
#define OP_RTT 1
#define OP_STREAM 2
#define OP_PING 3
#define MAX_SIZE (64u << 20)
#define MAX_RTT_SAMPLES (20u * 1000 * 1000)

struct hello {
	uint32_t magic;
	uint16_t version;
	uint16_t op;
	uint32_t size;
	uint32_t flags;
	uint64_t count;
	uint8_t pad[40];
};

struct stats {
	uint32_t magic;
	uint32_t pad0;
	uint64_t cpu_user_ns;
	uint64_t cpu_sys_ns;
	uint64_t wall_ns;
	uint64_t bytes;
	uint8_t pad[24];
};

_Static_assert(sizeof(struct hello) == 64, "hello is 64 bytes on the wire");
_Static_assert(sizeof(struct stats) == 64, "stats is 64 bytes on the wire");

static int opt_cpu = -1;
static long opt_poll_us = -1; /* < 0: never poll */
static volatile sig_atomic_t stop_flag;

/* ---------------------------------------------------------------- utils */

static void die(const char *what)
{
	fprintf(stderr, "sbp-pingpong: %s: %s\n", what, strerror(errno));
	exit(1);
}

static void fail(const char *msg)
{
	fprintf(stderr, "sbp-pingpong: %s\n", msg);
	exit(1);
}

static void cpu_ns(uint64_t *user, uint64_t *sys)
{
	struct rusage ru;
	getrusage(RUSAGE_SELF, &ru);
	*user = (uint64_t)ru.ru_utime.tv_sec * 1000000000ull + (uint64_t)ru.ru_utime.tv_usec * 1000ull;
	*sys = (uint64_t)ru.ru_stime.tv_sec * 1000000000ull + (uint64_t)ru.ru_stime.tv_usec * 1000ull;
}

/* Machine-wide CPU from /proc/stat, in seconds: busy = user+nice+system
 * (irq/softirq are left out: with IRQ time accounting they are charged to no
 * process, so they would look like somebody else's work), steal separately. */
struct machine { double busy, steal; int ok; };

static struct machine machine_now(void)
{
	struct machine m = {0, 0, 0};
	unsigned long long v[10] = {0};
	FILE *f = fopen("/proc/stat", "r");
	if (!f)
		return m;
	if (fscanf(f, "cpu %llu %llu %llu %llu %llu %llu %llu %llu %llu %llu",
		   &v[0], &v[1], &v[2], &v[3], &v[4], &v[5], &v[6], &v[7], &v[8], &v[9]) >= 8) {
		double hz = (double)sysconf(_SC_CLK_TCK);
		m.busy = (double)(v[0] + v[1] + v[2]) / hz;
		m.steal = (double)v[7] / hz;
		m.ok = 1;
	}
	fclose(f);
	return m;
}

static void pin_cpu(int cpu)
{
	if (pin_to_cpu(cpu) < 0)
		die("sched_setaffinity");
}

static int cmp_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
	return x < y ? -1 : x > y;
}

/* ---------------------------------------------------------- addresses */

struct addr {
	struct sockaddr_storage ss;
	socklen_t len;
	int family;
};

static void parse_addr(const char *text, struct addr *a)
{
	memset(a, 0, sizeof(*a));
	if (strncmp(text, "unix:", 5) == 0) {
		struct sockaddr_un *un = (struct sockaddr_un *)&a->ss;
		const char *path = text + 5;
		size_t n = strlen(path);
		if (n == 0 || n >= sizeof(un->sun_path))
			fail("unix socket path empty or too long");
		un->sun_family = AF_UNIX;
		memcpy(un->sun_path, path, n);
		if (path[0] == '@')
			un->sun_path[0] = '\0'; /* abstract namespace */
		a->len = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + n + (path[0] == '@' ? 0 : 1));
		a->family = AF_UNIX;
		return;
	}
	char host[256], port[16];
	const char *colon;
	if (text[0] == '[') {
		const char *end = strchr(text, ']');
		if (!end || end[1] != ':' || (size_t)(end - text - 1) >= sizeof(host))
			fail("bad address, expected [V6ADDR]:PORT");
		memcpy(host, text + 1, (size_t)(end - text - 1));
		host[end - text - 1] = '\0';
		colon = end + 1;
	} else {
		colon = strrchr(text, ':');
		if (!colon || (size_t)(colon - text) >= sizeof(host))
			fail("bad address, expected HOST:PORT, [V6]:PORT or unix:PATH");
		memcpy(host, text, (size_t)(colon - text));
		host[colon - text] = '\0';
	}
	if (strlen(colon + 1) == 0 || strlen(colon + 1) >= sizeof(port))
		fail("bad port");
	strcpy(port, colon + 1);
	struct addrinfo hints = {0}, *res;
	hints.ai_socktype = SOCK_STREAM;
	int rc = getaddrinfo(host, port, &hints, &res);
	if (rc != 0) {
		fprintf(stderr, "sbp-pingpong: %s: %s\n", text, gai_strerror(rc));
		exit(1);
	}
	memcpy(&a->ss, res->ai_addr, res->ai_addrlen);
	a->len = res->ai_addrlen;
	a->family = res->ai_family;
	freeaddrinfo(res);
}

static void format_addr(const struct sockaddr_storage *ss, char *out, size_t n)
{
	char host[INET6_ADDRSTRLEN + 1], port[16];
	if (ss->ss_family == AF_UNIX) {
		const struct sockaddr_un *un = (const struct sockaddr_un *)ss;
		snprintf(out, n, "unix:%s", un->sun_path[0] ? un->sun_path : "@");
		return;
	}
	if (getnameinfo((const struct sockaddr *)ss, sizeof(*ss), host, sizeof(host), port,
			sizeof(port), NI_NUMERICHOST | NI_NUMERICSERV) != 0) {
		snprintf(out, n, "?");
		return;
	}
	snprintf(out, n, ss->ss_family == AF_INET6 ? "[%s]:%s" : "%s:%s", host, port);
}

static void tune_socket(int fd, int family)
{
	int one = 1;
	/* Request/response programs set TCP_NODELAY; a ping-pong without it
	 * measures Nagle, not the transport. */
	if (family != AF_UNIX)
		setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
}

static int connect_to(const struct addr *a)
{
	int fd = socket(a->family, SOCK_STREAM, 0);
	if (fd < 0)
		die("socket");
	tune_socket(fd, a->family);
	while (connect(fd, (const struct sockaddr *)&a->ss, a->len) < 0) {
		if (errno != EINTR)
			die("connect");
	}
	return fd;
}

/* ------------------------------------------------------------ data I/O */

/* The try_ forms report errors (-1, errno set) so the server can drop one
 * bad connection and keep serving; the plain forms are for the client,
 * for which any error ends the run. */
static int try_send_all(int fd, const void *buf, size_t len)
{
	const char *p = buf;
	while (len > 0) {
		ssize_t n = send(fd, p, len, MSG_NOSIGNAL);
		if (n < 0) {
			if (errno == EINTR || errno == EAGAIN)
				continue;
			return -1;
		}
		p += n;
		len -= (size_t)n;
	}
	return 0;
}

static void send_all(int fd, const void *buf, size_t len)
{
	if (try_send_all(fd, buf, len) < 0)
		die("send");
}

/* One recv: busy-polls with MSG_DONTWAIT for up to --poll microseconds,
 * then blocks. Returns bytes, 0 on EOF, -1 on error. A blocking recv that
 * reports EAGAIN is retried (counted: the kernel tier once showed that after
 * a half-close). */
static unsigned long spurious_eagain;

static ssize_t recv_some(int fd, void *buf, size_t len)
{
	if (opt_poll_us > 0) {
		uint64_t deadline = 0;
		for (unsigned spins = 0;; spins++) {
			ssize_t n = recv(fd, buf, len, MSG_DONTWAIT);
			if (n >= 0)
				return n;
			if (errno != EAGAIN && errno != EINTR)
				return -1;
			if ((spins & 63) == 0) {
				uint64_t t = now_ns();
				if (!deadline)
					deadline = t + (uint64_t)opt_poll_us * 1000;
				else if (t >= deadline)
					break;
			}
		}
	}
	for (;;) {
		ssize_t n = recv(fd, buf, len, 0);
		if (n >= 0)
			return n;
		if (errno == EINTR)
			continue;
		if (errno == EAGAIN) {
			spurious_eagain++;
			continue;
		}
		return -1;
	}
}

/* 1 = got len bytes, 0 = clean EOF before the first byte, -1 = error or
 * EOF in the middle of the message (errno EPIPE then). */
static int try_recv_all(int fd, void *buf, size_t len)
{
	char *p = buf;
	size_t got = 0;
	while (got < len) {
		ssize_t n = recv_some(fd, p + got, len - got);
		if (n < 0)
			return -1;
		if (n == 0) {
			if (got == 0)
				return 0;
			errno = EPIPE;
			return -1;
		}
		got += (size_t)n;
	}
	return 1;
}

static int recv_all(int fd, void *buf, size_t len)
{
	int rc = try_recv_all(fd, buf, len);
	if (rc < 0) {
		if (errno == EPIPE)
			fail("peer closed in the middle of a message");
		die("recv");
	}
	return rc;
}

/* -------------------------------------------------------------- server */

static const char *opt_stats_file;
static int opt_once, opt_threads;
static pthread_mutex_t totals_lock = PTHREAD_MUTEX_INITIALIZER;
static uint64_t total_conns, total_bytes;

static void add_totals(uint64_t conns, uint64_t bytes)
{
	pthread_mutex_lock(&totals_lock);
	total_conns += conns;
	total_bytes += bytes;
	pthread_mutex_unlock(&totals_lock);
}

/* A connection the server cannot serve is dropped with one line on
 * stderr; the server goes on with the next one. */
static void drop(const char *why)
{
	fprintf(stderr, "sbp-pingpong: dropping a connection: %s%s%s\n", why,
		errno ? ": " : "", errno ? strerror(errno) : "");
}

static void serve_bench(int fd, char *buf)
{
	struct hello h;
	uint64_t bytes = 0;
	int rc;
	while ((rc = try_recv_all(fd, &h, sizeof(h))) > 0) {
		errno = 0;
		if (h.magic != HELLO_MAGIC || h.version != PROTO_VERSION) {
			drop("bad hello (not an sbp-pingpong client, or another version)");
			break;
		}
		if (h.op == OP_PING) {
			if (try_send_all(fd, &h, sizeof(h)) < 0) {
				drop("send");
				break;
			}
			bytes += sizeof(h);
			continue;
		}
		if (h.size == 0 || h.size > MAX_SIZE || (h.op != OP_RTT && h.op != OP_STREAM)) {
			drop("bad op or message size in hello");
			break;
		}
		uint64_t u0, s0, u1, s1, t0 = now_ns();
		cpu_ns(&u0, &s0);
		int ok = 1;
		if (h.op == OP_RTT) {
			for (uint64_t i = 0; ok && i < h.count; i++)
				ok = try_recv_all(fd, buf, h.size) > 0 && try_send_all(fd, buf, h.size) == 0;
			bytes += h.count * h.size;
		} else {
			for (uint64_t left = h.count; ok && left > 0;) {
				ssize_t n = recv_some(fd, buf, left < h.size ? left : h.size);
				ok = n > 0;
				left -= ok ? (uint64_t)n : 0;
			}
			bytes += h.count;
		}
		if (!ok) {
			drop("the client went away in the middle of an op");
			break;
		}
		cpu_ns(&u1, &s1);
		struct stats st = {.magic = STATS_MAGIC, .cpu_user_ns = u1 - u0,
				   .cpu_sys_ns = s1 - s0, .wall_ns = now_ns() - t0,
				   .bytes = h.op == OP_STREAM ? h.count : h.count * h.size};
		if (try_send_all(fd, &st, sizeof(st)) < 0) {
			drop("send");
			break;
		}
	}
	if (rc < 0)
		drop("recv");
	add_totals(1, bytes);
}

static void serve_echo(int fd, char *buf)
{
	uint64_t bytes = 0;
	for (;;) {
		ssize_t n = recv_some(fd, buf, 65536);
		if (n <= 0 || try_send_all(fd, buf, (size_t)n) < 0) {
			if (n != 0)
				drop("echo");
			break;
		}
		bytes += (uint64_t)n;
	}
	add_totals(1, bytes);
}

static int echo_mode;

static void *conn_thread(void *arg)
{
	/* One buffer per thread, kept across connections when they are served
	 * one at a time, so a connection-rate run does not measure malloc. */
	static __thread char *buf;
	int fd = (int)(intptr_t)arg;
	if (!buf && !(buf = malloc(echo_mode ? 65536 : MAX_SIZE)))
		fail("out of memory");
	if (echo_mode)
		serve_echo(fd, buf);
	else
		serve_bench(fd, buf);
	if (opt_threads) {
		free(buf);
		buf = NULL;
	}
	close(fd);
	return NULL;
}

static void on_signal(int sig)
{
	(void)sig;
	stop_flag = 1;
}

static void write_server_stats(void)
{
	if (!opt_stats_file)
		return;
	uint64_t u, s;
	cpu_ns(&u, &s);
	FILE *f = fopen(opt_stats_file, "w");
	if (!f)
		die(opt_stats_file);
	pthread_mutex_lock(&totals_lock);
	fprintf(f, "{\"cpu_user_s\": %.6f, \"cpu_sys_s\": %.6f, \"connections\": %" PRIu64
		", \"bytes\": %" PRIu64 ", \"spurious_eagain\": %lu}\n",
		(double)u / 1e9, (double)s / 1e9, total_conns, total_bytes, spurious_eagain);
	pthread_mutex_unlock(&totals_lock);
	fclose(f);
}

static int run_server(const char *addr_text)
{
	struct addr a;
	int one = 1;
	parse_addr(addr_text, &a);
	pin_cpu(opt_cpu);

	/* No SA_RESTART: a signal must interrupt accept() so we can exit. */
	struct sigaction sa = {0};
	sa.sa_handler = on_signal;
	sigaction(SIGINT, &sa, NULL);
	sigaction(SIGTERM, &sa, NULL);
	signal(SIGPIPE, SIG_IGN);

	int lfd = socket(a.family, SOCK_STREAM, 0);
	if (lfd < 0)
		die("socket");
	if (a.family == AF_UNIX) {
		struct sockaddr_un *un = (struct sockaddr_un *)&a.ss;
		if (un->sun_path[0])
			unlink(un->sun_path);
	} else {
		setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	}
	if (bind(lfd, (struct sockaddr *)&a.ss, a.len) < 0)
		die("bind");
	if (listen(lfd, 1024) < 0)
		die("listen");

	struct sockaddr_storage bound;
	socklen_t blen = sizeof(bound);
	char text[200];
	if (a.family == AF_UNIX) {
		snprintf(text, sizeof(text), "%s", addr_text);
	} else {
		if (getsockname(lfd, (struct sockaddr *)&bound, &blen) < 0)
			die("getsockname");
		format_addr(&bound, text, sizeof(text));
	}
	printf("{\"listening\": \"%s\", \"pid\": %d}\n", text, (int)getpid());
	fflush(stdout);

	/* Worker threads leave signals to the main thread. */
	sigset_t block, old;
	sigemptyset(&block);
	sigaddset(&block, SIGINT);
	sigaddset(&block, SIGTERM);

	while (!stop_flag) {
		int fd = accept(lfd, NULL, NULL);
		if (fd < 0) {
			if (errno == EINTR || errno == ECONNABORTED)
				continue;
			die("accept");
		}
		tune_socket(fd, a.family);
		if (opt_threads) {
			pthread_t t;
			pthread_sigmask(SIG_BLOCK, &block, &old);
			if (pthread_create(&t, NULL, conn_thread, (void *)(intptr_t)fd) != 0)
				fail("pthread_create");
			pthread_detach(t);
			pthread_sigmask(SIG_SETMASK, &old, NULL);
		} else {
			conn_thread((void *)(intptr_t)fd);
		}
		if (opt_once)
			break;
	}
	close(lfd);
	if (a.family == AF_UNIX && ((struct sockaddr_un *)&a.ss)->sun_path[0])
		unlink(((struct sockaddr_un *)&a.ss)->sun_path);
	write_server_stats();
	return 0;
}

/* -------------------------------------------------------------- client */

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

static int run_client(const char *addr_text, const char *mode, uint32_t size, uint64_t iters,
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

/* ---------------------------------------------------------------- main */

static void usage(void)
{
	fprintf(stderr,
		"usage: sbp-pingpong server|echo ADDR [--cpu N] [--poll[=US]] [--once] [--threads] [--stats-file F]\n"
		"       sbp-pingpong client ADDR [--cpu N] [--poll[=US]] [--mode rtt|stream|connrate]\n"
		"                    [--size B] [--iters N | --duration S] [--warmup N] [--bytes N]\n"
		"                    [--reps N] [--stdin] [--hold]\n"
		"ADDR: HOST:PORT, [V6]:PORT, unix:/path, unix:@abstract (see the top of sbp-pingpong.c)\n");
	exit(2);
}

static unsigned long long parse_num(const char *s, const char *what)
{
	char *end;
	errno = 0;
	unsigned long long v = strtoull(s, &end, 0);
	if (errno || end == s)
		goto bad;
	if (*end == 'k' || *end == 'K')
		v <<= 10, end++;
	else if (*end == 'm' || *end == 'M')
		v <<= 20, end++;
	else if (*end == 'g' || *end == 'G')
		v <<= 30, end++;
	if (*end == '\0')
		return v;
bad:
	fprintf(stderr, "sbp-pingpong: bad %s: %s\n", what, s);
	exit(2);
}

int main(int argc, char **argv)
{
	static const struct option opts[] = {
		{"cpu", required_argument, NULL, 'c'},
		{"poll", optional_argument, NULL, 'p'},
		{"once", no_argument, NULL, 'o'},
		{"threads", no_argument, NULL, 't'},
		{"stats-file", required_argument, NULL, 'f'},
		{"mode", required_argument, NULL, 'm'},
		{"size", required_argument, NULL, 's'},
		{"iters", required_argument, NULL, 'n'},
		{"duration", required_argument, NULL, 'd'},
		{"warmup", required_argument, NULL, 'w'},
		{"bytes", required_argument, NULL, 'b'},
		{"reps", required_argument, NULL, 'r'},
		{"stdin", no_argument, NULL, 'i'},
		{"hold", no_argument, NULL, 'H'},
		{"help", no_argument, NULL, 'h'},
		{NULL, 0, NULL, 0},
	};
	const char *mode = "rtt";
	uint32_t size = 0;
	uint64_t iters = 0, bytes = 0;
	double duration = 1.0;
	long long warmup = -1;
	int reps = 1, use_stdin = 0, hold = 0, c;

	if (argc < 3)
		usage();
	const char *role = argv[1], *addr = argv[2];
	optind = 3;
	while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
		switch (c) {
		case 'c': opt_cpu = (int)parse_num(optarg, "cpu"); break;
		case 'p': opt_poll_us = optarg ? (long)parse_num(optarg, "poll") : 50; break;
		case 'o': opt_once = 1; break;
		case 't': opt_threads = 1; break;
		case 'f': opt_stats_file = optarg; break;
		case 'm': mode = optarg; break;
		case 's': size = (uint32_t)parse_num(optarg, "size"); break;
		case 'n': iters = parse_num(optarg, "iters"); break;
		case 'd': duration = atof(optarg); break;
		case 'w': warmup = (long long)parse_num(optarg, "warmup"); break;
		case 'b': bytes = parse_num(optarg, "bytes"); break;
		case 'r': reps = (int)parse_num(optarg, "reps"); break;
		case 'i': use_stdin = 1; break;
		case 'H': hold = 1; break;
		default: usage();
		}
	}
	if (optind != argc)
		usage();
	if (strcmp(role, "server") == 0)
		return run_server(addr);
	if (strcmp(role, "echo") == 0) {
		echo_mode = 1;
		return run_server(addr);
	}
	if (strcmp(role, "client") != 0)
		usage();
	if (strcmp(mode, "rtt") && strcmp(mode, "stream") && strcmp(mode, "connrate"))
		usage();
	if (size == 0)
		size = strcmp(mode, "stream") == 0 ? 65536 : 64;
	if (size > MAX_SIZE || duration <= 0 || reps < 1)
		usage();
	return run_client(addr, mode, size, iters, duration, warmup, bytes, reps, use_stdin, hold);
}
