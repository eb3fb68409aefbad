/* SPDX-License-Identifier: GPL-2.0 */
/* wait.h: how a blocking call of one channel waits (spin, sleep, timeouts,
 * signals). */
#ifndef SBP_PRELOAD_WAIT_H
#define SBP_PRELOAD_WAIT_H

#include <stdint.h>

#include "channel.h"

/* After a signal interrupted a blocking wait: would the kernel restart the
 * call (every installed handler has SA_RESTART)? */
int sbp_restartable(void);
/* -1 when the socket has no SO_RCVTIMEO/SO_SNDTIMEO, else ns. */
int64_t sock_timeout_ns(int fd, int optname);
/* Sleep on the TCP socket of a channel until a doorbell or a state change.
 * dir 0: wait for rx data; 1: wait for tx room. 0 woken (re-check),
 * -ETIMEDOUT, -EINTR. Call with the direction lock held. */
int chan_wait(int fd, struct chan *ch, int dir, int64_t deadline);
/* The spin of a blocking wait, before the work (TCP look, timeout look-up)
 * that precedes a sleep: 0 ready, -EAGAIN the budget ran out. */
int ring_spin(struct sbp_ring *r, _Atomic uint32_t *sleeping, int dir);
/* Spin until the peer's ring can be attached: 0, -EAGAIN, -EPROTO (broken). */
int attach_spin(int fd, struct chan *ch);
/* Would the kernel restart a call interrupted with this deadline? */
int restart_ok(int64_t deadline);
/* The deadline SO_RCVTIMEO/SO_SNDTIMEO (opt) sets from now, or DL_NONE. */
int64_t deadline_for(int fd, int opt);

#endif
