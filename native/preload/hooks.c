// SPDX-License-Identifier: GPL-2.0
/* hooks.c: the libc functions the interposer replaces, and where each one
 * goes: straight to libc for fds that are not ours, to our code for the
 * rest. Find any libc call here by its name.
 *
 *   data calls (read/write/send/recv...)                    io.c
 *   sendfile, splice                                        splice.c
 *   poll, ppoll, select, pselect                            poll.c
 *   epoll_ctl, epoll_wait, epoll_pwait, epoll_pwait2        epoll.c
 *   socket life cycle (socket, connect, accept, close, dup,
 *   shutdown, fcntl, ioctl, setsockopt, getsockopt)         sockets.c
 *   load time and fork                                      setup.c, channel.c
 *
 * Everything the interposer does is async-signal-safe in the sense that
 * matters: no malloc (mmap only), no stdio, raw syscalls for its own I/O;
 * locks are only taken around ring operations.
 */
#include <pthread.h>
#include <stdarg.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "channel.h"
#include "epoll.h"
#include "epset.h"
#include "fdclass.h"
#include "fdtable.h"
#include "io.h"
#include "orphan.h"
#include "memory.h"
#include "poll.h"
#include "setup.h"
#include "sockets.h"
#include "splice.h"

/* ---- load time and fork ------------------------------------------------ */

static void atfork_prepare(void)
{
	chan_atfork_prepare();
}

static void atfork_parent(void)
{
	chan_atfork_parent();
	mark_all_shared();
}

static void atfork_child(void)
{
	g.pid = (pid_t)syscall(SYS_getpid);
	chan_atfork_child();
	mark_all_shared();
	mem_atfork_child();
	orphan_atfork_child();
	ep_atfork_child();
}

__attribute__((constructor)) static void preload_init(void)
{
	setup_init();
	if (g.enabled)
		pthread_atfork(atfork_prepare, atfork_parent, atfork_child);
}

/* ---- data: read/write, send/recv and their kin -------------------------- */

EXPORT ssize_t read(int fd, void *buf, size_t n)
{
	struct iovec iov = { buf, n };
	struct chan *ch;

	if (likely(fd_io_class(fd, &ch) != K_SHM && !ch))
		return REAL(read)(fd, buf, n);
	return put_ret(ch, shm_recv(fd, ch, &iov, 1, 0));
}

EXPORT ssize_t __read_chk(int fd, void *buf, size_t n, size_t buflen)
{
	if (n > buflen)
		return REAL(__read_chk)(fd, buf, n, buflen);    /* aborts, as it should */
	return read(fd, buf, n);
}

EXPORT ssize_t write(int fd, const void *buf, size_t n)
{
	struct iovec iov = { (void *)buf, n };
	struct chan *ch;

	if (likely(fd_io_class(fd, &ch) != K_SHM && !ch))
		return REAL(write)(fd, buf, n);
	return put_ret(ch, shm_send(fd, ch, &iov, 1, 0));
}

EXPORT ssize_t readv(int fd, const struct iovec *iov, int cnt)
{
	struct chan *ch;

	if (likely(fd_io_class(fd, &ch) != K_SHM && !ch))
		return REAL(readv)(fd, iov, cnt);
	return put_ret(ch, shm_recv(fd, ch, iov, cnt, 0));
}

EXPORT ssize_t writev(int fd, const struct iovec *iov, int cnt)
{
	struct chan *ch;

	if (likely(fd_io_class(fd, &ch) != K_SHM && !ch))
		return REAL(writev)(fd, iov, cnt);
	return put_ret(ch, shm_send(fd, ch, iov, cnt, 0));
}

EXPORT ssize_t recv(int fd, void *buf, size_t n, int flags)
{
	struct iovec iov = { buf, n };
	struct chan *ch;

	if (likely(fd_io_class(fd, &ch) != K_SHM && !ch))
		return REAL(recv)(fd, buf, n, flags);
	return put_ret(ch, shm_recv(fd, ch, &iov, 1, flags));
}

EXPORT ssize_t __recv_chk(int fd, void *buf, size_t n, size_t buflen, int flags)
{
	if (n > buflen)
		return REAL(__recv_chk)(fd, buf, n, buflen, flags);
	return recv(fd, buf, n, flags);
}

EXPORT ssize_t send(int fd, const void *buf, size_t n, int flags)
{
	struct iovec iov = { (void *)buf, n };
	struct chan *ch;

	if (likely(fd_io_class(fd, &ch) != K_SHM && !ch))
		return REAL(send)(fd, buf, n, flags);
	return put_ret(ch, shm_send(fd, ch, &iov, 1, flags));
}

EXPORT ssize_t recvfrom(int fd, void *buf, size_t n, int flags, struct sockaddr *addr,
			socklen_t *alen)
{
	struct iovec iov = { buf, n };
	struct chan *ch;
	ssize_t r;

	if (likely(fd_io_class(fd, &ch) != K_SHM && !ch))
		return REAL(recvfrom)(fd, buf, n, flags, addr, alen);
	r = shm_recv(fd, ch, &iov, 1, flags);
	if (r >= 0 && addr && alen)
		*alen = 0;              /* TCP reports no address */
	return put_ret(ch, r);
}

EXPORT ssize_t __recvfrom_chk(int fd, void *buf, size_t n, size_t buflen, int flags,
			      struct sockaddr *addr, socklen_t *alen)
{
	if (n > buflen)
		return REAL(__recvfrom_chk)(fd, buf, n, buflen, flags, addr, alen);
	return recvfrom(fd, buf, n, flags, addr, alen);
}

EXPORT ssize_t sendto(int fd, const void *buf, size_t n, int flags, const struct sockaddr *addr,
		      socklen_t alen)
{
	struct iovec iov = { (void *)buf, n };
	struct chan *ch;

	if (likely(fd_io_class(fd, &ch) != K_SHM && !ch))
		return REAL(sendto)(fd, buf, n, flags, addr, alen);
	return put_ret(ch, shm_send(fd, ch, &iov, 1, flags));   /* connected: address ignored */
}

EXPORT ssize_t recvmsg(int fd, struct msghdr *m, int flags)
{
	struct chan *ch;
	ssize_t r;

	if (likely(fd_io_class(fd, &ch) != K_SHM && !ch)) {
		r = REAL(recvmsg)(fd, m, flags);
		if (r >= 0)
			note_received_fds(m);
		return r;
	}
	return put_ret(ch, shm_recvmsg(fd, ch, m, flags));
}

EXPORT ssize_t sendmsg(int fd, const struct msghdr *m, int flags)
{
	struct chan *ch;

	if (likely(fd_io_class(fd, &ch) != K_SHM && !ch)) {
		note_sent_fds(m);       /* a shm socket passed on goes back to TCP first */
		return REAL(sendmsg)(fd, m, flags);
	}
	return put_ret(ch, shm_sendmsg(fd, ch, m, flags));
}

EXPORT int recvmmsg(int fd, struct mmsghdr *vec, unsigned int vlen, int flags,
		    struct timespec *timeout)
{
	struct chan *ch;

	if (likely(fd_io_class(fd, &ch) != K_SHM && !ch))
		return REAL(recvmmsg)(fd, vec, vlen, flags, timeout);
	return (int)put_ret(ch, shm_recvmmsg(fd, ch, vec, vlen, flags));
}

EXPORT int sendmmsg(int fd, struct mmsghdr *vec, unsigned int vlen, int flags)
{
	struct chan *ch;

	if (likely(fd_io_class(fd, &ch) != K_SHM && !ch)) {
		for (unsigned int i = 0; vec && i < vlen; i++)
			note_sent_fds(&vec[i].msg_hdr);
		return REAL(sendmmsg)(fd, vec, vlen, flags);
	}
	return (int)put_ret(ch, shm_sendmmsg(fd, ch, vec, vlen, flags));
}

EXPORT ssize_t sendfile(int out, int in, off_t *offset, size_t count)
{
	struct chan *ch;

	if (likely(fd_io_class(out, &ch) != K_SHM && !ch))
		return REAL(sendfile)(out, in, offset, count);
	return put_ret(ch, shm_sendfile(out, ch, in, offset, count));
}

EXPORT ssize_t sendfile64(int out, int in, off_t *offset, size_t count)
{
	struct chan *ch;

	if (likely(fd_io_class(out, &ch) != K_SHM && !ch))
		return REAL(sendfile64) ? REAL(sendfile64)(out, in, offset, count)
					: REAL(sendfile)(out, in, offset, count);
	return put_ret(ch, shm_sendfile(out, ch, in, offset, count));
}

EXPORT ssize_t splice(int in, off_t *off_in, int out, off_t *off_out, size_t len,
		      unsigned int flags)
{
	struct chan *cin, *cout;

	fd_io_class(in, &cin);
	fd_io_class(out, &cout);
	if (likely(!cin && !cout))
		return REAL(splice)(in, off_in, out, off_out, len, flags);
	return shm_splice(in, cin, off_in, out, cout, off_out, len, flags);
}

/* ---- readiness: poll, select, epoll ------------------------------------- */

EXPORT int poll(struct pollfd *fds, nfds_t n, int timeout)
{
	int handled, r = do_poll(fds, n, timeout < 0 ? -1 : (int64_t)timeout * 1000000, NULL, &handled);

	return handled ? r : REAL(poll)(fds, n, timeout);
}

EXPORT int __poll_chk(struct pollfd *fds, nfds_t n, int timeout, size_t fdslen)
{
	if (fdslen / sizeof(*fds) < n)
		return REAL(__poll_chk)(fds, n, timeout, fdslen);       /* aborts */
	return poll(fds, n, timeout);
}

EXPORT int ppoll(struct pollfd *fds, nfds_t n, const struct timespec *ts, const sigset_t *mask)
{
	int handled, r;

	if (ts && (ts->tv_sec < 0 || ts->tv_nsec < 0 || ts->tv_nsec >= NS_PER_S))
		return REAL(ppoll)(fds, n, ts, mask);   /* EINVAL */
	r = do_poll(fds, n, timespec_ns(ts), mask, &handled);
	return handled ? r : REAL(ppoll)(fds, n, ts, mask);
}

EXPORT int __ppoll_chk(struct pollfd *fds, nfds_t n, const struct timespec *ts,
		       const sigset_t *mask, size_t fdslen)
{
	if (fdslen / sizeof(*fds) < n)
		return REAL(__ppoll_chk)(fds, n, ts, mask, fdslen);
	return ppoll(fds, n, ts, mask);
}

EXPORT int select(int nfds, fd_set *r, fd_set *w, fd_set *e, struct timeval *tv)
{
	if (nfds < 0 || nfds > FD_SETSIZE || !sets_have_shm(nfds, r, w, e) ||
	    (tv && (tv->tv_sec < 0 || tv->tv_usec < 0)))
		return REAL(select)(nfds, r, w, e, tv);
	return poll_select(nfds, r, w, e, tv);
}

EXPORT int pselect(int nfds, fd_set *r, fd_set *w, fd_set *e, const struct timespec *ts,
		   const sigset_t *mask)
{
	if (nfds < 0 || nfds > FD_SETSIZE || !sets_have_shm(nfds, r, w, e) ||
	    (ts && (ts->tv_sec < 0 || ts->tv_nsec < 0 || ts->tv_nsec >= NS_PER_S)))
		return REAL(pselect)(nfds, r, w, e, ts, mask);
	return select_via_poll(nfds, r, w, e, timespec_ns(ts), mask);
}

EXPORT int epoll_ctl(int epfd, int op, int fd, struct epoll_event *ev)
{
	if (!g.enabled)
		return REAL(epoll_ctl)(epfd, op, fd, ev);
	return ep_ctl(epfd, op, fd, ev);
}

EXPORT int epoll_wait(int epfd, struct epoll_event *evs, int max, int timeout)
{
	int ret;

	if (ep_wait(epfd, evs, max, timeout < 0 ? -1 : (int64_t)timeout * 1000000, NULL, &ret))
		return ret;
	return REAL(epoll_wait)(epfd, evs, max, timeout);
}

EXPORT int epoll_pwait(int epfd, struct epoll_event *evs, int max, int timeout,
		       const sigset_t *mask)
{
	int ret;

	if (ep_wait(epfd, evs, max, timeout < 0 ? -1 : (int64_t)timeout * 1000000, mask, &ret))
		return ret;
	return REAL(epoll_pwait)(epfd, evs, max, timeout, mask);
}

EXPORT int epoll_pwait2(int epfd, struct epoll_event *evs, int max, const struct timespec *ts,
			const sigset_t *mask)
{
	int ret;

	if (ep_wait(epfd, evs, max, timespec_ns(ts), mask, &ret))
		return ret;
	return REAL(epoll_pwait2)(epfd, evs, max, ts, mask);
}

/* ---- the socket life cycle ---------------------------------------------- */

EXPORT int socket(int domain, int type, int proto)
{
	int fd = REAL(socket)(domain, type, proto);

	if (fd >= 0 && g.enabled)
		sock_created(fd, domain, type, proto);
	return fd;
}

EXPORT int connect(int fd, const struct sockaddr *addr, socklen_t len)
{
	if (!g.enabled)
		return REAL(connect)(fd, addr, len);
	return sock_connect(fd, addr, len);
}

EXPORT int listen(int fd, int backlog)
{
	if (!g.enabled)
		return REAL(listen)(fd, backlog);
	return sock_listen(fd, backlog);
}

EXPORT int accept(int fd, struct sockaddr *addr, socklen_t *len)
{
	int nfd = REAL(accept)(fd, addr, len);

	return nfd < 0 || !g.enabled ? nfd : sock_accepted(fd, nfd, 0);
}

EXPORT int accept4(int fd, struct sockaddr *addr, socklen_t *len, int flags)
{
	int nfd = REAL(accept4)(fd, addr, len, flags);

	return nfd < 0 || !g.enabled ? nfd : sock_accepted(fd, nfd, flags);
}

EXPORT int close(int fd)
{
	if (!g.enabled || fd < 0 || in_vfork_child())
		return REAL(close)(fd);
	return sock_close(fd);
}

EXPORT int close_range(unsigned int first, unsigned int last, int flags)
{
	if (!g.enabled || (flags & CLOSE_RANGE_CLOEXEC) || in_vfork_child())
		return REAL(close_range) ? REAL(close_range)(first, last, flags)
					 : (int)syscall(SYS_close_range, first, last, flags);
	return sock_close_range(first, last, flags);
}

EXPORT void closefrom(int lowfd)
{
	close_range(lowfd < 0 ? 0 : (unsigned int)lowfd, ~0u, 0);
}

EXPORT int shutdown(int fd, int how)
{
	struct chan *ch;

	if (fd_io_class(fd, &ch) != K_SHM && !ch)
		return REAL(shutdown)(fd, how);
	return (int)put_ret(ch, sock_shutdown(fd, ch, how));
}

EXPORT int dup(int oldfd)
{
	int nfd = REAL(dup)(oldfd);

	if (nfd >= 0 && g.enabled && !in_vfork_child())
		sock_duped(oldfd, nfd);
	return nfd;
}

EXPORT int dup2(int oldfd, int newfd)
{
	if (!g.enabled || in_vfork_child())
		return REAL(dup2)(oldfd, newfd);
	return sock_dup_onto(oldfd, newfd, 0, 0);
}

EXPORT int dup3(int oldfd, int newfd, int flags)
{
	if (!g.enabled || in_vfork_child())
		return REAL(dup3)(oldfd, newfd, flags);
	return sock_dup_onto(oldfd, newfd, flags, 1);
}

/* The one argument after `last` of fcntl/ioctl, an int or a pointer: taken
 * as a pointer, as glibc passes it on. */
#define ONE_VARARG(last, arg)                                   \
	do {                                                    \
		va_list ap;                                     \
		va_start(ap, last);                             \
		arg = va_arg(ap, void *);                       \
		va_end(ap);                                     \
	} while (0)

EXPORT int fcntl(int fd, int cmd, ...)
{
	void *arg;

	ONE_VARARG(cmd, arg);
	if (!g.enabled)
		return REAL(fcntl)(fd, cmd, arg);
	return sock_fcntl(REAL(fcntl), fd, cmd, arg);
}

EXPORT int fcntl64(int fd, int cmd, ...)
{
	int (*real)(int, int, void *) = REAL(fcntl64) ? REAL(fcntl64) : REAL(fcntl);
	void *arg;

	ONE_VARARG(cmd, arg);
	if (!g.enabled)
		return real(fd, cmd, arg);
	return sock_fcntl(real, fd, cmd, arg);
}

EXPORT int ioctl(int fd, unsigned long req, ...)
{
	void *arg;

	ONE_VARARG(req, arg);
	return sock_ioctl(fd, req, arg);
}

EXPORT int setsockopt(int fd, int level, int name, const void *val, socklen_t len)
{
	if (!g.enabled)
		return REAL(setsockopt)(fd, level, name, val, len);
	return sock_setsockopt(fd, level, name, val, len);
}

EXPORT int getsockopt(int fd, int level, int name, void *val, socklen_t *len)
{
	int r = REAL(getsockopt)(fd, level, name, val, len);

	if (r == 0 && g.enabled)
		sock_getsockopt_done(fd, level, name, val, len);
	return r;
}

/* ---- exec and spawn ------------------------------------------------------
 * The new program cannot read our rings (it has none of our mappings, and
 * maybe not our library): every shm socket it would inherit goes back to
 * plain TCP first, with every byte in order (revert.c). posix_spawn,
 * system and popen run the new program from a child our hooks never see,
 * so the sockets they could pass on go back before the call. */

EXPORT int execve(const char *path, char *const argv[], char *const envp[])
{
	if (g.enabled)
		sock_before_exec();
	return REAL(execve)(path, argv, envp);
}

EXPORT int execv(const char *path, char *const argv[])
{
	if (g.enabled)
		sock_before_exec();
	return REAL(execv)(path, argv);
}

EXPORT int execvp(const char *file, char *const argv[])
{
	if (g.enabled)
		sock_before_exec();
	return REAL(execvp)(file, argv);
}

EXPORT int execvpe(const char *file, char *const argv[], char *const envp[])
{
	if (g.enabled)
		sock_before_exec();
	return REAL(execvpe)(file, argv, envp);
}

/* execl, execlp, execle: glibc builds the argv and calls its internal
 * execve, which we would not see: the same here, through ours. */
#define EXECL_ARGS(first, last_arg, envp)                                       \
	size_t n = 1;                                                           \
	va_list ap;                                                             \
	va_start(ap, first);                                                    \
	while (va_arg(ap, char *))                                              \
		n++;                                                            \
	va_end(ap);                                                             \
	char *argv[n + 1];                                                      \
	va_start(ap, first);                                                    \
	argv[0] = (char *)(first);                                              \
	for (size_t i = 1; i <= n; i++)                                         \
		argv[i] = va_arg(ap, char *);                                   \
	envp = last_arg ? va_arg(ap, char **) : NULL;                           \
	va_end(ap)

EXPORT int execl(const char *path, const char *arg, ...)
{
	char **envp;

	EXECL_ARGS(arg, 0, envp);
	(void)envp;
	return execv(path, argv);
}

EXPORT int execlp(const char *file, const char *arg, ...)
{
	char **envp;

	EXECL_ARGS(arg, 0, envp);
	(void)envp;
	return execvp(file, argv);
}

EXPORT int execle(const char *path, const char *arg, ...)
{
	char **envp;

	EXECL_ARGS(arg, 1, envp);
	return execve(path, argv, envp);
}

EXPORT int fexecve(int fd, char *const argv[], char *const envp[])
{
	if (g.enabled)
		sock_before_exec();
	return REAL(fexecve)(fd, argv, envp);
}

EXPORT int posix_spawn(pid_t *pid, const char *path, const posix_spawn_file_actions_t *fa,
		       const posix_spawnattr_t *attr, char *const argv[], char *const envp[])
{
	if (g.enabled)
		sock_before_exec();
	return REAL(posix_spawn)(pid, path, fa, attr, argv, envp);
}

EXPORT int posix_spawnp(pid_t *pid, const char *file, const posix_spawn_file_actions_t *fa,
			const posix_spawnattr_t *attr, char *const argv[], char *const envp[])
{
	if (g.enabled)
		sock_before_exec();
	return REAL(posix_spawnp)(pid, file, fa, attr, argv, envp);
}

EXPORT int system(const char *cmd)
{
	if (g.enabled && cmd)
		sock_before_exec();
	return REAL(system)(cmd);
}

EXPORT FILE *popen(const char *cmd, const char *mode)
{
	if (g.enabled)
		sock_before_exec();
	return REAL(popen)(cmd, mode);
}
