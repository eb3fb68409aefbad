// SPDX-License-Identifier: GPL-2.0
/*
 * Kernel tier: sockops pairs the two local ends of a TCP connection when both
 * belong to the bypass cgroup and puts them in a SOCKHASH; sk_msg then moves
 * every send straight into the peer socket's receive queue (BPF_F_INGRESS),
 * skipping the TCP/IP stack.
 *
 * Ordering rule: a direction is redirected only if its very first byte is.
 * tcp_bpf_recvmsg() reads the psock queue before the TCP receive queue, so
 * mixing "TCP first, redirect later" in one direction would reorder bytes.
 * Going the other way (redirect, then TCP when draining or when the peer
 * left the map) is safe: the redirected bytes are older and are read first.
 *
 * Shm tier negotiation (docs/NEGOTIATION.md): on one host, two ends that
 * both asked (bpf/ask.bpf.c) are paired at PASSIVE_ESTABLISHED from BPF
 * state alone (shm_pair). Toward a configured peer VM (vm_peers), a socket
 * that asked carries a TCP experimental option on its SYN with the
 * slot it took from the free list; a marked listener answers in the SYN-ACK
 * with its own slot. Both ends know their tier before connect()/accept()
 * return, and a connection in the shm tier never enters the sockhash.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "bypass.h"
#include "shared.h"
#include "capture.h"

#define AF_INET 2
#define AF_INET6 10

/* sbp_conn.peer of an active socket that sent before its peer paired (see
 * handle_msg): the pairing was lost, the connection stays on TCP. */
#define PEER_RACED (~0ULL)

#define CLOCK_MONOTONIC 1
#define SOL_TCP 6
#define TCP_SAVE_SYN 27
#define TCPHDR_SYN 0x02
#define TCPHDR_ACK 0x10
/* Header-option callbacks are wanted only during the handshake. */
#define SBP_HDR_CB_FLAGS (BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG | \
			  BPF_SOCK_OPS_PARSE_UNKNOWN_HDR_OPT_CB_FLAG | \
			  BPF_SOCK_OPS_PARSE_ALL_HDR_OPT_CB_FLAG)

char LICENSE[] SEC("license") = "GPL";

struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, SBP_MAX_CONNS);
	__type(key, __u64);		/* socket cookie */
	__type(value, __u64);
} sock_hash SEC(".maps");



/* Handshakes a listener of the group answered, by 4-tuple as the active end
 * sees it. The active end enters the sockhash only if its SYN was answered
 * by one of ours: a socket with a psock must not carry TCP data, so one
 * talking to a remote host or to a process outside the group stays out.
 * (No ISNs here: a request sock exposes none to sockops.) Counted: the same
 * 4-tuple in two namespaces at once is two SYNs, and each active end finds
 * its own (an entry deleted at the first left the second on TCP). */
struct syn_key {
	__u32 a_ip[4];
	__u32 b_ip[4];
	__u16 a_port;
	__u16 b_port;
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, SBP_MAX_CONNS);
	__type(key, struct syn_key);
	__type(value, __u64);		/* SYNs answered, not yet established */
} syn_seen SEC(".maps");

/* Active sockets waiting for their passive peer to establish. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, SBP_MAX_CONNS);
	__type(key, struct sbp_conn_key);
	__type(value, __u64);		/* the active socket's cookie */
} pending SEC(".maps");


struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct sbp_config);
} settings SEC(".maps");

/* Connection policy by the server's port and address (the listener's end):
 * excluded connections stay on TCP with reason policy. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, __u16);		/* host byte order */
	__type(value, __u8);		/* SBP_POLICY_EXCLUDE / INCLUDE */
} policy_ports SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 1024);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct sbp_net_key);
	__type(value, __u8);
} policy_nets SEC(".maps");

/* ---- shm-tier negotiation maps ---- */

/* Free slot ids; the manager pushes 0..slot_count-1 at `up`. */
struct {
	__uint(type, BPF_MAP_TYPE_QUEUE);
	__uint(max_entries, SBP_MAX_SLOTS);
	__type(value, __u32);
} free_slots SEC(".maps");

/* Per slot: generation << 32 | references (SBP_SLOT_GEN/REFS). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, SBP_MAX_SLOTS);
	__type(key, __u32);
	__type(value, __u64);
} slot_state SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct sbp_region_cfg);
} region SEC(".maps");

/* VM pairs: the addresses of the peer VM (`up --vm-peer`). Only toward
 * these does a socket that asked carry the TCP option; on one host the two
 * ends pair from BPF state alone and nothing goes on the wire. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 64);
	__type(key, struct sbp_vm_peer);
	__type(value, __u8);
} vm_peers SEC(".maps");

/* Listeners of the group per (netns, port): marked ones for a VM pair's
 * SYN-ACK, all and shm-allowed ones for shm_expected(). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, struct sbp_listen_key);
	__type(value, struct sbp_port_count);
} ports SEC(".maps");

/* SYN-ACK answers waiting for their child socket. Bounded: a flood of
 * SYNs carrying our option fills it (then answers say pool-exhausted)
 * and the sweeper empties it again. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 8192);
	__type(key, struct sbp_resv_key);
	__type(value, struct sbp_resv);
} reservations SEC(".maps");

/* Why a SYN-ACK declined, kept for its child socket's reason. Apart and
 * LRU: SYNs that are declined (a flood in SYN-cookie mode, a peer with
 * another region) evict each other, never a reservation. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 4096);
	__type(key, struct sbp_resv_key);
	__type(value, __u32);
} declined SEC(".maps");

/* The one timer that expires reservations (see sweep()). A map holding a
 * timer must be pinned: bpf_timer_init() wants a user reference. */
struct sbp_sweeper {
	struct bpf_timer timer;
	__u64 armed;		/* 1 while the timer is (about to be) pending */
	__u64 ready;		/* 1 once init + set_callback succeeded */
	__u64 at;		/* when the pending sweep fires (ktime ns) */
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct sbp_sweeper);
} sweeper SEC(".maps");



static __always_inline int draining(void)
{
	__u32 zero = 0;
	struct sbp_config *cfg = bpf_map_lookup_elem(&settings, &zero);

	return cfg && cfg->draining;
}

static __always_inline __u32 capturing(void)
{
	__u32 zero = 0;
	struct sbp_config *cfg = bpf_map_lookup_elem(&settings, &zero);

	return cfg ? cfg->capture : 0;
}

/* Addresses as IPv6; IPv4 becomes ::ffff:a.b.c.d, the same form an IPv6
 * socket talking to an IPv4 peer already has. Every context field is read
 * unconditionally: the verifier rejects a context load at a computed offset,
 * which is what the compiler makes of a branch between ip4 and ip6[3]. */
static __always_inline void to_ip6(__u32 family, __u32 ip4, const __u32 ip6[4], __u32 out[4])
{
	if (family == AF_INET) {
		out[0] = 0;
		out[1] = 0;
		out[2] = bpf_htonl(0xffff);
		out[3] = ip4;
	} else {
		out[0] = ip6[0];
		out[1] = ip6[1];
		out[2] = ip6[2];
		out[3] = ip6[3];
	}
}

#define CTX_READ(field) (*(volatile __u32 *)&(field))

static __always_inline void local_ip(struct bpf_sock_ops *skops, __u32 ip[4])
{
	__u32 ip6[4] = { CTX_READ(skops->local_ip6[0]), CTX_READ(skops->local_ip6[1]),
			 CTX_READ(skops->local_ip6[2]), CTX_READ(skops->local_ip6[3]) };
	__u32 ip4 = CTX_READ(skops->local_ip4);

	to_ip6(skops->family, ip4, ip6, ip);
}

static __always_inline void remote_ip(struct bpf_sock_ops *skops, __u32 ip[4])
{
	__u32 ip6[4] = { CTX_READ(skops->remote_ip6[0]), CTX_READ(skops->remote_ip6[1]),
			 CTX_READ(skops->remote_ip6[2]), CTX_READ(skops->remote_ip6[3]) };
	__u32 ip4 = CTX_READ(skops->remote_ip4);

	to_ip6(skops->family, ip4, ip6, ip);
}

/* Is the remote end of this socket a configured peer VM? */
static __always_inline int remote_is_vm_peer(struct bpf_sock_ops *skops)
{
	struct sbp_vm_peer k;

	remote_ip(skops, k.ip);
	return bpf_map_lookup_elem(&vm_peers, &k) != NULL;
}

static __always_inline void make_key(struct bpf_sock_ops *skops, int active,
				     struct sbp_conn_key *key)
{
	/* local_port is host order; remote_port holds the network-order port
	 * in its upper 16 bits, which bpf_ntohl() turns into host order. */
	__u16 lport = (__u16)skops->local_port;
	__u16 rport = (__u16)bpf_ntohl(skops->remote_port);

	if (active) {
		local_ip(skops, key->a_ip);
		remote_ip(skops, key->b_ip);
		key->a_port = lport;
		key->b_port = rport;
		key->a_isn = skops->snd_nxt;
		key->b_isn = skops->rcv_nxt;
	} else {
		remote_ip(skops, key->a_ip);
		local_ip(skops, key->b_ip);
		key->a_port = rport;
		key->b_port = lport;
		key->a_isn = skops->rcv_nxt;
		key->b_isn = skops->snd_nxt;
	}
}

/* A listener of the group on (netns, port) in `ports`: counted in `all`,
 * and in the counters its SBP_LISTED_* bits name. d: 1 or -1. */
static __always_inline void count_port(struct sbp_listen_key *k, int d, __u32 listed)
{
	struct sbp_port_count first = { 1, !!(listed & SBP_LISTED_SHM), !!(listed & SBP_LISTED_MARKED) };
	struct sbp_port_count *n;

	n = bpf_map_lookup_elem(&ports, k);
	if (!n && d > 0 && !bpf_map_update_elem(&ports, k, &first, BPF_NOEXIST))
		return;
	if (!n)
		n = bpf_map_lookup_elem(&ports, k);     /* another listener made it */
	if (!n)
		return;             /* full: shm_expected says no, a VM peer sees no mark */
	if (listed & SBP_LISTED_SHM)
		__sync_fetch_and_add(&n->shm, d);
	if (listed & SBP_LISTED_MARKED)
		__sync_fetch_and_add(&n->marked, d);
	if (__sync_fetch_and_add(&n->all, d) == 1 && d < 0)
		bpf_map_delete_elem(&ports, k);
}

/* The shm tier's handshake: listeners, and a VM pair's TCP option. */
#include "handshake.h"

/* Was this active socket's SYN answered by a listener of the group? */
static __always_inline int peer_in_group(struct sbp_conn_key *key)
{
	struct syn_key k = {};
	__u64 *n;

	__builtin_memcpy(k.a_ip, key->a_ip, sizeof(k.a_ip));
	__builtin_memcpy(k.b_ip, key->b_ip, sizeof(k.b_ip));
	k.a_port = key->a_port;
	k.b_port = key->b_port;
	n = bpf_map_lookup_elem(&syn_seen, &k);
	if (!n)
		return 0;
	/* counted: the same 4-tuple in two namespaces at once is two SYNs */
	if (__sync_fetch_and_add(n, -1) <= 1)
		bpf_map_delete_elem(&syn_seen, &k);
	return 1;
}

/* Does the policy keep this connection (key: as built by make_key, the
 * passive end is "b") off both tiers? */
static __always_inline int policy_excluded(const struct sbp_conn_key *k)
{
	struct sbp_net_key nk = { .prefixlen = 128 };
	struct sbp_policy *p;
	__u16 port = k->b_port;
	__u32 zero = 0;
	__u8 *act;

	p = bpf_map_lookup_elem(&policy, &zero);
	act = bpf_map_lookup_elem(&policy_ports, &port);
	if (act ? *act == SBP_POLICY_EXCLUDE : p && (p->flags & SBP_POLICY_PORTS_ONLY))
		return 1;
	__builtin_memcpy(nk.ip, k->b_ip, sizeof(nk.ip));
	act = bpf_map_lookup_elem(&policy_nets, &nk);
	return act ? *act == SBP_POLICY_EXCLUDE : p && (p->flags & SBP_POLICY_NETS_ONLY);
}

/* One host, shm tier: both ends asked (SBP_SO_ASK: the child carries its
 * listener's request, the exact listening socket the SYN reached), so the
 * pair is put in the shm tier and neither end in the sockhash. Nothing
 * was on the wire and nothing is allocated: the interposers bring their
 * memory to each other (docs/NEGOTIATION.md). Called by the passive end
 * with the active end's row. */
static __always_inline void shm_pair(struct sbp_conn *c, __u64 cookie, struct sbp_conn *pc,
				     __u64 peer_cookie)
{
	c->tier = SBP_TIER_SHM;
	c->peer = peer_cookie;
	c->reason = SBP_REASON_NONE;
	c->shm_reason = SBP_REASON_NONE;
	pc->tier = SBP_TIER_SHM;
	pc->reason = SBP_REASON_NONE;
	pc->shm_reason = SBP_REASON_NONE;
	/* Its sk_msg may have claimed the handshake race meanwhile: that
	 * only sent its bytes over TCP, where the shm tier starts anyway. */
	pc->peer = cookie;
	if (!pc->unhashed)
		bpf_map_delete_elem(&sock_hash, &peer_cookie);
	bpf_map_delete_elem(&pending, &c->key);
	count(SBP_CNT_SHM, 2);
}

/* This socket's row in conns (a new one); counted if the table is full.
 * 0 or -1. */
static __always_inline int record(__u64 *cookie, struct sbp_conn *c)
{
	if (!bpf_map_update_elem(&conns, cookie, c, BPF_NOEXIST))
		return 0;
	count(SBP_CNT_TABLE_FULL, 1);
	return -1;
}

/* This socket into the sockhash (sk_msg redirects to it from now on). */
static __always_inline long enter_sockhash(struct bpf_sock_ops *skops, __u64 *cookie)
{
	long err = bpf_sock_hash_update(skops, &sock_hash, cookie, BPF_NOEXIST);

	if (err)
		REPORT(err);
	return err;
}

/* Will this active end's pair be in the shm tier? Yes if it asked, the
 * policy allows its owner, and every listener of the group on its peer's
 * port (in its netns) asked too with an owner the policy allowed: its
 * peer is a child of one of them. Then it stays out of the sockhash: a
 * psock made at every connect and torn down at the pairing cost more
 * than the rest of the pairing. Wrong only if the policy or a listener's
 * request changed since it listened: that pair stays on TCP. */
static __always_inline int shm_expected(const struct sbp_conn *c)
{
	struct sbp_listen_key k = {};
	struct sbp_port_count *n;

	if (!(c->asked & SBP_ASK_SHM) || !ident_allowed(&c->owner))
		return 0;
	k.netns = c->netns;
	k.port = c->key.b_port;
	n = bpf_map_lookup_elem(&ports, &k);
	return n && n->shm && n->shm == n->all;
}

/* The active end establishes first (it sends the final ACK): it enters
 * the sockhash now, unless shm_expected, and waits in `pending` for its
 * peer. */
static __always_inline void await_peer(struct bpf_sock_ops *skops, struct sbp_conn *c, __u64 cookie)
{
	struct sbp_conn *row;

	c->reason = SBP_REASON_AWAITING_PEER;
	c->unhashed = shm_expected(c);
	if (record(&cookie, c))
		return;
	if (!c->unhashed && enter_sockhash(skops, &cookie)) {
		row = bpf_map_lookup_elem(&conns, &cookie);
		if (row)
			row->reason = SBP_REASON_TABLE_FULL;
		return;
	}
	if (bpf_map_update_elem(&pending, &c->key, &cookie, BPF_ANY))
		count(SBP_CNT_TABLE_FULL, 1);
}

/* The passive end found its active end (pc, cookie *peer) waiting: the
 * kernel tier for both, unless the active end's first send won the race. */
static __always_inline void pair_kernel(struct bpf_sock_ops *skops, struct sbp_conn *c,
					__u64 cookie, struct sbp_conn *pc, __u64 *peer)
{
	struct sbp_conn *mine;

	c->peer = *peer;
	c->tier = SBP_TIER_KERNEL;
	c->reason = c->shm_reason;	/* kernel tier; why not shm, if asked */
	if (record(&cookie, c))
		return;
	/* Enter the sockhash before the active end can see us as its peer. */
	if (enter_sockhash(skops, &cookie)) {
		bpf_map_delete_elem(&conns, &cookie);
		return;
	}
	/* SYNC POINT: the active end's first send races with this. Whoever
	 * swaps pc->peer first decides: us (paired) or its sk_msg (raced). */
	if (__sync_val_compare_and_swap(&pc->peer, 0, cookie) != 0) {
		/* It already sent on TCP: both ends stay on TCP, out of the
		 * sockhash (nothing was redirected to either yet). */
		bpf_map_delete_elem(&sock_hash, &cookie);
		bpf_map_delete_elem(&sock_hash, peer);
		mine = bpf_map_lookup_elem(&conns, &cookie);
		if (mine) {
			mine->peer = 0;
			mine->tier = SBP_TIER_TCP;
			mine->reason = SBP_REASON_HANDSHAKE_RACE;
		}
		bpf_map_delete_elem(&pending, &c->key);
		return;
	}
	pc->tier = SBP_TIER_KERNEL;
	pc->reason = pc->shm_reason;
	bpf_map_delete_elem(&pending, &c->key);
	count(SBP_CNT_PAIRED, 1);
}

/* shm_expected was wrong (pc stayed out of the sockhash), and the kernel
 * tier needs both ends in it: plain TCP for both, with the reason. */
static __always_inline void pair_tcp(struct sbp_conn *c, __u64 cookie, struct sbp_conn *pc)
{
	c->reason = c->shm_reason ? c->shm_reason : SBP_REASON_PEER_NOT_CAPABLE;
	pc->reason = c->reason;
	bpf_map_delete_elem(&pending, &c->key);
	record(&cookie, c);
}

static __always_inline void handle_established(struct bpf_sock_ops *skops, int active)
{
	struct sbp_conn c = {}, *pc;
	__u64 cookie = bpf_get_socket_cookie(skops);
	struct bpf_sock *sk;
	struct sbp_sk *st;
	__u64 *peer;

	make_key(skops, active, &c.key);
	c.netns = bpf_get_netns_cookie(skops);
	c.active = active;
	c.family = skops->family;
	count(SBP_CNT_ESTABLISHED, 1);

	/* TCP_CLOSE tells us when to forget the socket; no more header
	 * options after the handshake. */
	set_cb_flags(skops, BPF_SOCK_OPS_STATE_CB_FLAG, SBP_HDR_CB_FLAGS);

	sk = skops->sk;
	st = sk ? bpf_sk_storage_get(&sk_state, sk, NULL, BPF_SK_STORAGE_GET_F_CREATE) : NULL;
	if (!st) {
		REPORT(-ENOMEM);
		return;
	}
	st->cookie = cookie;
	c.asked = st->asked;
	c.owner = st->owner;
	__builtin_memcpy(c.inbox, st->inbox, SBP_INBOX_LEN);

	if (policy_excluded(&c.key)) {
		c.reason = SBP_REASON_POLICY_EXCLUDED;
		record(&cookie, &c);
		return;
	}

	/* The shm tier of VM pairs first: its data goes through the ring, so
	 * such a socket never enters the sockhash. */
	if (active ? shm_active(skops, st) : shm_passive(skops, st, &c.key, c.netns)) {
		c.tier = SBP_TIER_SHM;
		c.tx_slot = st->tx_slot;
		c.rx_slot = st->rx_slot;
		c.tx_gen = st->tx_gen;
		c.rx_gen = st->rx_gen;
		count(SBP_CNT_SHM, 1);
		record(&cookie, &c);
		return;
	}
	if (st->vm) {
		c.shm_reason = st->reason;
		count(SBP_CNT_SHM_FALLBACK, 1);
	}

	if (draining()) {
		c.reason = SBP_REASON_DRAINING;
		bpf_map_update_elem(&conns, &cookie, &c, BPF_ANY);
		return;
	}

	if (active && !peer_in_group(&c.key)) {
		/* Remote, or a local listener outside the group: plain TCP. */
		c.reason = SBP_REASON_PEER_NOT_CAPABLE;
		record(&cookie, &c);
		return;
	}
	if (active) {
		await_peer(skops, &c, cookie);
		return;
	}

	peer = bpf_map_lookup_elem(&pending, &c.key);
	pc = peer ? bpf_map_lookup_elem(&conns, peer) : NULL;
	if (!pc) {
		/* The connecting end is not in the group (or is remote). */
		c.reason = SBP_REASON_PEER_NOT_CAPABLE;
		count(SBP_CNT_UNPAIRED_PASSIVE, 1);
		record(&cookie, &c);
		return;
	}

	if ((c.asked & SBP_ASK_SHM) && (pc->asked & SBP_ASK_SHM)) {
		/* Both asked; may these two users share memory (up's
		 * --allow-* policy)? If not, the kernel tier, which shares
		 * none, and the reason for both rows. */
		if (ident_allowed(&c.owner) && ident_allowed(&pc->owner)) {
			shm_pair(&c, cookie, pc, *peer);
			record(&cookie, &c);
			return;
		}
		c.shm_reason = SBP_REASON_POLICY_EXCLUDED;
		pc->shm_reason = SBP_REASON_POLICY_EXCLUDED;
	}
	if (pc->unhashed)
		pair_tcp(&c, cookie, pc);
	else
		pair_kernel(skops, &c, cookie, pc, peer);
}

static __always_inline void handle_close(struct bpf_sock_ops *skops)
{
	__u64 cookie = bpf_get_socket_cookie(skops);
	struct bpf_sock *sk = skops->sk;
	struct sbp_conn *c;
	struct sbp_sk *st;

	/* Each end drops its references on both rings; the slots go back to
	 * the free list when both ends have closed. */
	st = sk ? bpf_sk_storage_get(&sk_state, sk, NULL, 0) : NULL;
	if (st) {
		if (st->held) {
			park_tx_slot(skops, st);
			release_slots(st);
		}
		if (skops->args[0] == BPF_TCP_LISTEN && st->listed)
			forget_listener(skops, st);
	}

	c = bpf_map_lookup_elem(&conns, &cookie);
	if (!c)
		return;
	if (c->active && (!c->peer || c->peer == PEER_RACED))
		bpf_map_delete_elem(&pending, &c->key);
	bpf_map_delete_elem(&conns, &cookie);
	count(SBP_CNT_CLOSED, 1);
}

SEC("sockops")
int sbp_sockops(struct bpf_sock_ops *skops)
{
	switch (skops->op) {
	case BPF_SOCK_OPS_RWND_INIT:
		if (!skops->is_fullsock)
			handle_syn(skops);
		break;
	case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB:
		handle_established(skops, 1);
		break;
	case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB:
		handle_established(skops, 0);
		break;
	case BPF_SOCK_OPS_TCP_LISTEN_CB:
		handle_listen(skops);
		break;
	case BPF_SOCK_OPS_TCP_CONNECT_CB:
		handle_connect(skops);
		break;
	case BPF_SOCK_OPS_HDR_OPT_LEN_CB:
		handle_hdr_opt(skops, 0);
		break;
	case BPF_SOCK_OPS_WRITE_HDR_OPT_CB:
		handle_hdr_opt(skops, 1);
		break;
	case BPF_SOCK_OPS_STATE_CB:
		if (skops->args[1] == BPF_TCP_CLOSE)
			handle_close(skops);
		break;
	}
	return 1;
}

SEC("sk_msg")
int sbp_msg(struct sk_msg_md *msg)
{
	struct sbp_conn *c;
	__u32 size = msg->size;
	struct bpf_sock *sk;
	struct sbp_sk *st;
	__u64 peer;
	long ret;

	sk = msg->sk;
	if (!sk)
		return SK_PASS;
	st = bpf_sk_storage_get(&sk_state, sk, NULL, 0);
	if (!st)
		return SK_PASS;
	c = bpf_map_lookup_elem(&conns, &st->cookie);
	if (!c || c->tier == SBP_TIER_SHM)
		return SK_PASS;
	/* After our own FIN (shutdown(SHUT_WR), close) TCP fails a send with
	 * EPIPE, but a redirect would still deliver it, after the FIN. Passed
	 * on, tcp_sendmsg_locked() gives the EPIPE (conformance
	 * send_after_shutdown). */
	if (sk->state != BPF_TCP_ESTABLISHED && sk->state != BPF_TCP_CLOSE_WAIT)
		goto pass;
	if (c->tx_dir == SBP_DIR_UNDECIDED) {
		/* SYNC POINT: pairs with the compare-and-swap in
		 * handle_established. An active socket whose peer has not
		 * paired yet claims the race: it goes on TCP for good, and its
		 * peer, when it establishes, takes it out of the sockhash (an
		 * sk_msg program may not): a socket with a psock must not carry
		 * TCP data (the "half-close bug", docs/ARCHITECTURE.md). */
		peer = c->peer;
		if (!peer && c->active)
			peer = __sync_val_compare_and_swap(&c->peer, 0, PEER_RACED);
		if (!peer || peer == PEER_RACED) {
			c->tx_dir = SBP_DIR_TCP;
			c->reason = SBP_REASON_HANDSHAKE_RACE;
			count(SBP_CNT_HANDSHAKE_RACE, 1);
			goto pass;
		}
		c->tx_dir = draining() ? SBP_DIR_TCP : SBP_DIR_REDIRECT;
	}
	if (c->tx_dir != SBP_DIR_REDIRECT)
		goto pass;
	if (draining()) {
		c->tx_dir = SBP_DIR_TCP;
		c->reason = SBP_REASON_DRAINING;
		goto pass;
	}
	peer = c->peer;
	ret = bpf_msg_redirect_hash(msg, &sock_hash, &peer, BPF_F_INGRESS);
	if (ret != SK_PASS) {
		/* The peer left the map (it closed): the rest goes on TCP,
		 * which gives the peer's RST/EPIPE semantics. */
		c->tx_dir = SBP_DIR_TCP;
		c->reason = SBP_REASON_PEER_CLOSED;
		count(SBP_CNT_REDIRECT_FAILED, 1);
		goto pass;
	}
	/* One counter per send; status reads the peer's as this end's rx. */
	__sync_fetch_and_add(&c->bytes_tx, size);
	count(SBP_CNT_MSG_REDIRECT, 1);
	count(SBP_CNT_BYTES_REDIRECT, size);
	capture_send(msg, capturing());
	return SK_PASS;
pass:
	count(SBP_CNT_MSG_PASS, 1);
	return SK_PASS;
}
