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
 * recvfrom go on reading until the request is met, EOF, or an error, and
 * MSG_PEEK|MSG_WAITALL peeks again until that much is queued.
 *
 * splice() and sendfile() out of a socket read its receive queue, which the
 * redirected bytes never enter (tcp_bpf has no splice_read): they would
 * see nothing, then EOF. Out of a kernel-tier socket into a pipe, the guard
 * moves the bytes with recv() and write() instead (one copy more).
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/ioctl.h>
#include <sys/sendfile.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "sys.h"
#include "../bpf/bypass.h"

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
REAL(ssize_t, splice, int, off_t *, int, off_t *, size_t, unsigned int)
REAL(ssize_t, sendfile, int, int, off_t *, size_t)
REAL(ssize_t, sendfile64, int, int, off_t *, size_t)

static ssize_t guarded_recv(int fd, void *buf, size_t len, int flags)
{
	GUARDED(fd, flags, get_recv()(fd, buf, len, flags));
}

static ssize_t guarded_recvfrom(int fd, void *buf, size_t len, int flags,
				struct sockaddr *a, socklen_t *al)
{
	GUARDED(fd, flags, get_recvfrom()(fd, buf, len, flags, a, al));
}

/* Does the peer redirect into this socket's psock (the kernel tier)? A
 * TCP socket whose tier BPF cannot tell (no SBP_SO_INFO: the optional ask
 * feature is off) counts as one: a copy too many beats bytes unseen. */
static int redirected_into(int fd)
{
	struct sbp_info info;
	socklen_t len = sizeof(int);
	int proto = 0;

	/* (ENOTSOCK for anything but a socket) */
	if (getsockopt(fd, SOL_SOCKET, SO_PROTOCOL, &proto, &len) || proto != IPPROTO_TCP)
		return 0;
	len = sizeof(info);
	if (getsockopt(fd, SOL_SHMBYPASS, SBP_SO_INFO, &info, &len))
		return errno == ENOPROTOOPT;
	return info.tier == SBP_TIER_KERNEL;
}

/* MSG_PEEK|MSG_WAITALL waits, in TCP, until len bytes are queued (or EOF).
 * tcp_bpf returns what is queued at once; peek again as more arrives (a
 * rare call: a backoff sleep, not a wake-up, is enough). */
static ssize_t peek_all(int fd, char *buf, size_t len, int flags, ssize_t got)
{
	struct timespec nap = { 0, 20000 };
	int64_t start = now_ns();
	ssize_t n;

	if (!redirected_into(fd))
		return got;
	while (got > 0 && (size_t)got < len) {
		struct pollfd p = { .fd = fd, .events = POLLRDHUP };

		if (poll(&p, 1, 0) != 0 || nanosleep(&nap, NULL))
			break;	/* EOF, an error or a signal: what is queued is the answer */
		if (nap.tv_nsec < 10000000)
			nap.tv_nsec *= 2;
		n = get_recv()(fd, buf, len, flags | MSG_DONTWAIT);
		if (n > 0)
			got = n;
		else if (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK)
			return n;	/* reset: the bytes are gone, as in TCP */
		if (!spurious_eagain(fd, 0, start))
			break;	/* SO_RCVTIMEO expired (or the socket went non-blocking) */
	}
	return got;
}

/* MSG_WAITALL on a blocking socket: read the rest of a short first read. */
static ssize_t wait_all(int fd, char *buf, size_t len, int flags, ssize_t got)
{
	int fl;

	if (got <= 0 || (size_t)got >= len || !(flags & MSG_WAITALL) || (flags & MSG_DONTWAIT))
		return got;
	fl = fcntl(fd, F_GETFL);
	if (fl < 0 || (fl & O_NONBLOCK))
		return got;
	if (flags & MSG_PEEK)
		return peek_all(fd, buf, len, flags, got);
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

static int is_pipe(int fd)
{
	struct stat st;

	return fstat(fd, &st) == 0 && S_ISFIFO(st.st_mode);
}

/* Room in the pipe, waiting for some unless non-blocking (-1: errno). */
static ssize_t pipe_room(int pipe, int nonblock)
{
	for (;;) {
		int size = fcntl(pipe, F_GETPIPE_SZ), queued = 0;
		struct pollfd p = { .fd = pipe, .events = POLLOUT };

		if (size < 0 || ioctl(pipe, FIONREAD, &queued))
			return -1;
		if (queued < size)
			return size - queued;
		if (nonblock) {
			errno = EAGAIN;
			return -1;
		}
		if (poll(&p, 1, -1) < 0)
			return -1;
	}
}

/* Take the n bytes that a peek saw queued. (Only a second reader of the
 * socket, racing with this splice, could have taken some meanwhile: those
 * went to both, as nothing can undo a pipe write.) */
static void consume(int sock, char *buf, size_t n)
{
	while (n) {
		ssize_t k = guarded_recv(sock, buf, n, MSG_DONTWAIT);

		if (k <= 0)
			return;
		n -= (size_t)k;
	}
}

/* splice(sock -> pipe) as a peek, a write() of at most the pipe's room,
 * then a recv() of what the write took: like splice, the socket loses no
 * byte if the pipe's reader is gone (EPIPE) or the pipe filled meanwhile
 * (EAGAIN). Blocking and EOF are the peek's, as splice's are recv()'s. */
static ssize_t splice_out(int sock, int pipe, size_t len, unsigned int flags)
{
	int sfl = fcntl(sock, F_GETFL), pfl = fcntl(pipe, F_GETFL);
	int nonblock = (flags & SPLICE_F_NONBLOCK) || (pfl >= 0 && (pfl & O_NONBLOCK));
	ssize_t room = pipe_room(pipe, nonblock), n, w;
	char *buf;

	if (room < 0)
		return -1;
	if (len > (size_t)room)
		len = (size_t)room;
	buf = malloc(len);
	if (!buf) {
		errno = ENOMEM;
		return -1;
	}
	/* SPLICE_F_NONBLOCK is about the pipe; the socket's own flag decides
	 * whether the read waits, as in tcp_splice_read(). */
	n = guarded_recv(sock, buf, len, MSG_PEEK | ((sfl >= 0 && (sfl & O_NONBLOCK)) ? MSG_DONTWAIT : 0));
	if (n > 0) {
		do
			w = write(pipe, buf, (size_t)n);
		while (w < 0 && errno == EINTR);
		if (w > 0)
			consume(sock, buf, (size_t)w);
		n = w;
	}
	free(buf);
	return n;
}

EXPORT ssize_t splice(int in, off_t *off_in, int out, off_t *off_out, size_t len, unsigned int flags)
{
	if (!off_in && !off_out && len && is_pipe(out) && redirected_into(in))
		return splice_out(in, out, len, flags);
	return get_splice()(in, off_in, out, off_out, len, flags);
}

EXPORT ssize_t sendfile(int out, int in, off_t *offset, size_t count)
{
	if (!offset && count && is_pipe(out) && redirected_into(in))
		return splice_out(in, out, count, 0);
	return get_sendfile()(out, in, offset, count);
}

EXPORT ssize_t sendfile64(int out, int in, off_t *offset, size_t count)
{
	if (!offset && count && is_pipe(out) && redirected_into(in))
		return splice_out(in, out, count, 0);
	return get_sendfile64() ? get_sendfile64()(out, in, offset, count)
				: get_sendfile()(out, in, offset, count);
}
