// SPDX-License-Identifier: GPL-2.0
/* epset.c: the shadow epoll sets: per app epoll fd that holds shm-tier
 * sockets, their registrations (in our table, not the kernel's) and the
 * shadow epoll fd that watches their TCP sockets for doorbells. */
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "channel.h"
#include "control.h"
#include "epset.h"
#include "fdtable.h"
#include "setup.h"

static pthread_mutex_t ep_list_lock = PTHREAD_MUTEX_INITIALIZER;
static struct ep *ep_list;

struct ep *ep_of(int epfd)
{
	uint64_t v = fdt_load(epfd);

	return FD_KIND(v) == K_EPOLL ? FD_PTR(v) : NULL;
}

void shadow_add(struct ep *ep, struct epreg *r)
{
	/* Edge-triggered: one marker per burst of doorbells; the harvest
	 * (ep_settle_bells) eats them. */
	struct epoll_event se = { .events = EPOLLIN | EPOLLRDHUP | EPOLLET,
				  .data.u64 = (uint64_t)r->fd };
	int saved = errno;

	if (!r->in_shadow && r->ch && ctl_usable(r->ch) &&
	    sys_epoll_ctl(ep->shadow, EPOLL_CTL_ADD, r->fd, &se) == 0)
		r->in_shadow = 1;
	errno = saved;
}

void shadow_del(struct ep *ep, struct epreg *r)
{
	int saved = errno;

	if (r->in_shadow)
		sys_epoll_ctl(ep->shadow, EPOLL_CTL_DEL, r->fd, NULL);
	r->in_shadow = 0;
	errno = saved;
}

struct epreg *ep_find(struct ep *ep, int fd)
{
	for (int i = 0; i < ep->n; i++)
		if (ep->regs[i].fd == fd)
			return &ep->regs[i];
	return NULL;
}

struct epreg *ep_add(struct ep *ep, int fd)
{
	if (ep->n == ep->cap) {
		int ncap = ep->cap ? ep->cap * 2 : 64;
		size_t bytes = (size_t)ncap * sizeof(struct epreg);
		struct epreg *nr = anon_alloc(bytes);

		if (!nr)
			return NULL;
		if (ep->regs) {
			memcpy(nr, ep->regs, (size_t)ep->n * sizeof(struct epreg));
			munmap(ep->regs, ep->regs_bytes);
		}
		ep->regs = nr;
		ep->regs_bytes = bytes;
		ep->cap = ncap;
	}
	memset(&ep->regs[ep->n], 0, sizeof(struct epreg));
	ep->regs[ep->n].fd = fd;
	return &ep->regs[ep->n++];
}

void ep_remove(struct ep *ep, struct epreg *r)
{
	shadow_del(ep, r);
	if (r->ch)
		chan_put(r->ch);
	*r = ep->regs[--ep->n];
}

struct ep *ep_get(int epfd)
{
	struct epoll_event mk = { .events = EPOLLIN | EPOLLET, .data.u64 = EP_MARKER };
	uint64_t v = fdt_load(epfd);
	pthread_mutexattr_t ma;
	struct ep *ep;
	int sh;

	if (FD_KIND(v) == K_EPOLL)
		return FD_PTR(v);
	if (FD_KIND(v) == K_SHM || FD_KIND(v) == K_BUSY)
		return NULL;
	sh = (int)syscall(SYS_epoll_create1, EPOLL_CLOEXEC);
	if (sh < 0)
		return NULL;
	sh = sbp_internal_fd(sh);
	if (sys_epoll_ctl(epfd, EPOLL_CTL_ADD, sh, &mk) < 0) {
		fdt_store(sh, K_UNKNOWN);
		syscall(SYS_close, sh);
		return NULL;    /* not an epoll fd: the real call will say so */
	}
	ep = anon_alloc(sizeof(*ep));
	if (!ep) {
		sys_epoll_ctl(epfd, EPOLL_CTL_DEL, sh, NULL);
		fdt_store(sh, K_UNKNOWN);
		syscall(SYS_close, sh);
		return NULL;
	}
	ep->epfd = epfd;
	ep->shadow = sh;
	pthread_mutexattr_init(&ma);
	pthread_mutex_init(&ep->lock, &ma);
	pthread_mutexattr_destroy(&ma);
	if (!fdt_cas(epfd, v, (uint64_t)(uintptr_t)ep | K_EPOLL)) {
		/* another thread won */
		sys_epoll_ctl(epfd, EPOLL_CTL_DEL, sh, NULL);
		fdt_store(sh, K_UNKNOWN);
		syscall(SYS_close, sh);
		munmap(ep, sizeof(*ep));
		return ep_of(epfd);
	}
	pthread_mutex_lock(&ep_list_lock);
	ep->next = ep_list;
	ep_list = ep;
	pthread_mutex_unlock(&ep_list_lock);
	return ep;
}

void ep_free(void *p)
{
	struct ep *ep = p, **pp;

	pthread_mutex_lock(&ep_list_lock);
	for (pp = &ep_list; *pp; pp = &(*pp)->next) {
		if (*pp == ep) {
			*pp = ep->next;
			break;
		}
	}
	pthread_mutex_unlock(&ep_list_lock);
	pthread_mutex_lock(&ep->lock);
	while (ep->n)
		ep_remove(ep, &ep->regs[ep->n - 1]);
	pthread_mutex_unlock(&ep->lock);
	fdt_store(ep->shadow, K_UNKNOWN);
	syscall(SYS_close, ep->shadow);
	if (ep->regs)
		munmap(ep->regs, ep->regs_bytes);
	munmap(ep, sizeof(*ep));
}

/* fn(ep, r) for the registration of fd in each set that has one, with the
 * list and the set locked. */
static void for_each_reg_of(int fd, void (*fn)(struct ep *ep, struct epreg *r))
{
	pthread_mutex_lock(&ep_list_lock);
	for (struct ep *ep = ep_list; ep; ep = ep->next) {
		struct epreg *r;

		pthread_mutex_lock(&ep->lock);
		r = ep_find(ep, fd);
		if (r)
			fn(ep, r);
		pthread_mutex_unlock(&ep->lock);
	}
	pthread_mutex_unlock(&ep_list_lock);
}

void ep_forget_fd(int fd)
{
	for_each_reg_of(fd, ep_remove);
}

/* A registration made while its socket was connecting, now established. */
static void reg_established(struct ep *ep, struct epreg *r)
{
	uint64_t v;
	struct chan *ch;

	if (r->ch)
		return;
	/* A one-shot registration may have fired in the kernel's set (it is
	 * disarmed there, and we cannot ask): it stays there until the app
	 * arms it again (EPOLL_CTL_MOD moves it, epoll.c ctl_shm). */
	if (r->events & EPOLLONESHOT)
		return;
	v = fdt_load(r->fd);
	ch = FD_PTR(v);
	if (FD_KIND(v) == K_SHM && chan_tryget(ch)) {
		/* from the kernel's set (direct, while connecting) to ours */
		sys_epoll_ctl(ep->epfd, EPOLL_CTL_DEL, r->fd, NULL);
		r->ch = ch;
		r->fresh = 1;
		shadow_add(ep, r);
	} else {
		/* plain TCP after all: the kernel's registration stays */
		ep_remove(ep, r);
	}
}

void ep_fd_became_shm(int fd)
{
	for_each_reg_of(fd, reg_established);
}

/* A shm socket went back to plain TCP: its registrations from our table
 * to the kernel's set, as the app made them (a fired one-shot one stays
 * disarmed). */
static void reg_to_kernel(struct ep *ep, struct epreg *r)
{
	struct epoll_event ev = { .events = r->events, .data = r->data };

	if (r->ch && !r->dormant) {
		if (r->disabled)
			ev.events &= EPOLLONESHOT | EPOLLET;
		sys_epoll_ctl(ep->epfd, EPOLL_CTL_ADD, r->fd, &ev);
	}
	ep_remove(ep, r);
}

void ep_fd_became_plain(int fd)
{
	for_each_reg_of(fd, reg_to_kernel);
}

void ep_atfork_child(void)
{
	/* a thread of the parent may have held these at fork */
	pthread_mutex_init(&ep_list_lock, NULL);
	for (struct ep *ep = ep_list; ep; ep = ep->next)
		pthread_mutex_init(&ep->lock, NULL);
}
