// SPDX-License-Identifier: GPL-2.0-only
/* net.c: what both sides of sbp-pingpong use: process utilities (errors,
 * CPU time, the machine's load, pinning), addresses, and the data I/O with
 * its optional busy-poll. */
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

int opt_cpu = -1;
long opt_poll_us = -1; /* < 0: never poll */

void die(const char *what)
{
	fprintf(stderr, "sbp-pingpong: %s: %s\n", what, strerror(errno));
	exit(1);
}

void fail(const char *msg)
{
	fprintf(stderr, "sbp-pingpong: %s\n", msg);
	exit(1);
}

void cpu_ns(uint64_t *user, uint64_t *sys)
{
	struct rusage ru;
	getrusage(RUSAGE_SELF, &ru);
	*user = (uint64_t)ru.ru_utime.tv_sec * 1000000000ull + (uint64_t)ru.ru_utime.tv_usec * 1000ull;
	*sys = (uint64_t)ru.ru_stime.tv_sec * 1000000000ull + (uint64_t)ru.ru_stime.tv_usec * 1000ull;
}

struct machine machine_now(void)
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

void pin_cpu(int cpu)
{
	if (pin_to_cpu(cpu) < 0)
		die("sched_setaffinity");
}

int cmp_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
	return x < y ? -1 : x > y;
}

void parse_addr(const char *text, struct addr *a)
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

void format_addr(const struct sockaddr_storage *ss, char *out, size_t n)
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

void tune_socket(int fd, int family)
{
	int one = 1;
	/* Request/response programs set TCP_NODELAY; a ping-pong without it
	 * measures Nagle, not the transport. */
	if (family != AF_UNIX)
		setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
}

int connect_to(const struct addr *a)
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
int try_send_all(int fd, const void *buf, size_t len)
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

void send_all(int fd, const void *buf, size_t len)
{
	if (try_send_all(fd, buf, len) < 0)
		die("send");
}

/* One recv: busy-polls with MSG_DONTWAIT for up to --poll microseconds,
 * then blocks. Returns bytes, 0 on EOF, -1 on error. A blocking recv that
 * reports EAGAIN is retried (counted: the kernel tier once showed that after
 * a half-close). */
unsigned long spurious_eagain;

ssize_t recv_some(int fd, void *buf, size_t len)
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
int try_recv_all(int fd, void *buf, size_t len)
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

int recv_all(int fd, void *buf, size_t len)
{
	int rc = try_recv_all(fd, buf, len);
	if (rc < 0) {
		if (errno == EPIPE)
			fail("peer closed in the middle of a message");
		die("recv");
	}
	return rc;
}
