/* SPDX-License-Identifier: GPL-2.0 */
/* Maps and helpers shared by the BPF objects that run together: the core
 * (bypass.bpf.c) and the ask programs (ask.bpf.c). The manager creates them
 * with the core and hands them to ask.bpf.o (bpf_map__reuse_fd), so each
 * definition here must be the one both objects see. BPF-only. */
#ifndef SHMBYPASS_SHARED_H
#define SHMBYPASS_SHARED_H

#define EPERM 1
#define ENOENT 2
#define EINVAL 22
#define ENOMEM 12
#define EBUSY 16
#define ENOSPC 28
#define ENOMSG 42
#define EPROTO 71
#define ESTALE 116
#define EAGAIN 11

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

/* Policy (docs/NEGOTIATION.md, "Policy"): who may pair in the shm tier,
 * by the identity the kernel reports; which connections stay on TCP. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct sbp_policy);
} policy SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, struct sbp_allow_key);
	__type(value, __u32);
} allowed SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, SBP_CNT__MAX);
	__type(key, __u32);
	__type(value, __u64);
} counters SEC(".maps");

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

/* May this identity use the shm tier? Root, or an allowed uid or gid. */
static __always_inline int ident_allowed(const struct sbp_ident *id)
{
	struct sbp_allow_key k = {};
	struct sbp_policy *p;
	__u32 zero = 0;

	if (!id->tgid)
		return 0;			/* nobody asked */
	p = bpf_map_lookup_elem(&policy, &zero);
	if (p && (p->flags & SBP_POLICY_ANY_USER))
		return 1;
	if (id->uid == 0)
		return 1;
	k.kind = SBP_ALLOW_UID;
	k.id = id->uid;
	if (bpf_map_lookup_elem(&allowed, &k))
		return 1;
	k.kind = SBP_ALLOW_GID;
	k.id = id->gid;
	return bpf_map_lookup_elem(&allowed, &k) != NULL;
}

#endif
