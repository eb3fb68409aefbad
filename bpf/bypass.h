/* SPDX-License-Identifier: GPL-2.0 */
/* Types shared by the BPF programs (bpf/), the interposer
 * (native/preload/) and the manager, which reads them through the cffi
 * module (native/bypass.cdef; its `...` makes the compiler check the
 * layouts against this header). */
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

/* Why a connection is not (or no longer) bypassed, and the name `shmbypass
 * status` and the interposer's log give it: the one table of reasons,
 * X(enum, name). The BPF programs use the enum only; user space gets the
 * names through sbp_reason_name() (C) and the cffi module (status.py).
 * AWAITING_PEER shows as peer-not-capable: the peer was never seen. */
#define SBP_REASONS(X)								\
	X(SBP_REASON_NONE, "none")						\
	X(SBP_REASON_AWAITING_PEER, "peer-not-capable")	/* active side, peer not seen yet */ \
	X(SBP_REASON_PEER_NOT_CAPABLE, "peer-not-capable") /* peer outside the group (or remote) */ \
	X(SBP_REASON_HANDSHAKE_RACE, "handshake-race")	/* data on TCP before both ends paired */ \
	X(SBP_REASON_TABLE_FULL, "table-full")					\
	X(SBP_REASON_DRAINING, "shutting-down")		/* `shmbypass down` in progress */ \
	X(SBP_REASON_PEER_CLOSED, "peer-closed")				\
	X(SBP_REASON_POLICY_EXCLUDED, "policy")			\
	X(SBP_REASON_DIFFERENT_REGION, "different-region") /* shm: the ends map different regions */ \
	X(SBP_REASON_POOL_EXHAUSTED, "pool-exhausted")	/* shm: no free slot (or SYN cookies) */ \
	X(SBP_REASON_NO_OPTION_SPACE, "no-option-space") /* shm: no room for our SYN option */ \
	X(SBP_REASON_MEMORY_CAP, "memory-cap")	/* shm: the process reached up --memory-max */

enum sbp_reason {
#define SBP_REASON_ENUM(e, name) e,
	SBP_REASONS(SBP_REASON_ENUM)
#undef SBP_REASON_ENUM
	SBP_REASON__MAX,
};

#ifndef __bpf__
/* The name of a reason; NULL if r is none of them. */
static inline const char *sbp_reason_name(__u32 r)
{
#define SBP_REASON_NAME(e, name) [e] = name,
	static const char *const names[SBP_REASON__MAX] = { SBP_REASONS(SBP_REASON_NAME) };
#undef SBP_REASON_NAME

	return r < SBP_REASON__MAX ? names[r] : (const char *)0;
}
#endif

/* Direction state, decided once at the first send (see handle_msg). */
enum sbp_dir {
	SBP_DIR_UNDECIDED = 0,
	SBP_DIR_REDIRECT = 1,
	SBP_DIR_TCP = 2,
};

/* ---- asking for the shm tier: the socket options of bpf/ask.bpf.c ----
 *
 * A program in the bypass group asks with setsockopt(fd, SOL_SHMBYPASS,
 * SBP_SO_ASK, &struct sbp_ask, sizeof) and learns what BPF decided with
 * getsockopt(fd, SOL_SHMBYPASS, SBP_SO_INFO, &struct sbp_info, &len). The
 * cgroup sockopt programs answer both and keep the kernel out (outside the
 * group the kernel says ENOPROTOOPT: no bypass here). BPF records who asked
 * (uid, gid, tgid, cgroup) itself: it acts only on what it computed. The
 * inbox token is the one thing a program gives that BPF stores; BPF only
 * relays it to the peer (docs/NEGOTIATION.md, "Trust"). */
#define SOL_SHMBYPASS 0x5342	/* "SB": a level no protocol uses */
#define SBP_SO_ASK 1		/* set: struct sbp_ask */
#define SBP_SO_INFO 2		/* get: struct sbp_info */
#define SBP_SO_KEPT 3		/* set: __u32 reason a shm-tier pair stays on TCP (status) */
#define SBP_ASK_VERSION 1
#define SBP_INBOX_LEN 16	/* random token: names the asker's inbox socket */

#define SBP_ASK_SHM 1u		/* flags: the shm tier (memory through the inbox) */

struct sbp_ask {
	__u32 version;		/* SBP_ASK_VERSION */
	__u32 flags;		/* SBP_ASK_* */
	__u8 inbox[SBP_INBOX_LEN];
};

/* Who asked, as the kernel reported it at the moment of the call. */
struct sbp_ident {
	__u32 uid;
	__u32 gid;
	__u32 tgid;		/* process id (0: nobody asked yet) */
	__u32 pad;
	__u64 cgroup;		/* cgroup v2 id */
};

#define SBP_ROLE_ACTIVE 1	/* it connected */
#define SBP_ROLE_PASSIVE 2	/* it was accepted */

struct sbp_info {
	__u32 version;		/* SBP_ASK_VERSION */
	__u32 tier;		/* enum sbp_tier */
	__u32 reason;		/* enum sbp_reason: why not shm */
	__u32 role;		/* SBP_ROLE_* (0: not established) */
	__u64 cookie;		/* this socket */
	__u64 peer_cookie;	/* the peer socket (0: none) */
	struct sbp_ident self;	/* the caller, as recorded now */
	struct sbp_ident peer;	/* who asked for the peer socket */
	__u8 peer_inbox[SBP_INBOX_LEN];
	/* A VM pair (mem == SBP_MEM_SLOTS): the region slots of the handshake */
	__u32 mem;		/* SBP_MEM_* */
	__u32 tx_slot;
	__u32 rx_slot;
	__u32 pad;
	__u64 tx_gen;
	__u64 rx_gen;
	__u64 region_id;
};

#define SBP_MEM_INBOX 1	/* one host: the ends bring their memory (inbox) */
#define SBP_MEM_SLOTS 2	/* a VM pair: slots of the shared region */

/* One established socket of the bypass group, keyed by socket cookie. */
struct sbp_conn {
	struct sbp_conn_key key;
	__u64 peer;		/* peer socket cookie, 0 while unpaired */
	__u64 netns;		/* netns cookie */
	__u64 bytes_tx;		/* bytes this socket redirected to its peer (its
				 * peer's row says how many it received) */
	__u32 tier;		/* enum sbp_tier */
	__u32 reason;		/* enum sbp_reason */
	__u32 tx_dir;		/* enum sbp_dir */
	__u32 active;		/* 1: this socket connected (it is "a" in the key) */
	__u32 family;		/* AF_INET or AF_INET6 of the socket */
	__u32 shm_reason;	/* why a socket that asked for shm is not in it */
	__u32 tx_slot;		/* shm tier: the rings (status reads their byte counts) */
	__u32 rx_slot;
	__u64 tx_gen;
	__u64 rx_gen;
	__u32 asked;		/* SBP_ASK_* of its owner */
	__u32 kept;		/* SBP_SO_KEPT: why the interposer kept it on TCP (status) */
	struct sbp_ident owner;
	__u8 inbox[SBP_INBOX_LEN];
	__u32 unhashed;		/* active end kept out of the sockhash (shm_expected) */
	__u32 pad;
};

/* Per-socket state in a SK_STORAGE map (sk_state), written by BPF only:
 * bpf/ask.bpf.c records who asked (SBP_SO_ASK), sockops the rest. An
 * accepted socket starts with a copy of its listener's value (BPF_F_CLONE).
 * `tier` is SBP_TIER_SHM once a VM pair's handshake put the connection in
 * the shm tier (one-host pairs are in the `conns` rows). */

/* sbp_sk.listed: a listener counted in `ports` (ANY), there as asking for
 * shm with an allowed owner (SHM), and as asking (MARKED). */
#define SBP_LISTED_ANY 1u
#define SBP_LISTED_SHM 2u
#define SBP_LISTED_MARKED 4u

/* sbp_sk.held: which slot references this socket owns (BPF only). */
#define SBP_HELD_TX 1u
#define SBP_HELD_RX 2u

struct sbp_sk {
	__u32 vm;		/* 1: this socket's peer is a VM (option and slots) */
	__u32 tier;		/* enum sbp_tier */
	__u32 reason;		/* enum sbp_reason: why not shm (if it asked) */
	__u32 tx_slot;		/* shm tier: ring this socket writes */
	__u32 rx_slot;		/* shm tier: ring this socket reads */
	__u32 held;		/* SBP_HELD_*: slot references to drop at close */
	__u64 tx_gen;		/* ring generations */
	__u64 rx_gen;
	__u64 region_id;
	__u64 cookie;		/* own socket cookie: sk_msg cannot ask for it */
	/* Written by bpf/ask.bpf.c only (the kernel's identity of the caller): */
	__u32 asked;		/* SBP_ASK_* of the last SBP_SO_ASK */
	__u32 listed;		/* a listener: SBP_LISTED_*, what it counts in `ports` */
	struct sbp_ident owner;	/* who asked (a child starts with its listener's) */
	__u8 inbox[SBP_INBOX_LEN];
};

/* ---- shm-tier negotiation (docs/NEGOTIATION.md) ---- */

#define SBP_MAX_SLOTS 65536	/* slot ids travel as 16 bits on the wire */

/* The TCP experimental option (RFC 6994) on the SYN and the SYN-ACK.
 * All multi-byte fields in network byte order. 20 bytes: what a Linux SYN
 * (MSS, SACK-permitted, timestamps, window scale) leaves of the 40. */
#define SBP_OPT_KIND 254
#define SBP_OPT_EXID 0x5342	/* "SB"; unregistered experimental id */
#define SBP_OPT_LEN 20
#define SBP_OPT_VERSION 1
#define SBP_CAP_SHM_HOST 0x1	/* same-host rings in a shared region */

struct sbp_opt {
	__u8 kind;		/* SBP_OPT_KIND */
	__u8 len;		/* SBP_OPT_LEN */
	__u16 exid;		/* SBP_OPT_EXID */
	__u8 ver_caps;		/* version << 4 | capabilities */
	__u8 status;		/* 0: slot/gen valid; else the sbp_reason why not */
	__u16 slot;		/* the slot the sender will write */
	__u32 gen;		/* that slot's generation */
	__u64 region_id;	/* 0 unless status is 0 */
} __attribute__((packed));

/* A peer VM's address (HASH vm_peers), as IPv6 (IPv4 v4-mapped). */
struct sbp_vm_peer {
	__u32 ip[4];
};

/* The region the slots belong to (ARRAY `region`, one entry; the manager
 * fills it at `up`). */
struct sbp_region_cfg {
	__u64 region_id;	/* 0: no region, shm never offered */
	__u64 resv_ttl_ns;	/* life of an unclaimed SYN-ACK reservation */
	__u32 slot_count;	/* this kernel's part of the region: */
	__u32 first_slot;	/*   slots first_slot .. first_slot + slot_count - 1 */
};

/* Per-slot word in ARRAY `slot_state`: generation in the high 32 bits,
 * reference count in the low 32, changed only by compare-and-swap. */
#define SBP_SLOT_GEN(w) ((__u32)((w) >> 32))
#define SBP_SLOT_REFS(w) ((__u32)(w))

/* Listeners by (netns, port) (HASH `ports`): at the SYN-ACK the socket is
 * a request sock with no sk_storage, so the mark is looked up there. */
struct sbp_listen_key {
	__u64 netns;
	__u16 port;		/* host byte order */
	__u16 pad[3];
};

/* The listeners of the group on one (netns, port) (HASH `ports`): all,
 * those that asked with an owner the policy allowed, those that asked. */
struct sbp_port_count {
	__u64 all;
	__u64 shm;
	__u64 marked;
};

/* A slot the passive side put in a SYN-ACK (HASH `reservations`), keyed
 * by the connection as the child socket will see it: conn.a_* = peer,
 * conn.b_* = local, conn.a_isn = peer ISN + 1 (rcv_nxt), conn.b_isn = 0. */
struct sbp_resv_key {
	struct sbp_conn_key conn;
	__u64 netns;
};

enum sbp_resv_state {
	SBP_RESV_RESERVED = 1,	/* holds one reference on `slot` */
	SBP_RESV_CLAIMED,	/* the child socket took the reference */
	SBP_RESV_EXPIRED,	/* the timer gave the reference back */
	SBP_RESV_PARKED,	/* a closed socket's slot, held for a peer VM that
				 * may still read it (docs/NEGOTIATION.md) */
};

/* Parked slots live in `reservations` under netns SBP_PARK_NETNS (no real
 * netns cookie) and conn.a_isn = the slot, for SBP_PARK_TTL_NS: the time
 * TCP gives a FIN_WAIT2 peer (tcp_fin_timeout). */
#define SBP_PARK_NETNS (~0ULL)
#define SBP_PARK_TTL_NS (60ULL * 1000000000ULL)

struct sbp_resv {
	__u64 expires;		/* bpf_ktime_get_ns() deadline; pushed back by
				 * every SYN-ACK retransmission */
	__u64 state;		/* enum sbp_resv_state; 64-bit for cmpxchg */
	__u32 pad0;
	__u32 slot;		/* ours */
	__u32 gen;
	__u32 peer_slot;	/* from the SYN's option */
	__u32 peer_gen;
	__u32 pad;
	__u64 region_id;
};

/* Policy: who may pair in the shm tier (ARRAY `policy` + HASH `allowed`). */
#define SBP_POLICY_ANY_USER 1u	/* every user may (else root + `allowed`) */
#define SBP_POLICY_PORTS_ONLY 2u	/* bypass only ports marked INCLUDE */
#define SBP_POLICY_NETS_ONLY 4u	/* bypass only server addresses marked INCLUDE */

/* Values of the `policy_ports` (server port) and `policy_nets` (server
 * address, LPM trie over the v4-mapped IPv6 form) maps. */
#define SBP_POLICY_EXCLUDE 1
#define SBP_POLICY_INCLUDE 2

struct sbp_net_key {
	__u32 prefixlen;	/* of the 128-bit address */
	__u32 ip[4];
};

struct sbp_policy {
	__u32 flags;		/* SBP_POLICY_* */
	__u32 pad;
};

#define SBP_ALLOW_UID 1
#define SBP_ALLOW_GID 2

struct sbp_allow_key {
	__u32 kind;		/* SBP_ALLOW_UID or SBP_ALLOW_GID */
	__u32 id;
};

struct sbp_config {
	__u32 draining;		/* 1: redirect nothing new, let queues drain */
	__u32 capture;		/* 1: a capture runs (bpf/capture.h) */
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
	SBP_CNT_SHM,		/* sockets that entered the shm tier */
	SBP_CNT_SHM_FALLBACK,	/* marked sockets that did not */
	SBP_CNT_RESV_EXPIRED,	/* SYN-ACK reservations the timer returned */
	SBP_CNT_SLOT_PARKED,	/* closed sockets' slots held for a peer VM */
	SBP_CNT_CAPTURE_DROPPED,	/* capture records lost (ring full, send too long) */
	SBP_CNT_CAPTURE_DROPPED_BYTES,	/* their data bytes */
	SBP_CNT__MAX,
};

/* What the drain iterators (bpf/drain.bpf.c) write per socket: the bytes
 * redirected to it that its program has not read yet. */
struct sbp_drain_rec {
	__u64 cookie;
	__u32 queued;
	__u32 pad;
};

/* A BPF-side error: where and what (negative errno). Keyed by line. */
struct sbp_error {
	__s64 err;
	__u64 count;
};

#endif
