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
ssize_t shm_recvmsg(int fd, struct chan *ch, struct msghdr *m, int flags);
int shm_recvmmsg(int fd, struct chan *ch, struct mmsghdr *vec, unsigned int vlen, int flags);
int shm_sendmmsg(int fd, struct chan *ch, struct mmsghdr *vec, unsigned int vlen, int flags);
ssize_t shm_sendfile(int out, struct chan *ch, int in, off_t *offset, size_t count);
/* splice with a shm socket on one side (cin or cout, the other NULL) or
 * both (then EINVAL, as the kernel wants a pipe). Puts the channels. */
ssize_t shm_splice(int in, struct chan *cin, off_t *off_in, int out, struct chan *cout,
		   off_t *off_out, size_t len, unsigned int flags);

#endif
