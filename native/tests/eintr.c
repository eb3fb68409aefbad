// SPDX-License-Identifier: GPL-2.0
/*
 * Does a blocking call on a socket come back with EINTR when a signal
 * handler runs while it waits, having moved no byte? Like the kernel: not
 * when the handler was installed with SA_RESTART (and the socket has no
 * SO_RCVTIMEO/SO_SNDTIMEO): the call goes on and moves the bytes; yes
 * otherwise. The same for every call that waits on a socket:
 *
 *   recv        recv() of 1 byte from an empty socket
 *   splice-out  splice() from an empty socket into a pipe
 *   send        send() of 1 byte into a full socket
 *   sendfile    sendfile() of a file into a full socket
 *   splice-in   splice() from a pipe into a full socket
 *
 * "Full": the server writes without blocking until EAGAIN first, so the
 * blocking call waits with nothing moved. The signal comes at 1 s, the
 * client reads (or sends "x") at 1.5 s.
 *
 *   eintr server restart|norestart [OP]  prints "PORT n", then "RESULT data|EINTR|..."
 *                                        and "TIER t" (shmbypass_fd_tier, 0 without it)
 *   eintr client PORT [OP]               connects; at 1.5 s sends "x" (recv, splice-out)
 *                                        or reads to EOF (send, sendfile, splice-in)
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/sendfile.h>
#include <sys/socket.h>
#include <unistd.h>

static volatile sig_atomic_t hits;

static void on_alarm(int sig)
{
	(void)sig;
	hits++;
}

static int is_send_op(const char *op)
{
	return !strcmp(op, "send") || !strcmp(op, "sendfile") || !strcmp(op, "splice-in");
}

/* Write without blocking until the socket takes no more. */
static void fill(int fd)
{
	static char junk[65536];
	int fl = fcntl(fd, F_GETFL);

	fcntl(fd, F_SETFL, fl | O_NONBLOCK);
	while (send(fd, junk, sizeof(junk), 0) > 0 || errno == EINTR)
		;
	while (send(fd, junk, 1, 0) > 0)
		;
	fcntl(fd, F_SETFL, fl);
}

/* The blocking call under test: what it returned (bytes, or -1 with errno). */
static ssize_t blocking_op(const char *op, int fd)
{
	static char src[65536];
	int p[2];
	char c;

	if (!strcmp(op, "recv"))
		return recv(fd, &c, 1, 0);
	if (!strcmp(op, "send"))
		return send(fd, "y", 1, 0);
	if (!strcmp(op, "sendfile")) {
		char path[] = "/tmp/eintr-srcXXXXXX";
		int f = mkstemp(path);

		if (f < 0 || write(f, src, sizeof(src)) != (ssize_t)sizeof(src))
			return -2;
		unlink(path);
		return sendfile(fd, f, &(off_t){ 0 }, sizeof(src));
	}
	if (pipe(p))
		return -2;
	if (!strcmp(op, "splice-in")) {
		if (write(p[1], src, 4096) != 4096)
			return -2;
		return splice(p[0], NULL, fd, NULL, 4096, 0);
	}
	if (!strcmp(op, "splice-out"))
		return splice(fd, NULL, p[1], NULL, 4096, 0);
	return -2;
}

static int server(const char *mode, const char *op)
{
	struct sockaddr_in a = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
	socklen_t alen = sizeof(a);
	int (*tier)(int) = (int (*)(int))dlsym(RTLD_DEFAULT, "shmbypass_fd_tier");
	struct sigaction sa;
	int ls = socket(AF_INET, SOCK_STREAM, 0), fd;
	ssize_t n;

	if (bind(ls, (void *)&a, sizeof(a)) || listen(ls, 1) || getsockname(ls, (void *)&a, &alen))
		return 1;
	printf("PORT %d\n", ntohs(a.sin_port));
	fflush(stdout);
	fd = accept(ls, NULL, NULL);
	if (is_send_op(op))
		fill(fd);
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_alarm;
	sa.sa_flags = strcmp(mode, "restart") ? 0 : SA_RESTART;
	sigaction(SIGALRM, &sa, NULL);
	alarm(1);               /* fires while the call waits; the peer acts at 1.5 s */
	n = blocking_op(op, fd);
	printf("RESULT %s hits=%d\n", n > 0 ? "data" : n < 0 && errno == EINTR ? "EINTR" : "other",
	       (int)hits);
	printf("TIER %d\n", tier ? tier(fd) : 0);
	fflush(stdout);
	close(fd);
	return 0;
}

static int client(int port, const char *op)
{
	struct sockaddr_in a = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
	int fd = socket(AF_INET, SOCK_STREAM, 0);
	char buf[65536];

	a.sin_port = htons(port);
	if (connect(fd, (void *)&a, sizeof(a)))
		return 1;
	usleep(1500000);
	if (is_send_op(op)) {
		while (recv(fd, buf, sizeof(buf), 0) > 0)
			;
	} else {
		send(fd, "x", 1, 0);
		usleep(200000);
	}
	close(fd);
	return 0;
}

int main(int argc, char **argv)
{
	const char *op = argc > 3 ? argv[3] : "recv";

	if (argc < 3)
		return 2;
	if (!strcmp(argv[1], "server"))
		return server(argv[2], op);
	return client(atoi(argv[2]), op);
}
