/* SPDX-License-Identifier: GPL-2.0 */
/* control.h: the TCP control connection of a shm-tier socket. */
#ifndef SBP_PRELOAD_CONTROL_H
#define SBP_PRELOAD_CONTROL_H

#include <stdint.h>

#include "channel.h"

/* One doorbell byte to the peer: never blocks, keeps errno. 0 or -errno
 * (-EAGAIN: the socket's send buffer is full). */
int ctl_doorbell(int fd);
/* A doorbell on a channel's socket, counted (the peer skips exactly that
 * many TCP bytes if either end goes back to TCP): -EAGAIN while our ring
 * is not live (a byte of ours would be payload then), -EPIPE once the
 * count is closed, else as ctl_doorbell. */
int ctl_bell(int fd, struct chan *ch);
/* No doorbell after this one: the final count. */
uint64_t ctl_bells_close(struct chan *ch);
/* Consume doorbell bytes; notes FIN/RST. Returns CH_TCP_EOF/RST bits seen. */
uint32_t ctl_drain(int fd, struct chan *ch);
/* The last close, before the rings close: no doorbell is sent to us from
 * now on, and those the peer counted as sent are eaten (bounded wait). */
void ctl_close_bells(int fd, struct chan *ch);
/* Look at the TCP side without waiting: FIN/RST (and doorbells) noted. */
void ctl_check(int fd, struct chan *ch);
/* The peer can no longer send us doorbells (its write side is shut). */
int peer_tx_shut(struct chan *ch);
/* A writer waiting for room while the peer's side is shut (its FIN, or
 * its ring's): a live peer (half-closed) eats a doorbell; a dead one's
 * kernel answers RST, which a later probe's send reports (then the peer
 * is gone: EPIPE). At most every 200 ms. */
void ctl_probe(int fd, struct chan *ch);
/* Can the TCP socket still bring doorbells? */
int ctl_usable(struct chan *ch);

#endif
