// SPDX-License-Identifier: GPL-2.0
/*
 * An event-loop ping-pong like redis' (non-blocking sockets, epoll, read and
 * write), to measure the interposer's epoll path apart from any application.
 *
 *   epoll_pingpong server [ET]          prints "PORT <n>", serves one client
 *   epoll_pingpong client PORT SIZE N   prints "RTT_NS <p50> <p99> <mean>"
 *
 * ET: the server registers EPOLLIN|EPOLLET and reads until EAGAIN.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static int64_t now(void)
{
	struct timespec t;

	clock_gettime(CLOCK_MONOTONIC, &t);
	return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

static void die(const char *what)
{
	perror(what);
	exit(1);
}

static int cmp(const void *a, const void *b)
{
	int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;

	return x < y ? -1 : x > y;
}

/* Wait for EPOLLIN on fd in ep, then read exactly n bytes (non-blocking). */
static void read_n(int ep, int fd, char *buf, size_t n)
{
	struct epoll_event ev;
	size_t got = 0;

	while (got < n) {
		ssize_t r = read(fd, buf + got, n - got);

		if (r > 0) {
			got += r;
			continue;
		}
		if (r == 0)
			exit(0);
		if (errno != EAGAIN)
			die("read");
		if (epoll_wait(ep, &ev, 1, -1) < 0 && errno != EINTR)
			die("epoll_wait");
	}
}

static void write_n(int fd, const char *buf, size_t n)
{
	size_t off = 0;

	while (off < n) {
		ssize_t w = write(fd, buf + off, n - off);

		if (w > 0)
			off += w;
		else if (w < 0 && errno != EAGAIN)
			die("write");
	}
}

int main(int argc, char **argv)
{
	struct sockaddr_in a = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
	socklen_t alen = sizeof(a);
	struct epoll_event ev = { .events = EPOLLIN };
	int one = 1, ep = epoll_create1(0), fd;
	char buf[65536];

	if (argc < 2)
		return 2;
	if (!strcmp(argv[1], "server")) {
		int et = argc > 2 && !strcmp(argv[2], "ET");
		int ls = socket(AF_INET, SOCK_STREAM, 0);

		if (bind(ls, (void *)&a, sizeof(a)) || listen(ls, 1) || getsockname(ls, (void *)&a, &alen))
			die("listen");
		printf("PORT %d\n", ntohs(a.sin_port));
		fflush(stdout);
		fd = accept4(ls, NULL, NULL, SOCK_NONBLOCK);
		if (fd < 0)
			die("accept");
		setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
		ev.events = EPOLLIN | (et ? EPOLLET : 0);
		ev.data.fd = fd;
		epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
		for (;;) {
			struct epoll_event out[8];
			int n = epoll_wait(ep, out, 8, -1);

			for (int i = 0; i < n; i++) {
				for (;;) {     /* echo what is there (until EAGAIN) */
					ssize_t r = read(fd, buf, sizeof(buf));

					if (r == 0)
						return 0;
					if (r < 0) {
						if (errno == EAGAIN)
							break;
						die("read");
					}
					write_n(fd, buf, r);
					if (!et)
						break;
				}
			}
		}
	}
	if (argc < 5)
		return 2;
	{
		size_t size = strtoul(argv[3], NULL, 10), n = strtoul(argv[4], NULL, 10), warm = n / 10;
		int64_t *rtt = malloc(n * sizeof(*rtt)), sum = 0;

		a.sin_port = htons(atoi(argv[2]));
		fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
		if (connect(fd, (void *)&a, sizeof(a)) && errno != EINPROGRESS)
			die("connect");
		setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
		ev.data.fd = fd;
		epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
		memset(buf, 'p', sizeof(buf));
		for (size_t i = 0; i < warm + n; i++) {
			int64_t t0 = now();

			write_n(fd, buf, size);
			read_n(ep, fd, buf, size);
			if (i >= warm)
				rtt[i - warm] = now() - t0;
		}
		qsort(rtt, n, sizeof(*rtt), cmp);
		for (size_t i = 0; i < n; i++)
			sum += rtt[i];
		printf("RTT_NS %lld %lld %lld\n", (long long)rtt[n / 2], (long long)rtt[n * 99 / 100],
		       (long long)(sum / (int64_t)n));
		close(fd);
	}
	return 0;
}
