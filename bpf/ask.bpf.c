// SPDX-License-Identifier: GPL-2.0
/*
 * How a socket asks for the shm tier and learns what BPF decided: two
 * cgroup sockopt programs on the private level SOL_SHMBYPASS (bypass.h).
 *
 * - SBP_SO_ASK (setsockopt): the socket asks. BPF records who asked, as the
 *   kernel reports the caller (uid, gid, tgid, cgroup id): never what the
 *   program claims. The inbox token is the only value taken from the
 *   program, and BPF never acts on it, it only relays it to the peer.
 *   Called before connect()/listen(), and by the process that accepted a
 *   socket (a child starts with its listener's owner, a copy: BPF_F_CLONE).
 * - SBP_SO_INFO (getsockopt): tier, reason, role, both identities, the
 *   peer's inbox token. The shm tier is reported only if the policy allows
 *   both the caller (now) and whoever asked for the peer socket.
 * - SBP_SO_KEPT (setsockopt): the reason the interposer kept a shm-tier
 *   connection on TCP (memory-cap); kept for `status`, never acted upon.
 *
 * The kernel never sees this level (optlen -1 / retval 0). Outside the
 * bypass cgroup nothing answers and the kernel says ENOPROTOOPT, which
 * tells the interposer there is no bypass here.
 *
 * Loaded apart from the core (an optional feature: without it the shm tier
 * is off and the kernel tier works); its maps are the core's (shared.h).
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include "bypass.h"
#include "shared.h"

char LICENSE[] SEC("license") = "GPL";

static __always_inline void current_ident(struct sbp_ident *id)
{
	__u64 ug = bpf_get_current_uid_gid();

	id->uid = (__u32)ug;
	id->gid = (__u32)(ug >> 32);
	id->tgid = (__u32)(bpf_get_current_pid_tgid() >> 32);
	id->pad = 0;
	id->cgroup = bpf_get_current_cgroup_id();
}

static __always_inline int do_ask(struct bpf_sockopt *ctx)
{
	struct sbp_ask *a = ctx->optval;
	struct sbp_conn *row;
	struct sbp_sk *st;

	if ((void *)(a + 1) > ctx->optval_end || ctx->optlen < (int)sizeof(*a) ||
	    a->version != SBP_ASK_VERSION || (a->flags & ~SBP_ASK_SHM))
		return 0;				/* EPERM: not a request we know */
	st = bpf_sk_storage_get(&sk_state, ctx->sk, NULL, BPF_SK_STORAGE_GET_F_CREATE);
	if (!st)
		return 0;
	st->asked = a->flags;
	current_ident(&st->owner);
	__builtin_memcpy(st->inbox, a->inbox, SBP_INBOX_LEN);
	/* Established already (the accepting process asks): its row too. */
	row = st->cookie ? bpf_map_lookup_elem(&conns, &st->cookie) : NULL;
	if (row) {
		row->asked = st->asked;
		row->owner = st->owner;
		__builtin_memcpy(row->inbox, st->inbox, SBP_INBOX_LEN);
	}
	return 1;
}

static __always_inline int do_kept(struct bpf_sockopt *ctx)
{
	__u32 *reason = ctx->optval;
	struct sbp_conn *row;
	struct sbp_sk *st;

	if ((void *)(reason + 1) > ctx->optval_end)
		return 0;
	st = bpf_sk_storage_get(&sk_state, ctx->sk, NULL, 0);
	row = st && st->cookie ? bpf_map_lookup_elem(&conns, &st->cookie) : NULL;
	if (row)
		row->kept = *reason & 0xffff;
	return 1;
}

SEC("cgroup/setsockopt")
int sbp_setsockopt(struct bpf_sockopt *ctx)
{
	int ok;

	if (ctx->level != SOL_SHMBYPASS)
		return 1;				/* not ours: the kernel's */
	if (!ctx->sk)
		return 0;
	if (ctx->optname == SBP_SO_ASK)
		ok = do_ask(ctx);
	else if (ctx->optname == SBP_SO_KEPT)
		ok = do_kept(ctx);
	else
		return 0;
	ctx->optlen = -1;				/* the kernel does nothing more */
	return ok;
}

SEC("cgroup/getsockopt")
int sbp_getsockopt(struct bpf_sockopt *ctx)
{
	struct sbp_info *out = ctx->optval;
	struct sbp_conn *row, *peer = NULL;
	struct sbp_sk *st;
	int vm;

	if (ctx->level != SOL_SHMBYPASS || ctx->optname != SBP_SO_INFO)
		return 1;				/* the kernel's answer stands */
	if (!ctx->sk || (void *)(out + 1) > ctx->optval_end)
		return 0;
	__builtin_memset(out, 0, sizeof(*out));
	out->version = SBP_ASK_VERSION;
	out->reason = SBP_REASON_PEER_NOT_CAPABLE;
	current_ident(&out->self);
	st = bpf_sk_storage_get(&sk_state, ctx->sk, NULL, 0);
	row = st && st->cookie ? bpf_map_lookup_elem(&conns, &st->cookie) : NULL;
	if (row) {
		out->cookie = st->cookie;
		out->role = row->active ? SBP_ROLE_ACTIVE : SBP_ROLE_PASSIVE;
		out->tier = row->tier;
		out->reason = row->tier == SBP_TIER_SHM ? SBP_REASON_NONE
			      : row->shm_reason ? row->shm_reason : row->reason;
		if (row->peer && row->peer != ~0ULL) {
			out->peer_cookie = row->peer;
			peer = bpf_map_lookup_elem(&conns, &row->peer);
		}
	}
	if (peer) {
		out->peer = peer->owner;
		__builtin_memcpy(out->peer_inbox, peer->inbox, SBP_INBOX_LEN);
	}
	/* A VM pair's handshake gave slots (sk_state says so); else, on
	 * one host, the peers bring memory (also when a VM peer's pool ran
	 * out and both ends turned out to be here). */
	vm = st && st->tier == SBP_TIER_SHM;
	if (row && row->tier == SBP_TIER_SHM) {
		out->mem = vm ? SBP_MEM_SLOTS : SBP_MEM_INBOX;
		if (vm) {
			out->tx_slot = st->tx_slot;
			out->rx_slot = st->rx_slot;
			out->tx_gen = st->tx_gen;
			out->rx_gen = st->rx_gen;
			out->region_id = st->region_id;
		}
	}
	/* Paired in the shm tier (bypass.bpf.c), but may these two use it? */
	if (out->tier == SBP_TIER_SHM && row && !vm &&
	    (!peer || !ident_allowed(&out->self) || !ident_allowed(&peer->owner))) {
		out->tier = SBP_TIER_TCP;
		out->reason = peer ? SBP_REASON_POLICY_EXCLUDED : SBP_REASON_PEER_CLOSED;
		/* A process other than the one BPF paired for asks (a worker
		 * accepted what its master listened on) and may not share
		 * memory: plain TCP for both ends, and status says why. */
		if (peer) {
			row->tier = SBP_TIER_TCP;
			row->reason = SBP_REASON_POLICY_EXCLUDED;
			peer->tier = SBP_TIER_TCP;
			peer->reason = SBP_REASON_POLICY_EXCLUDED;
		}
	}
	ctx->optlen = sizeof(*out);
	ctx->retval = 0;
	return 1;
}
