/* SPDX-License-Identifier: GPL-2.0 */
/*
 * A region: one shared mapping = a header page + slot_count slots of
 * slot_size bytes. A slot holds one ring (ring.h). The header is untrusted
 * like everything shared: sbp_region_check() validates it once and copies
 * the geometry into a local struct sbp_region_info; slot addresses are then
 * computed from that local copy only.
 *
 * slot_size: a multiple of 4096, >= 8 KiB; the ring in it gets the largest
 * power of two that fits after its 4 KiB header (the default slot, the shm
 * tier's, is 4 KiB + 256 KiB, so the ring holds 256 KiB).
 */
#ifndef SHMBYPASS_REGION_H
#define SHMBYPASS_REGION_H

#include <stddef.h>
#include <stdint.h>

#define SBP_REGION_MAGIC        "SHMBYPRG"      /* 8 bytes, no NUL */
#define SBP_REGION_VERSION      2u      /* 2: map_addr (unused since the arena backend went) dropped */
#define SBP_REGION_HDR_SIZE     4096u
#define SBP_REGION_MIN_SLOT     8192u
#define SBP_REGION_MAX_SLOT     (SBP_REGION_HDR_SIZE + (1u << 30))
#define SBP_SLOT_SIZE_DEFAULT   (4096u + (256u << 10))   /* the shm tier's slots */
#define SBP_REGION_MAX_PARTS    16u

/* backend ids kept in the header (informational) */
#define SBP_BACKEND_ANON        0u
#define SBP_BACKEND_POSIX       1u      /* POSIX shm */
/* 2 was the BPF arena backend (removed; the number is not reused) */
#define SBP_BACKEND_IVSHMEM     3u

/* A part: a range of slots owned by one allocator (e.g. one VM). */
struct sbp_region_part {
	uint32_t first_slot;
	uint32_t slot_count;
	uint64_t owner;
};

/* On-disk (in-memory) header at offset 0 of the region. */
struct sbp_region_hdr {
	char magic[8];
	uint32_t version;
	uint32_t hdr_size;
	uint32_t slot_count;
	uint32_t slot_size;
	uint64_t region_size;
	uint64_t region_id;     /* random at format; names the trust domain */
	uint32_t backend;       /* SBP_BACKEND_* */
	uint32_t flags;
	uint32_t owner_uid;
	uint32_t nparts;
	struct sbp_region_part parts[SBP_REGION_MAX_PARTS];
};

/* Trusted, process-local copy of a checked header. */
struct sbp_region_info {
	uint32_t version;
	uint32_t hdr_size;
	uint32_t slot_count;
	uint32_t slot_size;
	uint64_t region_size;
	uint64_t region_id;
	uint32_t backend;
	uint32_t owner_uid;
	uint64_t ring_capacity; /* capacity of the ring in each slot */
	uint32_t nparts;
	struct sbp_region_part parts[SBP_REGION_MAX_PARTS];
};

/* Write a fresh header: as many slots as fit in size. One part covering all
 * slots (owner 0). 0 or -EINVAL (bad slot size, no room for one slot). */
int sbp_region_format(void *base, size_t size, uint32_t slot_size, uint64_t region_id);
/* Validate the header of a mapping of size bytes and fill *out.
 * -EPROTO garbage/short, -EPROTONOSUPPORT version mismatch. */
int sbp_region_check(const void *base, size_t size, struct sbp_region_info *out);
/* Address of slot `slot` from the local info; NULL if out of range. */
void *sbp_region_slot(const struct sbp_region_info *info, void *base, uint32_t slot);

/* Header fields set after format (by the owner, before others open it). */
void sbp_region_set_backend(void *base, uint32_t backend, uint32_t owner_uid);
/* Replace the parts table: n ranges, each inside [0, slot_count) and not
 * overlapping. 0 or -EINVAL. */
int sbp_region_set_parts(void *base, size_t size, const struct sbp_region_part *parts, uint32_t n);

#endif
