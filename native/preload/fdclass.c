// SPDX-License-Identifier: GPL-2.0
/* fdclass.c: what an fd is to us: an fd seen for the first time is probed,
 * a connection that became established is settled (sk_state says shm: a
 * channel; else plain TCP). */
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sched.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "channel.h"
#include "control.h"
#include "epset.h"
#include "fdclass.h"
#include "fdtable.h"
#include "setup.h"

static int tcp_state(int fd)
{
	struct tcp_info ti;
	socklen_t len = sizeof(ti);
	int saved = errno, rc;

	memset(&ti, 0, sizeof(ti));
	rc = (int)syscall(SYS_getsockopt, fd, IPPROTO_TCP, TCP_INFO, &ti, &len);
	errno = saved;
	return rc < 0 ? -1 : ti.tcpi_state;
}

void resolve_established(int fd, int rediscovered)
{
	struct sbp_sk st;
	struct chan *ch;
	int rc;

	if (!sbp_shm_usable()) {
		fdt_store(fd, K_PLAIN);
		return;
	}
	rc = sk_lookup(fd, &st);
	if (rc < 0) {
		DBG("fd %d: tcp tier (no sk_state entry: %s)", fd, strerror(-rc));
		fdt_store(fd, K_PLAIN);
		return;
	}
	if (st.tier != SBP_TIER_SHM) {
		DBG("fd %d: not in the shm tier: %s (reason %u)", fd,
		    sbp_reason_name(st.reason) ?: "other", st.reason);
		fdt_store(fd, K_PLAIN);
		return;
	}
	ch = chan_setup(fd, &st, rediscovered);
	if (!ch) {
		/* No memory for a channel: the peer expects rings, so end it. */
		WARN("fd %d: out of memory for a shm channel: connection shut down", fd);
		syscall(SYS_shutdown, fd, SHUT_RDWR);
		fdt_store(fd, K_PLAIN);
		return;
	}
	/* Hello: a peer waiting to attach the ring we just formatted wakes up. */
	if (!(atomic_load(&ch->sh->flags) & CH_BROKEN))
		ctl_doorbell(fd);
	atomic_store(&ch->nfds, 1);
	if (rediscovered)
		atomic_store(&ch->shared, 1);
	fdt_store(fd, (uint64_t)(uintptr_t)ch | K_SHM);
	if (!rediscovered)
		ep_fd_became_shm(fd);
}

/* An fd we have not seen (inherited across exec, received, or made by a
 * call we do not hook): what is it? */
static uint64_t probe(int fd)
{
	struct sbp_sk st;
	socklen_t len = sizeof(int);
	int proto = 0, saved = errno, state, marked;

	if (syscall(SYS_getsockopt, fd, SOL_SOCKET, SO_PROTOCOL, &proto, &len) < 0) {
		int e = errno;

		errno = saved;
		return e == EBADF ? K_UNKNOWN : K_PLAIN;
	}
	errno = saved;
	if (proto != IPPROTO_TCP || !sbp_shm_usable())
		return K_PLAIN;
	state = tcp_state(fd);
	if (sk_lookup(fd, &st) == 0 && st.tier == SBP_TIER_SHM) {
		if (!fdt_cas(fd, K_UNKNOWN, K_BUSY))
			return fdt_load(fd);
		DBG("fd %d: found a shm-tier connection (inherited)", fd);
		resolve_established(fd, 1);
		return fdt_load(fd);
	}
	marked = sk_lookup(fd, &st) == 0 && (st.flags & SBP_SK_WANT_SHM);
	switch (state) {
	case TCP_LISTEN:
		return marked ? K_LISTEN : K_PLAIN;
	case TCP_SYN_SENT:
		return marked ? K_CONNECTING : K_PLAIN;
	case TCP_CLOSE:
		return K_TCP;
	default:
		return K_PLAIN;
	}
}

int fd_class(int fd, struct chan **chp)
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
				if (fdt_load(fd) == v) {
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
		case K_CONNECTING: {
			int s = tcp_state(fd);

			if (s == TCP_SYN_SENT || s < 0)
				return K_CONNECTING;
			if (s == TCP_CLOSE) {           /* the connect failed */
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
