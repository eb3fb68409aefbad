/* SPDX-License-Identifier: GPL-2.0 */
/* memory.h: where a connection's shared memory comes from (docs/
 * NEGOTIATION.md, "Memory"): this process's inbox, the pair regions it
 * made for each peer process (the passive end allocates), and the regions
 * its peers sent it (the active end attaches). */
#ifndef SBP_PRELOAD_MEMORY_H
#define SBP_PRELOAD_MEMORY_H

#include <stdatomic.h>
#include <stdint.h>

#include "pairmem.h"
#include "../../bpf/bypass.h"

/* One connection's block in a pair region, as this process sees it. */
struct mem_ref {
	void *base;                     /* the region mapping */
	struct sbp_pair_info pi;        /* its trusted geometry */
	uint32_t block;
	uint32_t gen;
	uint8_t active;                 /* we are the active end */
	uint8_t unsent;                 /* passive: the offer waits for room in the peer's
					 * inbox (1), or could never be sent (2) */
	uint16_t region;                /* passive: the region's index here */
	_Atomic uint8_t charged;        /* passive: its base is on our memory count */
	_Atomic uint8_t held;           /* it counts in its region's users (released once) */
};

/* The token of this process's inbox (opened on first use). 0 or -errno. */
int mem_inbox_token(uint8_t out[SBP_INBOX_LEN]);
/* Passive end: take a block for the connection of fd (in: its SBP_SO_INFO)
 * and send the peer its message (and the region, the first time). 0 (the
 * offer may wait for room in the peer's inbox: out->unsent), -EDQUOT (the
 * memory cap, up --memory-max), -ENOSPC (no more regions), -errno
 * (nothing offered). */
int mem_offer(int fd, const struct sbp_info *in, struct mem_ref *out);
/* Passive end: send an offer that waited (the peer had not read its inbox:
 * it holds a few datagrams, net.unix.max_dgram_qlen). 1 sent, 0 not yet,
 * -errno: it never will be (withdrawn; the connection stays on TCP). */
int mem_deliver(struct mem_ref *ref);
/* Active end: has the peer offered memory for this socket? Reads the
 * inbox (at most every few microseconds unless `now`), checks the offer
 * against fd's SBP_SO_INFO (as mem_expect saw it, else asked again) and
 * takes the block. 1 taken, 0 not (yet), -errno: an offer that failed the
 * checks (ignored; stay on TCP). */
int mem_claim(int fd, uint64_t cookie, int now, struct mem_ref *out);
/* Active end: this socket waits for an offer (its channel was set up):
 * offers for it are kept until it claims them or mem_forget, however many
 * sockets wait (offers for a socket not known yet go to a small table that
 * forgets the older of two in one place). in: its SBP_SO_INFO at setup. */
void mem_expect(const struct sbp_info *in);
void mem_forget(uint64_t cookie);
/* Passive end: did the active end take the block? */
int mem_taken(const struct mem_ref *ref);
/* Passive end: take back an offer the peer has not taken. 1 withdrawn
 * (the peer can no longer take it), 0 taken already. */
int mem_withdraw(const struct mem_ref *ref);
/* This end is done with the block (last close). The passive end withdraws
 * an offer never taken. */
void mem_done(struct mem_ref *ref);
/* The block's header (NULL if the reference is empty). */
struct sbp_block_hdr *mem_block(const struct mem_ref *ref);

/* The ring memory this process's connections hold: a block's header and
 * first areas (charged by its passive end) and the larger areas a writer
 * grew into (charged by it). 0, or -EDQUOT if that would pass the cap
 * (`up --memory-max`; nothing charged then); force: charge anyway. */
int mem_charge(uint64_t n, int force);
void mem_uncharge(uint64_t n);

void mem_atfork_child(void);

#endif
