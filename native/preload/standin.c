// SPDX-License-Identifier: GPL-2.0
/* standin.c: a shm-tier socket whose peer has closed, going to a program
 * that cannot read the rings (across exec, or in SCM_RIGHTS): the program
 * gets a stand-in socket holding the rest of the peer's stream, then EOF.
 *
 * Going back to TCP (revert.c) needs the peer to put its unread bytes back
 * on TCP; a peer that closed (a server that answered and exited, nginx
 * with "Connection: close") never will. Its stream is final, though: its
 * FIN is in, and whatever it wrote is in our memory or our TCP queue. So we
 * read all of it (the interposer's own recv path), put it into one end of a
 * socketpair, and give the program the other end in the fd's place: the
 * bytes and EOF it would have read from TCP. What differs (a known limit,
 * docs/ARCHITECTURE.md): it is an AF_UNIX socket (getpeername, TCP
 * options), and a write to it fails with EPIPE at once (TCP accepts the
 * first one, then the peer's RST fails the next).
 *
 * May run just before exec in a vfork child (our memory, its own fd
 * table): raw system calls, no malloc, and the fd table is the caller's
 * business (sockets.c). A rest larger than the socketpair
 * buffers is written by a detached process of ours (forked twice, so that
 * the program never sees a child it did not make).
 */
#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <unistd.h>

#include "io.h"
#include "revert.h"
#include "setup.h"
#include "standin.h"

#define STANDIN_READ_NS (NS_PER_S)      /* for bytes still on their way */
#define STANDIN_MAX (64u << 20)         /* more than any stream keeps unread */

/* The rest of the peer's stream into buf (grown with mremap): its length,
 * or -errno (the stream ended in an error, or did not end in time). */
static ssize_t read_rest(int fd, struct chan *ch, char **buf, size_t *cap)
{
	int64_t deadline = now_ns() + STANDIN_READ_NS;
	size_t got = 0;

	for (;;) {
		struct iovec v;
		ssize_t n;

		if (got == *cap) {
			void *p = *cap >= STANDIN_MAX ? MAP_FAILED :
				  (void *)syscall(SYS_mremap, *buf, *cap, *cap * 2, MREMAP_MAYMOVE);

			if (p == MAP_FAILED)
				return -ENOMEM;
			*buf = p;
			*cap *= 2;
		}
		v = (struct iovec){ *buf + got, *cap - got };
		n = shm_recv(fd, ch, &v, 1, MSG_DONTWAIT);
		if (n > 0) {
			got += (size_t)n;
			continue;
		}
		if (n == 0)
			return (ssize_t)got;
		if (errno != EAGAIN && errno != EINTR)
			return -errno;
		if (now_ns() >= deadline)
			return -ETIMEDOUT;
		sys_ppoll(&(struct pollfd){ fd, POLLIN, 0 }, 1, 1000000, NULL);
	}
}

/* Write what fits without waiting; the count, or -errno. */
static ssize_t put_some(int s, const char *buf, size_t len)
{
	size_t done = 0;

	while (done < len) {
		long n = syscall(SYS_sendto, s, buf + done, len - done, MSG_DONTWAIT | MSG_NOSIGNAL,
				 NULL, 0);

		if (n > 0)
			done += (size_t)n;
		else if (n < 0 && errno == EINTR)
			continue;
		else if (n < 0 && errno == EAGAIN)
			break;
		else
			return -errno;
	}
	return (ssize_t)done;
}

/* A process of ours, detached (forked twice, the middle one reaped at once)
 * writes the rest and exits. fork by raw clone: no atfork handler runs; the
 * middle one signals nothing when it exits (the program's SIGCHLD handler
 * never sees a child it did not make), hence __WALL to reap it. */
static int feed_detached(int s, const char *buf, size_t len)
{
	long pid = syscall(SYS_clone, 0, 0, NULL, NULL, 0);

	if (pid < 0)
		return -errno;
	if (pid == 0) {
		if (syscall(SYS_clone, SIGCHLD, 0, NULL, NULL, 0) == 0) {
			/* keep only s: the program's sockets are not ours to hold */
			if (s > 0)
				syscall(SYS_close_range, 0, s - 1, 0);
			syscall(SYS_close_range, s + 1, ~0U, 0);
			while (len) {
				long n = syscall(SYS_sendto, s, buf, len, MSG_NOSIGNAL, NULL, 0);

				if (n < 0 && errno == EINTR)
					continue;
				if (n <= 0)
					break;
				buf += n;
				len -= (size_t)n;
			}
		}
		syscall(SYS_exit_group, 0);
	}
	while (syscall(SYS_wait4, pid, NULL, __WALL, NULL) < 0 && errno == EINTR)
		;
	return 0;
}

/* sv[0] gets the bytes and then EOF; 0 or -errno. */
static int fill(int sv[2], const char *buf, size_t len)
{
	int big = 4 << 20;
	ssize_t put;
	int rc = 0;

	/* as much as the kernel lets us buffer, so most rests need no writer */
	if (syscall(SYS_setsockopt, sv[1], SOL_SOCKET, SO_SNDBUFFORCE, &big, sizeof(big)) < 0)
		syscall(SYS_setsockopt, sv[1], SOL_SOCKET, SO_SNDBUF, &big, sizeof(big));
	put = put_some(sv[1], buf, len);
	if (put < 0)
		rc = (int)put;
	else if ((size_t)put < len)
		rc = feed_detached(sv[1], buf + put, len - (size_t)put);
	syscall(SYS_close, sv[1]);
	return rc;
}

int standin_put(int fd, struct chan *ch)
{
	size_t cap = 1u << 20;
	char *buf = (char *)syscall(SYS_mmap, NULL, cap, PROT_READ | PROT_WRITE,
				    MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	long fl = syscall(SYS_fcntl, fd, F_GETFL);
	int sv[2] = { -1, -1 }, rc;
	ssize_t len;

	if (buf == MAP_FAILED)
		return -ENOMEM;
	len = read_rest(fd, ch, &buf, &cap);
	rc = len < 0 ? (int)len : 0;
	if (!rc && syscall(SYS_socketpair, AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) < 0)
		rc = -errno;
	if (!rc)
		rc = fill(sv, buf, (size_t)len);
	if (!rc && fl >= 0 && (fl & O_NONBLOCK))
		syscall(SYS_fcntl, sv[0], F_SETFL, O_NONBLOCK);
	/* dup2 clears close-on-exec on fd: it stays inherited, as before */
	if (!rc && syscall(SYS_dup2, sv[0], fd) < 0)
		rc = -errno;
	if (sv[0] >= 0)
		syscall(SYS_close, sv[0]);
	syscall(SYS_munmap, buf, cap);
	if (rc == 0)
		DBG("fd %d: the peer closed: the rest of its stream (%zd bytes) in a stand-in socket", fd,
		    len);
	return rc;
}
