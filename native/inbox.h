/* SPDX-License-Identifier: GPL-2.0 */
/*
 * The inbox: how connection memory reaches exactly the two processes of a
 * connection, with no broker on the way.
 *
 * Every process that asks for the shm tier binds one Unix datagram socket
 * at <dir>/<token>, where token is 16 random bytes (hex in the name) and
 * dir is the instance's inbox directory (root's, mode 1733: anyone may
 * create and connect, nobody may list or remove another's entry). The
 * token goes to BPF with SBP_SO_ASK; BPF relays it to the peer socket's
 * owner only (SBP_SO_INFO). The passive end, which allocates, sends its
 * peer a message naming the memory of their connection (and, the first
 * time for that peer, the memfd itself). The receiver believes a message
 * only after checking, with its own socket's SBP_SO_INFO, that the
 * sender's pid (SCM_CREDENTIALS: the kernel's, not the sender's claim) is
 * the one BPF saw ask for the peer socket, and that the cookies match.
 *
 * Everything in a message is untrusted until then, and its memory is
 * checked like any shared memory (pairmem.h).
 */
#ifndef SHMBYPASS_INBOX_H
#define SHMBYPASS_INBOX_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#define SBP_INBOX_TOKEN_LEN 16
#define SBP_INBOX_MSG_MAGIC 0x58424e49u /* "INBX" */
#define SBP_INBOX_MSG_VERSION 1u

/* The passive end to the active end: "the memory of our connection is
 * block `block` (generation `gen`) of my pair region `region_id`". */
struct sbp_inbox_msg {
	uint32_t magic;
	uint32_t version;
	uint64_t active_cookie;  /* the receiver's socket */
	uint64_t passive_cookie; /* the sender's socket */
	uint64_t region_id;      /* the sender's pair region */
	uint64_t region_size;    /* of the memfd that comes with it, if any */
	uint32_t block;
	uint32_t gen;
};

/* A message as received: the fd (or -1) and the sender's pid as the
 * kernel stated it. */
struct sbp_inbox_rx {
	struct sbp_inbox_msg msg;
	int fd;
	pid_t pid;
	uid_t uid;
};

struct sbp_inbox {
	int fd;                                 /* bound, SO_PASSCRED, nonblocking */
	int tx;                                 /* unbound, for sending */
	uint8_t token[SBP_INBOX_TOKEN_LEN];
	char path[256];
};

/* Bind a new inbox in dir. 0 or -errno. The fds are close-on-exec. */
int sbp_inbox_open(struct sbp_inbox *in, const char *dir);
/* Unlink and close. */
void sbp_inbox_close(struct sbp_inbox *in);
/* Path of the inbox with this token in dir. */
void sbp_inbox_path(char *out, size_t n, const char *dir, const uint8_t token[SBP_INBOX_TOKEN_LEN]);
/* Send a message (and fd if >= 0) to the inbox with that token. Never
 * blocks: -EAGAIN when the receiver's queue is full, -ECONNREFUSED or
 * -ENOENT when there is no such inbox. 0 on success. */
int sbp_inbox_send(struct sbp_inbox *in, const char *dir, const uint8_t token[SBP_INBOX_TOKEN_LEN],
		   const struct sbp_inbox_msg *msg, int fd);
/* Is a process's inbox still there (its process neither exited nor
 * exec'd)? 1 yes, 0 no, -errno (cannot tell). Sends nothing. */
int sbp_inbox_alive(const char *dir, const uint8_t token[SBP_INBOX_TOKEN_LEN]);
/* Take one message. 1 got one, 0 none waiting, -errno. Messages that are
 * not well formed are dropped (and their fds closed) without a word: any
 * process may write to an inbox. */
int sbp_inbox_recv(struct sbp_inbox *in, struct sbp_inbox_rx *out);

#endif
