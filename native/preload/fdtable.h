/* SPDX-License-Identifier: GPL-2.0 */
/* fdtable.h: the fd table (what each fd is to us) and the notes of the
 * options the app set on its sockets. */
#ifndef SBP_PRELOAD_FDTABLE_H
#define SBP_PRELOAD_FDTABLE_H

#include <stdatomic.h>
#include <stdint.h>

/* An entry is a pointer (8-aligned) with the kind in the low 3 bits. */
enum fd_kind {
	K_UNKNOWN = 0,  /* not seen yet: probed on first use */
	K_PLAIN = 1,    /* not ours: pass straight through */
	K_TCP = 2,      /* a TCP socket not connected yet: mark at connect/listen */
	K_PENDING = 3,  /* connecting (ptr NULL), or on TCP until it can go live (ptr = chan) */
	K_LISTEN = 4,   /* a marked listener: accepted sockets are looked up */
	K_SHM = 5,      /* ptr = struct chan */
	K_EPOLL = 6,    /* ptr = struct ep (an epoll fd holding shm sockets) */
	K_BUSY = 7,     /* a thread is setting this fd up: others wait */
};
#define FD_KIND(v) ((int)((v) & 7))
#define FD_PTR(v) ((void *)(uintptr_t)((v) & ~(uint64_t)7))
/* An fd of ours (the map, the arena, epoll shadows): the app may not close it. */
#define FD_INTERNAL ((uint64_t)8 | K_PLAIN)

/* Two levels: chunks of FDT_CHUNK entries, mapped on first use. */
#define FDT_SHIFT 12
#define FDT_CHUNK (1u << FDT_SHIFT)
#define FDT_NCHUNKS 1024u                       /* 4 Mi fds */
#define FDT_LIMIT ((int)(FDT_CHUNK * FDT_NCHUNKS))
extern _Atomic(_Atomic uint64_t *) fdt_chunks[FDT_NCHUNKS];

/* Inline: every data call looks its fd up. */
static inline uint64_t fdt_load(int fd)
{
	_Atomic uint64_t *c;

	if (fd < 0 || fd >= FDT_LIMIT)
		return fd < 0 ? K_UNKNOWN : K_PLAIN;
	c = atomic_load_explicit(&fdt_chunks[(unsigned)fd >> FDT_SHIFT], memory_order_acquire);
	return c ? atomic_load_explicit(&c[fd & (FDT_CHUNK - 1)], memory_order_acquire) : K_UNKNOWN;
}

void fdt_store(int fd, uint64_t v);
uint64_t fdt_xchg(int fd, uint64_t v);
int fdt_cas(int fd, uint64_t old, uint64_t v);
int fdt_max(void);

/* What the app set on a socket we saw created (socket/accept): saves the
 * syscalls that would ask the kernel at set-up and close. */
#define FDO_KNOWN       0x01u   /* the other bits are reliable */
#define FDO_NONBLOCK    0x02u
#define FDO_NODELAY     0x04u
#define FDO_CORK        0x08u
#define FDO_LINGER0     0x10u   /* SO_LINGER {1, 0}: close is an abort */
#define FDO_RCVLOWAT    0x20u   /* SO_RCVLOWAT was set (else it is 1) */
unsigned fdo_get(int fd);
void fdo_set(int fd, unsigned bits);
void fdo_update(int fd, unsigned bit, int on);

/* Move an fd of ours to a high number (close-on-exec) and protect it from
 * the app's close()/close_range()/dup2(). */
int sbp_internal_fd(int fd);

#endif
