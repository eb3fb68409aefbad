/* SPDX-License-Identifier: GPL-2.0 */
/* Types shared by bpf/bypass.bpf.c and the manager (shmbypass/maps.py mirrors
 * these layouts with ctypes; keep both in sync, tests check the sizes). */
#ifndef SHMBYPASS_BYPASS_H
#define SHMBYPASS_BYPASS_H

#ifndef __VMLINUX_H__
#include <linux/types.h>
#endif

#define SBP_MAX_CONNS 65536

/* The id of one TCP connection, identical on both ends: addresses as IPv6
 * (IPv4 as v4-mapped), the active (connecting) side first, and both initial
 * sequence numbers. Two connections with the same 4-tuple in two network
 * namespaces differ in their ISNs, so pairing never mixes them up. */
struct sbp_conn_key {
	__u32 a_ip[4];
	__u32 b_ip[4];
	__u32 a_isn;		/* active side's snd_nxt at establishment */
	__u32 b_isn;		/* passive side's snd_nxt at establishment */
	__u16 a_port;		/* host byte order */
	__u16 b_port;
	__u32 pad;
};

enum sbp_tier {
	SBP_TIER_TCP = 0,
	SBP_TIER_KERNEL = 1,
	SBP_TIER_SHM = 2,
};

/* Why a connection is not (or no longer) bypassed. Names in shmbypass/status.py. */
enum sbp_reason {
	SBP_REASON_NONE = 0,
	SBP_REASON_AWAITING_PEER,	/* active side, peer not seen yet */
	SBP_REASON_PEER_NOT_CAPABLE,	/* peer outside the bypass group (or remote) */
	SBP_REASON_HANDSHAKE_RACE,	/* data was sent on TCP before both ends were paired */
	SBP_REASON_TABLE_FULL,
	SBP_REASON_DRAINING,		/* `shmbypass down` in progress */
	SBP_REASON_PEER_CLOSED,
	SBP_REASON_POLICY_EXCLUDED,
	SBP_REASON__MAX,
};

/* Direction state, decided once at the first send (see handle_msg). */
enum sbp_dir {
	SBP_DIR_UNDECIDED = 0,
	SBP_DIR_REDIRECT = 1,
	SBP_DIR_TCP = 2,
};

/* One established socket of the bypass group, keyed by socket cookie. */
struct sbp_conn {
	struct sbp_conn_key key;
	__u64 peer;		/* peer socket cookie, 0 while unpaired */
	__u64 netns;		/* netns cookie */
	__u64 bytes_tx;		/* bytes this socket redirected to its peer */
	__u64 bytes_rx;		/* bytes its peer redirected to it */
	__u32 tier;		/* enum sbp_tier */
	__u32 reason;		/* enum sbp_reason */
	__u32 tx_dir;		/* enum sbp_dir */
	__u32 active;		/* 1: this socket connected (it is "a" in the key) */
	__u32 family;		/* AF_INET or AF_INET6 of the socket */
	__u32 pad;
};

/* Per-socket state in a SK_STORAGE map (sk_state). User space (the
 * interposer) may set `flags` on its own socket fd before connect()/listen();
 * an accepted socket starts with a copy of its listener's value (BPF_F_CLONE).
 * The BPF programs fill in the rest. */
#define SBP_SK_WANT_SHM 1u

struct sbp_sk {
	__u32 flags;		/* SBP_SK_*, written by user space */
	__u32 tier;		/* enum sbp_tier, written by BPF */
	__u32 reason;		/* enum sbp_reason */
	__u32 tx_slot;		/* shm tier: ring this socket writes */
	__u32 rx_slot;		/* shm tier: ring this socket reads */
	__u32 pad;
	__u64 tx_gen;		/* ring generations */
	__u64 rx_gen;
	__u64 region_id;
	__u64 cookie;		/* own socket cookie: sk_msg cannot ask for it */
};

struct sbp_config {
	__u32 draining;		/* 1: redirect nothing new, let queues drain */
	__u32 pad;
};

enum sbp_counter {
	SBP_CNT_ESTABLISHED = 0,
	SBP_CNT_PAIRED,
	SBP_CNT_UNPAIRED_PASSIVE,
	SBP_CNT_CLOSED,
	SBP_CNT_MSG_REDIRECT,
	SBP_CNT_MSG_PASS,
	SBP_CNT_BYTES_REDIRECT,
	SBP_CNT_REDIRECT_FAILED,
	SBP_CNT_HANDSHAKE_RACE,
	SBP_CNT_TABLE_FULL,
	SBP_CNT__MAX,
};

/* A BPF-side error: where and what (negative errno). Keyed by line. */
struct sbp_error {
	__s64 err;
	__u64 count;
};

#endif
