// SPDX-License-Identifier: GPL-2.0
/* fdclass.c: what an fd is to us: an fd seen for the first time is probed,
 * a connection that became established is settled (BPF says shm: a
 * channel, on TCP until it can go live; else plain TCP). */
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sched.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "ask.h"
#include "channel.h"
#include "control.h"
#include "epset.h"
#include "fdclass.h"
#include "fdtable.h"
#include "revert.h"
#include "setup.h"


/* Every fd naming ch that waits on the kernel (K_PENDING) now names a
 * live channel: K_SHM, and its epoll registrations move to our sets. */
static void fds_went_live(struct chan *ch)
{
	int hi = fdt_max();

	for (int fd = 0; fd < hi; fd++) {
		uint64_t v = fdt_load(fd);

		if (FD_KIND(v) == K_PENDING && FD_PTR(v) == ch &&
		    fdt_cas(fd, v, (uint64_t)(uintptr_t)ch | K_SHM))
			ep_fd_became_shm(fd);
	}
}

void resolve_established(int fd, int rediscovered)
{
	struct sbp_info in;
	struct chan *ch;
	int rc;

	(void)rediscovered;
	rc = ask_info(fd, &in);
	if (rc < 0) {
		DBG("fd %d: tcp tier (%s)", fd, strerror(-rc));
		fdt_store(fd, K_PLAIN);
		return;
	}
	/* The active end may ask before its peer is accepted: BPF pairs them
	 * at the passive end's establishment (reason awaiting-peer until). */
	if (in.tier != SBP_TIER_SHM &&
	    !(in.role == SBP_ROLE_ACTIVE && in.reason == SBP_REASON_AWAITING_PEER)) {
		static atomic_flag said = ATOMIC_FLAG_INIT;

		if (in.reason == SBP_REASON_POLICY_EXCLUDED && !atomic_flag_test_and_set(&said))
			WARN("uid %u and uid %u may not share memory (the policy of instance %s, `up "
			     "--allow-user`): their connections use %s", in.self.uid, in.peer.uid,
			     g.instance, in.tier == SBP_TIER_KERNEL ? "the kernel tier" : "plain TCP");
		DBG("fd %d: not in the shm tier: %s", fd, sbp_reason_name(in.reason) ?: "other");
		fdt_store(fd, K_PLAIN);
		return;
	}
	ch = chan_setup(fd, &in);
	if (!ch) {
		DBG("fd %d: no memory offered: tcp", fd);
		fdt_store(fd, K_PLAIN);
		return;
	}
	atomic_store(&ch->nfds, 1);
	if (atomic_load(&ch->sh->phase) == CH_LIVE) {
		fdt_store(fd, (uint64_t)(uintptr_t)ch | K_SHM);
		ep_fd_became_shm(fd);
		ctl_bell(fd, ch);       /* a VM peer waiting to attach wakes up */
	} else {
		fdt_store(fd, (uint64_t)(uintptr_t)ch | K_PENDING);
	}
}

/* An fd we have not seen (inherited across exec, received, or made by a
 * call we do not hook): what is it? A connection that another process (or
 * image) set up is plain TCP to us: we hold no memory for it. */
static uint64_t probe(int fd)
{
	socklen_t len = sizeof(int);
	int proto = 0, saved = errno;

	if (syscall(SYS_getsockopt, fd, SOL_SOCKET, SO_PROTOCOL, &proto, &len) < 0) {
		int e = errno;

		errno = saved;
		return e == EBADF ? K_UNKNOWN : K_PLAIN;
	}
	errno = saved;
	if (proto != IPPROTO_TCP)
		return K_PLAIN;
	return sock_tcp_state(fd) == TCP_CLOSE ? K_TCP : K_PLAIN;
}

int fd_class(int fd, struct chan **chp)
{
	int k = fd_io_class(fd, chp);

	if (k == K_PENDING && *chp) {
		chan_put(*chp);         /* on TCP: the kernel's to watch */
		*chp = NULL;
	}
	return k;
}

int fd_io_class_slow(int fd, struct chan **chp)
{
	uint64_t v;

	*chp = NULL;
	if (unlikely(!g.enabled) || fd < 0)
		return K_PLAIN;
	for (;;) {
		v = fdt_load(fd);
		switch (FD_KIND(v)) {
		case K_SHM: {
			struct chan *ch = FD_PTR(v);

			if (chan_tryget(ch)) {
				if (unlikely(atomic_load(&ch->sh->flags) & CH_REVERTED)) {
					chan_went_plain(ch);    /* back to TCP (revert.c) */
					chan_put(ch);
					continue;
				}
				/* (another thread may have closed fd meanwhile) */
				if (__libc_single_threaded || fdt_load(fd) == v) {
					*chp = ch;
					return K_SHM;
				}
				chan_put(ch);
			}
			continue;
		}
		case K_UNKNOWN: {
			uint64_t k = probe(fd);

			if (k == K_UNKNOWN)
				return K_PLAIN;         /* not open: let the real call say EBADF */
			if (FD_KIND(k) != K_SHM)
				fdt_cas(fd, K_UNKNOWN, k);
			continue;
		}
		case K_PENDING: {
			struct chan *ch = FD_PTR(v);
			int st;

			if (ch) {
				/* on TCP until it can go live */
				if (!chan_tryget(ch))
					continue;
				if (fdt_load(fd) != v) {
					chan_put(ch);
					continue;
				}
				if (unlikely(atomic_load(&ch->sh->flags) & CH_REVERTED)) {
					chan_went_plain(ch);
					chan_put(ch);
					continue;
				}
				if (chan_try_live(fd, ch))
					fds_went_live(ch);
				*chp = ch;
				return FD_KIND(fdt_load(fd)) == K_SHM ? K_SHM : K_PENDING;
			}
			st = sock_tcp_state(fd);
			if (st == TCP_SYN_SENT || st < 0)
				return K_PENDING;
			if (st == TCP_CLOSE) {          /* the connect failed */
				fdt_cas(fd, v, K_TCP);
				return K_TCP;
			}
			if (fdt_cas(fd, v, K_BUSY))
				resolve_established(fd, 0);
			continue;
		}
		case K_BUSY:
			sched_yield();
			continue;
		default:
			return FD_KIND(v);
		}
	}
}
