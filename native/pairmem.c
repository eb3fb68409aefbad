// SPDX-License-Identifier: GPL-2.0
/* Pair memory (pairmem.h): the layout of a region of connection blocks. */
#include <errno.h>
#include <string.h>

#include "pairmem.h"
#include "ring.h"

size_t sbp_pair_area_slot_size(int area)
{
	return SBP_RING_HDR_SIZE + sbp_area_cap(area);
}

static uint64_t dir_size(void)
{
	uint64_t n = 0;

	for (int k = 0; k < SBP_AREAS; k++)
		n += sbp_pair_area_slot_size(k);
	return n;
}

uint64_t sbp_pair_block_size(void)
{
	return SBP_BLOCK_HDR_SIZE + 2 * dir_size();
}

uint64_t sbp_pair_region_size(uint32_t nblocks)
{
	return SBP_PAIR_HDR_SIZE + (uint64_t)nblocks * sbp_pair_block_size();
}

int sbp_pair_format(void *base, size_t size, uint64_t region_id, uint32_t nblocks)
{
	struct sbp_pair_hdr *h = base;

	if (!nblocks || nblocks > SBP_PAIR_MAX_BLOCKS || size < sbp_pair_region_size(nblocks))
		return -EINVAL;
	h->version = SBP_PAIR_VERSION;
	h->block_count = nblocks;
	h->block_size = sbp_pair_block_size();
	h->region_size = size;
	h->region_id = region_id;
	/* SYNC POINT: the magic last, so a reader never sees half a header. */
	__atomic_thread_fence(__ATOMIC_RELEASE);
	memcpy(h->magic, SBP_PAIR_MAGIC, sizeof(h->magic));
	return 0;
}

int sbp_pair_check(const void *base, size_t size, struct sbp_pair_info *out)
{
	struct sbp_pair_hdr h;

	if (size < SBP_PAIR_HDR_SIZE)
		return -EPROTO;
	memcpy(&h, base, sizeof(h));    /* one copy: the peer may change it */
	if (memcmp(h.magic, SBP_PAIR_MAGIC, sizeof(h.magic)) || h.version != SBP_PAIR_VERSION ||
	    h.block_size != sbp_pair_block_size() || !h.block_count ||
	    h.block_count > SBP_PAIR_MAX_BLOCKS || h.region_size != size ||
	    sbp_pair_region_size(h.block_count) > size)
		return -EPROTO;
	out->region_id = h.region_id;
	out->region_size = size;
	out->block_size = h.block_size;
	out->block_count = h.block_count;
	return 0;
}

struct sbp_block_hdr *sbp_pair_block(const struct sbp_pair_info *pi, void *base, uint32_t block)
{
	if (block >= pi->block_count)
		return NULL;
	return (struct sbp_block_hdr *)((char *)base + SBP_PAIR_HDR_SIZE + block * pi->block_size);
}

void *sbp_pair_area(const struct sbp_pair_info *pi, void *base, uint32_t block, int dir, int area)
{
	char *p = (char *)sbp_pair_block(pi, base, block);

	if (!p || (dir != SBP_DIR_A2P && dir != SBP_DIR_P2A) || area < 0 || area >= SBP_AREAS)
		return NULL;
	p += SBP_BLOCK_HDR_SIZE + dir * dir_size();
	for (int k = 0; k < area; k++)
		p += sbp_pair_area_slot_size(k);
	return p;
}
