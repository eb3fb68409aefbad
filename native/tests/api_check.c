// SPDX-License-Identifier: GPL-2.0
/*
 * The socket API on connections made inside one process (both ends in the
 * shm tier when run under the interposer), one check per line of output:
 *   "ok <name>" or "FAIL <name>: <why>"; last line "TIER <n>" (what
 *   shmbypass_fd_tier says, 0 without the library) and "DONE <failures>".
 * Covers what the Python scenarios do not reach: ppoll, pselect,
 * epoll_pwait/epoll_pwait2, readv/writev, sendmsg/recvmsg, sendmmsg/
 * recvmmsg, MSG_TRUNC, splice pipe->socket and socket->pipe, dup3,
 * accept4 flags, SHUT_RD, SHUT_RDWR and EPOLLHUP, and that no fd shows up
 * twice in one epoll batch.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/ioctl.h>
#include <sys/select.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

static int failures;

#define CHECK(name, cond, ...)                                                   \
	do {                                                                     \
		if (cond) {                                                      \
			printf("ok %s\n", name);                                 \
		} else {                                                         \
			printf("FAIL %s: ", name);                               \
			printf(__VA_ARGS__);                                     \
			printf(" (errno %d %s)\n", errno, strerror(errno));      \
			failures++;                                              \
		}                                                                \
		fflush(stdout);                                                  \
	} while (0)

static int listener;

static void make_listener(void)
{
	struct sockaddr_in a = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };

	listener = socket(AF_INET, SOCK_STREAM, 0);
	if (bind(listener, (void *)&a, sizeof(a)) || listen(listener, 64)) {
		perror("listen");
		exit(2);
	}
}

/* A connected pair; the accepted end gets accept4 flags. */
static void pair(int *c, int *s, int aflags)
{
	struct sockaddr_in a;
	socklen_t len = sizeof(a);

	getsockname(listener, (void *)&a, &len);
	*c = socket(AF_INET, SOCK_STREAM, 0);
	if (connect(*c, (void *)&a, sizeof(a))) {
		perror("connect");
		exit(2);
	}
	*s = accept4(listener, NULL, NULL, aflags);
	if (*s < 0) {
		perror("accept4");
		exit(2);
	}
}

static ssize_t read_exact(int fd, void *buf, size_t n)
{
	size_t got = 0;

	while (got < n) {
		ssize_t r = read(fd, (char *)buf + got, n - got);

		if (r <= 0)
			return r < 0 ? r : (ssize_t)got;
		got += r;
	}
	return got;
}

/* long: one check after another, each a block with its comment, in the
 * order of the output (a script, not an algorithm). */
int main(void)
{
	int (*tier)(int) = (int (*)(int))dlsym(RTLD_DEFAULT, "shmbypass_fd_tier");
	char buf[70000], big[65536];
	int c, s, t = 0;

	signal(SIGPIPE, SIG_IGN);
	make_listener();

	/* accept4 flags on the accepted end */
	pair(&c, &s, SOCK_NONBLOCK | SOCK_CLOEXEC);
	CHECK("accept4-flags", (fcntl(s, F_GETFL) & O_NONBLOCK) && (fcntl(s, F_GETFD) & FD_CLOEXEC),
	      "flags %#x fd flags %#x", fcntl(s, F_GETFL), fcntl(s, F_GETFD));
	if (tier)
		t = tier(c);
	{
		ssize_t r = read(s, buf, 10);

		CHECK("nonblock-empty", r < 0 && errno == EAGAIN, "read gave %zd", r);
	}
	fcntl(s, F_SETFL, 0);

	/* writev/readv */
	{
		struct iovec w[3] = { { "abc", 3 }, { "", 0 }, { "defgh", 5 } };
		char x[4], y[10];
		struct iovec r[2] = { { x, 4 }, { y, 4 } };
		ssize_t n = writev(c, w, 3), m;

		m = readv(s, r, 2);
		CHECK("writev-readv", n == 8 && m == 8 && !memcmp(x, "abcd", 4) && !memcmp(y, "efgh", 4),
		      "writev %zd readv %zd", n, m);
	}

	/* sendmsg/recvmsg with an address buffer (TCP fills in nothing) */
	{
		struct iovec v = { "hello", 5 };
		struct msghdr m = { .msg_iov = &v, .msg_iovlen = 1 };
		struct sockaddr_storage from;
		char rb[16];
		struct iovec rv = { rb, sizeof(rb) };
		struct msghdr rm = { .msg_name = &from, .msg_namelen = sizeof(from), .msg_iov = &rv,
				     .msg_iovlen = 1 };
		ssize_t n = sendmsg(c, &m, 0), k = recvmsg(s, &rm, 0);

		CHECK("sendmsg-recvmsg", n == 5 && k == 5 && !memcmp(rb, "hello", 5) && rm.msg_flags == 0,
		      "sent %zd got %zd flags %#x", n, k, rm.msg_flags);
	}

	/* sendmmsg/recvmmsg */
	{
		struct iovec v1 = { "one", 3 }, v2 = { "two", 3 };
		struct mmsghdr mm[2] = { { .msg_hdr = { .msg_iov = &v1, .msg_iovlen = 1 } },
					 { .msg_hdr = { .msg_iov = &v2, .msg_iovlen = 1 } } };
		char r1[6];
		struct iovec rv = { r1, 6 };
		struct mmsghdr rm[1] = { { .msg_hdr = { .msg_iov = &rv, .msg_iovlen = 1 } } };
		int n = sendmmsg(c, mm, 2, 0), k;

		usleep(10000);
		k = recvmmsg(s, rm, 1, 0, NULL);
		CHECK("sendmmsg-recvmmsg", n == 2 && k == 1 && rm[0].msg_len == 6 && !memcmp(r1, "onetwo", 6),
		      "sent %d got %d len %u", n, k, rm[0].msg_len);
	}

	/* MSG_TRUNC on TCP: drop bytes without copying them */
	{
		ssize_t n;

		write(c, "0123456789", 10);
		usleep(10000);
		n = recv(s, NULL, 4, MSG_TRUNC);
		read_exact(s, buf, 6);
		CHECK("msg-trunc", n == 4 && !memcmp(buf, "456789", 6), "recv gave %zd", n);
	}

	/* splice: pipe -> socket and socket -> pipe */
	{
		int p[2], q[2];
		ssize_t a, b;

		pipe(p);
		pipe(q);
		write(p[1], "spliced!", 8);
		a = splice(p[0], NULL, c, NULL, 8, 0);
		b = splice(s, NULL, q[1], NULL, 8, 0);
		memset(buf, 0, 16);
		read(q[0], buf, 8);
		CHECK("splice", a == 8 && b == 8 && !memcmp(buf, "spliced!", 8), "in %zd out %zd", a, b);
		close(p[0]);
		close(p[1]);
		close(q[0]);
		close(q[1]);
	}

	/* dup3 onto another fd, O_CLOEXEC; the original closed */
	{
		int d = dup3(s, 100, O_CLOEXEC);

		write(c, "dup3", 4);
		CHECK("dup3", d == 100 && read_exact(d, buf, 4) == 4 && !memcmp(buf, "dup3", 4) &&
			      (fcntl(d, F_GETFD) & FD_CLOEXEC), "dup3 gave %d", d);
		close(s);
		s = d;
		write(c, "after", 5);
		CHECK("dup-after-close", read_exact(s, buf, 5) == 5 && !memcmp(buf, "after", 5), "-");
	}

	/* ppoll, pselect, epoll_pwait, epoll_pwait2 */
	{
		struct pollfd pf = { s, POLLIN, 0 };
		struct timespec ts = { 0, 0 }, tl = { 5, 0 };
		sigset_t mask;
		fd_set rs;
		int ep = epoll_create1(0), n;
		struct epoll_event ev = { .events = EPOLLIN, .data.fd = s }, out[4];

		sigemptyset(&mask);
		n = ppoll(&pf, 1, &ts, &mask);
		CHECK("ppoll-empty", n == 0, "ppoll %d revents %#x", n, pf.revents);
		write(c, "p", 1);
		n = ppoll(&pf, 1, &tl, &mask);
		CHECK("ppoll-data", n == 1 && (pf.revents & POLLIN), "ppoll %d revents %#x", n, pf.revents);
		FD_ZERO(&rs);
		FD_SET(s, &rs);
		n = pselect(s + 1, &rs, NULL, NULL, &tl, &mask);
		CHECK("pselect", n == 1 && FD_ISSET(s, &rs), "pselect %d", n);
		epoll_ctl(ep, EPOLL_CTL_ADD, s, &ev);
		n = epoll_pwait(ep, out, 4, 5000, &mask);
		CHECK("epoll_pwait", n == 1 && out[0].data.fd == s && (out[0].events & EPOLLIN), "n %d", n);
		n = epoll_pwait2(ep, out, 4, &tl, &mask);
		CHECK("epoll_pwait2", n == 1 && out[0].data.fd == s, "n %d", n);
		read(s, buf, 1);
		n = epoll_wait(ep, out, 4, 0);
		CHECK("epoll-after-read", n == 0, "n %d", n);
		close(ep);
	}

	/* many ready connections: each fd at most once per batch */
	{
		enum { N = 12 };
		int cs[N], ss[N], ep = epoll_create1(0), dup = 0, seen_total = 0;
		struct epoll_event ev, out[64];

		for (int i = 0; i < N; i++) {
			pair(&cs[i], &ss[i], SOCK_NONBLOCK);
			ev.events = EPOLLIN | EPOLLOUT;
			ev.data.fd = ss[i];
			epoll_ctl(ep, EPOLL_CTL_ADD, ss[i], &ev);
			write(cs[i], "r", 1);
		}
		usleep(20000);
		for (int round = 0; round < 5; round++) {
			int n = epoll_wait(ep, out, 64, 1000), seen[1024] = { 0 };

			seen_total += n;
			for (int i = 0; i < n; i++)
				if (out[i].data.fd < 1024 && seen[out[i].data.fd]++)
					dup++;
		}
		CHECK("epoll-no-duplicates", dup == 0 && seen_total >= 5 * N, "dups %d seen %d", dup, seen_total);
		for (int i = 0; i < N; i++) {
			close(cs[i]);
			close(ss[i]);
		}
		close(ep);
	}

	/* SHUT_RD: reads end at once; the other direction still works */
	{
		ssize_t r;

		shutdown(s, SHUT_RD);
		r = read(s, buf, 10);
		CHECK("shut-rd-eof", r == 0, "read %zd", r);
		r = write(s, "still", 5);
		CHECK("shut-rd-write", r == 5 && read_exact(c, buf, 5) == 5 && !memcmp(buf, "still", 5),
		      "write %zd", r);
	}

	/* SHUT_RDWR: the peer gets EOF, then EPOLLHUP once it shuts too */
	{
		int ep = epoll_create1(0), n;
		struct epoll_event ev = { .events = EPOLLIN | EPOLLRDHUP, .data.fd = c }, out[2];
		ssize_t r;

		memset(big, 'b', sizeof(big));
		write(s, big, 1000);
		shutdown(s, SHUT_RDWR);
		epoll_ctl(ep, EPOLL_CTL_ADD, c, &ev);
		n = epoll_wait(ep, out, 2, 5000);
		CHECK("rdhup", n == 1 && (out[0].events & EPOLLRDHUP), "n %d events %#x", n,
		      n > 0 ? out[0].events : 0);
		r = read_exact(c, buf, 1000);
		CHECK("data-before-eof", r == 1000 && read(c, buf, 10) == 0, "read %zd", r);
		shutdown(c, SHUT_WR);
		n = epoll_wait(ep, out, 2, 5000);
		CHECK("hup", n == 1 && (out[0].events & EPOLLHUP), "n %d events %#x", n,
		      n > 0 ? out[0].events : 0);
		r = write(c, "x", 1);
		CHECK("write-after-shut", r < 0 && errno == EPIPE, "write %zd", r);
		close(ep);
	}
	close(c);
	close(s);
	printf("TIER %d\nDONE %d\n", t, failures);
	return failures != 0;
}
