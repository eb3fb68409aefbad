/* SPDX-License-Identifier: GPL-2.0 */
/* setup.h: the interposer's set-up: the real libc functions, the process-wide
 * state from the environment, logging, the sk_state map and the region. */
#ifndef SBP_PRELOAD_SETUP_H
#define SBP_PRELOAD_SETUP_H

#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <sys/epoll.h>
#include <sys/select.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <time.h>

#include "region.h"
#include "ring.h"
#include "sys.h"
#include "../../bpf/bypass.h"

#define EXPORT __attribute__((visibility("default")))
#define unlikely(x) __builtin_expect(!!(x), 0)
#define likely(x) __builtin_expect(!!(x), 1)

/* ---- the real functions (dlsym RTLD_NEXT), resolved at load ---------- */

#define SBP_REAL_LIST(X)                                                                   \
	X(int, socket, int, int, int)                                                      \
	X(int, connect, int, const struct sockaddr *, socklen_t)                           \
	X(int, listen, int, int)                                                           \
	X(int, accept, int, struct sockaddr *, socklen_t *)                                \
	X(int, accept4, int, struct sockaddr *, socklen_t *, int)                          \
	X(int, close, int)                                                                 \
	X(int, close_range, unsigned int, unsigned int, int)                               \
	X(void, closefrom, int)                                                            \
	X(int, shutdown, int, int)                                                         \
	X(int, dup, int)                                                                   \
	X(int, dup2, int, int)                                                             \
	X(int, dup3, int, int, int)                                                        \
	X(int, fcntl, int, int, void *)                                                    \
	X(int, fcntl64, int, int, void *)                                                  \
	X(int, ioctl, int, unsigned long, void *)                                          \
	X(int, getsockopt, int, int, int, void *, socklen_t *)                             \
	X(int, setsockopt, int, int, int, const void *, socklen_t)                         \
	X(ssize_t, read, int, void *, size_t)                                              \
	X(ssize_t, write, int, const void *, size_t)                                       \
	X(ssize_t, readv, int, const struct iovec *, int)                                  \
	X(ssize_t, writev, int, const struct iovec *, int)                                 \
	X(ssize_t, recv, int, void *, size_t, int)                                         \
	X(ssize_t, send, int, const void *, size_t, int)                                   \
	X(ssize_t, recvfrom, int, void *, size_t, int, struct sockaddr *, socklen_t *)     \
	X(ssize_t, sendto, int, const void *, size_t, int, const struct sockaddr *,        \
	  socklen_t)                                                                       \
	X(ssize_t, recvmsg, int, struct msghdr *, int)                                     \
	X(ssize_t, sendmsg, int, const struct msghdr *, int)                               \
	X(int, recvmmsg, int, struct mmsghdr *, unsigned int, int, struct timespec *)      \
	X(int, sendmmsg, int, struct mmsghdr *, unsigned int, int)                         \
	X(ssize_t, sendfile, int, int, off_t *, size_t)                                    \
	X(ssize_t, sendfile64, int, int, off_t *, size_t)                                  \
	X(ssize_t, splice, int, off_t *, int, off_t *, size_t, unsigned int)               \
	X(ssize_t, __read_chk, int, void *, size_t, size_t)                                \
	X(ssize_t, __recv_chk, int, void *, size_t, size_t, int)                           \
	X(ssize_t, __recvfrom_chk, int, void *, size_t, size_t, int, struct sockaddr *,    \
	  socklen_t *)                                                                     \
	X(int, poll, struct pollfd *, nfds_t, int)                                         \
	X(int, __poll_chk, struct pollfd *, nfds_t, int, size_t)                           \
	X(int, ppoll, struct pollfd *, nfds_t, const struct timespec *, const sigset_t *)  \
	X(int, __ppoll_chk, struct pollfd *, nfds_t, const struct timespec *,              \
	  const sigset_t *, size_t)                                                        \
	X(int, select, int, fd_set *, fd_set *, fd_set *, struct timeval *)                \
	X(int, pselect, int, fd_set *, fd_set *, fd_set *, const struct timespec *,        \
	  const sigset_t *)                                                                \
	X(int, epoll_ctl, int, int, int, struct epoll_event *)                             \
	X(int, epoll_wait, int, struct epoll_event *, int, int)                            \
	X(int, epoll_pwait, int, struct epoll_event *, int, int, const sigset_t *)         \
	X(int, epoll_pwait2, int, struct epoll_event *, int, const struct timespec *,      \
	  const sigset_t *)                                                                \
	X(int, execve, const char *, char *const *, char *const *)                         \
	X(int, execv, const char *, char *const *)                                         \
	X(int, execvp, const char *, char *const *)                                        \
	X(int, execvpe, const char *, char *const *, char *const *)                        \
	X(int, fexecve, int, char *const *, char *const *)                                 \
	X(int, posix_spawn, pid_t *, const char *, const posix_spawn_file_actions_t *,     \
	  const posix_spawnattr_t *, char *const *, char *const *)                         \
	X(int, posix_spawnp, pid_t *, const char *, const posix_spawn_file_actions_t *,    \
	  const posix_spawnattr_t *, char *const *, char *const *)                         \
	X(int, system, const char *)                                                       \
	X(FILE *, popen, const char *, const char *)

#define SBP_REAL_DECL(ret, name, ...) extern ret (*real_##name)(__VA_ARGS__);
SBP_REAL_LIST(SBP_REAL_DECL)
#undef SBP_REAL_DECL
/* Resolve one real function now (a hook called before our constructor). */
void *sbp_real(const char *name, void **slot);
#define REAL(name) (likely(real_##name) ? real_##name :                                     \
		    (__typeof__(real_##name))sbp_real(#name, (void **)&real_##name))

/* ---- process-wide state ---------------------------------------------- */

struct sbp_global {
	int enabled;            /* 0: SHMBYPASS_DISABLE: pure pass-through */
	pid_t pid;              /* ours (set again in a fork child; a vfork child differs) */
	int debug;
	int doorbell;           /* no futex wake-ups (a VM pair: the peer is in another VM) */
	_Atomic int region_state; /* VM pairs: 0 not tried, 1 mapped, -1 not usable (said why) */
	void *region;           /* a VM pair's shared region (ivshmem BAR) */
	size_t region_size;
	struct sbp_region_info info;
	uint32_t part_first;    /* this kernel's part of the region (BPF `region` map): */
	uint32_t part_count;    /*   a peer slot outside it is another VM's (0: unknown) */
	uint32_t spin_ns;       /* ring spin budget (SHMBYPASS_SPIN_NS) */
	uint32_t epoll_spin_ns; /* poll/epoll spin before sleeping */
	char instance[128];
	char pin_dir[256];
	char region_spec[300];  /* "<backend>:<path>" (VM pairs) */
};
extern struct sbp_global g;

void sbp_log(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
#define DBG(...) do { if (unlikely(g.debug)) sbp_log(__VA_ARGS__); } while (0)
/* Reasons are worth a line even without SHMBYPASS_DEBUG when the connection
 * had been promised the shm tier. */
#define WARN(...) sbp_log(__VA_ARGS__)

/* Between vfork() and exec: the child runs in our memory (our tables are
 * the parent's), and no atfork handler told us. A syscall: only for the
 * calls a vfork child makes (close, dup2, exec), never on the data path. */
static inline int in_vfork_child(void)
{
	return unlikely((pid_t)syscall(SYS_getpid) != g.pid);
}

/* The TCP state (TCP_ESTABLISHED...) of a socket, -1 if not one. */
int sock_tcp_state(int fd);

/* Load time: resolve the real functions, read the environment. */
void setup_init(void);

/* A VM pair's region, mapped on first need: 1 if there is one here. */
int sbp_region_ready(void);

#endif
