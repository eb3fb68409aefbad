// SPDX-License-Identifier: GPL-2.0
/* setup.c: the interposer's set-up: the real libc functions, the
 * environment (struct sbp_global), logging, the pinned sk_state map, and the
 * region (mapped once, on first need, by whichever thread gets there). */
#include <dlfcn.h>
#include <fcntl.h>
#include <sched.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "fdtable.h"
#include "setup.h"

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

static int bpf_obj_get(const char *path)
{
	union bpf_attr a;

	memset(&a, 0, sizeof(a));
	a.pathname = (uint64_t)(uintptr_t)path;
	a.file_flags = 0;
	return (int)sys_bpf(BPF_OBJ_GET, &a);
}

/* 0, or -errno (-ENOENT: no storage on this socket). */
int sk_lookup(int fd, struct sbp_sk *out)
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

int sk_mark(int fd)
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

void setup_init(void)
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
	if (!g.enabled)
		DBG("disabled (%s)", g.region_spec[0] ? "SHMBYPASS_DISABLE" : "SHMBYPASS_REGION unset");
}

/* Map all of an open fd (MAP_SHARED), anywhere, if it holds at least min
 * bytes; the fd is closed. 0, -errno, or -EPROTO (too small). */
static int map_all(int fd, size_t min, void **addr, size_t *size)
{
	struct stat st;
	void *p;
	int err;

	if (fstat(fd, &st) < 0 || st.st_size < (off_t)min) {
		syscall(SYS_close, fd);
		return -EPROTO;
	}
	p = mmap(NULL, st.st_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	err = errno;
	syscall(SYS_close, fd);
	if (p == MAP_FAILED)
		return -err;
	*addr = p;
	*size = st.st_size;
	return 0;
}

/* Map a whole region (a POSIX shm segment, or an ivshmem BAR2 file). */
static int map_region_fd(int fd)
{
	return map_all(fd, SBP_REGION_HDR_SIZE, &g.region, &g.region_size);
}

static int map_region_posix(const char *name)
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
	int fd = shm_open(name, O_RDWR | O_CLOEXEC, 0);

	if (fd < 0)
		return -errno;
	return map_all(fd, sbp_region_wake_size(g.info.slot_count), &g.wake, &g.wake_size);
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

/* ivshmem: the peer is another VM. Waits spin up to about a doorbell's
 * cost (ring.h, sbp_ring_set_bell_cost), which under TCG is far more than
 * the one-host default; so do poll/epoll waits (unless set explicitly). */
static void doorbell_defaults(void)
{
	char tmp[32];

	g.doorbell = 1;
	copy_env(tmp, sizeof(tmp), "SHMBYPASS_SPIN_NS", NULL);
	if (!tmp[0])
		g.spin_ns = SBP_RING_SPIN_DOORBELL_MAX_NS;
	copy_env(tmp, sizeof(tmp), "SHMBYPASS_EPOLL_SPIN_NS", NULL);
	if (!tmp[0])
		g.epoll_spin_ns = SBP_RING_SPIN_DOORBELL_MAX_NS;
}

/* arena:<pin>[:<wake segment>]: the arena, and the companion segment of
 * futex words ("/<instance>-wake" unless named). 0, -errno (mapping), or
 * 1 (refused, the reason logged). */
static int map_arena_spec(const char *rest)
{
	char path[300], wname[160], *third;
	int rc;

	snprintf(path, sizeof(path), "%s", rest);
	third = strchr(path, ':');
	if (third)
		*third++ = 0;
	rc = map_region_arena(path);
	if (rc < 0)
		return rc;
	if (third && *third)
		snprintf(wname, sizeof(wname), "%s", third);
	else
		snprintf(wname, sizeof(wname), "/%s-wake", g.instance);
	if (sbp_region_check(g.region, g.region_size, &g.info) == 0 && (rc = map_wake(wname)) < 0) {
		WARN("shm tier off: arena region needs its wake segment %s: %s", wname, strerror(-rc));
		return 1;
	}
	return 0;
}

/* Map the region SHMBYPASS_REGION=<backend>:<path> names: 0, -errno
 * (mapping), or 1 (refused, the reason logged). Backends: posix (POSIX
 * shm; `shm:` is its old name, still accepted), ivshmem, arena. */
static int map_region(const char *spec)
{
	const char *colon = strchr(spec, ':');     /* shm_init checked there is one */

	if (!strncmp(spec, "posix:", 6) || !strncmp(spec, "shm:", 4))
		return map_region_posix(colon + 1);
	if (!strncmp(spec, "ivshmem:", 8)) {
		doorbell_defaults();
		return map_region_file(colon + 1);
	}
	if (!strncmp(spec, "arena:", 6))
		return map_arena_spec(colon + 1);
	WARN("shm tier off: unknown region backend in SHMBYPASS_REGION=%s", spec);
	return 1;
}

/* The pinned sk_state map: 0, or -1 (the reason said or, if the instance
 * is simply not up, said only with SHMBYPASS_DEBUG). */
static int open_sk_state(void)
{
	char path[300];
	int fd;

	snprintf(path, sizeof(path), "%s/sk_state", g.pin_dir);
	fd = bpf_obj_get(path);
	if (fd < 0) {
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
	g.map_fd = sbp_internal_fd(fd);
	return 0;
}

static int shm_init(void)
{
	const char *spec = g.region_spec;
	int rc;

	if (!strchr(spec, ':')) {
		WARN("shm tier off: SHMBYPASS_REGION=%s is not <backend>:<path>", spec);
		return -1;
	}
	if (open_sk_state() < 0)
		return -1;
	rc = map_region(spec);
	if (rc > 0)
		return -1;
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
void region_wake_words(struct sbp_ring *r, uint32_t slot)
{
	uint32_t *rw, *ww;

	if (!g.wake)
		return;
	rw = sbp_region_wake_word(g.wake, g.wake_size, slot, 0);
	ww = sbp_region_wake_word(g.wake, g.wake_size, slot, 1);
	if (rw && ww)
		sbp_ring_set_wait_words(r, rw, ww);
}

/* fork does not copy an arena's VMA: map it again, same address. */
void setup_atfork_child(void)
{
	if (g.arena_fd >= 0 && g.region) {
		int err = 0;

		if (!sbp_map_shared(g.arena_fd, (uint64_t)(uintptr_t)g.region, g.region_size, &err))
			WARN("forked child cannot map the arena again: %s", strerror(err));
	}
}
