// SPDX-License-Identifier: GPL-2.0
/* testhooks.c: hooks for the tests, built only into the test library
 * (libshmbypass-preload-test.so, -DSBP_TEST): the arm delay that holds a
 * lost wake-up's window open, and the exports that tell a test an fd's tier
 * and slots. */
#include <stdlib.h>
#include <time.h>

#include "ask.h"
#include "channel.h"
#include "fdtable.h"
#include "setup.h"
#include "testhooks.h"

/* SHMBYPASS_TEST_ARM_DELAY_NS: sleep this long between the last look at the
 * rings and arming them, so a peer that frees room or sends data meanwhile
 * is certain to do it inside that window (the window is otherwise a few
 * hundred ns; the lost wake-up it hid showed only under load). Read once
 * at load. */
static int64_t test_arm_delay_ns;

__attribute__((constructor)) static void test_hooks_init(void)
{
	const char *v = getenv("SHMBYPASS_TEST_ARM_DELAY_NS");

	if (v && *v)
		test_arm_delay_ns = strtoll(v, NULL, 10);
}

void test_arm_delay(void)
{
	if (unlikely(test_arm_delay_ns > 0)) {
		struct timespec ts = { test_arm_delay_ns / 1000000000, test_arm_delay_ns % 1000000000 };
		int saved = errno;

		nanosleep(&ts, NULL);
		errno = saved;
	}
}

/* For tests (ctypes): which directions of fd go through rings now (bit 0:
 * what we send, bit 1: what we read); 0 for anything else. */
EXPORT int shmbypass_fd_rings(int fd)
{
	uint64_t v = fdt_load(fd);
	struct chan_sh *sh;

	if (!g.enabled || (FD_KIND(v) != K_SHM && FD_KIND(v) != K_PENDING) || !FD_PTR(v))
		return 0;
	sh = ((struct chan *)FD_PTR(v))->sh;
	return (atomic_load(&sh->phase) == CH_LIVE ? 1 : 0) |
	       ((atomic_load(&sh->flags) & CH_RX_ATTACHED) ? 2 : 0);
}

/* For tests (ctypes): wait up to ms milliseconds for a shm-tier connection
 * to move its bytes through rings (the active end: until the offer comes
 * and is taken; the passive end: until it was taken), as it would after a
 * first exchange, so that a test's next bytes take the rings. 1 if our
 * direction is live, 0 if not (plain TCP, or the time is up). */
EXPORT int shmbypass_fd_settle(int fd, int ms)
{
	int64_t end = now_ns() + (int64_t)ms * 1000000;
	struct timespec pause = { 0, 200000 };

	for (;;) {
		uint64_t v = fdt_load(fd);
		struct chan *ch = FD_PTR(v);
		int live = 0;

		if (FD_KIND(v) == K_SHM)
			return 1;
		if (FD_KIND(v) != K_PENDING || !ch || now_ns() >= end)
			return 0;
		if (chan_tryget(ch)) {
			live = chan_try_live(fd, ch);   /* the fd follows at its next call */
			chan_put(ch);
		}
		if (live)
			return 1;
		nanosleep(&pause, NULL);
	}
}

/* For tests (ctypes, dlsym): 2 if fd is a healthy shm-tier connection
 * here (BPF paired it, this process holds its channel: on TCP until both
 * ends hold the memory, then rings; shmbypass_fd_rings says which), -1 if
 * its channel was reset, 0 otherwise. Never probes or sets anything up. */
EXPORT int shmbypass_fd_tier(int fd)
{
	uint64_t v = fdt_load(fd);
	struct sbp_info in;

	if (!g.enabled || (FD_KIND(v) != K_SHM && FD_KIND(v) != K_PENDING) || !FD_PTR(v))
		return 0;
	if (atomic_load(&((struct chan *)FD_PTR(v))->sh->flags) & CH_BROKEN)
		return -1;
	if (shmbypass_fd_rings(fd))
		return SBP_TIER_SHM;    /* rings in use (the peer may have closed since) */
	return ask_info(fd, &in) == 0 && in.tier == SBP_TIER_SHM ? SBP_TIER_SHM : 0;
}

/* For tests (ctypes): the slots of a shm-tier fd; 0, or -1 if it is not one. */
EXPORT int shmbypass_fd_slots(int fd, unsigned int *tx, unsigned int *rx)
{
	uint64_t v = fdt_load(fd);
	struct chan_sh *sh;

	if (!g.enabled || FD_KIND(v) != K_SHM)
		return -1;
	sh = ((struct chan *)FD_PTR(v))->sh;
	*tx = sh->tx_part;
	*rx = sh->rx_part;
	return 0;
}

