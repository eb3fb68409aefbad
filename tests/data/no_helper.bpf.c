// SPDX-License-Identifier: GPL-2.0
/* Stands in for a kernel that lacks what shmbypass needs: same program and
 * map names as bpf/bypass.bpf.c, but sbp_msg calls a helper sk_msg may not
 * use, so the verifier refuses it the way an older kernel refuses ours. */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>

char LICENSE[] SEC("license") = "GPL";

SEC("sockops")
int sbp_sockops(struct bpf_sock_ops *skops)
{
	return 1;
}

SEC("sk_msg")
int sbp_msg(struct sk_msg_md *msg)
{
	return bpf_get_socket_cookie(msg) ? SK_PASS : SK_DROP;
}
