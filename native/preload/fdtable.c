// SPDX-License-Identifier: GPL-2.0
/* fdtable.c: the fd table (what each fd of the process is to us) and the
 * notes of the options the app set on its sockets. Lock-free: two-level
 * arrays of atomics, chunks mapped on first use and never freed. */
#include <fcntl.h>
#include <stdatomic.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "fdtable.h"

_Atomic(_Atomic uint64_t *) fdt_chunks[FDT_NCHUNKS];
static _Atomic int fdt_hi;

static _Atomic uint64_t *fdt_slot(int fd, int create)
{
	_Atomic uint64_t *c, *fresh = NULL;
	unsigned idx;

	if (fd < 0 || fd >= FDT_LIMIT)
		return NULL;
	idx = (unsigned)fd >> FDT_SHIFT;
	c = atomic_load_explicit(&fdt_chunks[idx], memory_order_acquire);
	if (!c) {
		if (!create)
			return NULL;
		fresh = mmap(NULL, FDT_CHUNK * sizeof(uint64_t), PROT_READ | PROT_WRITE,
			     MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		if (fresh == MAP_FAILED)
			return NULL;
		if (atomic_compare_exchange_strong(&fdt_chunks[idx], &c, fresh)) {
			c = fresh;
		} else {
			munmap(fresh, FDT_CHUNK * sizeof(uint64_t));
		}
	}
	if (create) {
		int hi = atomic_load_explicit(&fdt_hi, memory_order_relaxed);

		while (fd >= hi && !atomic_compare_exchange_weak(&fdt_hi, &hi, fd + 1))
			;
	}
	return &c[fd & (FDT_CHUNK - 1)];
}

void fdt_store(int fd, uint64_t v)
{
	_Atomic uint64_t *s = fdt_slot(fd, v != K_UNKNOWN);

	if (s)
		atomic_store_explicit(s, v, memory_order_release);
}

uint64_t fdt_xchg(int fd, uint64_t v)
{
	_Atomic uint64_t *s = fdt_slot(fd, v != K_UNKNOWN);

	if (!s)
		return fd >= FDT_LIMIT ? K_PLAIN : K_UNKNOWN;
	return atomic_exchange_explicit(s, v, memory_order_acq_rel);
}

int fdt_cas(int fd, uint64_t old, uint64_t v)
{
	_Atomic uint64_t *s = fdt_slot(fd, 1);

	return s && atomic_compare_exchange_strong(s, &old, v);
}

int fdt_max(void)
{
	return atomic_load(&fdt_hi);
}

/* The option bytes (FDO_*), same two-level layout. */
static _Atomic(_Atomic uint8_t *) fdo_chunks[FDT_NCHUNKS];

static _Atomic uint8_t *fdo_slot(int fd, int create)
{
	_Atomic uint8_t *c, *fresh;
	unsigned idx;

	if (fd < 0 || fd >= FDT_LIMIT)
		return NULL;
	idx = (unsigned)fd >> FDT_SHIFT;
	c = atomic_load_explicit(&fdo_chunks[idx], memory_order_acquire);
	if (!c && create) {
		fresh = mmap(NULL, FDT_CHUNK, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		if (fresh == MAP_FAILED)
			return NULL;
		if (atomic_compare_exchange_strong(&fdo_chunks[idx], &c, fresh))
			c = fresh;
		else
			munmap(fresh, FDT_CHUNK);
	}
	return c ? &c[fd & (FDT_CHUNK - 1)] : NULL;
}

unsigned fdo_get(int fd)
{
	_Atomic uint8_t *s = fdo_slot(fd, 0);

	return s ? atomic_load_explicit(s, memory_order_relaxed) : 0;
}

void fdo_set(int fd, unsigned bits)
{
	_Atomic uint8_t *s = fdo_slot(fd, bits != 0);

	if (s)
		atomic_store_explicit(s, (uint8_t)bits, memory_order_relaxed);
}

void fdo_update(int fd, unsigned bit, int on)
{
	_Atomic uint8_t *s = fdo_slot(fd, 0);

	if (!s || !(atomic_load(s) & FDO_KNOWN))
		return;
	if (on)
		atomic_fetch_or(s, (uint8_t)bit);
	else
		atomic_fetch_and(s, (uint8_t)~bit);
}

/* Put an fd of ours at a high number, close-on-exec, protected from the
 * app's close()/close_range(). Returns the new fd (the old one is closed). */
int sbp_internal_fd(int fd)
{
	struct rlimit rl;
	int lo = 1000, nfd;

	if (fd < 0)
		return fd;
	if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY &&
	    (rlim_t)lo + 64 > rl.rlim_cur)
		lo = rl.rlim_cur > 128 ? (int)(rl.rlim_cur - 64) : 3;
	nfd = (int)syscall(SYS_fcntl, fd, F_DUPFD_CLOEXEC, lo);
	if (nfd < 0)
		nfd = (int)syscall(SYS_fcntl, fd, F_DUPFD_CLOEXEC, 3);
	if (nfd >= 0) {
		syscall(SYS_close, fd);
		fd = nfd;
	}
	fdt_store(fd, FD_INTERNAL);
	return fd;
}
