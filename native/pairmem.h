/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Pair memory: the shared memory of the connections between exactly two
 * processes (docs/NEGOTIATION.md, "Memory").
 *
 * The passive end of a connection (the process that accepted it) keeps, per
 * peer process, pair regions: memfds it created, sealed against shrinking
 * and growing, that only it and that peer ever map (the memfd travels once,
 * through the peer's inbox, inbox.h). A region holds blocks; a block is the
 * memory of one connection and is reused, with a new generation, for the
 * next connection between the same two processes once both ends are done
 * with it. So a new connection costs no mmap and no fd.
 *
 * Region layout (every field untrusted when read):
 *   page 0          struct sbp_pair_hdr: magic, version, geometry, region id
 *   block b at SBP_PAIR_HDR_SIZE + b * block_size:
 *     page 0        struct sbp_block_hdr: generation, the two socket cookies,
 *                   which ends are done
 *     then, for direction 0 (active -> passive) and 1 (passive -> active),
 *     SBP_AREAS areas, each a ring slot (ring.h: a 4 KiB header and a data
 *     area of sbp_area_cap(k) bytes). A direction writes one area at a time
 *     and moves to a larger one when its reader falls behind, back to the
 *     smallest when idle (stream.h). Untouched pages of a memfd cost no
 *     memory: an idle connection holds a few pages, a busy one what it has
 *     in flight.
 */
#ifndef SHMBYPASS_PAIRMEM_H
#define SHMBYPASS_PAIRMEM_H

#include <stddef.h>
#include <stdint.h>

#define SBP_PAIR_MAGIC          "SBPPAIR1"
#define SBP_PAIR_VERSION        1u
#define SBP_PAIR_HDR_SIZE       4096u
#define SBP_BLOCK_HDR_SIZE      4096u
#define SBP_AREAS               4               /* per direction */
#define SBP_PAIR_MAX_BLOCKS     4096u

/* Data capacity of area k: 16 KiB (an idle or request/response connection),
 * 256 KiB (a stream whose reader keeps up: what the raw ring is fastest
 * with here), 1 MiB, 8 MiB (more than loopback TCP buffers before a writer
 * blocks, ~4 MiB here). */
static inline uint64_t sbp_area_cap(int k)
{
	static const uint64_t cap[SBP_AREAS] = { 16u << 10, 256u << 10, 1u << 20, 8u << 20 };

	return k >= 0 && k < SBP_AREAS ? cap[k] : 0;
}

/* Direction numbers inside a block. */
#define SBP_DIR_A2P 0   /* the active end writes */
#define SBP_DIR_P2A 1   /* the passive end writes */

/* block_hdr.done bits: this end is finished with the block */
#define SBP_DONE_ACTIVE  1u
#define SBP_DONE_PASSIVE 2u

/* block_hdr.state: generation << 32 | one of these, changed by CAS so that
 * the active end attaching and the passive end withdrawing cannot both win. */
#define SBP_BLOCK_FREE      0u
#define SBP_BLOCK_OFFERED   1u  /* the passive end sent it to its peer */
#define SBP_BLOCK_ATTACHED  2u  /* the active end took it */
#define SBP_BLOCK_WITHDRAWN 3u  /* the passive end closed before it was taken */
#define SBP_BLOCK_STATE(gen, st) ((uint64_t)(gen) << 32 | (st))

struct sbp_pair_hdr {
	char magic[8];
	uint32_t version;
	uint32_t block_count;
	uint64_t block_size;
	uint64_t region_size;
	uint64_t region_id;
};

struct sbp_block_hdr {
	uint64_t state;                 /* SBP_BLOCK_STATE(gen, SBP_BLOCK_*) */
	uint32_t done;                  /* SBP_DONE_* (atomic or) */
	uint32_t pad;
	uint64_t active_cookie;         /* the connection it was offered for */
	uint64_t passive_cookie;
	/* Per direction (SBP_DIR_*), written by that direction's reader:
	 * how much of the writer's TCP part it has read (the writer rings
	 * its switch doorbell only once all of it is read, so a doorbell
	 * never sits in front of payload), and a request that the writer
	 * go back to TCP from stream position revert_pos (docs/
	 * NEGOTIATION.md, "Back to TCP"); the writer answers with the
	 * doorbells it sent (revert_bells) and revert = SBP_REVERT_DONE. */
	uint64_t tcp_read[2];
	uint64_t revert_pos[2];
	uint64_t revert_bells[2];
	uint32_t revert[2];
	/* Per direction, counted by its writer for this connection: how
	 * often it found the ring full (status and metrics only), and the
	 * doorbells it sent to the other end, each counted before it is sent
	 * (the other end's close waits for them, bounded: control.c). */
	uint64_t full[2];
	uint64_t bells[2];
	/* SBP_DONE_* bits: that end has begun its last close; a doorbell to
	 * it is no longer sent. */
	uint32_t closing;
};

#define SBP_REVERT_ASKED 1u
#define SBP_REVERT_DONE  2u

/* Trusted, process-local geometry of a checked region. */
struct sbp_pair_info {
	uint64_t region_id;
	uint64_t region_size;
	uint64_t block_size;
	uint32_t block_count;
};

/* Bytes of one block (header page + both directions' areas). */
uint64_t sbp_pair_block_size(void);
/* Bytes of a region of n blocks. */
uint64_t sbp_pair_region_size(uint32_t nblocks);
/* Write the header of a new region (the memory must be zero). -EINVAL if
 * size does not fit n blocks. */
int sbp_pair_format(void *base, size_t size, uint64_t region_id, uint32_t nblocks);
/* Check the header of a mapping of size bytes; fill *out. -EPROTO. */
int sbp_pair_check(const void *base, size_t size, struct sbp_pair_info *out);
/* Block header / area (ring slot) addresses from the local info; NULL when
 * out of range. The slot size of area k is SBP_RING_HDR_SIZE + cap(k). */
struct sbp_block_hdr *sbp_pair_block(const struct sbp_pair_info *pi, void *base, uint32_t block);
void *sbp_pair_area(const struct sbp_pair_info *pi, void *base, uint32_t block, int dir, int area);
size_t sbp_pair_area_slot_size(int area);

#endif
