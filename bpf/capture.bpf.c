// SPDX-License-Identifier: GPL-2.0
/*
 * Optional: `shmbypass capture` of the kernel tier (docs/CAPTURE.md).
 *
 * The kernel tier's payload never crosses the TCP stack, so no packet of it
 * exists. These two programs record what a capture needs to rebuild the
 * packets TCP would have sent, into one ring buffer that the capture command
 * reads:
 * - sbp_capture_msg (sk_msg): the bytes of each redirected send, in records
 *   of SBP_CAP_CHUNK bytes, with the sender's cookie and its stream offset.
 *   The core's sk_msg tail-calls it after the redirect, only while a capture
 *   runs (bpf/capture.h).
 * - sbp_capture_ops (sockops, attached next to the core's by the capture
 *   command for as long as it runs): each socket's ESTABLISHED (the
 *   connection: addresses, ports, both ISNs) and its FIN and RST.
 *
 * A record that does not fit (ring full, a send longer than
 * SBP_CAP_MAX_CHUNKS records) is counted (SBP_CNT_CAPTURE_DROPPED*), never
 * waited for: the application never blocks on a capture.
 *
 * Loaded by the capture command apart from the core (a kernel that refuses
 * it loses the capture only); its maps are the core's (shared.h).
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include "bypass.h"
#include "shared.h"
#include "capture.h"

char LICENSE[] SEC("license") = "GPL";

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 16 << 20);	/* the command sets its own size */
} capture_ring SEC(".maps");

/* A record is built here, then copied into the ring whole (the ring's
 * helpers take no packet memory, and a reserved record has a fixed size). */
struct cap_scratch {
	struct sbp_cap_rec rec;
	__u8 data[SBP_CAP_CHUNK];
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct cap_scratch);
} capture_scratch SEC(".maps");

/* Records (of SBP_CAP_CHUNK data bytes at most) not written, and their bytes. */
static __always_inline void dropped(__u64 records, __u64 bytes)
{
	count(SBP_CNT_CAPTURE_DROPPED, records);
	count(SBP_CNT_CAPTURE_DROPPED_BYTES, bytes);
}

static __always_inline __u64 records_of(__u64 bytes)
{
	return (bytes + SBP_CAP_CHUNK - 1) / SBP_CAP_CHUNK;
}

/* Copy n (<= SBP_CAP_CHUNK) bytes of the message into dst, one
 * power-of-two block per bit of n. Written for the verifier, which must not
 * walk 2^13 paths: after each block its state must be the same whether the
 * block copied or not. So a block's offset is computed from n alone (the
 * bits above it), never from the blocks before it; the test is on a copy of
 * the bit (a test of n itself would teach the verifier n's bit); and each
 * block loads the message pointers afresh (a pointer that lives on would
 * carry the range a block proved). 8-byte moves: the JIT's loads do not
 * care about alignment on the architectures that run this. */
#define MSG_PTR(field) ((void *)(long)*(volatile __u64 *)&msg->field)

#define COPY_WORDS(d, s, b)                                                    \
	do {                                                                   \
		_Pragma("unroll") for (int _i = 0; _i < (b) / 8; _i++)       \
			((__u64 *)(d))[_i] = ((const __u64 *)(s))[_i];        \
	} while (0)

#define COPY_BLOCK(b, T)                                                       \
	do {                                                                   \
		__u32 bit = n & (b);                                           \
		asm volatile("" : "+r"(bit));                                 \
		if (bit) {                                                     \
			__u32 o = n & ~(2 * (b) - 1) & (SBP_CAP_CHUNK - 1);    \
			void *s = MSG_PTR(data) + o;                           \
			if (s + (b) > MSG_PTR(data_end))                       \
				return -1;                                     \
			if ((b) >= 8)                                          \
				COPY_WORDS(dst + o, s, b);                     \
			else                                                   \
				*(T *)(dst + o) = *(const T *)s;               \
		}                                                              \
	} while (0)

static __always_inline int copy_msg(__u8 *dst, struct sk_msg_md *msg, __u32 n)
{
	COPY_BLOCK(4096, __u64);
	COPY_BLOCK(2048, __u64);
	COPY_BLOCK(1024, __u64);
	COPY_BLOCK(512, __u64);
	COPY_BLOCK(256, __u64);
	COPY_BLOCK(128, __u64);
	COPY_BLOCK(64, __u64);
	COPY_BLOCK(32, __u64);
	COPY_BLOCK(16, __u64);
	COPY_BLOCK(8, __u64);
	COPY_BLOCK(4, __u32);
	COPY_BLOCK(2, __u16);
	COPY_BLOCK(1, __u8);
	return 0;
}

_Static_assert(SBP_CAP_CHUNK == 4096, "copy_msg's blocks cover SBP_CAP_CHUNK");

/* What one send's records share (bpf_loop's context). */
struct cap_send {
	struct sk_msg_md *msg;
	struct cap_scratch *sc;
	__u64 ts;
	__u64 cookie;
	__u64 offset;		/* of the send's first byte */
	__u32 size;
};

/* Record i of a send: bytes [i * SBP_CAP_CHUNK, + SBP_CAP_CHUNK). 1 stops. */
static long send_chunk(__u32 i, struct cap_send *x)
{
	struct sk_msg_md *msg = x->msg;
	struct cap_scratch *sc = x->sc;
	__u32 start = i * SBP_CAP_CHUNK, n;

	if (start >= x->size)
		return 1;
	n = x->size - start;
	if (n > SBP_CAP_CHUNK)
		n = SBP_CAP_CHUNK;
	/* Makes [start, start + n) one piece at data (a copy only if it
	 * spans two pieces of the message, or for spliced pages). */
	if (bpf_msg_pull_data(msg, start, start + n, 0) || copy_msg(sc->data, msg, n)) {
		dropped(records_of(x->size - start), x->size - start);
		return 1;
	}
	sc->rec.ts = x->ts;
	sc->rec.cookie = x->cookie;
	sc->rec.offset = x->offset + start;
	sc->rec.len = n;
	sc->rec.kind = SBP_CAP_DATA;
	sc->rec.flags = start + n >= x->size ? SBP_CAP_F_PUSH : 0;
	if (bpf_ringbuf_output(&capture_ring, sc, sizeof(sc->rec) + n, 0))
		dropped(1, n);
	return 0;
}

SEC("sk_msg")
int sbp_capture_msg(struct sk_msg_md *msg)
{
	struct cap_send x = { .msg = msg, .ts = bpf_ktime_get_ns(), .size = msg->size };
	struct bpf_sock *sk = msg->sk;
	struct sbp_conn *c;
	struct sbp_sk *st;
	__u32 zero = 0, chunks;

	st = sk ? bpf_sk_storage_get(&sk_state, sk, NULL, 0) : NULL;
	c = st ? bpf_map_lookup_elem(&conns, &st->cookie) : NULL;
	x.sc = bpf_map_lookup_elem(&capture_scratch, &zero);
	if (!st || !c || !x.sc) {
		dropped(records_of(x.size), x.size);
		return SK_PASS;
	}
	x.cookie = st->cookie;
	/* The core counted this send already; sends on one socket are
	 * serialized by its lock, so this is where the send starts. */
	x.offset = c->bytes_tx - x.size;
	chunks = records_of(x.size);
	/* A reader that fell behind: drop the whole send now, before copying
	 * it (a send is kept whole or not at all, unless producers race). */
	if (bpf_ringbuf_query(&capture_ring, BPF_RB_AVAIL_DATA) + x.size +
	    chunks * (sizeof(struct sbp_cap_rec) + 8) > bpf_ringbuf_query(&capture_ring, BPF_RB_RING_SIZE)) {
		dropped(chunks, x.size);
		return SK_PASS;
	}
	if (chunks > SBP_CAP_MAX_CHUNKS) {
		dropped(chunks - SBP_CAP_MAX_CHUNKS, x.size - SBP_CAP_MAX_CHUNKS * SBP_CAP_CHUNK);
		chunks = SBP_CAP_MAX_CHUNKS;
	}
	bpf_loop(chunks, send_chunk, &x, 0);
	return SK_PASS;
}

struct cap_event {
	struct sbp_cap_rec rec;
	struct sbp_cap_conn conn;
};

/* One OPEN or STATE record: the connection as `conns` has it now. */
static __always_inline void emit(struct bpf_sock_ops *skops, __u16 kind, __u32 old, __u32 new)
{
	__u64 cookie = bpf_get_socket_cookie(skops);
	struct bpf_sock *sk = skops->sk;
	struct cap_event *ev;
	struct tcp_sock *tp;
	struct sbp_conn *c;

	c = bpf_map_lookup_elem(&conns, &cookie);
	if (!c && kind == SBP_CAP_OPEN)
		return;			/* not a connection the bypass knows */
	ev = bpf_ringbuf_reserve(&capture_ring, sizeof(*ev), 0);
	if (!ev) {
		dropped(1, 0);
		return;
	}
	__builtin_memset(ev, 0, sizeof(*ev));
	ev->rec.ts = bpf_ktime_get_ns();
	ev->rec.cookie = cookie;
	ev->rec.len = sizeof(ev->conn);
	ev->rec.kind = kind;
	if (c) {
		ev->conn.key = c->key;
		ev->conn.active = c->active;
		ev->conn.family = c->family;
		ev->conn.tier = c->tier;
		ev->conn.uid = c->owner.uid;
		ev->rec.offset = c->bytes_tx;	/* where its FIN goes (kernel tier) */
	} else {
		ev->rec.flags = SBP_CAP_F_NOKEY;	/* the core forgot it at TCP_CLOSE */
	}
	ev->conn.mss = skops->mss_cache;
	ev->conn.old_state = old;
	ev->conn.new_state = new;
	tp = sk ? bpf_skc_to_tcp_sock(sk) : NULL;
	if (tp)
		ev->conn.err = tp->inet_conn.icsk_inet.sk.sk_err;
	bpf_ringbuf_submit(ev, 0);
}

/* The state changes that are packets: a FIN sent (-> FIN_WAIT1, or
 * CLOSE_WAIT -> LAST_ACK) and the end of a connection (-> CLOSE: after a
 * reset either way, or the normal end, which user space tells apart). */
static __always_inline int state_matters(__u32 old, __u32 new)
{
	if (old == BPF_TCP_LISTEN || old == BPF_TCP_SYN_SENT || old == BPF_TCP_SYN_RECV ||
	    old == BPF_TCP_NEW_SYN_RECV || old == BPF_TCP_CLOSE)
		return 0;
	return new == BPF_TCP_FIN_WAIT1 || new == BPF_TCP_LAST_ACK || new == BPF_TCP_CLOSE;
}

SEC("sockops")
int sbp_capture_ops(struct bpf_sock_ops *skops)
{
	switch (skops->op) {
	case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB:
	case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB:
		emit(skops, SBP_CAP_OPEN, 0, BPF_TCP_ESTABLISHED);
		break;
	case BPF_SOCK_OPS_STATE_CB:
		if (state_matters(skops->args[0], skops->args[1]))
			emit(skops, SBP_CAP_STATE, skops->args[0], skops->args[1]);
		break;
	}
	return 1;
}
