// SPDX-License-Identifier: GPL-2.0
/* setup.c: the interposer's set-up: the real libc functions, the
 * environment (struct sbp_global), logging, and, for a VM pair, the shared
 * region (mapped once, on first need, by whichever thread gets there). */
#include <dlfcn.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
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
#include "capture.h"
#include "setup.h"

struct sbp_global g;

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

void setup_init(void)
{
	char bpffs[128], tmp[32];

#define SBP_RESOLVE(ret, name, ...) if (!real_##name) sbp_real(#name, (void **)&real_##name);
	SBP_REAL_LIST(SBP_RESOLVE)
#undef SBP_RESOLVE
	g.pid = (pid_t)syscall(SYS_getpid);
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

	g.enabled = !(tmp[0] && tmp[0] != '0');
	if (!g.enabled)
		DBG("disabled (SHMBYPASS_DISABLE)");
	else
		capture_init();         /* a running `shmbypass capture` sees our rings */
	if (!strncmp(g.region_spec, "ivshmem:", 8))
		doorbell_defaults();
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

/* ivshmem: the BAR2 of the ivshmem PCI device (its sysfs resource2 file),
 * shared with another VM: mapped anywhere, and no futex can wake a waiter
 * over there, so everything runs in doorbell mode. */
static int map_region_file(const char *path)
{
	int fd = open(path, O_RDWR | O_CLOEXEC);

	return fd < 0 ? -errno : map_region_fd(fd);
}

static int bpf_obj_get(const char *path)
{
	union bpf_attr a;

	memset(&a, 0, sizeof(a));
	a.pathname = (uint64_t)(uintptr_t)path;
	return (int)sys_bpf(BPF_OBJ_GET, &a);
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

/* A VM pair's region (SHMBYPASS_REGION=ivshmem:<BAR file>, or posix:<name>
 * for tests of the VM path on one host): map it and check the header. */
static int region_init(void)
{
	const char *spec = g.region_spec, *colon = strchr(spec, ':');
	int rc;

	if (!colon) {
		WARN("VM pairs off: SHMBYPASS_REGION=%s is not <backend>:<path>", spec);
		return -1;
	}
	if (!strncmp(spec, "posix:", 6))
		rc = map_region_posix(colon + 1);
	else if (!strncmp(spec, "ivshmem:", 8))
		rc = map_region_file(colon + 1);
	else
		rc = -EINVAL;
	if (rc < 0) {
		WARN("VM pairs off: cannot map region %s: %s", spec, strerror(-rc));
		return -1;
	}
	rc = sbp_region_check(g.region, g.region_size, &g.info);
	if (rc < 0) {
		WARN("VM pairs off: region %s: %s", spec,
		     rc == -EPROTONOSUPPORT ? "header version mismatch" : "bad header");
		munmap(g.region, g.region_size);
		g.region = NULL;
		return -1;
	}
	if (bpf_region_differs(spec))
		return -1;
	DBG("VM pair region %s id %#llx, %u slots of %u bytes, instance %s", spec,
	    (unsigned long long)g.info.region_id, g.info.slot_count, g.info.slot_size, g.instance);
	return 0;
}

int sbp_region_ready(void)
{
	int s = atomic_load_explicit(&g.region_state, memory_order_acquire);

	if (likely(s))
		return s > 0;
	if (!g.enabled || !g.region_spec[0])
		return 0;
	/* One thread maps it; the others wait (it takes microseconds). */
	if (atomic_compare_exchange_strong(&g.region_state, &s, 2)) {
		int ok = region_init() == 0;

		atomic_store_explicit(&g.region_state, ok ? 1 : -1, memory_order_release);
		return ok;
	}
	while ((s = atomic_load_explicit(&g.region_state, memory_order_acquire)) == 2)
		sched_yield();
	return s > 0;
}

int sock_tcp_state(int fd)
{
	struct tcp_info ti;
	socklen_t len = sizeof(ti);
	int saved = errno, rc;

	memset(&ti, 0, sizeof(ti));
	rc = (int)syscall(SYS_getsockopt, fd, IPPROTO_TCP, TCP_INFO, &ti, &len);
	errno = saved;
	return rc < 0 ? -1 : ti.tcpi_state;
}
