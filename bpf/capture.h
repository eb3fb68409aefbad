/* SPDX-License-Identifier: GPL-2.0 */
/*
 * `shmbypass capture` (docs/CAPTURE.md): what the kernel tier's capture
 * program (bpf/capture.bpf.c) and the shm tier's interposer
 * (native/preload/capture.c) record, and the files the interposer writes
 * into. Shared by BPF, the interposer and the Python side (cffi); the
 * core's hook (a program array and one branch) is at the end, BPF only.
 *
 * One record format for both tiers: struct sbp_cap_rec, then its data.
 */
#ifndef SHMBYPASS_CAPTURE_H
#define SHMBYPASS_CAPTURE_H

#include "bypass.h"

#define SBP_CAP_DATA 1		/* bytes a socket sent */
#define SBP_CAP_OPEN 2		/* a socket reached ESTABLISHED (sockops) */
#define SBP_CAP_STATE 3		/* an established socket changed TCP state (sockops) */

#define SBP_CAP_F_PUSH 1	/* DATA: the last record of one send */
#define SBP_CAP_F_NOKEY 2	/* OPEN/STATE: no conns row (gone, or never made) */
#define SBP_CAP_F_RX 4		/* DATA: bytes the socket received, not sent */

/* capture_data()'s dir (native/preload/capture.h): whose bytes they are. */
#define SBP_CAP_TX 0		/* the socket sent them (the send path) */
#define SBP_CAP_RX 1		/* the socket received them */

#define SBP_CAP_CHUNK 4096	/* kernel tier: data bytes per record */
#define SBP_CAP_MAX_CHUNKS 1024	/* kernel tier: records per send (4 MiB); the rest is dropped */

struct sbp_cap_rec {
	__u64 ts;		/* CLOCK_MONOTONIC ns */
	__u64 cookie;		/* the socket (DATA: the one that sent) */
	__u64 offset;		/* DATA: bytes that socket sent (F_RX: received) on
				 * the connection before data[0]: its sequence
				 * number is ISN + 1 + offset. STATE: bytes the
				 * kernel tier moved for it (conns' bytes_tx) */
	__u32 len;		/* bytes after this header: DATA its bytes, OPEN and
				 * STATE a struct sbp_cap_conn */
	__u16 kind;		/* SBP_CAP_* */
	__u16 flags;		/* SBP_CAP_F_* */
};

/* The body of OPEN and STATE records: the connection as `conns` has it
 * (so a connection that closes before user space looks is still known). */
struct sbp_cap_conn {
	struct sbp_conn_key key;	/* zero with SBP_CAP_F_NOKEY */
	__u32 active;		/* 1: this socket connected */
	__u32 family;
	__u32 tier;		/* enum sbp_tier as decided so far */
	__u32 mss;		/* the socket's MSS (mss_cache) */
	__u32 old_state;	/* STATE: BPF_TCP_* before and after */
	__u32 new_state;
	__u32 err;		/* STATE: sk_err (ECONNRESET: the peer sent an RST) */
	__u32 uid;		/* who asked for the socket (conns' owner.uid) */
};

/* ---- the shm tier: files the capture command and the interposer share ----
 *
 * /run/<instance>/capture: root's, mode 0644, made at `up`; every
 * interposed process maps it read-only at start, so "is a capture on?" is
 * one load. A capture sets `on` and bumps `generation`. */
#define SBP_CAPCTL_MAGIC 0x53424343u	/* "SBCC" */
#define SBP_CAP_VERSION 1

struct sbp_cap_ctl {
	__u32 magic;
	__u32 version;
	__u32 on;		/* 1 while a capture runs */
	__u32 generation;	/* one per capture: each has new rings */
	__u64 ring_bytes;	/* the data area of each process's ring */
	__u64 lease_ns;		/* CLOCK_MONOTONIC: writers stop after it (the
				 * capture renews it; one that was killed does not) */
};

/* /run/<instance>/capture.d/<pid>-<generation>: one ring per process,
 * made by that process (its uid, mode 0600) at its first captured send;
 * threads share it (multi-producer), the capture command reads it. Every
 * byte in it is the writer's to forge: the reader trusts nothing (a ring
 * only ever speaks for connections owned by the file's uid). */
#define SBP_CAPRING_MAGIC 0x53424352u	/* "SBCR" */
#define SBP_CAPRING_DATA 4096		/* offset of the data area in the file */
#define SBP_CAPRING_MIN (64u << 10)
#define SBP_CAPRING_MAX (256u << 20)

struct sbp_cap_ring {
	__u32 magic;		/* stored last by the creator */
	__u32 version;
	__u32 generation;
	__u32 pid;
	__u64 size;		/* data area bytes, a power of two */
	__u64 dropped;		/* records writers found no room for */
	__u64 dropped_bytes;	/* their data bytes */
	__u8 pad0[24];
	__u64 head;		/* writers reserve here (compare-and-swap) */
	__u8 pad1[56];
	__u64 tail;		/* the reader frees up to here */
	__u8 pad2[56];
};

/* A record in a ring: this header, then struct sbp_cap_rec and its data,
 * the whole padded to 8 bytes. A writer reserves, writes the record and
 * `len`, and stores `pos` last (release): a header whose `pos` is not the
 * position it is read at is not written yet (or is a previous lap's). */
struct sbp_cap_slot {
	__u32 len;		/* bytes after this header */
	__u32 pad;
	__u64 pos;		/* the record's own position in the ring */
};

#ifdef __VMLINUX_H__
/* ---- the core's hook (bpf/bypass.bpf.c) ----
 * The core holds only this program array. The capture command puts the
 * capture program in it through an fd of its own, and the kernel empties
 * the array when the last such fd closes (the command exits, even killed):
 * the lease that keeps a dead capture from capturing. The core never pins
 * it, so nothing else holds it. */
struct {
	__uint(type, BPF_MAP_TYPE_PROG_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} capture_msg SEC(".maps");

/* sk_msg, after a redirect: while a capture runs (`on`: the settings flag,
 * one predictable branch when off), hand the send to the capture program.
 * The tail call does not return; the redirect already decided stays. */
static __always_inline void capture_send(struct sk_msg_md *msg, __u32 on)
{
	if (on)
		bpf_tail_call(msg, &capture_msg, 0);
}
#endif

#endif
