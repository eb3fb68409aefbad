// SPDX-License-Identifier: GPL-2.0
/*
 * The kernel-tier guard, loaded with LD_PRELOAD by `shmbypass run`.
 *
 * With a socket in a sockmap, tcp_bpf_recvmsg() returns -EAGAIN from a
 * *blocking* recv() when the wait is woken by something that brought no
 * data: e.g. the ACK of our own FIN after shutdown(SHUT_WR) (a state-change
 * wake-up), or the ACKs that free send-buffer space. A blocking socket must
 * never say EAGAIN (except after SO_RCVTIMEO), so the guard calls again.
 * It costs nothing on the fast path: the checks run only after EAGAIN.
 * docs/ARCHITECTURE.md ("The half-close bug") has the analysis.
 *
 * The same receive path also returns short from recv(MSG_WAITALL) on a
 * blocking socket (whatever one redirected message held); recv and
 * recvfrom go on reading until the request is met, EOF, or an error.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "sys.h"

#define EXPORT __attribute__((visibility("default")))

/* After EAGAIN: was that a spurious wake-up of a blocking stream socket? */
static int spurious_eagain(int fd, int flags, int64_t start)
{
	struct timeval tv;
	socklen_t len = sizeof(int);
	int type = 0, fl;

	if (flags & MSG_DONTWAIT)
		return 0;
	fl = fcntl(fd, F_GETFL);
	if (fl < 0 || (fl & O_NONBLOCK))
		return 0;
	if (getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &len) || type != SOCK_STREAM)
		return 0;
	len = sizeof(tv);
	if (getsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, &len) == 0 && (tv.tv_sec || tv.tv_usec)) {
		int64_t timeout = (int64_t)tv.tv_sec * 1000000000 + (int64_t)tv.tv_usec * 1000;

		if (now_ns() - start >= timeout)
			return 0;	/* a real timeout */
	}
	return 1;
}

/* Call `call` again while it fails with a spurious EAGAIN. */
#define GUARDED(fd, flags, call)					\
	do {								\
		int64_t start_ = 0;					\
		for (;;) {						\
			ssize_t n_ = (call);				\
			int err_ = errno;				\
			if (n_ >= 0 || (err_ != EAGAIN && err_ != EWOULDBLOCK)) \
				return n_;				\
			if (!start_)					\
				start_ = now_ns();			\
			if (!spurious_eagain((fd), (flags), start_)) {	\
				errno = err_;				\
				return n_;				\
			}						\
		}							\
	} while (0)

#define REAL(ret, name, ...)						\
	static ret (*real_##name)(__VA_ARGS__);				\
	static ret (*get_##name(void))(__VA_ARGS__)			\
	{								\
		if (!real_##name)					\
			real_##name = dlsym(RTLD_NEXT, #name);		\
		return real_##name;					\
	}

REAL(ssize_t, recv, int, void *, size_t, int)
REAL(ssize_t, recvfrom, int, void *, size_t, int, struct sockaddr *, socklen_t *)
REAL(ssize_t, recvmsg, int, struct msghdr *, int)
REAL(ssize_t, read, int, void *, size_t)
REAL(ssize_t, readv, int, const struct iovec *, int)
REAL(ssize_t, __read_chk, int, void *, size_t, size_t)
REAL(ssize_t, __recv_chk, int, void *, size_t, size_t, int)
REAL(ssize_t, __recvfrom_chk, int, void *, size_t, size_t, int, struct sockaddr *, socklen_t *)

static ssize_t guarded_recv(int fd, void *buf, size_t len, int flags)
{
	GUARDED(fd, flags, get_recv()(fd, buf, len, flags));
}

static ssize_t guarded_recvfrom(int fd, void *buf, size_t len, int flags,
				struct sockaddr *a, socklen_t *al)
{
	GUARDED(fd, flags, get_recvfrom()(fd, buf, len, flags, a, al));
}

/* MSG_WAITALL on a blocking socket: read the rest of a short first read. */
static ssize_t wait_all(int fd, char *buf, size_t len, int flags, ssize_t got)
{
	int fl;

	if (got <= 0 || (size_t)got >= len || !(flags & MSG_WAITALL) || (flags & (MSG_PEEK | MSG_DONTWAIT)))
		return got;
	fl = fcntl(fd, F_GETFL);
	if (fl < 0 || (fl & O_NONBLOCK))
		return got;
	while ((size_t)got < len) {
		ssize_t n = guarded_recv(fd, buf + got, len - (size_t)got, flags);

		if (n <= 0)
			break;	/* EOF or error: what arrived so far is the answer */
		got += n;
	}
	return got;
}

EXPORT ssize_t recv(int fd, void *buf, size_t len, int flags)
{
	return wait_all(fd, buf, len, flags, guarded_recv(fd, buf, len, flags));
}

EXPORT ssize_t recvfrom(int fd, void *buf, size_t len, int flags, struct sockaddr *a, socklen_t *al)
{
	return wait_all(fd, buf, len, flags, guarded_recvfrom(fd, buf, len, flags, a, al));
}

EXPORT ssize_t recvmsg(int fd, struct msghdr *msg, int flags)
{
	GUARDED(fd, flags, get_recvmsg()(fd, msg, flags));
}

EXPORT ssize_t read(int fd, void *buf, size_t len)
{
	GUARDED(fd, 0, get_read()(fd, buf, len));
}

EXPORT ssize_t readv(int fd, const struct iovec *iov, int cnt)
{
	GUARDED(fd, 0, get_readv()(fd, iov, cnt));
}

EXPORT ssize_t __read_chk(int fd, void *buf, size_t len, size_t buflen)
{
	GUARDED(fd, 0, get___read_chk()(fd, buf, len, buflen));
}

EXPORT ssize_t __recv_chk(int fd, void *buf, size_t len, size_t buflen, int flags)
{
	GUARDED(fd, flags, get___recv_chk()(fd, buf, len, buflen, flags));
}

EXPORT ssize_t __recvfrom_chk(int fd, void *buf, size_t len, size_t buflen, int flags,
			      struct sockaddr *a, socklen_t *al)
{
	GUARDED(fd, flags, get___recvfrom_chk()(fd, buf, len, buflen, flags, a, al));
}
