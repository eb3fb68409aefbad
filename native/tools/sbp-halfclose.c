// SPDX-License-Identifier: GPL-2.0
/*
 * sbp-halfclose: N half-close trials on loopback. Per trial the client
 * connects, sends a few bytes, calls shutdown(SHUT_WR) and waits; the server
 * thread reads with blocking recv() until it returns 0. Any recv() error
 * (EAGAIN above all) or a byte count mismatch is a failure.
 *
 *   sbp-halfclose [-n TRIALS] [-6] [-s BYTES] [-d USEC] [-r] [-w]
 * -r: the server answers the first bytes before it waits for EOF (request,
 * response, half-close), the client reads the answer before shutting down.
 * -w: after its shutdown(SHUT_WR) the client waits in a blocking recv() for
 *     the server to close (the server closes after reading EOF); an EAGAIN
 *     there is the classic form of the bug (our FIN's ACK wakes the reader).
 * -d sleeps between the send and the shutdown, so the reader is usually
 * blocked in recv() when the FIN arrives.
 * Prints one JSON line: {"trials": N, "failures": F, "eagain": E, ...}
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static int lfd, trials = 10000, v6, nbytes = 16, delay_us, reply, wait_eof;
static long client_failures, client_eagain;
static long failures, eagain, short_reads;
static int ready[2];  /* server -> client: trial done */

static void *server(void *arg)
{
	char buf[4096];

	(void)arg;
	for (int i = 0; i < trials; i++) {
		int fd = accept(lfd, NULL, NULL);
		long got = 0;
		char done = 0;

		if (fd < 0) {
			perror("accept");
			exit(2);
		}
		for (;;) {
			ssize_t n = recv(fd, buf, sizeof(buf), 0);

			if (n > 0) {
				if (reply && got == 0 && send(fd, buf, 1, 0) != 1)
					exit(2);
				got += n;
				continue;
			}
			if (n < 0) {
				if (errno == EINTR)
					continue;
				failures++;
				if (errno == EAGAIN)
					eagain++;
			}
			break;
		}
		if (got != nbytes) {
			failures++;
			short_reads++;
		}
		close(fd);
		if (write(ready[1], &done, 1) != 1)
			exit(2);
	}
	return NULL;
}

int main(int argc, char **argv)
{
	struct sockaddr_storage ss = { 0 };
	socklen_t sl;
	pthread_t th;
	char *msg;
	int opt;

	while ((opt = getopt(argc, argv, "n:6s:d:rw")) != -1) {
		switch (opt) {
		case 'n': trials = atoi(optarg); break;
		case '6': v6 = 1; break;
		case 's': nbytes = atoi(optarg); break;
		case 'd': delay_us = atoi(optarg); break;
		case 'r': reply = 1; break;
		case 'w': wait_eof = 1; break;
		default:
			fprintf(stderr, "usage: %s [-n TRIALS] [-6] [-s BYTES] [-d USEC] [-r] [-w]\n", argv[0]);
			return 2;
		}
	}
	msg = calloc(1, (size_t)nbytes + 1);
	if (v6) {
		struct sockaddr_in6 *a = (struct sockaddr_in6 *)&ss;

		a->sin6_family = AF_INET6;
		a->sin6_addr = in6addr_loopback;
		sl = sizeof(*a);
	} else {
		struct sockaddr_in *a = (struct sockaddr_in *)&ss;

		a->sin_family = AF_INET;
		a->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
		sl = sizeof(*a);
	}
	lfd = socket(ss.ss_family, SOCK_STREAM, 0);
	if (lfd < 0 || bind(lfd, (struct sockaddr *)&ss, sl) || listen(lfd, 128) ||
	    getsockname(lfd, (struct sockaddr *)&ss, &sl) || pipe(ready)) {
		perror("listen");
		return 2;
	}
	pthread_create(&th, NULL, server, NULL);
	for (int i = 0; i < trials; i++) {
		int fd = socket(ss.ss_family, SOCK_STREAM, 0);
		char c;

		if (fd < 0 || connect(fd, (struct sockaddr *)&ss, sl)) {
			perror("connect");
			return 2;
		}
		if (send(fd, msg, (size_t)nbytes, 0) != nbytes) {
			perror("send");
			return 2;
		}
		if (reply && recv(fd, &c, 1, 0) != 1) {
			perror("recv reply");
			return 2;
		}
		if (delay_us)
			usleep((useconds_t)delay_us);
		shutdown(fd, SHUT_WR);
		while (wait_eof) {
			ssize_t n = recv(fd, &c, 1, 0);

			if (n == 0)
				break;
			if (n < 0 && errno == EINTR)
				continue;
			if (n < 0) {
				client_failures++;
				if (errno == EAGAIN)
					client_eagain++;
				break;
			}
		}
		if (read(ready[0], &c, 1) != 1)
			return 2;
		close(fd);
	}
	pthread_join(th, NULL);
	failures += client_failures;
	eagain += client_eagain;
	printf("{\"trials\": %d, \"failures\": %ld, \"eagain\": %ld, \"short_reads\": %ld}\n",
	       trials, failures, eagain, short_reads);
	return failures ? 1 : 0;
}
