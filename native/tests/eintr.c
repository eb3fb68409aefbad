// SPDX-License-Identifier: GPL-2.0
/*
 * Does a blocking recv() come back with EINTR when a signal handler runs?
 * Like the kernel: not when the handler was installed with SA_RESTART (and
 * the socket has no SO_RCVTIMEO), yes otherwise.
 *
 *   eintr server restart|norestart    prints "PORT n", then "RESULT data|EINTR|..."
 *   eintr client PORT                 connects, sends "x" after 1.5 s
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static volatile sig_atomic_t hits;

static void on_alarm(int sig)
{
	(void)sig;
	hits++;
}

int main(int argc, char **argv)
{
	struct sockaddr_in a = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
	socklen_t alen = sizeof(a);
	char c;

	if (argc < 3)
		return 2;
	if (!strcmp(argv[1], "server")) {
		struct sigaction sa;
		int ls = socket(AF_INET, SOCK_STREAM, 0), fd;
		ssize_t n;

		if (bind(ls, (void *)&a, sizeof(a)) || listen(ls, 1) || getsockname(ls, (void *)&a, &alen))
			return 1;
		printf("PORT %d\n", ntohs(a.sin_port));
		fflush(stdout);
		fd = accept(ls, NULL, NULL);
		memset(&sa, 0, sizeof(sa));
		sa.sa_handler = on_alarm;
		sa.sa_flags = strcmp(argv[2], "restart") ? 0 : SA_RESTART;
		sigaction(SIGALRM, &sa, NULL);
		alarm(1);               /* fires while recv() waits; data comes at 1.5 s */
		n = recv(fd, &c, 1, 0);
		printf("RESULT %s hits=%d\n", n == 1 ? "data" : n < 0 && errno == EINTR ? "EINTR" : "other",
		       (int)hits);
		return 0;
	}
	a.sin_port = htons(atoi(argv[2]));
	{
		int fd = socket(AF_INET, SOCK_STREAM, 0);

		if (connect(fd, (void *)&a, sizeof(a)))
			return 1;
		usleep(1500000);
		c = 'x';
		send(fd, &c, 1, 0);
		usleep(200000);
		close(fd);
	}
	return 0;
}
