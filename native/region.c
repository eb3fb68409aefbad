// SPDX-License-Identifier: GPL-2.0
/* Region header and slot addressing. See region.h. */
#include <errno.h>
#include <stdbool.h>
#include <string.h>

#include "region.h"
#include "ring.h"

_Static_assert(sizeof(struct sbp_region_hdr) <= SBP_REGION_HDR_SIZE, "region header fits a page");
_Static_assert(SBP_REGION_HDR_SIZE == SBP_RING_HDR_SIZE, "page-sized headers");

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

void sbp_region_set_backend(void *base, uint32_t backend, uint32_t owner_uid)
{
	struct sbp_region_hdr *h = base;

	h->backend = backend;
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
