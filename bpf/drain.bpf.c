// SPDX-License-Identifier: GPL-2.0
/*
 * Optional: how many redirected bytes each kernel-tier socket still holds
 * unread. `shmbypass down` waits for these to reach zero before it drops
 * the sockhash, because dropping a socket from it discards that queue.
 *
 * Two iterators, each loaded on its own (some kernels refuse one and not
 * the other: docs/ARCHITECTURE.md, "Kernels differ"):
 * - sbp_drain (iter/sockmap) walks our sockhash: every namespace;
 * - sbp_drain_tcp (iter/tcp) walks the TCP sockets of the network namespace
 *   of the process that reads it; user space keeps only our sockets' cookies.
 * Neither touches a map, so this object loads apart from the core.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include "bypass.h"

char LICENSE[] SEC("license") = "GPL";

#define SK_USER_DATA_PTRMASK (~7UL)

/* Bytes queued on a socket's psock, 0 without one. Older kernels (the 6.1
 * of the VM guests) keep no byte count: 1 while the queue is not empty. */
static __always_inline __u32 psock_queued(struct sock *sk)
{
	struct sk_psock *psock;
	void *ud;

	ud = BPF_CORE_READ(sk, sk_user_data);
	psock = (struct sk_psock *)((unsigned long)ud & SK_USER_DATA_PTRMASK);
	if (!psock)
		return 0;
	if (bpf_core_field_exists(psock->msg_tot_len))
		return BPF_CORE_READ(psock, msg_tot_len);
	return BPF_CORE_READ(psock, ingress_msg.next) != &psock->ingress_msg;
}

SEC("iter/sockmap")
int sbp_drain(struct bpf_iter__sockmap *ctx)
{
	struct sbp_drain_rec rec = {};
	struct sock *sk = ctx->sk;
	__u64 *key = ctx->key;

	if (!sk || !key)
		return 0;
	rec.cookie = *key;
	rec.queued = psock_queued(sk);
	bpf_seq_write(ctx->meta->seq, &rec, sizeof(rec));
	return 0;
}

/* sk_user_data of a socket that is not ours may be something else than a
 * psock: the value read is then meaningless, and user space drops it (its
 * cookie is not one of ours; a socket nobody asked the cookie of has 0). */
SEC("iter/tcp")
int sbp_drain_tcp(struct bpf_iter__tcp *ctx)
{
	struct sock_common *skc = ctx->sk_common;
	struct sbp_drain_rec rec = {};
	struct tcp_sock *tp;

	if (!skc)
		return 0;
	tp = bpf_skc_to_tcp_sock(skc);
	if (!tp)
		return 0;
	rec.cookie = BPF_CORE_READ(skc, skc_cookie.counter);
	if (!rec.cookie)
		return 0;
	rec.queued = psock_queued((struct sock *)tp);
	bpf_seq_write(ctx->meta->seq, &rec, sizeof(rec));
	return 0;
}
