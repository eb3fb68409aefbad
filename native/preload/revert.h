/* SPDX-License-Identifier: GPL-2.0 */
/* revert.h: bringing a shm-tier connection back to plain TCP, every byte in
 * order (docs/NEGOTIATION.md, "Back to TCP"). */
#ifndef SBP_PRELOAD_REVERT_H
#define SBP_PRELOAD_REVERT_H

#include "channel.h"

/* This end gives the socket away (exec, SCM_RIGHTS, posix_spawn): both
 * directions back to TCP, agreed with the peer, before the call returns.
 * 0: fd is plain TCP now (for every holder); -ENOTSUP: a VM pair's slots
 * (not done: the channel stays); -ESHUTDOWN: the peer closed (or shut
 * down and answers nothing) and its FIN is in, so it never will: the
 * channel stays, the rest of its stream is final (standin.c); other
 * -errno: it could not be agreed in time, the connection was reset (both
 * ends get ECONNRESET, never a wrong byte). */
int chan_give_back(int fd, struct chan *ch);

/* Reset the connection for good before fd leaves this program (why goes
 * to stderr): ECONNRESET for whoever reads it next. */
void chan_reset_for_successor(int fd, struct chan *ch, const char *why);

/* Answer it (tx_lock held): link our ring to TCP after the doorbells we
 * sent, send again over TCP what the peer had not read, write the rest of
 * our stream on TCP. 1 if answered now, 0 if nothing was asked. */
int tx_answer(int fd, struct chan *ch);

/* Our reader drained the peer's ring up to its link to TCP (rx_lock held):
 * skip the peer's doorbells still queued and read TCP from now on. 0, or
 * -errno (the connection was reset: ECONNRESET to the reader). */
int rx_to_tcp(int fd, struct chan *ch);

/* Both directions went back to TCP (here, or in another process holding
 * the socket): this process's fds naming ch become plain sockets. */
void chan_went_plain(struct chan *ch);

#endif
