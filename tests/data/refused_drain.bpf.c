// SPDX-License-Identifier: GPL-2.0
/* Stands in for a kernel that refuses the optional drain iterators: the
 * same program names and sections as bpf/drain.bpf.c, but each calls a
 * helper iterators may not use, so the verifier refuses both. */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>

char LICENSE[] SEC("license") = "GPL";

SEC("iter/sockmap")
int sbp_drain(struct bpf_iter__sockmap *ctx)
{
	return bpf_skb_load_bytes((void *)ctx, 0, (void *)0, 0) ? 0 : 1;
}

SEC("iter/tcp")
int sbp_drain_tcp(struct bpf_iter__tcp *ctx)
{
	return bpf_skb_load_bytes((void *)ctx, 0, (void *)0, 0) ? 0 : 1;
}
