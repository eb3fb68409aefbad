/* SPDX-License-Identifier: GPL-2.0 */
/* io.h: the data path of shm-tier sockets. Each call takes the channel
 * hooks.c found for the fd (referenced; the caller puts it) and returns
 * what the libc call returns, with errno. */
#ifndef SBP_PRELOAD_IO_H
#define SBP_PRELOAD_IO_H

#include <sys/socket.h>
#include <sys/types.h>
#include <sys/uio.h>

#include "channel.h"

ssize_t shm_send(int fd, struct chan *ch, const struct iovec *iov, int iovcnt, int flags);
ssize_t shm_recv(int fd, struct chan *ch, const struct iovec *iov, int iovcnt, int flags);
ssize_t shm_sendmsg(int fd, struct chan *ch, const struct msghdr *m, int flags);
ssize_t shm_recvmsg(int fd, struct chan *ch, struct msghdr *m, int flags);
int shm_recvmmsg(int fd, struct chan *ch, struct mmsghdr *vec, unsigned int vlen, int flags);
int shm_sendmmsg(int fd, struct chan *ch, struct mmsghdr *vec, unsigned int vlen, int flags);

/* Shared with splice.c (sendfile and splice use the same rules). */
#define TCP_PIECE (256u << 10)     /* the most one send puts on TCP before a look */
/* Take a direction lock: 0, or 1 if a non-blocking caller would wait. */
int dir_lock(pthread_mutex_t *m, _Atomic uint32_t *sleeping, int nonblock);
/* -1 with errno = err (EPIPE raises SIGPIPE unless MSG_NOSIGNAL in flags). */
ssize_t fail(int err, int flags);
/* A ring call's error as the errno the app gets (a corrupt ring breaks the
 * channel). dir: 1 tx, 0 rx. */
int ring_error(int fd, struct chan *ch, ssize_t n, int dir);
/* Why our direction cannot write (0: it can); the rx side's end (EOF 0,
 * an errno, or -1: go on). */
int tx_state_err(struct chan_sh *sh, uint32_t f);
int tx_peer_closed(struct chan_sh *sh, int err);
int rx_over(uint32_t f);
/* Doorbells after ring writes, after a reader freed room, at the switch. */
int tx_switch_bell(int fd, struct chan *ch);
void tx_bells(int fd, struct chan *ch);
void rx_bell(int fd, struct chan *ch);
/* A larger area instead of a sleep for a writer that found its ring full. */
int tx_grow(struct chan_sh *sh, int nonblock);

#endif
