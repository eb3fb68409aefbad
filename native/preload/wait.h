/* SPDX-License-Identifier: GPL-2.0 */
/* wait.h: how a call of one channel waits when its ring is full or empty. */
#ifndef SBP_PRELOAD_WAIT_H
#define SBP_PRELOAD_WAIT_H

#include <stddef.h>
#include <stdint.h>

#include "channel.h"

/* One call's waiting, across the passes of its loop. */
struct blocking {
	int fd;
	int dir;                /* 0: waits for data (rx); 1: for room (tx) */
	int nonblock;           /* O_NONBLOCK, MSG_DONTWAIT, SPLICE_F_NONBLOCK */
	int spun;               /* the spin before the first sleep is over */
	int looked;             /* a reader looked at the TCP side */
	size_t min;             /* dir 0: ring bytes to wait for (0: any) */
	int64_t deadline;       /* 0: SO_RCVTIMEO/SO_SNDTIMEO not looked up yet */
};

/* A blocking call that cannot arm a wake-up (a peek whose bytes go on in
 * a later area): a 50 us nap; 0 to look again, else the errno chan_block
 * would give (EAGAIN: non-blocking or SO_RCVTIMEO passed; EINTR). */
int chan_nap(struct blocking *b);

/* The spin of a blocking call before its first sleep (no syscall): 0 if
 * the ring became ready. chan_block does it too, once per call. */
int chan_spin(struct chan *ch, struct blocking *b);

/* The call found its ring full (dir 1) or empty (dir 0) and has nothing
 * else to report. Returns 0: look at the ring again; else the errno the
 * call ends with if it has moved no byte (EAGAIN: non-blocking, or
 * SO_*TIMEO ran out; EINTR: a signal, and the kernel would not restart
 * the call). done: bytes the call has moved so far (a call that moved
 * some is never restarted, it returns them). Call with the direction
 * lock held. The one copy of this logic for send/recv/sendfile/splice. */
int chan_block(struct chan *ch, struct blocking *b, size_t done);

/* A wait on the socket itself while the peer's bytes still come over TCP
 * (the kernel waits, our deadline and restart rules): 0 to look again,
 * EAGAIN at SO_RCVTIMEO/SO_SNDTIMEO, EINTR. */
int tcp_block(struct blocking *b, short events);

#endif
