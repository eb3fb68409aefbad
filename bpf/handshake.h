/* SPDX-License-Identifier: GPL-2.0 */
/*
 * handshake.h: the shm tier's part of the TCP handshake, for
 * bypass.bpf.c (one compilation unit: included once, after the maps and
 * the address helpers): listeners that asked (exact listener identity),
 * and toward a configured peer VM the TCP option with the slots each end
 * will write: the slot pool, reservations and their sweeper, the SYN and
 * SYN-ACK options, parking a slot whose reader may still read it
 * (docs/NEGOTIATION.md).
 */
#ifndef SBP_BPF_HANDSHAKE_H
#define SBP_BPF_HANDSHAKE_H

static __always_inline struct sbp_region_cfg *region_cfg(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&region, &zero);
}

/* Take a free slot: pop its id, bump its generation (never 0, which an
 * unformatted slot has), hold one reference. */
static __always_inline int slot_pop(__u32 *slot, __u32 *gen)
{
	__u64 *w, old, new;
	__u32 id, g;
	int i;

	if (bpf_map_pop_elem(&free_slots, &id))
		return -ENOENT;
	w = bpf_map_lookup_elem(&slot_state, &id);
	if (!w) {
		REPORT(-EINVAL);	/* the manager pushed an id out of range */
		return -EINVAL;
	}
	for (i = 0; i < 8; i++) {
		old = *(volatile __u64 *)w;
		if (SBP_SLOT_REFS(old)) {
			REPORT(-EBUSY);	/* a referenced slot was on the free list */
			return -EBUSY;
		}
		g = SBP_SLOT_GEN(old) + 1;
		if (!g)
			g = 1;
		new = (__u64)g << 32 | 1;
		if (__sync_val_compare_and_swap(w, old, new) == old) {
			*slot = id;
			*gen = g;
			return 0;
		}
	}
	bpf_map_push_elem(&free_slots, &id, 0);
	REPORT(-EAGAIN);
	return -EAGAIN;
}

/* Is this slot in this kernel's part of the region? On one host the peer's
 * slot always is, and both ends hold a reference on both slots. Across two
 * VMs sharing an IVSHMEM region the peer's slot is in the other guest's
 * part: the other kernel counts it, and this one must not touch it. A slot
 * is then held by its own socket only, and comes back at that socket's
 * TCP_CLOSE, which a normal close reaches only once the peer has closed too
 * (FIN_WAIT2 -> TIME_WAIT, or LAST_ACK), so the peer is done reading. */
static __always_inline int slot_is_ours(__u32 slot)
{
	struct sbp_region_cfg *cfg = region_cfg();

	return cfg && slot >= cfg->first_slot && slot - cfg->first_slot < cfg->slot_count;
}

/* Take one more reference on a slot, only if it is still the slot of that
 * generation and still referenced (its owner has not given it back). */
static __always_inline int slot_get(__u32 slot, __u32 gen)
{
	__u64 *w, old;
	int i;

	w = bpf_map_lookup_elem(&slot_state, &slot);
	if (!w)
		return -EINVAL;
	for (i = 0; i < 8; i++) {
		old = *(volatile __u64 *)w;
		if (SBP_SLOT_GEN(old) != gen || !SBP_SLOT_REFS(old))
			return -ESTALE;
		if (__sync_val_compare_and_swap(w, old, old + 1) == old)
			return 0;
	}
	REPORT(-EAGAIN);
	return -EAGAIN;
}

/* Drop a reference; the last one puts the slot back on the free list. */
static __always_inline void slot_put(__u32 slot, __u32 gen)
{
	__u64 *w, old;
	long err;
	int i;

	w = bpf_map_lookup_elem(&slot_state, &slot);
	if (!w) {
		REPORT(-EINVAL);
		return;
	}
	for (i = 0; i < 8; i++) {
		old = *(volatile __u64 *)w;
		if (SBP_SLOT_GEN(old) != gen || !SBP_SLOT_REFS(old)) {
			REPORT(-ESTALE);	/* a reference we never had */
			return;
		}
		if (__sync_val_compare_and_swap(w, old, old - 1) != old)
			continue;
		if (SBP_SLOT_REFS(old) == 1) {
			err = bpf_map_push_elem(&free_slots, &slot, 0);
			if (err)
				REPORT(err);
		}
		return;
	}
	REPORT(-EAGAIN);
}

static __always_inline void opt_fill(struct sbp_opt *o, __u32 status, __u32 slot,
				     __u32 gen, __u64 region_id)
{
	o->kind = SBP_OPT_KIND;
	o->len = SBP_OPT_LEN;
	o->exid = bpf_htons(SBP_OPT_EXID);
	o->ver_caps = SBP_OPT_VERSION << 4 | SBP_CAP_SHM_HOST;
	o->status = status;
	if (status) {
		o->slot = 0;
		o->gen = 0;
		o->region_id = 0;
	} else {
		o->slot = bpf_htons(slot);
		o->gen = bpf_htonl(gen);
		o->region_id = bpf_cpu_to_be64(region_id);
	}
}

/* Our option in the SYN (from_syn: the SYN that a SYN-ACK answers) or in
 * the packet at hand. 0 and *o in host byte order, -ENOMSG if absent,
 * -EPROTO if it is not a version we speak, other errors are ours. */
static __always_inline int opt_load(struct bpf_sock_ops *skops, int from_syn, struct sbp_opt *o)
{
	long ret;

	__builtin_memset(o, 0, sizeof(*o));
	o->kind = SBP_OPT_KIND;
	o->len = 4;			/* search by kind + 2-byte ExID */
	o->exid = bpf_htons(SBP_OPT_EXID);
	ret = bpf_load_hdr_opt(skops, o, sizeof(*o), from_syn ? BPF_LOAD_HDR_OPT_TCP_SYN : 0);
	if (ret == -ENOSPC)		/* longer than ours: not a version we know */
		return -EPROTO;
	if (ret < 0)
		return ret;
	if (ret != SBP_OPT_LEN || o->len != SBP_OPT_LEN ||
	    o->ver_caps >> 4 != SBP_OPT_VERSION || !(o->ver_caps & SBP_CAP_SHM_HOST))
		return -EPROTO;
	o->slot = bpf_ntohs(o->slot);
	o->gen = bpf_ntohl(o->gen);
	o->region_id = bpf_be64_to_cpu(o->region_id);
	if (o->status >= SBP_REASON__MAX)
		o->status = SBP_REASON_PEER_NOT_CAPABLE;
	return 0;
}

static __always_inline int opt_missing(long err)
{
	return err == -ENOMSG || err == -EPROTO;
}

/* Reservations expire through one sweeper timer, not a timer each: a
 * timer's first bpf_timer_init() allocates, and that allocation fails now
 * and then in softirq (seen here: 2 of 2000 SYN-ACKs). The sweeper is
 * allocated once (at the first marked listen) and armed while reservations
 * may be waiting; each pass frees the expired ones and re-arms for the
 * next deadline. */
struct sweep_ctx {
	__u64 now;
	__u64 next;		/* earliest deadline still ahead */
	__u64 left;		/* 1: some are still waiting (a flag: a count
				 * would keep the verifier from converging) */
};

static long sweep_one(struct bpf_map *map, struct sbp_resv_key *key, struct sbp_resv *r,
		      struct sweep_ctx *ctx)
{
	if (r->state == SBP_RESV_CLAIMED)
		return 0;			/* its child deletes it */
	if (r->expires > ctx->now) {
		ctx->left = 1;
		if (r->expires < ctx->next)
			ctx->next = r->expires;
		return 0;
	}
	/* A parked slot's time is up: the peer VM had tcp_fin_timeout to
	 * finish reading. */
	if (r->state == SBP_RESV_PARKED) {
		if (__sync_val_compare_and_swap(&r->state, SBP_RESV_PARKED, SBP_RESV_EXPIRED) ==
		    SBP_RESV_PARKED)
			slot_put(r->slot, r->gen);
		bpf_map_delete_elem(map, key);
		return 0;
	}
	/* The child socket never came (handshake abandoned, RST, SYN flood):
	 * give the slot back, unless the child claims it right now. */
	if (__sync_val_compare_and_swap(&r->state, SBP_RESV_RESERVED, SBP_RESV_EXPIRED) ==
	    SBP_RESV_RESERVED) {
		slot_put(r->slot, r->gen);
		count(SBP_CNT_RESV_EXPIRED, 1);
	}
	bpf_map_delete_elem(map, key);
	return 0;
}

static int sweep(void *map, __u32 *key, struct sbp_sweeper *sw)
{
	struct sweep_ctx ctx = { .now = bpf_ktime_get_ns(), .next = ~0ULL };
	long err;

	/* SYNC POINT: disarm before the walk. A reservation inserted after
	 * this re-arms the timer itself (sweeper_arm); one inserted before
	 * is seen by the walk. */
	__sync_val_compare_and_swap(&sw->armed, 1, 0);
	bpf_for_each_map_elem(&reservations, sweep_one, &ctx, 0);
	if (!ctx.left || __sync_val_compare_and_swap(&sw->armed, 0, 1) != 0)
		return 0;
	sw->at = ctx.next + 1000000;
	err = bpf_timer_start(&sw->timer, ctx.next - ctx.now + 1000000, 0);
	if (err) {
		sw->armed = 0;
		REPORT(err);
	}
	return 0;
}

static __always_inline struct sbp_sweeper *sweeper_ready(void)
{
	struct sbp_sweeper *sw;
	__u32 zero = 0;
	long err;

	sw = bpf_map_lookup_elem(&sweeper, &zero);
	if (!sw)
		return NULL;
	if (sw->ready)
		return sw;
	err = bpf_timer_init(&sw->timer, &sweeper, CLOCK_MONOTONIC);
	if (err && err != -EBUSY) {
		if (err != -ENOMEM)	/* ENOMEM: transient, tried again later */
			REPORT(err);
		return NULL;
	}
	err = bpf_timer_set_callback(&sw->timer, sweep);
	if (err) {
		REPORT(err);
		return NULL;
	}
	sw->ready = 1;
	return sw;
}

/* Make sure a sweep is pending. If the sweeper cannot be made ready (its
 * one allocation failed), the next SYN-ACK or listen tries again. */
static __always_inline void sweeper_arm(__u64 delay)
{
	struct sbp_sweeper *sw = sweeper_ready();
	__u64 at = bpf_ktime_get_ns() + delay;
	long err;

	if (!sw)
		return;
	if (__sync_val_compare_and_swap(&sw->armed, 0, 1) != 0) {
		/* Pending, maybe for a later deadline (a 180 s reservation,
		 * then a 60 s park): bring it forward. A sweep that comes
		 * early only re-arms for what is left. */
		if (at + 1000000 < sw->at) {
			sw->at = at;
			err = bpf_timer_start(&sw->timer, delay, 0);
			if (err)
				REPORT(err);
		}
		return;
	}
	sw->at = at;
	err = bpf_timer_start(&sw->timer, delay, 0);
	if (err) {
		sw->armed = 0;
		REPORT(err);
	}
}

static __always_inline __u64 resv_ttl(void)
{
	struct sbp_region_cfg *cfg = region_cfg();

	return cfg && cfg->resv_ttl_ns ? cfg->resv_ttl_ns : 180ULL * 1000000000ULL;
}

/* Record a SYN-ACK's answer for the child socket. Returns the entry, or
 * NULL if the table is full (or a twin SYN-ACK inserted it first). */
static __always_inline struct sbp_resv *resv_insert(struct sbp_resv_key *key, struct sbp_resv *val)
{
	__u64 ttl = resv_ttl();

	val->expires = bpf_ktime_get_ns() + ttl;
	if (bpf_map_update_elem(&reservations, key, val, BPF_NOEXIST))
		return NULL;
	sweeper_arm(ttl);
	return bpf_map_lookup_elem(&reservations, key);
}

static __always_inline void set_cb_flags(struct bpf_sock_ops *skops, __u32 set, __u32 clear)
{
	long err = bpf_sock_ops_cb_flags_set(skops, (skops->bpf_sock_ops_cb_flags | set) & ~clear);

	if (err)
		REPORT(err);
}

static __always_inline void listen_key(struct bpf_sock_ops *skops, struct sbp_listen_key *k)
{
	__builtin_memset(k, 0, sizeof(*k));
	k->netns = bpf_get_netns_cookie(skops);
	k->port = (__u16)skops->local_port;
}

/* A socket of the group starts listening: counted in `ports`, its close
 * watched. A marked one (it asked) asks for the SYN-ACK header callbacks
 * too (children inherit them, cleared when established). */
static __always_inline void handle_listen(struct bpf_sock_ops *skops)
{
	struct sbp_listen_key k;
	struct bpf_sock *sk = skops->sk;
	struct sbp_sk *st;
	int one_int = 1;
	long err;

	st = sk ? bpf_sk_storage_get(&sk_state, sk, NULL, BPF_SK_STORAGE_GET_F_CREATE) : NULL;
	if (!st)
		return;
	st->listed = SBP_LISTED_ANY;
	if (st->asked & SBP_ASK_SHM)
		st->listed |= SBP_LISTED_MARKED | (ident_allowed(&st->owner) ? SBP_LISTED_SHM : 0);
	listen_key(skops, &k);
	count_port(&k, 1, st->listed);
	set_cb_flags(skops, BPF_SOCK_OPS_STATE_CB_FLAG, 0);
	if (!(st->listed & SBP_LISTED_MARKED))
		return;
	/* A retransmitted SYN-ACK is built without the SYN at hand: keep a
	 * copy of it on each request sock so the answer can be rebuilt. */
	err = bpf_setsockopt(skops, SOL_TCP, TCP_SAVE_SYN, &one_int, sizeof(one_int));
	if (err)
		REPORT(err);
	set_cb_flags(skops, BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG, 0);
	sweeper_ready();	/* allocate the expiry timer now, not at a SYN-ACK */
}

/* A listener closes: what handle_listen counted goes. */
static __always_inline void forget_listener(struct bpf_sock_ops *skops, struct sbp_sk *st)
{
	struct sbp_listen_key k;

	listen_key(skops, &k);
	count_port(&k, -1, st->listed);
	st->listed = 0;
}

/* A marked socket connects: take the slot it will write, before its SYN
 * (a retransmitted SYN then carries the same one). */
static __always_inline void handle_connect(struct bpf_sock_ops *skops)
{
	struct bpf_sock *sk = skops->sk;
	struct sbp_region_cfg *cfg;
	struct sbp_sk *st;
	__u32 slot, gen;

	st = sk ? bpf_sk_storage_get(&sk_state, sk, NULL, 0) : NULL;
	if (!st || !(st->asked & SBP_ASK_SHM))
		return;
	/* Only toward a peer VM: on one host pairing needs no option. */
	st->vm = remote_is_vm_peer(skops);
	if (!st->vm)
		return;
	if (st->held)
		REPORT(-EBUSY);		/* connect() again without TCP_CLOSE? */
	st->tier = SBP_TIER_TCP;
	st->held = 0;
	cfg = region_cfg();
	if (draining()) {
		st->reason = SBP_REASON_DRAINING;
	} else if (!cfg || !cfg->region_id || slot_pop(&slot, &gen)) {
		st->reason = SBP_REASON_POOL_EXHAUSTED;
	} else {
		st->reason = SBP_REASON_NONE;
		st->tx_slot = slot;
		st->tx_gen = gen;
		st->region_id = cfg->region_id;
		st->held = SBP_HELD_TX;
		/* Allocate the sweeper here, in process context, for a guest
		 * that only connects: its closes may park slots. */
		sweeper_ready();
	}
	/* The option goes out even without a slot: it tells a marked peer
	 * why, so both ends record the same reason. STATE_CB gives the slot
	 * back if the connect fails. */
	set_cb_flags(skops, BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG | BPF_SOCK_OPS_STATE_CB_FLAG, 0);
}

static __always_inline void syn_opt_len(struct bpf_sock_ops *skops)
{
	struct bpf_sock *sk = skops->sk;
	struct sbp_sk *st;
	long err;

	st = sk ? bpf_sk_storage_get(&sk_state, sk, NULL, 0) : NULL;
	if (!st || !st->vm)
		return;
	err = bpf_reserve_hdr_opt(skops, SBP_OPT_LEN, 0);
	if (err == -ENOSPC)
		st->reason = SBP_REASON_NO_OPTION_SPACE;	/* e.g. MD5 or a TFO cookie */
	else if (err)
		REPORT(err);
}

static __always_inline void syn_opt_write(struct bpf_sock_ops *skops)
{
	struct bpf_sock *sk = skops->sk;
	struct sbp_opt o = {};
	struct sbp_sk *st;
	long err;

	st = sk ? bpf_sk_storage_get(&sk_state, sk, NULL, 0) : NULL;
	if (!st || !st->vm)
		return;
	if (st->held & SBP_HELD_TX)
		opt_fill(&o, 0, st->tx_slot, (__u32)st->tx_gen, st->region_id);
	else
		opt_fill(&o, st->reason ? st->reason : SBP_REASON_POOL_EXHAUSTED, 0, 0, 0);
	err = bpf_store_hdr_opt(skops, &o, sizeof(o), 0);
	if (err)
		REPORT(err);
}

static __always_inline int listener_marked(struct bpf_sock_ops *skops)
{
	struct sbp_listen_key k;
	struct sbp_port_count *n;

	listen_key(skops, &k);
	n = bpf_map_lookup_elem(&ports, &k);
	return n && n->marked;
}

/* A SYN-ACK carries an answer only toward a peer VM, from a marked
 * listener, to a SYN that carried the option (loaded into *o). */
static __always_inline int synack_answers(struct bpf_sock_ops *skops, struct sbp_opt *o)
{
	long err;

	if (!listener_marked(skops) || !remote_is_vm_peer(skops))
		return 0;
	err = opt_load(skops, 1, o);
	if (err && !opt_missing(err))
		REPORT(err);
	return !err;
}

/* SYN-ACK, first pass: room for an answer only if the SYN asked (so an
 * unmarked peer never sees the option) and the listener is marked. */
static __always_inline void synack_opt_len(struct bpf_sock_ops *skops)
{
	struct sbp_opt o;
	long err;

	if (!synack_answers(skops, &o))
		return;
	err = bpf_reserve_hdr_opt(skops, SBP_OPT_LEN, 0);
	if (err && err != -ENOSPC)	/* no room: no answer, both ends fall back */
		REPORT(err);
}

static __always_inline void resv_key_req(struct bpf_sock_ops *skops, __u32 ack_seq,
					 struct sbp_resv_key *key)
{
	__builtin_memset(key, 0, sizeof(*key));
	remote_ip(skops, key->conn.a_ip);
	local_ip(skops, key->conn.b_ip);
	key->conn.a_port = (__u16)bpf_ntohl(skops->remote_port);
	key->conn.b_port = (__u16)skops->local_port;
	key->conn.a_isn = ack_seq;	/* peer ISN + 1 = the child's rcv_nxt */
	key->netns = bpf_get_netns_cookie(skops);
}

/* SYN-ACK, second pass: decide, reserve, answer. The header is written by
 * now, so its ack_seq gives the peer's ISN for the reservation's key. */
static __always_inline void synack_opt_write(struct bpf_sock_ops *skops)
{
	struct sbp_resv val = {}, *r;
	__u32 *was;
	struct sbp_region_cfg *cfg;
	struct sbp_resv_key key;
	struct sbp_opt o, out = {};
	struct tcphdr *th;
	__u32 status, slot, gen;
	long err;

	if (!synack_answers(skops, &o))
		return;
	th = (struct tcphdr *)(long)skops->skb_data;
	if ((void *)(th + 1) > (void *)(long)skops->skb_data_end) {
		REPORT(-EINVAL);
		return;
	}
	resv_key_req(skops, bpf_ntohl(th->ack_seq), &key);

	cfg = region_cfg();
	status = SBP_REASON_NONE;
	if (o.status)
		status = o.status;			/* the peer has no slot: echo why */
	else if (!cfg || !cfg->region_id)
		status = SBP_REASON_POOL_EXHAUSTED;
	else if (o.region_id != cfg->region_id)
		status = SBP_REASON_DIFFERENT_REGION;
	else if (skops->args[0] & BPF_WRITE_HDR_TCP_SYNACK_COOKIE)
		status = SBP_REASON_POOL_EXHAUSTED;	/* SYN flood: reserve nothing */
	else if (draining())
		status = SBP_REASON_DRAINING;

	r = bpf_map_lookup_elem(&reservations, &key);
	if (r) {
		/* A retransmitted SYN-ACK (or one for a retransmitted SYN):
		 * the same answer as the first time. */
		if (r->state == SBP_RESV_RESERVED) {
			r->expires = bpf_ktime_get_ns() + resv_ttl();
			sweeper_arm(resv_ttl());
			opt_fill(&out, 0, r->slot, r->gen, r->region_id);
		} else {
			opt_fill(&out, SBP_REASON_POOL_EXHAUSTED, 0, 0, 0);
		}
		goto store;
	}
	was = bpf_map_lookup_elem(&declined, &key);
	if (was) {
		opt_fill(&out, *was, 0, 0, 0);  /* declined the first time: again */
		goto store;
	}

	if (status == SBP_REASON_NONE) {
		if (slot_pop(&slot, &gen)) {
			status = SBP_REASON_POOL_EXHAUSTED;
		} else {
			val.state = SBP_RESV_RESERVED;
			val.slot = slot;
			val.gen = gen;
			val.peer_slot = o.slot;
			val.peer_gen = o.gen;
			val.region_id = cfg ? cfg->region_id : 0;
			r = resv_insert(&key, &val);
			if (!r) {
				/* Table full (flood), or a twin SYN-ACK won the race. */
				slot_put(slot, gen);
				r = bpf_map_lookup_elem(&reservations, &key);
				if (r && r->state == SBP_RESV_RESERVED) {
					opt_fill(&out, 0, r->slot, r->gen, r->region_id);
					goto store;
				}
				status = SBP_REASON_POOL_EXHAUSTED;
			} else {
				opt_fill(&out, 0, slot, gen, val.region_id);
				goto store;
			}
		}
	}
	/* Declined: remember why, so the child records the same reason. */
	bpf_map_update_elem(&declined, &key, &status, BPF_ANY);
	opt_fill(&out, status, 0, 0, 0);
store:
	err = bpf_store_hdr_opt(skops, &out, sizeof(out), 0);
	if (err)
		REPORT(err);
}

/* The option rides on SYN and SYN-ACK only (no skb, flags 0: the MSS
 * estimate): write 0 reserves its space, write 1 writes it. */
static __always_inline void handle_hdr_opt(struct bpf_sock_ops *skops, int write)
{
	__u8 flags = skops->skb_tcp_flags;

	if ((flags & (TCPHDR_SYN | TCPHDR_ACK)) == (TCPHDR_SYN | TCPHDR_ACK)) {
		if (write)
			synack_opt_write(skops);
		else
			synack_opt_len(skops);
	} else if (flags & TCPHDR_SYN) {
		if (write)
			syn_opt_write(skops);
		else
			syn_opt_len(skops);
	}
}

/* Give back the slot references a socket holds (at TCP_CLOSE, or when the
 * handshake ends outside the shm tier). */
static __always_inline void release_slots(struct sbp_sk *st)
{
	if (st->held & SBP_HELD_TX)
		slot_put(st->tx_slot, (__u32)st->tx_gen);
	if (st->held & SBP_HELD_RX)
		slot_put(st->rx_slot, (__u32)st->rx_gen);
	st->held = 0;
}

/* TCP_CLOSE of a socket whose peer is another VM (its rx slot is in the
 * other kernel's part): that kernel holds no reference on our tx slot, so
 * ours would go back on the free list now, while the peer VM may still be
 * reading it. Free it now only after a clean close, where the peer's FIN
 * came (it closed: done reading): the socket leaves LAST_ACK or CLOSING,
 * or FIN_WAIT2 with no error (the interposer sets TCP_LINGER2 over 60 s on
 * such sockets, so an orphan leaves FIN_WAIT2 only at the peer's FIN or
 * after 60 s, not at the ACK of its own FIN). Anything else (a reset either
 * way, an abortive close, a kill): park the slot for SBP_PARK_TTL_NS in
 * `reservations`, and the sweeper frees it. 1 if parked. */
static __always_inline int park_tx_slot(struct bpf_sock_ops *skops, struct sbp_sk *st)
{
	struct sbp_resv_key key = {};
	struct sbp_resv val = {};
	struct bpf_sock *sk = skops->sk;
	struct tcp_sock *tp;
	__u32 old = skops->args[0];
	int err = 0;

	if (st->tier != SBP_TIER_SHM || !(st->held & SBP_HELD_TX) || slot_is_ours(st->rx_slot))
		return 0;
	tp = sk ? bpf_skc_to_tcp_sock(sk) : NULL;
	if (tp)
		err = tp->inet_conn.icsk_inet.sk.sk_err;
	if (!err && (old == BPF_TCP_LAST_ACK || old == BPF_TCP_CLOSING || old == BPF_TCP_FIN_WAIT2))
		return 0;
	if (!sweeper_ready())
		return 0;		/* nothing could ever free it: free it now */
	key.netns = SBP_PARK_NETNS;
	key.conn.a_isn = st->tx_slot;
	val.state = SBP_RESV_PARKED;
	val.slot = st->tx_slot;
	val.gen = (__u32)st->tx_gen;
	val.expires = bpf_ktime_get_ns() + SBP_PARK_TTL_NS;
	if (bpf_map_update_elem(&reservations, &key, &val, BPF_NOEXIST))
		return 0;		/* table full: free it now */
	sweeper_arm(SBP_PARK_TTL_NS);
	st->held &= ~SBP_HELD_TX;	/* the parked entry holds the reference */
	count(SBP_CNT_SLOT_PARKED, 1);
	return 1;
}

/* ACTIVE_ESTABLISHED: the SYN-ACK's answer decides. 1 if shm. */
static __always_inline int shm_active(struct bpf_sock_ops *skops, struct sbp_sk *st)
{
	struct sbp_opt o;
	long err;

	if (!st->vm)
		return 0;
	st->tier = SBP_TIER_TCP;
	if (!(st->held & SBP_HELD_TX))
		return 0;			/* reason set at connect */
	err = opt_load(skops, 0, &o);
	if (err) {
		if (!opt_missing(err))
			REPORT(err);
		if (st->reason != SBP_REASON_NO_OPTION_SPACE)
			st->reason = SBP_REASON_PEER_NOT_CAPABLE;
		goto fallback;
	}
	if (o.status) {
		st->reason = o.status;
		goto fallback;
	}
	if (o.region_id != st->region_id) {
		st->reason = SBP_REASON_DIFFERENT_REGION;	/* a peer breaking the protocol */
		goto fallback;
	}
	/* The peer's slot, while its reservation still holds it (on one
	 * host; another VM's slot is that VM's business). */
	if (slot_is_ours(o.slot)) {
		if (slot_get(o.slot, o.gen)) {
			st->reason = SBP_REASON_PEER_CLOSED;
			goto fallback;
		}
		st->held |= SBP_HELD_RX;
	}
	st->rx_slot = o.slot;
	st->rx_gen = o.gen;
	st->tier = SBP_TIER_SHM;
	st->reason = SBP_REASON_NONE;
	return 1;
fallback:
	release_slots(st);
	return 0;
}

/* PASSIVE_ESTABLISHED: claim what the SYN-ACK promised. The reservation is
 * looked up even if the child is not marked: the peer already acted on the
 * answer. 1 if shm. */
static __always_inline int shm_passive(struct bpf_sock_ops *skops, struct sbp_sk *st,
				       const struct sbp_conn_key *ck, __u64 netns)
{
	struct sbp_resv_key key = {};
	struct sbp_resv *r;
	__u32 *reason;
	__u32 slot, gen, peer_slot, peer_gen;
	__u64 region_id;

	key.conn = *ck;
	key.conn.b_isn = 0;
	key.netns = netns;
	r = bpf_map_lookup_elem(&reservations, &key);
	reason = r ? NULL : bpf_map_lookup_elem(&declined, &key);
	if (reason) {
		st->vm = 1;
		st->tier = SBP_TIER_TCP;
		st->reason = *reason;
		bpf_map_delete_elem(&declined, &key);
		return 0;
	}
	if (!r) {
		/* Not a VM pair's handshake. If this end asked and its peer is
		 * a VM, the SYN had no option (that end did not ask, or has no
		 * region): say so, as the connecting end would. */
		if ((st->asked & SBP_ASK_SHM) && remote_is_vm_peer(skops)) {
			st->vm = 1;
			st->tier = SBP_TIER_TCP;
			st->reason = SBP_REASON_PEER_NOT_CAPABLE;
		}
		return 0;
	}
	st->vm = 1;
	st->tier = SBP_TIER_TCP;
	st->reason = SBP_REASON_PEER_NOT_CAPABLE;
	/* Read before the claim: once the sweeper has deleted an entry its
	 * memory may hold another one. */
	slot = r->slot;
	gen = r->gen;
	peer_slot = r->peer_slot;
	peer_gen = r->peer_gen;
	region_id = r->region_id;
	if (__sync_val_compare_and_swap(&r->state, SBP_RESV_RESERVED, SBP_RESV_CLAIMED) !=
	    SBP_RESV_RESERVED) {
		st->reason = SBP_REASON_PEER_CLOSED;	/* expired under our feet */
		return 0;
	}
	/* The reservation's reference on our slot is now the child's. */
	bpf_map_delete_elem(&reservations, &key);
	st->held = SBP_HELD_TX;
	if (slot_is_ours(peer_slot)) {
		if (slot_get(peer_slot, peer_gen)) {
			/* The connecting socket is already gone (and gave its slot back). */
			slot_put(slot, gen);
			st->held = 0;
			st->reason = SBP_REASON_PEER_CLOSED;
			return 0;
		}
		st->held |= SBP_HELD_RX;
	}
	st->tx_slot = slot;
	st->tx_gen = gen;
	st->rx_slot = peer_slot;
	st->rx_gen = peer_gen;
	st->region_id = region_id;
	st->tier = SBP_TIER_SHM;
	st->reason = SBP_REASON_NONE;
	return 1;
}

/* A SYN reached a listener of the group: the request sock's RWND_INIT runs
 * (in the listener's cgroup) before the SYN-ACK leaves. */
static __always_inline void handle_syn(struct bpf_sock_ops *skops)
{
	struct syn_key k = {};
	__u64 one = 1, *n;

	remote_ip(skops, k.a_ip);
	local_ip(skops, k.b_ip);
	k.a_port = (__u16)bpf_ntohl(skops->remote_port);
	k.b_port = (__u16)skops->local_port;
	n = bpf_map_lookup_elem(&syn_seen, &k);
	if (n)
		__sync_fetch_and_add(n, 1);
	else
		bpf_map_update_elem(&syn_seen, &k, &one, BPF_ANY);
}

#endif
