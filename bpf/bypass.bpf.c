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
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_core_read.h>
#include "bypass.h"

#define AF_INET 2
#define AF_INET6 10
#define ENOMEM 12

char LICENSE[] SEC("license") = "GPL";

struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, SBP_MAX_CONNS);
	__type(key, __u64);		/* socket cookie */
	__type(value, __u64);
} sock_hash SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, SBP_MAX_CONNS);
	__type(key, __u64);		/* socket cookie */
	__type(value, struct sbp_conn);
} conns SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC | BPF_F_CLONE);
	__type(key, int);
	__type(value, struct sbp_sk);
} sk_state SEC(".maps");

/* Active sockets waiting for their passive peer to establish. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, SBP_MAX_CONNS);
	__type(key, struct sbp_conn_key);
	__type(value, __u64);		/* the active socket's cookie */
} pending SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, SBP_CNT__MAX);
	__type(key, __u32);
	__type(value, __u64);
} counters SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct sbp_config);
} settings SEC(".maps");

/* Errors the programs hit, keyed by source line; tests assert it is empty. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 64);
	__type(key, __u32);
	__type(value, struct sbp_error);
} errors SEC(".maps");

static __always_inline void count(__u32 idx, __u64 n)
{
	__u64 *v = bpf_map_lookup_elem(&counters, &idx);

	if (v)
		*v += n;
}

static __always_inline void report(__u32 line, long err)
{
	struct sbp_error e = { .err = err, .count = 1 }, *old;

	old = bpf_map_lookup_elem(&errors, &line);
	if (old) {
		old->err = err;
		__sync_fetch_and_add(&old->count, 1);
	} else {
		bpf_map_update_elem(&errors, &line, &e, BPF_NOEXIST);
	}
}
#define REPORT(err) report(__LINE__, (err))

static __always_inline int draining(void)
{
	__u32 zero = 0;
	struct sbp_config *cfg = bpf_map_lookup_elem(&settings, &zero);

	return cfg && cfg->draining;
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

static __always_inline void handle_established(struct bpf_sock_ops *skops, int active)
{
	struct sbp_conn c = {}, *pc;
	__u64 cookie = bpf_get_socket_cookie(skops);
	struct bpf_sock *sk;
	struct sbp_sk *st;
	__u64 *peer;
	long err;

	make_key(skops, active, &c.key);
	c.netns = bpf_get_netns_cookie(skops);
	c.active = active;
	c.family = skops->family;
	count(SBP_CNT_ESTABLISHED, 1);

	/* TCP_CLOSE tells us when to forget the socket. */
	err = bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags |
					BPF_SOCK_OPS_STATE_CB_FLAG);
	if (err)
		REPORT(err);

	sk = skops->sk;
	st = sk ? bpf_sk_storage_get(&sk_state, sk, NULL, BPF_SK_STORAGE_GET_F_CREATE) : NULL;
	if (!st) {
		REPORT(-ENOMEM);
		return;
	}
	st->cookie = cookie;

	if (draining()) {
		c.reason = SBP_REASON_DRAINING;
		bpf_map_update_elem(&conns, &cookie, &c, BPF_ANY);
		return;
	}

	if (active) {
		/* The active end establishes first (it sends the final ACK):
		 * enter the sockhash now and wait for the peer. */
		c.reason = SBP_REASON_AWAITING_PEER;
		if (bpf_map_update_elem(&conns, &cookie, &c, BPF_NOEXIST)) {
			count(SBP_CNT_TABLE_FULL, 1);
			return;
		}
		err = bpf_sock_hash_update(skops, &sock_hash, &cookie, BPF_NOEXIST);
		if (err) {
			REPORT(err);
			pc = bpf_map_lookup_elem(&conns, &cookie);
			if (pc)
				pc->reason = SBP_REASON_TABLE_FULL;
			return;
		}
		if (bpf_map_update_elem(&pending, &c.key, &cookie, BPF_ANY))
			count(SBP_CNT_TABLE_FULL, 1);
		return;
	}

	peer = bpf_map_lookup_elem(&pending, &c.key);
	pc = peer ? bpf_map_lookup_elem(&conns, peer) : NULL;
	if (!pc) {
		/* The connecting end is not in the group (or is remote). */
		c.reason = SBP_REASON_PEER_NOT_CAPABLE;
		count(SBP_CNT_UNPAIRED_PASSIVE, 1);
		if (bpf_map_update_elem(&conns, &cookie, &c, BPF_NOEXIST))
			count(SBP_CNT_TABLE_FULL, 1);
		return;
	}

	c.peer = *peer;
	c.tier = SBP_TIER_KERNEL;
	if (bpf_map_update_elem(&conns, &cookie, &c, BPF_NOEXIST)) {
		count(SBP_CNT_TABLE_FULL, 1);
		return;
	}
	err = bpf_sock_hash_update(skops, &sock_hash, &cookie, BPF_NOEXIST);
	if (err) {
		REPORT(err);
		bpf_map_delete_elem(&conns, &cookie);
		return;
	}
	pc->peer = cookie;
	pc->tier = SBP_TIER_KERNEL;
	/* If the active end already sent on TCP, that direction stays on TCP
	 * (see the ordering rule at the top); the other one is redirected. */
	pc->reason = pc->tx_dir == SBP_DIR_TCP ? SBP_REASON_HANDSHAKE_RACE : SBP_REASON_NONE;
	bpf_map_delete_elem(&pending, &c.key);
	count(SBP_CNT_PAIRED, 1);
}

static __always_inline void handle_close(struct bpf_sock_ops *skops)
{
	__u64 cookie = bpf_get_socket_cookie(skops);
	struct sbp_conn *c = bpf_map_lookup_elem(&conns, &cookie);

	if (!c)
		return;
	if (c->active && !c->peer)
		bpf_map_delete_elem(&pending, &c->key);
	bpf_map_delete_elem(&conns, &cookie);
	count(SBP_CNT_CLOSED, 1);
}

SEC("sockops")
int sbp_sockops(struct bpf_sock_ops *skops)
{
	switch (skops->op) {
	case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB:
		handle_established(skops, 1);
		break;
	case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB:
		handle_established(skops, 0);
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
	struct sbp_conn *c, *pc;
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
	if (!c)
		return SK_PASS;
	if (c->tx_dir == SBP_DIR_UNDECIDED) {
		if (c->peer && !draining()) {
			c->tx_dir = SBP_DIR_REDIRECT;
		} else {
			c->tx_dir = SBP_DIR_TCP;
			count(SBP_CNT_HANDSHAKE_RACE, 1);
		}
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
	__sync_fetch_and_add(&c->bytes_tx, size);
	pc = bpf_map_lookup_elem(&conns, &peer);
	if (pc)
		__sync_fetch_and_add(&pc->bytes_rx, size);
	count(SBP_CNT_MSG_REDIRECT, 1);
	count(SBP_CNT_BYTES_REDIRECT, size);
	return SK_PASS;
pass:
	count(SBP_CNT_MSG_PASS, 1);
	return SK_PASS;
}

/* Unread bytes a socket holds in its psock queue (redirected to it but not
 * read yet). `shmbypass down` waits for these to reach zero before it drops
 * the map, because dropping a socket from a sockhash discards that queue. */
struct sbp_drain_rec {
	__u64 cookie;
	__u32 queued;
	__u32 pad;
};

#define SK_USER_DATA_PTRMASK (~7UL)

SEC("iter/sockmap")
int sbp_drain(struct bpf_iter__sockmap *ctx)
{
	struct sbp_drain_rec rec = {};
	struct sock *sk = ctx->sk;
	__u64 *key = ctx->key;
	struct sk_psock *psock;
	void *ud;

	if (!sk || !key)
		return 0;
	rec.cookie = *key;
	ud = BPF_CORE_READ(sk, sk_user_data);
	psock = (struct sk_psock *)((unsigned long)ud & SK_USER_DATA_PTRMASK);
	if (psock)
		rec.queued = BPF_CORE_READ(psock, msg_tot_len);
	bpf_seq_write(ctx->meta->seq, &rec, sizeof(rec));
	return 0;
}
