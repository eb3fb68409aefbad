// SPDX-License-Identifier: GPL-2.0
/* sockets.c: the socket life-cycle calls (socket, connect, listen, accept,
 * close, dup, shutdown, fcntl, ioctl, socket options, fds passed in
 * SCM_RIGHTS) and what each does to the fd table and the channels.
 *
 * Life of a connection:
 *  1. socket(AF_INET/6, SOCK_STREAM) -> K_TCP.
 *  2. connect()/listen(): mark it in the pinned sk_state map (flags =
 *     SBP_SK_WANT_SHM) so the BPF handshake offers the shm tier. Only when
 *     the region is mapped here: a process that could not use rings never
 *     offers them, so both ends fall back to TCP before any data flows.
 *  3. Established (connect returned, or the first use after EINPROGRESS, or
 *     accept): read sk_state back (fdclass.c). tier == SHM: build a channel
 *     (format the ring we write, attach the one we read, possibly later),
 *     send one "hello" doorbell so a peer waiting to attach wakes up. Else
 *     K_PLAIN.
 *  4. close(): the last fd of the last holder sets the ring FIN flags, eats
 *     the doorbell bytes (so the kernel sends FIN, not RST), closes.
 * Anything unexpected after the handshake breaks the channel: ECONNRESET
 * to the app, shutdown() on the TCP socket so the peer learns it too. */
#include <fcntl.h>
#include <limits.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "ask.h"
#include "channel.h"
#include "control.h"
#include "epset.h"
#include "fdclass.h"
#include "fdtable.h"
#include "orphan.h"
#include "memory.h"
#include "ready.h"
#include "revert.h"
#include "setup.h"
#include "standin.h"
#include "sockets.h"


/* Our FIN on the ring we write; a doorbell if the peer sleeps on it. */
static void close_tx(int fd, struct chan *ch)
{
	sbp_ring_close_writer(&ch->sh->tx.ring);
	if (sbp_ring_peer_waiting(&ch->sh->tx.ring))
		ctl_bell(fd, ch);
}

static void chan_flag(struct chan *ch, uint32_t bit, int on)
{
	if (on)
		atomic_fetch_or(&ch->sh->flags, bit);
	else
		atomic_fetch_and(&ch->sh->flags, ~bit);
}

/* The last fd here of a socket another process may hold (fork): its block
 * waits until no process holds the socket (orphan.c); without a block
 * nothing waits. */
static void shared_close(int fd, struct chan *ch)
{
	struct chan_sh *sh = ch->sh;

	if (!sh->mem.base)
		chan_done(ch);
	else
		orphan_add(fd, &sh->mem, sh->cookie,
			   sh->tx.area > 0 ? sbp_area_cap(sh->tx.area) - sbp_area_cap(0) : 0);
}

/* The last holder of a shm socket closes it: the peer gets everything we
 * wrote, then EOF; its writes get EPIPE. SO_LINGER {1, 0} is an abort:
 * both rings reset (TCP sends RST too). o: the fd's option notes. */
static void last_close(int fd, struct chan *ch, unsigned o)
{
	struct chan_sh *sh = ch->sh;
	struct linger lg = { 0, 0 };
	socklen_t len = sizeof(lg);
	int saved = errno, live = atomic_load(&sh->phase) == CH_LIVE;

	if ((o & FDO_KNOWN) ? !!(o & FDO_LINGER0) :
	    (syscall(SYS_getsockopt, fd, SOL_SOCKET, SO_LINGER, &lg, &len) == 0 &&
	     lg.l_onoff && lg.l_linger == 0)) {
		if (live)
			sbp_ring_reset(&sh->tx.ring, SBP_RESET_APP);
		if (atomic_load(&sh->flags) & CH_RX_OPEN)
			sbp_ring_reset(&sh->rx.ring, SBP_RESET_APP);
		chan_done(ch);
		errno = saved;
		return;
	}
	ctl_close_bells(fd, ch);
	/* Nobody reads any more, as TCP's RST would tell the peer (it may
	 * write into its ring while we still read its TCP part); said before
	 * our EOF is seen, as TCP's close does both at once: a peer that read
	 * our EOF then writes finds our reader closed (its first send is
	 * taken, the next fails with EPIPE), not its bytes left unread, which
	 * would be a reset (ECONNRESET). */
	if (lock_try(&sh->rx_lock)) {
		rx_progress(fd, ch);
		if (atomic_load(&sh->flags) & CH_RX_OPEN) {
			sbp_ring_close_reader(&sh->rx.ring);
			if (sbp_ring_peer_waiting(&sh->rx.ring))
				ctl_bell(fd, ch);
		}
		pthread_mutex_unlock(&sh->rx_lock);
	}
	if (live && lock_try(&sh->tx_lock)) {
		close_tx(fd, ch);
		pthread_mutex_unlock(&sh->tx_lock);
	}
	/* Unread doorbells would make close() send RST. */
	if (atomic_load(&sh->flags) & CH_RX_ATTACHED)
		ctl_drain(fd, ch);
	chan_done(ch);
	errno = saved;
}

/* The old occupant of an fd number is gone (a new socket got the number, or
 * dup2 replaced it): drop our state for it. closing: by close() (or dup2),
 * so a last holder closes the channel. */
static void fd_forget(int fd, int closing)
{
	unsigned o = fdo_get(fd);
	uint64_t v = fdt_xchg(fd, K_UNKNOWN);
	int k = FD_KIND(v);

	if (o)
		fdo_set(fd, 0);
	if (k == K_SHM || k == K_PENDING)
		ep_forget_fd(fd);
	if (k == K_EPOLL) {
		ep_free(FD_PTR(v));
	} else if ((k == K_SHM || k == K_PENDING) && FD_PTR(v)) {
		struct chan *ch = FD_PTR(v);

		if (atomic_fetch_sub(&ch->nfds, 1) == 1 && closing) {
			if (!atomic_load(&ch->shared))
				last_close(fd, ch, o);
			else
				shared_close(fd, ch);
		}
		chan_put(ch);
	}
}

/* newfd now names what oldfd names. */
static void fd_copy(int oldfd, int newfd)
{
	struct chan *ch;
	int k = fd_io_class(oldfd, &ch);

	fdo_set(newfd, fdo_get(oldfd));

	if (ch) {
		atomic_fetch_add(&ch->nfds, 1);
		/* the reference moves to the table */
		fdt_store(newfd, (uint64_t)(uintptr_t)ch | (uint64_t)k);
	} else if (k == K_EPOLL) {
		fdt_store(newfd, K_UNKNOWN);
	} else {
		fdt_store(newfd, (uint64_t)k);
	}
}

/* A table entry that names a channel (live, or on TCP until it can be). */
static struct chan *entry_chan(uint64_t v)
{
	return FD_KIND(v) == K_SHM || FD_KIND(v) == K_PENDING ? FD_PTR(v) : NULL;
}

void mark_all_shared(void)
{
	int hi = fdt_max();

	for (int fd = 0; fd < hi; fd++) {
		struct chan *ch = entry_chan(fdt_load(fd));

		if (ch)
			atomic_store(&ch->shared, 1);
	}
}

/* The kind of fd as the table has it, probing if needed (no reference kept). */
static int fd_kind_now(int fd)
{
	struct chan *ch;
	int k = fd_class(fd, &ch);

	if (ch)
		chan_put(ch);
	return k;
}

static int is_tcp_socket(int domain, int type, int proto)
{
	return (domain == AF_INET || domain == AF_INET6) && (type & 0xf) == SOCK_STREAM &&
	       (proto == 0 || proto == IPPROTO_TCP);
}

void sock_created(int fd, int domain, int type, int proto)
{
	int saved = errno;

	fd_forget(fd, 0);
	if (is_tcp_socket(domain, type, proto)) {
		fdt_store(fd, K_TCP);
		fdo_set(fd, FDO_KNOWN | ((type & SOCK_NONBLOCK) ? FDO_NONBLOCK : 0));
	} else {
		fdt_store(fd, K_PLAIN);
	}
	errno = saved;
}

/* Ask for the shm tier on fd, naming our inbox (opened on first use). */
static int ask_for_shm(int fd)
{
	uint8_t token[SBP_INBOX_LEN] = { 0 };
	int rc = mem_inbox_token(token);

	return rc < 0 ? rc : ask_socket(fd, token);
}

/* Ask BPF for the shm tier, then connect. */
int sock_connect(int fd, const struct sockaddr *addr, socklen_t len)
{
	int r, saved;

	if (fd_kind_now(fd) != K_TCP || !addr || addr->sa_family == AF_UNSPEC)
		return REAL(connect)(fd, addr, len);
	r = ask_for_shm(fd);
	if (r < 0) {
		DBG("fd %d: cannot ask for the shm tier (%s): tcp", fd, strerror(-r));
		fdt_cas(fd, K_TCP, K_PLAIN);
		return REAL(connect)(fd, addr, len);
	}
	r = REAL(connect)(fd, addr, len);
	saved = errno;
	if (r == 0) {
		if (fdt_cas(fd, K_TCP, K_BUSY))
			resolve_established(fd, 0);
	} else if (errno == EINPROGRESS || errno == EINTR || errno == EALREADY) {
		fdt_cas(fd, K_TCP, K_PENDING);
	}
	errno = saved;
	return r;
}

int sock_listen(int fd, int backlog)
{
	if (fd_kind_now(fd) == K_TCP) {
		int rc = ask_for_shm(fd);

		if (rc == 0)
			fdt_cas(fd, K_TCP, K_LISTEN);
		else
			DBG("fd %d: cannot ask for the shm tier (%s)", fd, strerror(-rc));
	}
	return REAL(listen)(fd, backlog);
}

int sock_accepted(int lfd, int nfd, int flags)
{
	int saved = errno;
	unsigned lo;

	fd_forget(nfd, 0);
	/* an accepted socket inherits the listener's options, not O_NONBLOCK */
	lo = fdo_get(lfd);
	if (lo & FDO_KNOWN)
		fdo_set(nfd, FDO_KNOWN | (lo & (FDO_NODELAY | FDO_CORK | FDO_LINGER0 | FDO_RCVLOWAT)) |
			     ((flags & SOCK_NONBLOCK) ? FDO_NONBLOCK : 0));
	/* We, not the listener's owner, will use it: say so (BPF records
	 * who; the peer learns our inbox). */
	if (fd_kind_now(lfd) == K_LISTEN && ask_for_shm(nfd) == 0) {
		fdt_store(nfd, K_BUSY);
		resolve_established(nfd, 0);
	} else {
		fdt_store(nfd, K_PLAIN);
	}
	errno = saved;
	return nfd;
}

int sock_close(int fd)
{
	if (fdt_load(fd) == FD_INTERNAL)
		return 0;       /* ours (sk_state, arena, an epoll shadow): keep it */
	fd_forget(fd, 1);
	return REAL(close)(fd);
}

/* close_range/closefrom: our own fds survive; the rest go through close(). */
int sock_close_range(unsigned int first, unsigned int last, int flags)
{
	unsigned int hi = (unsigned int)fdt_max();

	for (unsigned int fd = first; fd <= last && fd < hi; fd++) {
		if (fdt_load((int)fd) != FD_INTERNAL) {
			fd_forget((int)fd, 1);
			continue;
		}
		/* split the range around our fd */
		if (fd > first)
			syscall(SYS_close_range, first, fd - 1, flags);
		first = fd + 1;
		if (fd == UINT_MAX)
			return 0;
	}
	if (first > last)
		return 0;
	return (int)syscall(SYS_close_range, first, last, flags);
}

int sock_shutdown(int fd, struct chan *ch, int how)
{
	struct chan_sh *sh = ch->sh;

	/* The ring flags first: when the peer sees our FIN on TCP, it must
	 * also see the ring's FIN, or it would take it for a dead peer. */
	if ((how == SHUT_WR || how == SHUT_RDWR) && atomic_load(&sh->phase) == CH_CAND) {
		atomic_fetch_or(&sh->flags, CH_SHUT_WR);        /* TCP says it all */
	} else if (how == SHUT_WR || how == SHUT_RDWR) {
		atomic_fetch_or(&sh->flags, CH_SHUT_WR);
		if (lock_try(&sh->tx_lock)) {
			close_tx(fd, ch);
			pthread_mutex_unlock(&sh->tx_lock);
		} else {
			/* A writer sleeps holding the lock: it closes the ring
			 * itself when it sees CH_SHUT_WR. Flags are atomic. */
			sbp_ring_close_writer(&sh->tx.ring);
		}
	}
	if (how == SHUT_RD || how == SHUT_RDWR)
		atomic_fetch_or(&sh->flags, CH_SHUT_RD);
	return REAL(shutdown)(fd, how);
}

void sock_duped(int oldfd, int newfd)
{
	int saved = errno;

	fd_forget(newfd, 0);
	fd_copy(oldfd, newfd);
	errno = saved;
}

int sock_dup_onto(int oldfd, int newfd, int flags, int three)
{
	int r, saved;

	if (oldfd == newfd)
		return three ? REAL(dup3)(oldfd, newfd, flags) : REAL(dup2)(oldfd, newfd);
	if (fdt_load(newfd) == FD_INTERNAL) {
		errno = EBUSY;  /* we hold that number (Linux says EBUSY for a racing dup2) */
		return -1;
	}
	/* newfd is closed by dup2: say goodbye while it still names its file;
	 * but only if oldfd is valid (else dup2 fails and closes nothing). */
	if (syscall(SYS_fcntl, oldfd, F_GETFD, 0) < 0) {
		errno = EBADF;
		return -1;
	}
	fd_forget(newfd, 1);
	r = three ? REAL(dup3)(oldfd, newfd, flags) : REAL(dup2)(oldfd, newfd);
	saved = errno;
	if (r >= 0)
		fd_copy(oldfd, newfd);
	errno = saved;
	return r;
}

int sock_fcntl(int (*real)(int, int, void *), int fd, int cmd, void *arg)
{
	struct chan *ch;
	int r, k;

	switch (cmd) {
	case F_DUPFD:
	case F_DUPFD_CLOEXEC:
		r = real(fd, cmd, arg);
		if (r >= 0)
			sock_duped(fd, r);
		return r;
	case F_SETFL:
		k = fd_class(fd, &ch);
		r = real(fd, cmd, arg);
		if (r == 0)
			fdo_update(fd, FDO_NONBLOCK, (int)(intptr_t)arg & O_NONBLOCK);
		if (k == K_SHM) {
			if (r == 0)
				chan_flag(ch, CH_NONBLOCK, (int)(intptr_t)arg & O_NONBLOCK);
			chan_put(ch);
		}
		return r;
	default:
		return real(fd, cmd, arg);
	}
}

#ifndef SIOCOUTQNSD
#define SIOCOUTQNSD 0x894B
#endif

int sock_ioctl(int fd, unsigned long req, void *arg)
{
	struct chan *ch;
	struct chan_sh *sh;
	int r = 0;

	if (fd_class(fd, &ch) != K_SHM) {
		r = REAL(ioctl)(fd, req, arg);
		if (r == 0 && req == FIONBIO && arg)
			fdo_update(fd, FDO_NONBLOCK, *(int *)arg);
		return r;
	}
	sh = ch->sh;
	switch (req) {
	case FIONREAD: {        /* == SIOCINQ */
		/* What a read could take: the rest of the peer's TCP part (up
		 * to where its ring starts), then its ring. */
		uint32_t f;
		int n = 0;

		rx_look(fd, ch);
		f = atomic_load(&sh->flags);
		if (!(f & CH_RX_ATTACHED)) {
			r = REAL(ioctl)(fd, req, &n);
			if (r)
				break;
			if ((f & CH_RX_OPEN) && (uint64_t)n >= sh->rx_tcp_end - sh->rx_tcp)
				n = (int)(sh->rx_tcp_end - sh->rx_tcp) + (int)sbp_ring_readable(&sh->rx.ring);
		} else {
			n = (int)sbp_ring_readable(&sh->rx.ring);
		}
		*(int *)arg = n;
		break;
	}
	case TIOCOUTQ:          /* == SIOCOUTQ */
	case SIOCOUTQNSD:
		/* What the peer has not acknowledged: ring bytes are in its
		 * receive buffer (as ACKed), the TCP socket's are doorbells. */
		if (atomic_load(&sh->phase) == CH_LIVE)
			*(int *)arg = 0;
		else
			r = REAL(ioctl)(fd, req, arg);
		break;
	case FIONBIO:
		r = REAL(ioctl)(fd, req, arg);
		if (r == 0) {
			fdo_update(fd, FDO_NONBLOCK, *(int *)arg);
			chan_flag(ch, CH_NONBLOCK, *(int *)arg);
		}
		break;
	default:
		r = REAL(ioctl)(fd, req, arg);
	}
	chan_put(ch);
	return r;
}

/* TCP options that would hold doorbells back are the app's business only:
 * remembered for getsockopt, never applied to the control connection. */
static uint32_t virtual_tcp_opt(int level, int name)
{
	if (level != IPPROTO_TCP)
		return 0;
	return name == TCP_NODELAY ? CH_APP_NODELAY : name == TCP_CORK ? CH_APP_CORK : 0;
}

int sock_setsockopt(int fd, int level, int name, const void *val, socklen_t len)
{
	uint32_t bit = virtual_tcp_opt(level, name);
	struct chan *ch;
	int r;

	if (bit && val && len >= sizeof(int) && FD_KIND(fdt_load(fd)) == K_SHM &&
	    fd_class(fd, &ch) == K_SHM) {
		chan_flag(ch, bit, *(const int *)val);
		chan_put(ch);
		return 0;
	}
	r = REAL(setsockopt)(fd, level, name, val, len);
	if (r == 0 && val) {
		int e = errno;

		if (bit && len >= sizeof(int))
			fdo_update(fd, bit == CH_APP_NODELAY ? FDO_NODELAY : FDO_CORK, *(const int *)val);
		else if (level == SOL_SOCKET && name == SO_RCVLOWAT) {
			fdo_update(fd, FDO_RCVLOWAT, 1);
			if (FD_PTR(fdt_load(fd))) {
				fd_io_class(fd, &ch);   /* a channel live or still on TCP */
				if (ch) {
					chan_note_rcvlowat(fd, ch->sh);
					chan_put(ch);
				}
			}
		} else if (level == SOL_SOCKET && name == SO_LINGER && len >= sizeof(struct linger))
			fdo_update(fd, FDO_LINGER0, ((const struct linger *)val)->l_onoff &&
						    !((const struct linger *)val)->l_linger);
		errno = e;
	}
	return r;
}

void sock_getsockopt_done(int fd, int level, int name, void *val, socklen_t *len)
{
	struct chan *ch;
	int saved = errno;

	if (virtual_tcp_opt(level, name) && val && len && *len >= sizeof(int) &&
	    FD_KIND(fdt_load(fd)) == K_SHM && fd_class(fd, &ch) == K_SHM) {
		*(int *)val = !!(atomic_load(&ch->sh->flags) & virtual_tcp_opt(level, name));
		chan_put(ch);
	}
	/* SO_ERROR is how a non-blocking connect learns it is done: settle the
	 * fd's tier now (fd_class does it on the way). */
	if (level == SOL_SOCKET && name == SO_ERROR && FD_KIND(fdt_load(fd)) == K_PENDING)
		fd_kind_now(fd);
	errno = saved;
}

/* Each fd an SCM_RIGHTS message of m carries. */
static void for_each_passed_fd(const struct msghdr *m, void (*fn)(int fd))
{
	struct cmsghdr *c;

	if (!g.enabled || !m->msg_control || m->msg_controllen < sizeof(struct cmsghdr))
		return;
	for (c = CMSG_FIRSTHDR((struct msghdr *)m); c; c = CMSG_NXTHDR((struct msghdr *)m, c)) {
		if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
			continue;
		for (size_t i = 0; (i + 1) * sizeof(int) <= c->cmsg_len - CMSG_LEN(0); i++) {
			int fd;

			memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof(int));
			fn(fd);
		}
	}
}

/* fds that arrive in SCM_RIGHTS are new to us whatever the table says. */
static void forget_received(int fd)
{
	fdt_store(fd, K_UNKNOWN);
}

/* fd was a socket of ch's and is a stand-in now: forget the old entry
 * without closing anything more (the socket is gone from fd already; its
 * peer has finished: the block is done at our end when no fd is left,
 * unless another process holds the socket: then its last close does, or
 * its orphan wait, orphan.c). */
static void standin_took(int fd, struct chan *ch)
{
	uint64_t v = fdt_xchg(fd, K_UNKNOWN);

	fdo_set(fd, 0);
	if (entry_chan(v) != ch)
		return;         /* not in our table (a vfork child's numbering) */
	ep_forget_fd(fd);
	if (atomic_fetch_sub(&ch->nfds, 1) == 1 && !atomic_load(&ch->shared))
		chan_done(ch);
	chan_put(ch);
}

/* A shm socket handed to another process, which may not have our library
 * and has none of our mappings: back to plain TCP first (revert.c). A VM
 * pair's socket cannot go back: it now has two holders. */
static void share_sent(int fd)
{
	struct chan *ch;
	int rc;

	if (fd_io_class(fd, &ch) == K_PLAIN || !ch)
		return;
	rc = chan_give_back(fd, ch);
	if (rc == -ENOTSUP)
		atomic_store(&ch->shared, 1);
	if (rc == -ESHUTDOWN) {
		if (standin_put(fd, ch) == 0)
			/* fd (ours and the message's) names the stand-in now */
			standin_took(fd, ch);
		else
			chan_reset_for_successor(fd, ch, "the peer closed and the rest of its stream "
						 "could not be read for the program the socket goes to");
	}
	chan_put(ch);
}

/* The socket open at fd (in this process, whatever our table says: a vfork
 * child renumbers fds behind it), by its cookie: its channel, referenced,
 * or NULL. */
static struct chan *chan_by_cookie(int fd)
{
	uint64_t cookie = 0;
	socklen_t len = sizeof(cookie);
	int hi = fdt_max();

	if (syscall(SYS_getsockopt, fd, SOL_SOCKET, SO_COOKIE, &cookie, &len) < 0 || !cookie)
		return NULL;
	for (int i = 0; i < hi; i++) {
		struct chan *ch = entry_chan(fdt_load(i));

		if (ch && chan_tryget(ch)) {
			if (ch->sh && ch->sh->cookie == cookie)
				return ch;
			chan_put(ch);
		}
	}
	return NULL;
}

void sock_before_exec(void)
{
	int saved = errno, hi = fdt_max(), rc;

	for (int fd = 0; fd < hi; fd++) {
		long fl = syscall(SYS_fcntl, fd, F_GETFD);
		struct chan *ch;

		if (fl < 0 || (fl & FD_CLOEXEC) || fdt_load(fd) == FD_INTERNAL)
			continue;
		ch = chan_by_cookie(fd);
		if (!ch)
			continue;
		rc = chan_give_back(fd, ch);
		if (rc == -ENOTSUP)
			/* A VM pair's slots cannot go back to TCP: the new
			 * program would read doorbells as data. Reset. */
			chan_break(fd, ch, SBP_RESET_APP, "a VM pair's connection cannot follow exec");
		if (rc == -ESHUTDOWN) {
			if (standin_put(fd, ch) < 0)
				chan_reset_for_successor(fd, ch, "the peer closed and the rest of its stream "
							 "could not be read for the program exec starts");
			else if (!in_vfork_child())
				standin_took(fd, ch);   /* (a vfork child's memory is its parent's) */
		}
		chan_put(ch);
	}
	errno = saved;
}

void note_received_fds(const struct msghdr *m)
{
	int saved = errno;

	for_each_passed_fd(m, forget_received);
	errno = saved;
}

void note_sent_fds(const struct msghdr *m)
{
	for_each_passed_fd(m, share_sent);
}
