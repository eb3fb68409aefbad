/* SPDX-License-Identifier: GPL-2.0 */
/* sockets.h: the socket life-cycle calls, after hooks.c decided they are
 * ours to look at (the library is enabled). Each returns what the call
 * returns, with errno, as the real call would. */
#ifndef SBP_PRELOAD_SOCKETS_H
#define SBP_PRELOAD_SOCKETS_H

#include <sys/socket.h>

#include "channel.h"

/* After the real call made fd (socket, accept, dup...). */
void sock_created(int fd, int domain, int type, int proto);
int sock_accepted(int lfd, int nfd, int flags);
void sock_duped(int oldfd, int newfd);
int sock_connect(int fd, const struct sockaddr *addr, socklen_t len);
int sock_listen(int fd, int backlog);
int sock_close(int fd);
int sock_close_range(unsigned int first, unsigned int last, int flags);
int sock_shutdown(int fd, struct chan *ch, int how);
int sock_dup_onto(int oldfd, int newfd, int flags, int three);
int sock_fcntl(int (*real)(int, int, void *), int fd, int cmd, void *arg);
int sock_ioctl(int fd, unsigned long req, void *arg);
int sock_setsockopt(int fd, int level, int name, const void *val, socklen_t len);
/* After a successful real getsockopt: our view of the option. */
void sock_getsockopt_done(int fd, int level, int name, void *val, socklen_t *len);
/* fds in SCM_RIGHTS: received ones are new to us, sent ones shared. */
void note_received_fds(const struct msghdr *m);
void note_sent_fds(const struct msghdr *m);
/* fork(): every shm socket now has two holders. */
void mark_all_shared(void);
/* exec or spawn: the shm sockets the new program would inherit (not
 * close-on-exec) go back to plain TCP first. */
void sock_before_exec(void);

#endif
