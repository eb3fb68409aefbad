// SPDX-License-Identifier: GPL-2.0
/* Region header, slot addressing, and the BPF arena backend's syscalls.
 * See region.h. */
#include <errno.h>
#include <linux/bpf.h>
#include <stdbool.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "region.h"
#include "ring.h"
#include "sys.h"

_Static_assert(sizeof(struct sbp_region_hdr) <= SBP_REGION_HDR_SIZE, "region header fits a page");
_Static_assert(SBP_REGION_HDR_SIZE == SBP_RING_HDR_SIZE, "page-sized headers");

#define SZ_4G (1ULL << 32)

static bool slot_size_ok(uint64_t slot_size)
{
	return slot_size >= SBP_REGION_MIN_SLOT && slot_size <= SBP_REGION_MAX_SLOT &&
	       slot_size % 4096 == 0 && sbp_ring_capacity_for(slot_size) != 0;
}

/* Parts: in range and not overlapping (n is small: quadratic is fine). */
static bool parts_ok(const struct sbp_region_part *p, uint32_t n, uint32_t slot_count)
{
	if (n > SBP_REGION_MAX_PARTS)
		return false;
	for (uint32_t i = 0; i < n; i++) {
		if (p[i].first_slot > slot_count || p[i].slot_count > slot_count - p[i].first_slot)
			return false;
		for (uint32_t j = 0; j < i; j++) {
			uint64_t a0 = p[i].first_slot, a1 = a0 + p[i].slot_count;
			uint64_t b0 = p[j].first_slot, b1 = b0 + p[j].slot_count;

			if (a0 < b1 && b0 < a1)
				return false;
		}
	}
	return true;
}

int sbp_region_format(void *base, size_t size, uint32_t slot_size, uint64_t region_id)
{
	struct sbp_region_hdr *h = base;
	uint64_t count;

	if (!base || !slot_size_ok(slot_size) || size < SBP_REGION_HDR_SIZE + (uint64_t)slot_size)
		return -EINVAL;
	count = (size - SBP_REGION_HDR_SIZE) / slot_size;
	if (count > UINT32_MAX)
		count = UINT32_MAX;
	memset(h, 0, SBP_REGION_HDR_SIZE);
	h->version = SBP_REGION_VERSION;
	h->hdr_size = SBP_REGION_HDR_SIZE;
	h->slot_count = (uint32_t)count;
	h->slot_size = slot_size;
	h->region_size = SBP_REGION_HDR_SIZE + count * slot_size;
	h->region_id = region_id;
	h->nparts = 1;
	h->parts[0].first_slot = 0;
	h->parts[0].slot_count = (uint32_t)count;
	/* SYNC POINT: region format: the magic goes last; check() acquires it. */
	__atomic_thread_fence(__ATOMIC_RELEASE);
	memcpy(h->magic, SBP_REGION_MAGIC, sizeof(h->magic));
	return 0;
}

int sbp_region_check(const void *base, size_t size, struct sbp_region_info *out)
{
	const struct sbp_region_hdr *sh = base;
	struct sbp_region_hdr h;

	if (!base || !out || size < SBP_REGION_HDR_SIZE)
		return -EPROTO;
	/* One snapshot, then validate only the copy (the shared page may change
	 * under us). */
	memcpy(&h, sh, sizeof(h));
	__atomic_thread_fence(__ATOMIC_ACQUIRE);
	if (memcmp(h.magic, SBP_REGION_MAGIC, sizeof(h.magic)) != 0)
		return -EPROTO;
	if (h.version != SBP_REGION_VERSION)
		return -EPROTONOSUPPORT;
	if (h.hdr_size != SBP_REGION_HDR_SIZE || !slot_size_ok(h.slot_size) || h.slot_count == 0)
		return -EPROTO;
	if (h.region_size != SBP_REGION_HDR_SIZE + (uint64_t)h.slot_count * h.slot_size ||
	    h.region_size > size)
		return -EPROTO;
	if (!parts_ok(h.parts, h.nparts, h.slot_count))
		return -EPROTO;
	memset(out, 0, sizeof(*out));
	out->version = h.version;
	out->hdr_size = h.hdr_size;
	out->slot_count = h.slot_count;
	out->slot_size = h.slot_size;
	out->region_size = h.region_size;
	out->region_id = h.region_id;
	out->map_addr = h.map_addr;
	out->backend = h.backend;
	out->owner_uid = h.owner_uid;
	out->ring_capacity = sbp_ring_capacity_for(h.slot_size);
	out->nparts = h.nparts;
	memcpy(out->parts, h.parts, sizeof(out->parts));
	return 0;
}

void *sbp_region_slot(const struct sbp_region_info *info, void *base, uint32_t slot)
{
	if (!info || !base || slot >= info->slot_count)
		return NULL;
	return (char *)base + info->hdr_size + (uint64_t)slot * info->slot_size;
}

void sbp_region_set_backend(void *base, uint32_t backend, uint64_t map_addr, uint32_t owner_uid)
{
	struct sbp_region_hdr *h = base;

	h->backend = backend;
	h->map_addr = map_addr;
	h->owner_uid = owner_uid;
}

int sbp_region_set_parts(void *base, size_t size, const struct sbp_region_part *parts, uint32_t n)
{
	struct sbp_region_info info;
	struct sbp_region_hdr *h = base;

	if (sbp_region_check(base, size, &info) != 0 || !parts_ok(parts, n, info.slot_count))
		return -EINVAL;
	memset(h->parts, 0, sizeof(h->parts));
	memcpy(h->parts, parts, n * sizeof(*parts));
	h->nparts = n;
	return 0;
}

size_t sbp_region_wake_size(uint32_t slot_count)
{
	size_t n = (size_t)slot_count * 2 * SBP_WAKE_STRIDE;

	return (n + 4095) & ~(size_t)4095;
}

uint32_t *sbp_region_wake_word(void *wake, size_t wake_size, uint32_t slot, int writer)
{
	uint64_t off = ((uint64_t)slot * 2 + (writer ? 1 : 0)) * SBP_WAKE_STRIDE;

	if (!wake || off + sizeof(uint32_t) > wake_size)
		return NULL;
	return (uint32_t *)((char *)wake + off);
}

uint64_t sbp_arena_pick_addr(size_t size)
{
	/* Reserve twice the size, keep a sub-range that does not cross 4 GiB,
	 * release it. Another thread could take it before the arena maps it:
	 * the caller retries on EEXIST. */
	void *p = mmap(NULL, 2 * size, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	uint64_t start;

	if (p == MAP_FAILED || size == 0 || size > SZ_4G)
		return 0;
	start = (uint64_t)(uintptr_t)p;
	if ((start >> 32) != ((start + size - 1) >> 32))
		start = (start + SZ_4G - 1) & ~(SZ_4G - 1);
	munmap(p, 2 * size);
	return start;
}

int sbp_arena_create(uint32_t pages, uint64_t map_addr)
{
	union bpf_attr a;
	long fd;

	memset(&a, 0, sizeof(a));
	a.map_type = SBP_BPF_MAP_TYPE_ARENA;
	a.max_entries = pages;
	a.map_flags = BPF_F_MMAPABLE;
	a.map_extra = map_addr;
	memcpy(a.map_name, "sbp_arena", sizeof("sbp_arena"));
	fd = sys_bpf(BPF_MAP_CREATE, &a);
	return fd < 0 ? -errno : (int)fd;
}

int sbp_map_query(int fd, uint32_t *map_type, uint32_t *max_entries, uint64_t *map_extra,
		  uint32_t *map_flags)
{
	struct bpf_map_info info;
	union bpf_attr a;

	memset(&info, 0, sizeof(info));
	memset(&a, 0, sizeof(a));
	a.info.bpf_fd = (uint32_t)fd;
	a.info.info_len = sizeof(info);
	a.info.info = (uint64_t)(uintptr_t)&info;
	if (sys_bpf(BPF_OBJ_GET_INFO_BY_FD, &a) < 0)
		return -errno;
	*map_type = info.type;
	*max_entries = info.max_entries;
	*map_extra = info.map_extra;
	*map_flags = info.map_flags;
	return 0;
}

void *sbp_map_shared(int fd, uint64_t addr, size_t size, int *err)
{
	int flags = MAP_SHARED | (addr ? MAP_FIXED_NOREPLACE : 0);
	void *p = mmap((void *)(uintptr_t)addr, size, PROT_READ | PROT_WRITE, flags, fd, 0);

	if (p == MAP_FAILED) {
		*err = errno;
		return NULL;
	}
	if (addr && (uint64_t)(uintptr_t)p != addr) {
		/* old kernels ignore MAP_FIXED_NOREPLACE and treat addr as a hint */
		munmap(p, size);
		*err = EEXIST;
		return NULL;
	}
	*err = 0;
	return p;
}

int sbp_unmap(void *addr, size_t size)
{
	return munmap(addr, size) < 0 ? -errno : 0;
}

void sbp_prefault(void *addr, size_t size)
{
	volatile const char *p = addr;

	for (size_t off = 0; off < size; off += 4096)
		(void)p[off];
}
