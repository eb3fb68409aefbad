/* SPDX-License-Identifier: GPL-2.0 */
/*
 * sys.h: the clock, the spin pause and the raw system calls that the ring,
 * the region, the preload libraries and the tools share (one copy each).
 *
 * Raw syscall() on purpose where the interposer is concerned: its own I/O
 * must not go through its own hooks, and these are the calls it makes on
 * the application's behalf without counting as the application's calls.
 */
#ifndef SHMBYPASS_SYS_H
#define SHMBYPASS_SYS_H

#include <errno.h>
#include <limits.h>
#include <linux/bpf.h>
#include <linux/futex.h>
#include <poll.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/epoll.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define NS_PER_S 1000000000
#define DL_NONE INT64_MAX       /* a deadline that never comes */

/* CLOCK_MONOTONIC in ns (no syscall: the vDSO). */
static inline int64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * NS_PER_S + ts.tv_nsec;
}

/* A timeout as ns; NULL (no timeout) is -1. */
static inline int64_t timespec_ns(const struct timespec *ts)
{
	if (!ts)
		return -1;
	return (int64_t)ts->tv_sec * NS_PER_S + ts->tv_nsec;
}

/* The pause of a spin loop on shared state. */
static inline void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
	__builtin_ia32_pause();
#elif defined(__aarch64__)
	__asm__ __volatile__("yield");
#endif
}

/* bpf(2): libbpf cannot say everything we need (a 64-bit map_extra), and
 * the interposer must not depend on libbpf. */
static inline long sys_bpf(int cmd, union bpf_attr *a)
{
	return syscall(SYS_bpf, cmd, a, sizeof(*a));
}

/* FUTEX_WAIT (not private: the word is shared between processes): 0 when
 * woken, else -errno (-EAGAIN: the word was not val, -ETIMEDOUT, -EINTR,
 * -EFAULT: no shared futex on this memory). timeout_ns < 0: none. */
static inline int sys_futex_wait(uint32_t *word, uint32_t val, int64_t timeout_ns)
{
	struct timespec ts, *tp = NULL;

	if (timeout_ns >= 0) {
		ts.tv_sec = timeout_ns / NS_PER_S;
		ts.tv_nsec = timeout_ns % NS_PER_S;
		tp = &ts;
	}
	if (syscall(SYS_futex, word, FUTEX_WAIT, val, tp, NULL, 0) == 0)
		return 0;
	return -errno;
}

static inline void sys_futex_wake(uint32_t *word)
{
	syscall(SYS_futex, word, FUTEX_WAKE, INT_MAX, NULL, NULL, 0);
}

/* ns < 0: no timeout; mask NULL: the thread's own. */
static inline int sys_ppoll(struct pollfd *fds, nfds_t n, int64_t ns, const sigset_t *mask)
{
	struct timespec ts, *tp = NULL;

	if (ns >= 0) {
		ts.tv_sec = ns / NS_PER_S;
		ts.tv_nsec = ns % NS_PER_S;
		tp = &ts;
	}
	return (int)syscall(SYS_ppoll, fds, n, tp, mask, 8);
}

static inline int sys_epoll_ctl(int epfd, int op, int fd, struct epoll_event *ev)
{
	return (int)syscall(SYS_epoll_ctl, epfd, op, fd, ev);
}

/* epoll_pwait2 (ns resolution), or epoll_pwait where the kernel lacks it. */
static inline int sys_epoll_wait_ns(int epfd, struct epoll_event *evs, int max, int64_t ns,
				    const sigset_t *mask)
{
	struct timespec ts, *tp = NULL;
	long r;

	if (ns >= 0) {
		ts.tv_sec = ns / NS_PER_S;
		ts.tv_nsec = ns % NS_PER_S;
		tp = &ts;
	}
	r = syscall(SYS_epoll_pwait2, epfd, evs, max, tp, mask, 8);
	if (r < 0 && errno == ENOSYS)
		r = syscall(SYS_epoll_pwait, epfd, evs, max,
			    ns < 0 ? -1 : (int)((ns + 999999) / 1000000), mask, 8);
	return (int)r;
}

/* Private anonymous memory (no malloc in the interposer); NULL on failure. */
static inline void *anon_alloc(size_t bytes)
{
	void *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

	return p == MAP_FAILED ? NULL : p;
}

#endif
