// SPDX-License-Identifier: GPL-2.0
/*
 * The LD_PRELOAD interposer: set-up, the fd table, channels, the TCP control
 * connection, waits, and the socket life cycle (socket/connect/listen/accept/
 * close/dup/fcntl/ioctl/shutdown). See interpose.h for the picture; the data
 * path is interpose_io.c, readiness interpose_poll.c.
 *
 * Life of a connection:
 *  1. socket(AF_INET/6, SOCK_STREAM) -> K_TCP.
 *  2. connect()/listen(): mark it in the pinned sk_state map (flags =
 *     SBP_SK_WANT_SHM) so the BPF handshake offers the shm tier. Only when
 *     the region is mapped here: a process that could not use rings never
 *     offers them, so both ends fall back to TCP before any data flows.
 *  3. Established (connect returned, or the first use after EINPROGRESS, or
 *     accept): read sk_state back. tier == SHM: build a channel (format the
 *     ring we write, attach the one we read, possibly later), send one
 *     "hello" doorbell so a peer waiting to attach wakes up. Else K_PLAIN.
 *  4. close(): the last fd of the last holder sets the ring FIN flags, eats
 *     the doorbell bytes (so the kernel sends FIN, not RST), closes.
 * Anything unexpected after the handshake breaks the channel: ECONNRESET
 * to the app, shutdown() on the TCP socket so the peer learns it too.
 *
 * Everything here is async-signal-safe in the sense that matters: no malloc
 * (mmap only), no stdio, raw syscalls for our own I/O; locks are only taken
 * around ring operations.
 */
#include <dlfcn.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/bpf.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sched.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "interpose.h"

struct sbp_global g = { .map_fd = -1, .arena_fd = -1 };

#define SBP_REAL_DEF(ret, name, ...) ret (*real_##name)(__VA_ARGS__);
SBP_REAL_LIST(SBP_REAL_DEF)
#undef SBP_REAL_DEF

void *sbp_real(const char *name, void **slot)
{
	void *p = dlsym(RTLD_NEXT, name);

	if (p)
		__atomic_store_n(slot, p, __ATOMIC_RELEASE);
	return p;
}

/* ---- logging --------------------------------------------------------------- */

void sbp_log(const char *fmt, ...)
{
	char buf[512];
	int n, saved = errno;
	va_list ap;

	n = snprintf(buf, sizeof(buf), "shmbypass[%d]: ", (int)getpid());
	va_start(ap, fmt);
	n += vsnprintf(buf + n, sizeof(buf) - n - 1, fmt, ap);
	va_end(ap);
	if (n > (int)sizeof(buf) - 2)
		n = sizeof(buf) - 2;
	buf[n++] = '\n';
	syscall(SYS_write, 2, buf, n);
	errno = saved;
}

/* Reasons are worth a line even without SHMBYPASS_DEBUG when the connection
 * had been promised the shm tier. */
#define WARN(...) sbp_log(__VA_ARGS__)

int64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* ---- raw bpf(2) on the pinned sk_state map --------------------------------- */

static long sys_bpf(int cmd, union bpf_attr *a)
{
	return syscall(SYS_bpf, cmd, a, sizeof(*a));
}

static int bpf_obj_get(const char *path)
{
	union bpf_attr a;

	memset(&a, 0, sizeof(a));
	a.pathname = (uint64_t)(uintptr_t)path;
	a.file_flags = 0;
	return (int)sys_bpf(BPF_OBJ_GET, &a);
}

/* 0, or -errno (-ENOENT: no storage on this socket). */
static int sk_lookup(int fd, struct sbp_sk *out)
{
	union bpf_attr a;
	int key = fd, saved = errno, rc;

	memset(&a, 0, sizeof(a));
	a.map_fd = g.map_fd;
	a.key = (uint64_t)(uintptr_t)&key;
	a.value = (uint64_t)(uintptr_t)out;
	rc = sys_bpf(BPF_MAP_LOOKUP_ELEM, &a) < 0 ? -errno : 0;
	errno = saved;
	return rc;
}

static int sk_mark(int fd)
{
	struct sbp_sk v;
	union bpf_attr a;
	int key = fd, saved = errno, rc;

	memset(&v, 0, sizeof(v));
	v.flags = SBP_SK_WANT_SHM;
	memset(&a, 0, sizeof(a));
	a.map_fd = g.map_fd;
	a.key = (uint64_t)(uintptr_t)&key;
	a.value = (uint64_t)(uintptr_t)&v;
	a.flags = BPF_ANY;
	rc = sys_bpf(BPF_MAP_UPDATE_ELEM, &a) < 0 ? -errno : 0;
	errno = saved;
	return rc;
}

/* ---- the fd table ------------------------------------------------------------ */

#define FDT_SHIFT 12
#define FDT_CHUNK (1u << FDT_SHIFT)
#define FDT_NCHUNKS 1024u                       /* 4 Mi fds */
#define FDT_LIMIT ((int)(FDT_CHUNK * FDT_NCHUNKS))
/* An fd of ours (the map, the arena, epoll shadows): the app may not close it. */
#define FD_INTERNAL ((uint64_t)8 | K_PLAIN)

static _Atomic(_Atomic uint64_t *) fdt_chunks[FDT_NCHUNKS];
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

uint64_t fdt_load(int fd)
{
	_Atomic uint64_t *s = fdt_slot(fd, 0);

	if (s)
		return atomic_load_explicit(s, memory_order_acquire);
	return fd >= FDT_LIMIT ? K_PLAIN : K_UNKNOWN;
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

/* ---- init ---------------------------------------------------------------------- */

static void copy_env(char *dst, size_t n, const char *name, const char *dflt)
{
	const char *v = getenv(name);

	if (!v || !*v)
		v = dflt;
	if (!v) {
		dst[0] = 0;
		return;
	}
	snprintf(dst, n, "%s", v);
}

static void atfork_prepare(void);
static void atfork_parent(void);
static void atfork_child(void);

__attribute__((constructor)) static void sbp_init(void)
{
	char bpffs[128], tmp[32];

#define SBP_RESOLVE(ret, name, ...) if (!real_##name) sbp_real(#name, (void **)&real_##name);
	SBP_REAL_LIST(SBP_RESOLVE)
#undef SBP_RESOLVE
	copy_env(tmp, sizeof(tmp), "SHMBYPASS_DEBUG", "0");
	g.debug = tmp[0] && tmp[0] != '0';
	copy_env(g.instance, sizeof(g.instance), "SHMBYPASS_INSTANCE", "shmbypass");
	copy_env(bpffs, sizeof(bpffs), "SHMBYPASS_BPFFS", "/sys/fs/bpf");
	snprintf(g.pin_dir, sizeof(g.pin_dir), "%s/%s", bpffs, g.instance);
	copy_env(g.region_spec, sizeof(g.region_spec), "SHMBYPASS_REGION", NULL);
	copy_env(tmp, sizeof(tmp), "SHMBYPASS_SPIN_NS", NULL);
	g.spin_ns = tmp[0] ? (uint32_t)strtoul(tmp, NULL, 10) : SBP_RING_SPIN_DEFAULT_NS;
	copy_env(tmp, sizeof(tmp), "SHMBYPASS_DOORBELL", "0");
	g.doorbell = tmp[0] && tmp[0] != '0';
	copy_env(tmp, sizeof(tmp), "SHMBYPASS_EPOLL_SPIN_NS", NULL);
	g.epoll_spin_ns = tmp[0] ? (uint32_t)strtoul(tmp, NULL, 10) : 50000;
	copy_env(tmp, sizeof(tmp), "SHMBYPASS_DISABLE", "0");

	/* Without a region nothing can ever be in the shm tier: stay out of
	 * the way entirely (every hook is a plain call). */
	g.enabled = !(tmp[0] && tmp[0] != '0') && g.region_spec[0];
	if (!g.enabled) {
		DBG("disabled (%s)", g.region_spec[0] ? "SHMBYPASS_DISABLE" : "SHMBYPASS_REGION unset");
		return;
	}
	pthread_atfork(atfork_prepare, atfork_parent, atfork_child);
}

/* Map a whole region (a POSIX shm segment, or an ivshmem BAR2 file) from
 * an open fd, anywhere; the fd is closed. */
static int map_region_fd(int fd)
{
	struct stat st;
	void *p;

	if (fstat(fd, &st) < 0 || st.st_size < (off_t)SBP_REGION_HDR_SIZE) {
		syscall(SYS_close, fd);
		return -EPROTO;
	}
	p = mmap(NULL, st.st_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	syscall(SYS_close, fd);
	if (p == MAP_FAILED)
		return -errno;
	g.region = p;
	g.region_size = st.st_size;
	return 0;
}

static int map_region_shm(const char *name)
{
	int fd = shm_open(name, O_RDWR | O_CLOEXEC, 0);

	return fd < 0 ? -errno : map_region_fd(fd);
}

static int map_region_arena(const char *path)
{
	uint32_t type, pages, mflags;
	uint64_t addr;
	void *p;
	int fd, err = 0, rc;

	fd = bpf_obj_get(path);
	if (fd < 0)
		return -errno;
	rc = sbp_map_query(fd, &type, &pages, &addr, &mflags);
	if (rc < 0 || type != SBP_BPF_MAP_TYPE_ARENA || !addr) {
		syscall(SYS_close, fd);
		return rc < 0 ? rc : -EPROTO;
	}
	/* Every process maps the arena at the address kept in map_extra (and
	 * in the region header): the kernel refuses any other. */
	p = sbp_map_shared(fd, addr, (size_t)pages * 4096, &err);
	if (!p) {
		syscall(SYS_close, fd);
		return -err;
	}
	g.region = p;
	g.region_size = (size_t)pages * 4096;
	/* Kept: a forked child must map it again (fork does not copy the VMA). */
	g.arena_fd = sbp_internal_fd(fd);
	return 0;
}

/* ivshmem: the BAR2 of the ivshmem PCI device (its sysfs resource2 file),
 * shared with another VM: mapped anywhere, and no futex can wake a waiter
 * over there, so everything runs in doorbell mode. */
static int map_region_file(const char *path)
{
	int fd = open(path, O_RDWR | O_CLOEXEC);

	return fd < 0 ? -errno : map_region_fd(fd);
}

/* The arena's companion segment of futex words ("/<instance>-wake", or the
 * third field of SHMBYPASS_REGION=arena:<pin>:<name>). */
static int map_wake(const char *name)
{
	struct stat st;
	void *p;
	int fd;

	fd = shm_open(name, O_RDWR | O_CLOEXEC, 0);
	if (fd < 0)
		return -errno;
	if (fstat(fd, &st) < 0 || st.st_size < (off_t)sbp_region_wake_size(g.info.slot_count)) {
		syscall(SYS_close, fd);
		return -EPROTO;
	}
	p = mmap(NULL, st.st_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	syscall(SYS_close, fd);
	if (p == MAP_FAILED)
		return -errno;
	g.wake = p;
	g.wake_size = st.st_size;
	return 0;
}

/* The BPF side hands out slots of the region it was told about (the
 * `region` map): if that is not the one mapped here, never offer shm, so the
 * handshake leaves both ends on TCP. */
static int bpf_region_differs(const char *spec)
{
	struct sbp_region_cfg cfg;
	union bpf_attr a;
	uint32_t key = 0;
	char path[300];
	int fd, rc;

	snprintf(path, sizeof(path), "%s/region", g.pin_dir);
	fd = bpf_obj_get(path);
	if (fd < 0)
		return 0;
	memset(&a, 0, sizeof(a));
	memset(&cfg, 0, sizeof(cfg));
	a.map_fd = fd;
	a.key = (uint64_t)(uintptr_t)&key;
	a.value = (uint64_t)(uintptr_t)&cfg;
	rc = (int)sys_bpf(BPF_MAP_LOOKUP_ELEM, &a);
	syscall(SYS_close, fd);
	if (rc < 0)
		return 0;
	if (cfg.region_id != g.info.region_id) {
		WARN("shm tier off (different-region): instance %s hands out slots of "
		     "region %#llx, SHMBYPASS_REGION=%s is region %#llx", g.instance,
		     (unsigned long long)cfg.region_id, spec, (unsigned long long)g.info.region_id);
		return 1;
	}
	if (cfg.slot_count > g.info.slot_count) {
		WARN("shm tier off: instance %s hands out %u slots, region %s has %u",
		     g.instance, cfg.slot_count, spec, g.info.slot_count);
		return 1;
	}
	/* This kernel's part: a peer slot outside it is another VM's. */
	g.part_first = cfg.first_slot;
	g.part_count = cfg.slot_count;
	return 0;
}

static int shm_init(void)
{
	char path[300];
	const char *spec = g.region_spec, *colon = strchr(spec, ':');
	int rc;

	if (!colon) {
		WARN("shm tier off: SHMBYPASS_REGION=%s is not <backend>:<path>", spec);
		return -1;
	}
	snprintf(path, sizeof(path), "%s/sk_state", g.pin_dir);
	rc = bpf_obj_get(path);
	if (rc < 0) {
		/* Permission denied: this user may not use the instance (its
		 * pins and region are root's, mode 0600 by default): say so, the
		 * program's connections are plain TCP. Absent: not up, quietly. */
		if (errno == EACCES || errno == EPERM)
			WARN("shm tier off: uid %d may not use instance %s (%s: %s): plain TCP",
			     (int)getuid(), g.instance, path, strerror(errno));
		else
			DBG("shm tier off: no sk_state map at %s (%s): instance not up?", path,
			    strerror(errno));
		return -1;
	}
	g.map_fd = sbp_internal_fd(rc);
	if (!strncmp(spec, "shm:", 4)) {
		rc = map_region_shm(colon + 1);
	} else if (!strncmp(spec, "ivshmem:", 8)) {
		char tmp[32];

		rc = map_region_file(colon + 1);
		g.doorbell = 1;
		/* The peer is another VM: waits spin up to about a doorbell's
		 * cost (ring.h, sbp_ring_set_bell_cost), which under TCG is far
		 * more than the one-host default; so do poll/epoll waits. */
		copy_env(tmp, sizeof(tmp), "SHMBYPASS_SPIN_NS", NULL);
		if (!tmp[0])
			g.spin_ns = SBP_RING_SPIN_DOORBELL_MAX_NS;
		copy_env(tmp, sizeof(tmp), "SHMBYPASS_EPOLL_SPIN_NS", NULL);
		if (!tmp[0])
			g.epoll_spin_ns = SBP_RING_SPIN_DOORBELL_MAX_NS;
	} else if (!strncmp(spec, "arena:", 6)) {
		char *third;

		snprintf(path, sizeof(path), "%s", colon + 1);
		third = strchr(path, ':');
		if (third)
			*third++ = 0;
		rc = map_region_arena(path);
		if (rc == 0) {
			char wname[160];

			if (third && *third)
				snprintf(wname, sizeof(wname), "%s", third);
			else
				snprintf(wname, sizeof(wname), "/%s-wake", g.instance);
			if (sbp_region_check(g.region, g.region_size, &g.info) == 0 &&
			    (rc = map_wake(wname)) < 0) {
				WARN("shm tier off: arena region needs its wake segment %s: %s", wname,
				     strerror(-rc));
				return -1;
			}
		}
	} else {
		WARN("shm tier off: unknown region backend in SHMBYPASS_REGION=%s", spec);
		return -1;
	}
	if (rc < 0) {
		WARN("shm tier off: cannot map region %s: %s", spec, strerror(-rc));
		return -1;
	}
	rc = sbp_region_check(g.region, g.region_size, &g.info);
	if (rc < 0) {
		WARN("shm tier off: region %s: %s", spec,
		     rc == -EPROTONOSUPPORT ? "header version mismatch" : "bad header");
		munmap(g.region, g.region_size);
		g.region = NULL;
		return -1;
	}
	if (g.info.map_addr && g.info.map_addr != (uint64_t)(uintptr_t)g.region) {
		WARN("shm tier off: region %s is mapped at %p, its header says %#llx", spec,
		     g.region, (unsigned long long)g.info.map_addr);
		return -1;
	}
	if (bpf_region_differs(spec))
		return -1;
	DBG("shm tier on: region %s id %#llx, %u slots of %u bytes, instance %s", spec,
	    (unsigned long long)g.info.region_id, g.info.slot_count, g.info.slot_size, g.instance);
	return 0;
}

int sbp_shm_usable(void)
{
	int s = atomic_load_explicit(&g.shm_state, memory_order_acquire);

	if (likely(s))
		return s > 0;
	if (!g.enabled)
		return 0;
	/* One thread sets up; the others wait (the set-up takes microseconds). */
	if (atomic_compare_exchange_strong(&g.shm_state, &s, 2)) {
		int ok = shm_init() == 0;

		atomic_store_explicit(&g.shm_state, ok ? 1 : -1, memory_order_release);
		return ok;
	}
	while ((s = atomic_load_explicit(&g.shm_state, memory_order_acquire)) == 2)
		sched_yield();
	return s > 0;
}

/* Arena rings keep their futex words in the companion shm segment (FUTEX_WAIT
 * on arena memory says EFAULT); both ends use the same ones. */
static void wake_words(struct sbp_ring *r, uint32_t slot)
{
	uint32_t *rw, *ww;

	if (!g.wake)
		return;
	rw = sbp_region_wake_word(g.wake, g.wake_size, slot, 0);
	ww = sbp_region_wake_word(g.wake, g.wake_size, slot, 1);
	if (rw && ww)
		sbp_ring_set_wait_words(r, rw, ww);
}

/* ---- channels -------------------------------------------------------------------- */

static atomic_flag slab_lock = ATOMIC_FLAG_INIT;
static struct chan *chan_free_list;

static void slab_acquire(void)
{
	while (atomic_flag_test_and_set_explicit(&slab_lock, memory_order_acquire))
		sched_yield();
}

static void slab_release(void)
{
	atomic_flag_clear_explicit(&slab_lock, memory_order_release);
}

/* Channel pages (MAP_SHARED, so a forked child shares them) are kept for
 * reuse: a fresh one costs a shmem page-cache insert, a fault and a free.
 * Only pages no other process can have: none made before the last fork. */
#define SH_BYTES ((sizeof(struct chan_sh) + 4095) & ~(size_t)4095)
#define SH_POOL_MAX 256
static _Atomic unsigned fork_epoch;
static void *sh_pool[SH_POOL_MAX];
static unsigned sh_pool_n;

static struct chan *chan_alloc(void)
{
	pthread_mutexattr_t ma;
	struct chan_sh *sh = NULL;
	struct chan *ch;

	slab_acquire();
	if (sh_pool_n)
		sh = sh_pool[--sh_pool_n];
	slab_release();
	if (sh) {
		memset(sh, 0, sizeof(*sh));
	} else {
		sh = mmap(NULL, SH_BYTES, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
		if (sh == MAP_FAILED)
			return NULL;
	}
	slab_acquire();
	if (!chan_free_list) {
		size_t sz = 65536, each = (sizeof(struct chan) + 63) & ~(size_t)63;
		char *p = mmap(NULL, sz, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

		if (p == MAP_FAILED) {
			slab_release();
			munmap(sh, SH_BYTES);
			return NULL;
		}
		for (size_t off = 0; off + each <= sz; off += each) {
			struct chan *c = (struct chan *)(p + off);

			c->next_free = chan_free_list;
			chan_free_list = c;
		}
	}
	ch = chan_free_list;
	chan_free_list = ch->next_free;
	slab_release();

	pthread_mutexattr_init(&ma);
	pthread_mutexattr_setpshared(&ma, PTHREAD_PROCESS_SHARED);
	pthread_mutexattr_setrobust(&ma, PTHREAD_MUTEX_ROBUST);
	pthread_mutex_init(&sh->rx_lock, &ma);
	pthread_mutex_init(&sh->tx_lock, &ma);
	pthread_mutexattr_destroy(&ma);
	sh->kick[0] = sh->kick[1] = -1;
	ch->sh = sh;
	ch->sh_epoch = atomic_load(&fork_epoch);
	ch->next_free = NULL;
	atomic_store(&ch->nfds, 0);
	atomic_store(&ch->shared, 0);
	atomic_store_explicit(&ch->refs, 1, memory_order_release);
	return ch;
}

int chan_tryget(struct chan *ch)
{
	int r = atomic_load_explicit(&ch->refs, memory_order_relaxed);

	while (r > 0)
		if (atomic_compare_exchange_weak(&ch->refs, &r, r + 1))
			return 1;
	return 0;
}

void chan_put(struct chan *ch)
{
	void *sh;

	if (atomic_fetch_sub_explicit(&ch->refs, 1, memory_order_acq_rel) != 1)
		return;
	/* Our view only: the rings live on in the region for the peer. */
	sh = ch->sh;
	ch->sh = NULL;
	for (int d = 0; d < 2; d++) {
		int k = ((struct chan_sh *)sh)->kick[d];

		if (k >= 0 && ch->sh_epoch == atomic_load(&fork_epoch)) {
			/* ours alone (no fork since): close it */
			fdt_store(k, K_UNKNOWN);
			syscall(SYS_close, k);
		}
	}
	slab_acquire();
	if (ch->sh_epoch == atomic_load(&fork_epoch) && sh_pool_n < SH_POOL_MAX) {
		sh_pool[sh_pool_n++] = sh;
		sh = NULL;
	}
	ch->next_free = chan_free_list;
	chan_free_list = ch;
	slab_release();
	if (sh)
		munmap(sh, SH_BYTES);
}

/* fork: pooled pages are now mapped in two processes; neither may reuse them. */
static void sh_pool_drop(void)
{
	atomic_fetch_add(&fork_epoch, 1);
	while (sh_pool_n)
		munmap(sh_pool[--sh_pool_n], SH_BYTES);
}

/* ---- the control connection ----------------------------------------------------- */

/* Doorbell mode: the first guess at what a doorbell wake-up costs, the
 * connection's smoothed RTT as the kernel measured it on the handshake (a
 * doorbell is one segment plus a wake-up); 0 (ring default) if unknown. */
static uint32_t bell_seed_ns(int fd)
{
	struct tcp_info ti;
	socklen_t len = sizeof(ti);
	int saved = errno;

	memset(&ti, 0, sizeof(ti));
	if (syscall(SYS_getsockopt, fd, IPPROTO_TCP, TCP_INFO, &ti, &len) < 0)
		ti.tcpi_rtt = 0;
	errno = saved;
	return ti.tcpi_rtt > SBP_RING_SPIN_DOORBELL_MAX_NS / 1000 ? SBP_RING_SPIN_DOORBELL_MAX_NS
								: ti.tcpi_rtt * 1000;
}

void ctl_doorbell(int fd)
{
	static const char bell = 0;
	int saved = errno;

	/* SYNC POINT: the ring was published before this syscall; the peer
	 * re-checks the ring after it wakes on the byte. */
	syscall(SYS_sendto, fd, &bell, 1, MSG_DONTWAIT | MSG_NOSIGNAL, NULL, 0);
	errno = saved;
}

int rx_try_attach(int fd, struct chan *ch)
{
	struct chan_sh *sh = ch->sh;
	struct sbp_ring tmp;
	uint32_t zero = 0;
	int rc;

	if (atomic_load_explicit(&sh->flags, memory_order_acquire) & CH_RX_ATTACHED)
		return 1;
	rc = sbp_ring_attach(&tmp, sh->rx_slot, sh->slot_size, sh->rx_gen);
	if (rc == -EAGAIN)
		return 0;
	/* Until the peer has formatted it, the slot holds whatever its last
	 * user (or anyone) left there: a bad header means "not yet". The peer
	 * formats before it sends anything on TCP, so once a byte came from
	 * it, a bad header is corruption. */
	if (rc == -EPROTO && !(atomic_load(&sh->flags) & CH_BELL_SEEN))
		return 0;
	if (rc < 0) {
		chan_break(fd, ch, SBP_RESET_CORRUPT, "the peer's ring header is bad");
		return 0;
	}
	/* Nobody touches sh->rx before CH_RX_ATTACHED says it is there, so
	 * the one thread that wins this flag may write it. */
	if (!atomic_compare_exchange_strong(&sh->attaching, &zero, 1))
		return !!(atomic_load_explicit(&sh->flags, memory_order_acquire) & CH_RX_ATTACHED);
	if (!(atomic_load(&sh->flags) & CH_RX_ATTACHED)) {
		sbp_ring_set_spin(&tmp, g.spin_ns);
		wake_words(&tmp, sh->rx_idx);
		sbp_ring_doorbell_mode(&tmp, g.doorbell);
		if (g.doorbell)
			sbp_ring_set_bell_cost(&tmp, bell_seed_ns(fd));
		sh->rx = tmp;
		/* SYNC POINT: the view is complete before the flag says so. */
		atomic_fetch_or_explicit(&sh->flags, CH_RX_ATTACHED, memory_order_release);
	}
	return 1;
}

int peer_tx_shut(struct chan *ch)
{
	uint32_t f = atomic_load_explicit(&ch->sh->flags, memory_order_acquire);

	if (f & (CH_TCP_EOF | CH_TCP_RST | CH_PEER_GONE | CH_BROKEN))
		return 1;
	return (f & CH_RX_ATTACHED) && (sbp_ring_flags(&ch->sh->rx) & SBP_RING_WRITER_CLOSED);
}

/* The TCP connection ended (FIN or RST). If the ring we read carries no FIN,
 * the peer did not shut down its side through us: its socket is gone (the
 * process died, or it closed a descriptor it shared with another process).
 * Then reads drain the ring and end like TCP would: ECONNRESET if the peer
 * left data of ours unread (TCP would have sent RST), else EOF. */
static void note_tcp_end(int fd, struct chan *ch, uint32_t bit)
{
	struct chan_sh *sh = ch->sh;
	int fin;

	rx_try_attach(fd, ch);
	fin = (atomic_load(&sh->flags) & CH_RX_ATTACHED) &&
	      (sbp_ring_flags(&sh->rx) & SBP_RING_WRITER_CLOSED);
	if (!fin || bit == CH_TCP_RST) {
		uint32_t more = CH_PEER_GONE;

		if (!fin && sbp_ring_readable(&sh->tx) > 0)
			more |= CH_GONE_RESET;
		bit |= more;
	}
	if (!(atomic_fetch_or(&sh->flags, bit) & CH_PEER_GONE) && (bit & CH_PEER_GONE))
		DBG("peer's socket closed (TCP %s%s)", bit & CH_TCP_RST ? "RST" : "FIN",
		    bit & CH_GONE_RESET ? ", our data unread: ECONNRESET" : "");
}

uint32_t ctl_drain(int fd, struct chan *ch)
{
	struct chan_sh *sh = ch->sh;
	uint32_t f = atomic_load(&sh->flags);
	char buf[256];
	int saved = errno;

	if (f & (CH_TCP_EOF | CH_TCP_RST))
		return f & (CH_TCP_EOF | CH_TCP_RST);
	for (;;) {
		long n = syscall(SYS_recvfrom, fd, buf, sizeof(buf), MSG_DONTWAIT, NULL, NULL);

		if (n > 0 && !(f & CH_BELL_SEEN)) {
			/* SYNC POINT: the peer formatted its ring before this byte */
			atomic_fetch_or(&sh->flags, CH_BELL_SEEN);
			f |= CH_BELL_SEEN;
		}
		if (n > 0 && g.doorbell) {
			/* The bytes may have been for a sleeper of the other
			 * direction, asleep on this socket too: kick it. */
			for (int d = 0; d < 2; d++) {
				int k = sh->kick[d];

				if (k >= 0 && atomic_load(d ? &sh->tx_sleeping : &sh->rx_sleeping)) {
					uint64_t one = 1;

					syscall(SYS_write, k, &one, sizeof(one));
				}
			}
		}
		if (n == (long)sizeof(buf))
			continue;
		if (n > 0)
			break;
		if (n == 0) {
			/* After our own SHUT_RD a 0 says nothing about the peer. */
			if (!(f & CH_SHUT_RD))
				note_tcp_end(fd, ch, CH_TCP_EOF);
			break;
		}
		if (errno == EINTR)
			continue;
		if (errno == ECONNRESET || errno == ETIMEDOUT || errno == EPIPE)
			note_tcp_end(fd, ch, CH_TCP_RST);
		break;
	}
	errno = saved;
	return atomic_load(&sh->flags) & (CH_TCP_EOF | CH_TCP_RST);
}

void chan_break(int fd, struct chan *ch, uint32_t reason, const char *why)
{
	struct chan_sh *sh = ch->sh;

	if (atomic_fetch_or(&sh->flags, CH_BROKEN) & CH_BROKEN)
		return;
	sh->reason = reason;
	WARN("fd %d: shm channel reset: %s%s", fd, why,
	     atomic_load(&sh->flags) & CH_DATA ? "" : " (before any data)");
	/* Both rings say RESET (if their headers still make sense), and the
	 * TCP connection ends so a peer sleeping on it wakes. */
	sbp_ring_reset(&sh->tx, reason);
	if (atomic_load(&sh->flags) & CH_RX_ATTACHED)
		sbp_ring_reset(&sh->rx, reason);
	if (fd >= 0) {
		/* a peer asleep in poll/epoll learns from the FIN below */
		int saved = errno;

		syscall(SYS_shutdown, fd, SHUT_RDWR);
		errno = saved;
	}
}

/* ---- waiting -------------------------------------------------------------------- */

int sbp_restartable(void)
{
	/* EINTR is rare: ask the kernel about every handler rather than track
	 * sigaction()/signal() (glibc's signal() calls sigaction internally,
	 * out of our reach). */
	for (int sig = 1; sig < 65; sig++) {
		struct {
			void *handler;
			unsigned long flags;
			void *restorer;
			uint64_t mask;
		} ka;

		if (syscall(SYS_rt_sigaction, sig, NULL, &ka, 8) < 0)
			continue;
		if (ka.handler != (void *)SIG_DFL && ka.handler != (void *)SIG_IGN &&
		    !(ka.flags & SA_RESTART))
			return 0;
	}
	return 1;
}

int64_t sock_timeout_ns(int fd, int optname)
{
	struct timeval tv = { 0, 0 };
	socklen_t len = sizeof(tv);
	int saved = errno;

	if (syscall(SYS_getsockopt, fd, SOL_SOCKET, optname, &tv, &len) < 0)
		tv.tv_sec = tv.tv_usec = 0;
	errno = saved;
	if (!tv.tv_sec && !tv.tv_usec)
		return -1;
	return (int64_t)tv.tv_sec * 1000000000 + (int64_t)tv.tv_usec * 1000;
}

static int sys_ppoll_ns(struct pollfd *p, unsigned n, int64_t ns)
{
	struct timespec ts, *tp = NULL;

	if (ns >= 0) {
		ts.tv_sec = ns / 1000000000;
		ts.tv_nsec = ns % 1000000000;
		tp = &ts;
	}
	return (int)syscall(SYS_ppoll, p, n, tp, NULL, 8);
}

/* Blocking calls sleep on the ring's futex word (one per direction, so a
 * reader and a writer thread never steal each other's wake-up). A futex
 * cannot say that the peer process died; its TCP socket can. So the sleep
 * is cut in slices (10 ms, doubling to 1 s while nothing happens) and the
 * TCP socket is looked at between them. */
#define SLICE_MIN_NS    10000000
#define SLICE_MAX_NS    1000000000
#define ATTACH_WAIT_NS  10000000

/* Look at the TCP side without waiting: FIN/RST (and doorbells) noted. */
static void ctl_check(int fd, struct chan *ch)
{
	struct pollfd p = { fd, POLLIN | POLLRDHUP, 0 };
	int saved = errno;

	if (!(atomic_load(&ch->sh->flags) & (CH_TCP_EOF | CH_TCP_RST)) &&
	    sys_ppoll_ns(&p, 1, 0) > 0)
		ctl_drain(fd, ch);
	errno = saved;
}

static int futex_wait_sliced(int fd, struct chan *ch, int dir, int64_t deadline);

/* Doorbell mode (no futex across VMs): spin, arm, and sleep on the TCP
 * socket plus this direction's kick eventfd (another thread that eats a
 * doorbell meant for us kicks it). Where no doorbell can come (the peer's
 * TCP side is shut), look in slices backing off to 20 ms. */
static int kick_fd(struct chan_sh *sh, int dir)
{
	int k = sh->kick[dir];

	if (k < 0) {
		k = (int)syscall(SYS_eventfd2, 0, EFD_CLOEXEC | EFD_NONBLOCK);
		if (k >= 0)
			k = sbp_internal_fd(k);
		sh->kick[dir] = k;      /* under the direction lock */
	}
	return k;
}

static int doorbell_wait(int fd, struct chan *ch, int dir, int64_t deadline)
{
	struct chan_sh *sh = ch->sh;
	_Atomic uint32_t *sleeping = dir ? &sh->tx_sleeping : &sh->rx_sleeping;
	int64_t left = -1, sleep_ns = -1;
	uint32_t f = atomic_load(&sh->flags);
	struct pollfd p[2];
	int rc, attached = dir || (f & CH_RX_ATTACHED);

	if (deadline != DL_NONE) {
		left = deadline - now_ns();
		if (left <= 0)
			return -ETIMEDOUT;
	}
	/* SYNC POINT: "sleeping" before the ring is armed: whoever eats the
	 * doorbell that the arming brings sees it and kicks us. */
	p[1].fd = kick_fd(sh, dir);
	p[1].events = POLLIN;
	atomic_store(sleeping, 1);
	if (attached) {
		rc = dir ? sbp_ring_wait_writable(&sh->tx, left) : sbp_ring_wait_readable(&sh->rx, left);
		if (rc == 0 || rc == -ETIMEDOUT) {
			atomic_store(sleeping, 0);
			return rc;      /* else -EAGAIN: armed, sleep */
		}
	} else {
		sleep_ns = ATTACH_WAIT_NS;
	}
	p[0].fd = fd;
	p[0].events = POLLIN | POLLRDHUP;
	p[0].revents = p[1].revents = 0;
	f = atomic_load(&sh->flags);
	if ((f & (CH_TCP_EOF | CH_TCP_RST | CH_SHUT_RD)) || (dir && peer_tx_shut(ch))) {
		if (dir && !(f & (CH_TCP_EOF | CH_TCP_RST | CH_SHUT_WR))) {
			int64_t t = now_ns();

			if (t - sh->last_probe_ns > 200000000) {
				sh->last_probe_ns = t;
				ctl_doorbell(fd);
			}
		}
		if (sh->slice_ns[dir] < 50000)
			sh->slice_ns[dir] = 50000;
		sleep_ns = sh->slice_ns[dir];
		if (sh->slice_ns[dir] < 20000000)
			sh->slice_ns[dir] *= 2;
		p[0].events = 0;
		if (f & (CH_TCP_EOF | CH_TCP_RST))
			p[0].fd = -1;
	} else {
		sh->slice_ns[dir] = 0;
	}
	if (left >= 0 && (sleep_ns < 0 || sleep_ns > left))
		sleep_ns = left;
	rc = sys_ppoll_ns(p, 2, sleep_ns);
	atomic_store(sleeping, 0);
	if (rc > 0 && p[1].revents) {
		uint64_t v;

		syscall(SYS_read, p[1].fd, &v, sizeof(v));
	}
	if (rc > 0 && p[0].revents && p[0].fd >= 0)
		ctl_drain(fd, ch);
	if (attached)           /* how long the doorbell took: the spin's calibration */
		sbp_ring_note_wakeup(dir ? &sh->tx : &sh->rx);
	if (rc < 0 && errno == EINTR)
		return -EINTR;
	if (sh->slice_ns[dir] && (dir ? sbp_ring_writable(&sh->tx) : sbp_ring_readable(&sh->rx)))
		sh->slice_ns[dir] = 50000;      /* it moved: stay quick */
	return 0;
}

int chan_wait(int fd, struct chan *ch, int dir, int64_t deadline)
{
	if (g.doorbell)
		return doorbell_wait(fd, ch, dir, deadline);
	return futex_wait_sliced(fd, ch, dir, deadline);
}

static int futex_wait_sliced(int fd, struct chan *ch, int dir, int64_t deadline)
{
	struct chan_sh *sh = ch->sh;
	_Atomic uint32_t *sleeping = dir ? &sh->tx_sleeping : &sh->rx_sleeping;
	int64_t left = -1, slice;
	uint32_t f = atomic_load(&sh->flags);
	int rc;

	if (deadline != DL_NONE) {
		left = deadline - now_ns();
		if (left <= 0)
			return -ETIMEDOUT;
	}
	if (!dir && !(f & CH_RX_ATTACHED)) {
		/* The peer has not formatted the ring yet: its hello doorbell
		 * wakes us (retry now and then anyway). */
		struct pollfd p = { fd, POLLIN | POLLRDHUP, 0 };

		slice = left >= 0 && left < ATTACH_WAIT_NS ? left : ATTACH_WAIT_NS;
		atomic_store(sleeping, 1);
		rc = sys_ppoll_ns(&p, 1, slice);
		atomic_store(sleeping, 0);
		if (rc > 0)
			ctl_drain(fd, ch);
		if (rc < 0 && errno == EINTR)
			return -EINTR;
		return 0;
	}
	if (sh->slice_ns[dir] < SLICE_MIN_NS)
		sh->slice_ns[dir] = SLICE_MIN_NS;
	slice = sh->slice_ns[dir];
	if (left >= 0 && left < slice)
		slice = left;
	atomic_store(sleeping, 1);
	rc = dir ? sbp_ring_wait_writable(&sh->tx, slice) : sbp_ring_wait_readable(&sh->rx, slice);
	atomic_store(sleeping, 0);
	if (rc == 0) {
		sh->slice_ns[dir] = SLICE_MIN_NS;
		return 0;
	}
	if (rc == -EINTR)
		return -EINTR;
	/* A slice went by: is the peer still there? */
	if (sh->slice_ns[dir] < SLICE_MAX_NS)
		sh->slice_ns[dir] *= 2;
	if (dir && peer_tx_shut(ch) && !(f & (CH_TCP_EOF | CH_TCP_RST | CH_SHUT_WR))) {
		/* The peer shut its side: if it has died since, only a byte
		 * from us makes its kernel answer (RST). A live peer eats it
		 * as a doorbell. */
		ctl_doorbell(fd);
	}
	ctl_check(fd, ch);
	if (deadline != DL_NONE && now_ns() >= deadline)
		return -ETIMEDOUT;
	return 0;
}

/* ---- setting a channel up ---------------------------------------------------------- */


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

/* Build the channel for a socket the handshake put in the shm tier. NULL
 * only if no memory; a channel that cannot work comes back broken. */
static struct chan *chan_setup(int fd, const struct sbp_sk *st, int rediscovered)
{
	struct chan *ch = chan_alloc();
	struct chan_sh *sh;
	const char *why = NULL;
	void *tx, *rx;
	int rc, fl;

	if (!ch)
		return NULL;
	sh = ch->sh;
	sh->slot_size = g.info.slot_size;
	sh->tx_idx = st->tx_slot;
	sh->rx_idx = st->rx_slot;
	sh->tx_gen = st->tx_gen;
	sh->rx_gen = st->rx_gen;
	{
		/* What the app set: from our own notes when we saw the socket
		 * made, else from the kernel. Doorbells are single bytes: Nagle
		 * would hold one back until the peer's delayed ACK (40 ms), a
		 * cork (nginx' tcp_nopush) for 200 ms. So NODELAY on, CORK off;
		 * the app's own values are kept for getsockopt (its data no
		 * longer uses TCP). */
		unsigned o = fdo_get(fd);
		int nonblock, nodelay, cork, one = 1, zero = 0;

		if (o & FDO_KNOWN) {
			nonblock = !!(o & FDO_NONBLOCK);
			nodelay = !!(o & FDO_NODELAY);
			cork = !!(o & FDO_CORK);
		} else {
			socklen_t len = sizeof(int);

			fl = (int)syscall(SYS_fcntl, fd, F_GETFL, 0);
			nonblock = fl >= 0 && (fl & O_NONBLOCK);
			nodelay = cork = 0;
			syscall(SYS_getsockopt, fd, IPPROTO_TCP, TCP_NODELAY, &nodelay, &len);
			len = sizeof(int);
			syscall(SYS_getsockopt, fd, IPPROTO_TCP, TCP_CORK, &cork, &len);
		}
		if (nonblock)
			atomic_fetch_or(&sh->flags, CH_NONBLOCK);
		if (nodelay)
			atomic_fetch_or(&sh->flags, CH_APP_NODELAY);
		else
			syscall(SYS_setsockopt, fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
		if (cork) {
			atomic_fetch_or(&sh->flags, CH_APP_CORK);
			syscall(SYS_setsockopt, fd, IPPROTO_TCP, TCP_CORK, &zero, sizeof(zero));
		}
	}

	tx = sbp_region_slot(&g.info, g.region, st->tx_slot);
	rx = sbp_region_slot(&g.info, g.region, st->rx_slot);
	sh->tx_slot = tx;
	sh->rx_slot = rx;
	if (st->region_id && st->region_id != g.info.region_id)
		why = "the handshake named another region";
	else if (!tx || !rx || st->tx_slot == st->rx_slot)
		why = "slot numbers out of range";
	if (why)
		goto broken;
	/* A new connection formats the ring it writes. One found again (after
	 * exec) attaches: the ring may already carry our data; it formats
	 * only if the slot still shows another generation. */
	rc = rediscovered ? sbp_ring_attach(&sh->tx, tx, sh->slot_size, st->tx_gen) : -EAGAIN;
	if (rc == -EAGAIN) {
		if (g.wake) {
			uint32_t *rw = sbp_region_wake_word(g.wake, g.wake_size, st->tx_slot, 0);
			uint32_t *ww = sbp_region_wake_word(g.wake, g.wake_size, st->tx_slot, 1);

			if (rw && ww)
				*rw = *ww = 0;
		}
		rc = sbp_ring_format(tx, sh->slot_size, st->tx_gen);
		if (rc == 0)
			rc = sbp_ring_attach(&sh->tx, tx, sh->slot_size, st->tx_gen);
	}
	if (rc < 0) {
		why = "cannot format the ring we write";
		goto broken;
	}
	sbp_ring_set_spin(&sh->tx, g.spin_ns);
	wake_words(&sh->tx, st->tx_slot);
	sbp_ring_doorbell_mode(&sh->tx, g.doorbell);
	if (g.part_count && (st->rx_slot < g.part_first || st->rx_slot - g.part_first >= g.part_count)) {
		/* The peer is another kernel (its slot is in another part), which
		 * holds no reference on our slot: ours comes back at our socket's
		 * TCP_CLOSE. After close() an orphan reaches it as soon as its FIN
		 * is ACKed (FIN_WAIT2 turns into a time-wait sock when
		 * tcp_fin_timeout <= 60 s), while the peer may still be reading
		 * our ring. A linger2 over 60 s keeps the orphan a full socket in
		 * FIN_WAIT2 until the peer's FIN (it closed: done reading) or
		 * 60 s, so the slot is not reused under a late reader
		 * (docs/NEGOTIATION.md, "VM pairs"). */
		int linger2 = 120;

		syscall(SYS_setsockopt, fd, IPPROTO_TCP, TCP_LINGER2, &linger2, sizeof(linger2));
	}
	if (g.doorbell) {
		sbp_ring_set_bell_cost(&sh->tx, bell_seed_ns(fd));
		/* A peer VM that dies sends no FIN: TCP keepalives find it. */
		int on = 1, idle = 2, intvl = 1, cnt = 3;

		syscall(SYS_setsockopt, fd, SOL_SOCKET, SO_KEEPALIVE, &on, sizeof(on));
		syscall(SYS_setsockopt, fd, IPPROTO_TCP, TCP_KEEPIDLE, &idle, sizeof(idle));
		syscall(SYS_setsockopt, fd, IPPROTO_TCP, TCP_KEEPINTVL, &intvl, sizeof(intvl));
		syscall(SYS_setsockopt, fd, IPPROTO_TCP, TCP_KEEPCNT, &cnt, sizeof(cnt));
	}
	rx_try_attach(fd, ch);
	if (atomic_load(&sh->flags) & CH_BROKEN)
		goto out;
	/* Hello: a peer waiting to attach the ring we just formatted wakes up. */
	ctl_doorbell(fd);
	DBG("fd %d: shm tier: tx slot %u gen %#llx, rx slot %u gen %#llx%s", fd, st->tx_slot,
	    (unsigned long long)st->tx_gen, st->rx_slot, (unsigned long long)st->rx_gen,
	    atomic_load(&sh->flags) & CH_RX_ATTACHED ? "" : " (peer not attached yet)");
	goto out;
broken:
	memset(&sh->tx, 0, sizeof(sh->tx));
	chan_break(fd, ch, SBP_RESET_CORRUPT, why);
out:
	return ch;
}

/* ---- from a socket to its kind ---------------------------------------------------------- */


/* Why BPF left a marked socket out of the shm tier (bpf/bypass.h; the
 * names `shmbypass status` uses). */
static const char *reason_name(uint32_t r)
{
	static const char *names[] = {
		[SBP_REASON_NONE] = "none",
		[SBP_REASON_AWAITING_PEER] = "peer-not-capable",
		[SBP_REASON_PEER_NOT_CAPABLE] = "peer-not-capable",
		[SBP_REASON_HANDSHAKE_RACE] = "handshake-race",
		[SBP_REASON_TABLE_FULL] = "table-full",
		[SBP_REASON_DRAINING] = "shutting-down",
		[SBP_REASON_PEER_CLOSED] = "peer-closed",
		[SBP_REASON_POLICY_EXCLUDED] = "policy-excluded",
		[SBP_REASON_DIFFERENT_REGION] = "different-region",
		[SBP_REASON_POOL_EXHAUSTED] = "pool-exhausted",
		[SBP_REASON_NO_OPTION_SPACE] = "no-option-space",
	};

	return r < sizeof(names) / sizeof(names[0]) && names[r] ? names[r] : "other";
}

/* fd is established (connect returned, or accept): settle its kind. The
 * entry holds K_BUSY (we own it) on entry. */
static void resolve_established(int fd, int rediscovered)
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
		DBG("fd %d: not in the shm tier: %s (reason %u)", fd, reason_name(st.reason),
		    st.reason);
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

/* The old occupant of an fd number is gone (a new socket got the number, or
 * dup2 replaced it): drop our state for it. */
static void fd_forget(int fd, int closing)
{
	unsigned o = fdo_get(fd);
	uint64_t v = fdt_xchg(fd, K_UNKNOWN);
	int k = FD_KIND(v);

	if (o)
		fdo_set(fd, 0);

	if (k == K_SHM || k == K_CONNECTING)
		ep_forget_fd(fd);
	if (k == K_EPOLL) {
		ep_free(FD_PTR(v));
	} else if (k == K_SHM) {
		struct chan *ch = FD_PTR(v);
		struct chan_sh *sh = ch->sh;

		if (atomic_fetch_sub(&ch->nfds, 1) == 1 && closing && !atomic_load(&ch->shared)) {
			/* Last holder: the peer gets everything we wrote, then
			 * EOF; its writes get EPIPE. SO_LINGER {1, 0} is an
			 * abort: both rings reset (TCP sends RST too). */
			struct linger lg = { 0, 0 };
			socklen_t len = sizeof(lg);
			int saved = errno, rc;

			if ((o & FDO_KNOWN) ? !!(o & FDO_LINGER0) :
			    (syscall(SYS_getsockopt, fd, SOL_SOCKET, SO_LINGER, &lg, &len) == 0 &&
			     lg.l_onoff && lg.l_linger == 0)) {
				sbp_ring_reset(&sh->tx, SBP_RESET_APP);
				if (atomic_load(&sh->flags) & CH_RX_ATTACHED)
					sbp_ring_reset(&sh->rx, SBP_RESET_APP);
			} else {
				rc = pthread_mutex_trylock(&sh->tx_lock);
				if (rc == 0 || rc == EOWNERDEAD) {
					if (rc)
						pthread_mutex_consistent(&sh->tx_lock);
					sbp_ring_close_writer(&sh->tx);
					if (sbp_ring_peer_waiting(&sh->tx))
						ctl_doorbell(fd);
					pthread_mutex_unlock(&sh->tx_lock);
				}
				rx_try_attach(fd, ch);
				rc = pthread_mutex_trylock(&sh->rx_lock);
				if (rc == 0 || rc == EOWNERDEAD) {
					if (rc)
						pthread_mutex_consistent(&sh->rx_lock);
					if (atomic_load(&sh->flags) & CH_RX_ATTACHED) {
						sbp_ring_close_reader(&sh->rx);
						if (sbp_ring_peer_waiting(&sh->rx))
							ctl_doorbell(fd);
					}
					pthread_mutex_unlock(&sh->rx_lock);
				}
				/* Unread doorbells would make close() send RST. */
				ctl_drain(fd, ch);
			}
			errno = saved;
		}
		chan_put(ch);
	}
}

/* newfd now names what oldfd names. */
static void fd_copy(int oldfd, int newfd)
{
	struct chan *ch;
	int k = fd_class(oldfd, &ch);

	fdo_set(newfd, fdo_get(oldfd));

	if (k == K_SHM) {
		atomic_fetch_add(&ch->nfds, 1);
		fdt_store(newfd, (uint64_t)(uintptr_t)ch | K_SHM);   /* the reference moves to the table */
	} else if (k == K_EPOLL) {
		fdt_store(newfd, K_UNKNOWN);
	} else {
		fdt_store(newfd, (uint64_t)k);
	}
}

/* ---- fork ------------------------------------------------------------------------------- */

static void mark_all_shared(void)
{
	int hi = fdt_max();

	for (int fd = 0; fd < hi; fd++) {
		uint64_t v = fdt_load(fd);

		if (FD_KIND(v) == K_SHM)
			atomic_store(&((struct chan *)FD_PTR(v))->shared, 1);
	}
}

static void atfork_prepare(void)
{
	slab_acquire();
}

static void atfork_parent(void)
{
	sh_pool_drop();
	slab_release();
	mark_all_shared();
}

static void atfork_child(void)
{
	sh_pool_drop();
	slab_release();
	mark_all_shared();
	/* fork does not copy an arena's VMA: map it again, same address. */
	if (g.arena_fd >= 0 && g.region) {
		int err = 0;

		if (!sbp_map_shared(g.arena_fd, (uint64_t)(uintptr_t)g.region, g.region_size, &err))
			WARN("forked child cannot map the arena again: %s", strerror(err));
	}
	ep_atfork_child();
}

/* ---- socket life-cycle hooks ---------------------------------------------------------------- */

static int is_tcp_socket(int domain, int type, int proto)
{
	return (domain == AF_INET || domain == AF_INET6) && (type & 0xf) == SOCK_STREAM &&
	       (proto == 0 || proto == IPPROTO_TCP);
}

EXPORT int socket(int domain, int type, int proto)
{
	int fd = REAL(socket)(domain, type, proto), saved = errno;

	if (fd < 0 || !g.enabled)
		return fd;
	fd_forget(fd, 0);
	if (is_tcp_socket(domain, type, proto)) {
		fdt_store(fd, K_TCP);
		fdo_set(fd, FDO_KNOWN | ((type & SOCK_NONBLOCK) ? FDO_NONBLOCK : 0));
	} else {
		fdt_store(fd, K_PLAIN);
	}
	errno = saved;
	return fd;
}

EXPORT int connect(int fd, const struct sockaddr *addr, socklen_t len)
{
	struct chan *ch;
	int k, r, saved;

	if (!g.enabled)
		return REAL(connect)(fd, addr, len);
	k = fd_class(fd, &ch);
	if (ch)
		chan_put(ch);
	if (k != K_TCP || !addr || addr->sa_family == AF_UNSPEC)
		return REAL(connect)(fd, addr, len);
	if (!sbp_shm_usable()) {
		fdt_cas(fd, K_TCP, K_PLAIN);
		return REAL(connect)(fd, addr, len);
	}
	r = sk_mark(fd);
	if (r < 0) {
		DBG("fd %d: cannot mark the socket (%s): tcp tier", fd, strerror(-r));
		fdt_cas(fd, K_TCP, K_PLAIN);
		return REAL(connect)(fd, addr, len);
	}
	r = REAL(connect)(fd, addr, len);
	saved = errno;
	if (r == 0) {
		if (fdt_cas(fd, K_TCP, K_BUSY))
			resolve_established(fd, 0);
	} else if (errno == EINPROGRESS || errno == EINTR || errno == EALREADY) {
		fdt_cas(fd, K_TCP, K_CONNECTING);
	}
	errno = saved;
	return r;
}

EXPORT int listen(int fd, int backlog)
{
	struct chan *ch;
	int k;

	if (!g.enabled)
		return REAL(listen)(fd, backlog);
	k = fd_class(fd, &ch);
	if (ch)
		chan_put(ch);
	if (k == K_TCP && sbp_shm_usable()) {
		int rc = sk_mark(fd);

		if (rc == 0)
			fdt_cas(fd, K_TCP, K_LISTEN);
		else
			DBG("fd %d: cannot mark the listener (%s)", fd, strerror(-rc));
	}
	return REAL(listen)(fd, backlog);
}

static int after_accept(int lfd, int nfd, int flags)
{
	struct chan *ch;
	int saved = errno, k;
	unsigned lo;

	if (nfd < 0 || !g.enabled)
		return nfd;
	fd_forget(nfd, 0);
	/* an accepted socket inherits the listener's options, not O_NONBLOCK */
	lo = fdo_get(lfd);
	if (lo & FDO_KNOWN)
		fdo_set(nfd, FDO_KNOWN | (lo & (FDO_NODELAY | FDO_CORK | FDO_LINGER0)) |
			     ((flags & SOCK_NONBLOCK) ? FDO_NONBLOCK : 0));
	k = fd_class(lfd, &ch);
	if (ch)
		chan_put(ch);
	if (k == K_LISTEN) {
		fdt_store(nfd, K_BUSY);
		resolve_established(nfd, 0);
	} else {
		fdt_store(nfd, K_PLAIN);
	}
	errno = saved;
	return nfd;
}

EXPORT int accept(int fd, struct sockaddr *addr, socklen_t *len)
{
	return after_accept(fd, REAL(accept)(fd, addr, len), 0);
}

EXPORT int accept4(int fd, struct sockaddr *addr, socklen_t *len, int flags)
{
	return after_accept(fd, REAL(accept4)(fd, addr, len, flags), flags);
}

EXPORT int close(int fd)
{
	if (!g.enabled || fd < 0)
		return REAL(close)(fd);
	if (fdt_load(fd) == FD_INTERNAL)
		return 0;       /* ours (sk_state, arena, an epoll shadow): keep it */
	fd_forget(fd, 1);
	return REAL(close)(fd);
}

/* close_range/closefrom: our own fds survive; the rest go through close(). */
EXPORT int close_range(unsigned int first, unsigned int last, int flags)
{
	unsigned int hi;

	if (!g.enabled || (flags & CLOSE_RANGE_CLOEXEC))
		return REAL(close_range) ? REAL(close_range)(first, last, flags)
					 : (int)syscall(SYS_close_range, first, last, flags);
	hi = (unsigned int)fdt_max();
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

EXPORT void closefrom(int lowfd)
{
	close_range(lowfd < 0 ? 0 : (unsigned int)lowfd, ~0u, 0);
}

EXPORT int shutdown(int fd, int how)
{
	struct chan *ch;
	struct chan_sh *sh;
	int rc;

	if (fd_class(fd, &ch) != K_SHM)
		return REAL(shutdown)(fd, how);
	sh = ch->sh;
	/* The ring flags first: when the peer sees our FIN on TCP, it must
	 * also see the ring's FIN, or it would take it for a dead peer. */
	if (how == SHUT_WR || how == SHUT_RDWR) {
		atomic_fetch_or(&sh->flags, CH_SHUT_WR);
		rc = pthread_mutex_trylock(&sh->tx_lock);
		if (rc == 0 || rc == EOWNERDEAD) {
			if (rc)
				pthread_mutex_consistent(&sh->tx_lock);
			sbp_ring_close_writer(&sh->tx);
			if (sbp_ring_peer_waiting(&sh->tx))
				ctl_doorbell(fd);
			pthread_mutex_unlock(&sh->tx_lock);
		} else {
			/* A writer sleeps holding the lock: it closes the ring
			 * itself when it sees CH_SHUT_WR. Flags are atomic. */
			sbp_ring_close_writer(&sh->tx);
		}
	}
	if (how == SHUT_RD || how == SHUT_RDWR)
		atomic_fetch_or(&sh->flags, CH_SHUT_RD);
	rc = REAL(shutdown)(fd, how);
	chan_put(ch);
	return rc;
}

EXPORT int dup(int oldfd)
{
	int nfd = REAL(dup)(oldfd), saved = errno;

	if (nfd >= 0 && g.enabled) {
		fd_forget(nfd, 0);
		fd_copy(oldfd, nfd);
	}
	errno = saved;
	return nfd;
}

static int dup_onto(int oldfd, int newfd, int flags, int three)
{
	int r, saved;

	if (!g.enabled || oldfd == newfd)
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

EXPORT int dup2(int oldfd, int newfd)
{
	return dup_onto(oldfd, newfd, 0, 0);
}

EXPORT int dup3(int oldfd, int newfd, int flags)
{
	return dup_onto(oldfd, newfd, flags, 1);
}

static int do_fcntl(int (*real)(int, int, void *), int fd, int cmd, void *arg)
{
	struct chan *ch;
	int r, saved, k;

	if (!g.enabled)
		return real(fd, cmd, arg);
	switch (cmd) {
	case F_DUPFD:
	case F_DUPFD_CLOEXEC:
		r = real(fd, cmd, arg);
		saved = errno;
		if (r >= 0) {
			fd_forget(r, 0);
			fd_copy(fd, r);
		}
		errno = saved;
		return r;
	case F_SETFL:
		k = fd_class(fd, &ch);
		r = real(fd, cmd, arg);
		if (r == 0)
			fdo_update(fd, FDO_NONBLOCK, (int)(intptr_t)arg & O_NONBLOCK);
		if (k == K_SHM) {
			if (r == 0) {
				if ((int)(intptr_t)arg & O_NONBLOCK)
					atomic_fetch_or(&ch->sh->flags, CH_NONBLOCK);
				else
					atomic_fetch_and(&ch->sh->flags, ~CH_NONBLOCK);
			}
			chan_put(ch);
		}
		return r;
	default:
		return real(fd, cmd, arg);
	}
}

EXPORT int fcntl(int fd, int cmd, ...)
{
	va_list ap;
	void *arg;

	va_start(ap, cmd);
	arg = va_arg(ap, void *);
	va_end(ap);
	return do_fcntl(REAL(fcntl), fd, cmd, arg);
}

EXPORT int fcntl64(int fd, int cmd, ...)
{
	va_list ap;
	void *arg;

	va_start(ap, cmd);
	arg = va_arg(ap, void *);
	va_end(ap);
	return do_fcntl(REAL(fcntl64) ? REAL(fcntl64) : REAL(fcntl), fd, cmd, arg);
}

#ifndef SIOCOUTQNSD
#define SIOCOUTQNSD 0x894B
#endif

EXPORT int ioctl(int fd, unsigned long req, ...)
{
	struct chan *ch;
	struct chan_sh *sh;
	va_list ap;
	void *arg;
	int r = 0;

	va_start(ap, req);
	arg = va_arg(ap, void *);
	va_end(ap);
	if (fd_class(fd, &ch) != K_SHM) {
		r = REAL(ioctl)(fd, req, arg);
		if (r == 0 && req == FIONBIO && arg)
			fdo_update(fd, FDO_NONBLOCK, *(int *)arg);
		return r;
	}
	sh = ch->sh;
	switch (req) {
	case FIONREAD:          /* == SIOCINQ */
		rx_try_attach(fd, ch);
		*(int *)arg = (atomic_load(&sh->flags) & CH_RX_ATTACHED) ?
			      (int)sbp_ring_readable(&sh->rx) : 0;
		break;
	case TIOCOUTQ:          /* == SIOCOUTQ */
	case SIOCOUTQNSD:
		*(int *)arg = (int)sbp_ring_readable(&sh->tx);
		break;
	case FIONBIO:
		r = REAL(ioctl)(fd, req, arg);
		if (r == 0) {
			fdo_update(fd, FDO_NONBLOCK, *(int *)arg);
			if (*(int *)arg)
				atomic_fetch_or(&sh->flags, CH_NONBLOCK);
			else
				atomic_fetch_and(&sh->flags, ~CH_NONBLOCK);
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

EXPORT int setsockopt(int fd, int level, int name, const void *val, socklen_t len)
{
	uint32_t bit = virtual_tcp_opt(level, name);
	struct chan *ch;
	int r;

	if (!g.enabled)
		return REAL(setsockopt)(fd, level, name, val, len);
	if (bit && val && len >= sizeof(int) && FD_KIND(fdt_load(fd)) == K_SHM &&
	    fd_class(fd, &ch) == K_SHM) {
		if (*(const int *)val)
			atomic_fetch_or(&ch->sh->flags, bit);
		else
			atomic_fetch_and(&ch->sh->flags, ~bit);
		chan_put(ch);
		return 0;
	}
	r = REAL(setsockopt)(fd, level, name, val, len);
	if (r == 0 && val) {
		int e = errno;

		if (bit && len >= sizeof(int))
			fdo_update(fd, bit == CH_APP_NODELAY ? FDO_NODELAY : FDO_CORK, *(const int *)val);
		else if (level == SOL_SOCKET && name == SO_LINGER && len >= sizeof(struct linger))
			fdo_update(fd, FDO_LINGER0, ((const struct linger *)val)->l_onoff &&
						    !((const struct linger *)val)->l_linger);
		errno = e;
	}
	return r;
}

EXPORT int getsockopt(int fd, int level, int name, void *val, socklen_t *len)
{
	struct chan *ch;
	int r, saved;

	r = REAL(getsockopt)(fd, level, name, val, len);
	if (r == 0 && g.enabled && virtual_tcp_opt(level, name) && val && len &&
	    *len >= sizeof(int) && FD_KIND(fdt_load(fd)) == K_SHM) {
		saved = errno;
		if (fd_class(fd, &ch) == K_SHM) {
			*(int *)val = !!(atomic_load(&ch->sh->flags) & virtual_tcp_opt(level, name));
			chan_put(ch);
		}
		errno = saved;
	}
	/* SO_ERROR is how a non-blocking connect learns it is done: settle the
	 * fd's tier now (fd_class does it on the way). */
	if (r == 0 && g.enabled && level == SOL_SOCKET && name == SO_ERROR &&
	    FD_KIND(fdt_load(fd)) == K_CONNECTING) {
		saved = errno;
		fd_class(fd, &ch);
		if (ch)
			chan_put(ch);
		errno = saved;
	}
	return r;
}

/* For tests and tools (ctypes): 2 if fd is a healthy shm-tier socket here,
 * -1 if its channel was reset, 0 otherwise. Never probes or sets anything up. */
EXPORT int shmbypass_fd_tier(int fd)
{
	uint64_t v = fdt_load(fd);

	if (!g.enabled || FD_KIND(v) != K_SHM)
		return 0;
	return (atomic_load(&((struct chan *)FD_PTR(v))->sh->flags) & CH_BROKEN) ? -1 : SBP_TIER_SHM;
}

/* For tests (ctypes): the slots of a shm-tier fd; 0, or -1 if it is not one. */
EXPORT int shmbypass_fd_slots(int fd, unsigned int *tx, unsigned int *rx)
{
	uint64_t v = fdt_load(fd);
	struct chan_sh *sh;

	if (!g.enabled || FD_KIND(v) != K_SHM)
		return -1;
	sh = ((struct chan *)FD_PTR(v))->sh;
	*tx = sh->tx_idx;
	*rx = sh->rx_idx;
	return 0;
}
