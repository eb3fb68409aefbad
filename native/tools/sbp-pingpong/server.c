// SPDX-License-Identifier: GPL-2.0-only
/* server.c: sbp-pingpong's server and echo modes: the bench protocol's
 * server side, one thread per connection or one at a time, its stats. */
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

const char *opt_stats_file;
int opt_once, opt_threads, echo_mode;
static volatile sig_atomic_t stop_flag;
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

int run_server(const char *addr_text)
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
