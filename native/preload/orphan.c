// SPDX-License-Identifier: GPL-2.0
/* orphan.c: the memory of a connection this process shared (fork) and has
 * closed, while another process may still hold the socket.
 *
 * The last close of a shared socket here is not the socket's last close
 * (the kernel's: the other holder may still read and write), so the block
 * cannot be given up then. Nor later by the other holder, which may exit
 * without a close or exec a program without us. The kernel knows: once no
 * process holds the socket, sock_diag finds it gone or orphaned (inode 0:
 * closing, or TIME_WAIT). Until then the block waits here, and a few of
 * those waiting are looked at each time a connection starts. A
 * fork-per-connection server (the parent closes its copy after fork, the
 * child answers and exits) gets its blocks back one connection later;
 * before, every connection kept one for good. */
#include <errno.h>
#include <linux/inet_diag.h>
#include <linux/netlink.h>
#include <linux/sock_diag.h>
#include <netinet/in.h>
#include <pthread.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "orphan.h"
#include "memory.h"
#include "setup.h"

#define ORPHAN_MAX 4096         /* more waiting: the oldest keep their block, as before */

struct waiter {
	struct mem_ref ref;
	uint64_t cookie;
	uint64_t grown;         /* what its writer grew into, charged here */
	uint64_t netns;         /* SO_NETNS_COOKIE of its namespace (0: not known) */
	struct sockaddr_storage local, remote;
};

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static struct waiter *tab;      /* ORPHAN_MAX entries, anon_alloc'd */
static _Atomic int count;
static int next;

#ifndef SO_NETNS_COOKIE
#define SO_NETNS_COOKIE 71
#endif

/* The network namespace of socket fd, 0 if the kernel does not say. */
static uint64_t netns_cookie(int fd)
{
	uint64_t c = 0;
	socklen_t len = sizeof(c);

	if (syscall(SYS_getsockopt, fd, SOL_SOCKET, SO_NETNS_COOKIE, &c, &len) < 0)
		return 0;
	return c;
}

void orphan_add(int fd, const struct mem_ref *ref, uint64_t cookie, uint64_t grown)
{
	socklen_t ll = sizeof(struct sockaddr_storage), rl = ll;
	int saved = errno;
	struct waiter e;

	memset(&e, 0, sizeof(e));
	if (syscall(SYS_getsockname, fd, &e.local, &ll) < 0 ||
	    syscall(SYS_getpeername, fd, &e.remote, &rl) < 0) {
		errno = saved;
		return;                 /* no way to ask: the block stays taken */
	}
	e.ref = *ref;
	atomic_store(&e.ref.charged, atomic_load(&ref->charged));
	atomic_store(&e.ref.held, atomic_load(&ref->held));
	e.cookie = cookie;
	e.grown = grown;
	e.netns = netns_cookie(fd);
	pthread_mutex_lock(&lock);
	if (!tab)
		tab = anon_alloc(ORPHAN_MAX * sizeof(*tab));
	if (tab && count < ORPHAN_MAX)
		tab[atomic_fetch_add(&count, 1)] = e;
	pthread_mutex_unlock(&lock);
}

/* Does any process hold the socket of e? 1 yes, 0 no, -1 cannot tell. */
static int sock_held(const struct waiter *e)
{
	struct {
		struct nlmsghdr nh;
		struct inet_diag_req_v2 r;
	} req;
	union {
		struct nlmsghdr nh;
		char buf[512];
	} ans;
	struct sockaddr_nl kernel = { .nl_family = AF_NETLINK };
	struct inet_diag_msg *m = NLMSG_DATA(&ans.nh);
	int s, family = e->local.ss_family;
	long n;

	memset(&req, 0, sizeof(req));
	req.nh.nlmsg_len = sizeof(req);
	req.nh.nlmsg_type = SOCK_DIAG_BY_FAMILY;
	req.nh.nlmsg_flags = NLM_F_REQUEST;
	req.r.sdiag_family = (uint8_t)family;
	req.r.sdiag_protocol = IPPROTO_TCP;
	req.r.idiag_states = ~0u;
	if (family == AF_INET) {
		const struct sockaddr_in *l = (const void *)&e->local, *r = (const void *)&e->remote;

		req.r.id.idiag_sport = l->sin_port;
		req.r.id.idiag_dport = r->sin_port;
		memcpy(req.r.id.idiag_src, &l->sin_addr, 4);
		memcpy(req.r.id.idiag_dst, &r->sin_addr, 4);
	} else if (family == AF_INET6) {
		const struct sockaddr_in6 *l = (const void *)&e->local, *r = (const void *)&e->remote;

		req.r.id.idiag_sport = l->sin6_port;
		req.r.id.idiag_dport = r->sin6_port;
		memcpy(req.r.id.idiag_src, &l->sin6_addr, 16);
		memcpy(req.r.id.idiag_dst, &r->sin6_addr, 16);
		req.r.id.idiag_if = l->sin6_scope_id;
	} else {
		return -1;
	}
	req.r.id.idiag_cookie[0] = (uint32_t)e->cookie;
	req.r.id.idiag_cookie[1] = (uint32_t)(e->cookie >> 32);
	s = (int)syscall(SYS_socket, AF_NETLINK, SOCK_DGRAM | SOCK_CLOEXEC, NETLINK_SOCK_DIAG);
	if (s < 0)
		return -1;
	/* sock_diag looks in our namespace now: "no such socket" says
	 * nothing if the socket lives in another (a setns since) */
	if (netns_cookie(s) != e->netns) {
		syscall(SYS_close, s);
		return -1;
	}
	n = syscall(SYS_sendto, s, &req, sizeof(req), 0, &kernel, sizeof(kernel));
	if (n == (long)sizeof(req))
		n = syscall(SYS_recvfrom, s, &ans, sizeof(ans), 0, NULL, NULL);
	syscall(SYS_close, s);
	if (n < (long)sizeof(struct nlmsghdr) || (size_t)n < ans.nh.nlmsg_len)
		return -1;
	if (ans.nh.nlmsg_type == NLMSG_ERROR) {
		const struct nlmsgerr *err = NLMSG_DATA(&ans.nh);

		if (ans.nh.nlmsg_len < NLMSG_LENGTH(sizeof(*err)))
			return -1;
		/* no socket with that address and cookie: closed (or the
		 * address has a new connection, ESTALE) */
		return err->error == -ENOENT || err->error == -ESTALE ? 0 : -1;
	}
	if (ans.nh.nlmsg_type != SOCK_DIAG_BY_FAMILY || ans.nh.nlmsg_len < NLMSG_LENGTH(sizeof(*m)))
		return -1;
	return m->idiag_inode != 0;
}

#define CHECK_EVERY_NS 1000000  /* a fork-per-connection server: a few asks per ms at most */

void orphan_check(int max)
{
	static _Atomic int64_t last_ns;
	int64_t now;
	int saved = errno;

	if (!atomic_load_explicit(&count, memory_order_relaxed))
		return;
	now = now_ns();
	if (now - atomic_load(&last_ns) < CHECK_EVERY_NS)
		return;
	atomic_store(&last_ns, now);
	pthread_mutex_lock(&lock);
	for (int i = 0; i < max && count; i++) {
		struct waiter *e;

		if (next >= count)
			next = 0;
		e = &tab[next];
		if (sock_held(e) != 0) {
			next++;
			continue;
		}
		mem_uncharge(e->grown);
		mem_done(&e->ref);
		*e = tab[atomic_fetch_sub(&count, 1) - 1];
	}
	pthread_mutex_unlock(&lock);
	errno = saved;
}

void orphan_atfork_child(void)
{
	/* the parent's closes: its own to finish */
	pthread_mutex_init(&lock, NULL);
	atomic_store(&count, 0);
	next = 0;
}
