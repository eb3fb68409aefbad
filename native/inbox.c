// SPDX-License-Identifier: GPL-2.0
/* The inbox (inbox.h): one Unix datagram socket per process. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE             /* struct ucred, SCM_CREDENTIALS */
#endif
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <unistd.h>

#include "inbox.h"

/* The interposer hooks the socket calls (close, sendmsg, recvmsg...): its
 * own are raw system calls, so that they never enter its hooks. */
static void raw_close(int fd)
{
	if (fd >= 0)
		syscall(SYS_close, fd);
}

void sbp_inbox_path(char *out, size_t n, const char *dir, const uint8_t token[SBP_INBOX_TOKEN_LEN])
{
	static const char digits[] = "0123456789abcdef";
	char hex[2 * SBP_INBOX_TOKEN_LEN + 1];

	/* By hand: a server formats one per connection it offers memory to. */
	for (int i = 0; i < SBP_INBOX_TOKEN_LEN; i++) {
		hex[2 * i] = digits[token[i] >> 4];
		hex[2 * i + 1] = digits[token[i] & 15];
	}
	hex[2 * SBP_INBOX_TOKEN_LEN] = 0;
	snprintf(out, n, "%s/%s", dir, hex);
}

static int to_sockaddr(struct sockaddr_un *sa, const char *path)
{
	memset(sa, 0, sizeof(*sa));
	sa->sun_family = AF_UNIX;
	if (strlen(path) >= sizeof(sa->sun_path))
		return -ENAMETOOLONG;
	strcpy(sa->sun_path, path);
	return 0;
}

int sbp_inbox_open(struct sbp_inbox *in, const char *dir)
{
	struct sockaddr_un sa;
	int one = 1, rc;

	memset(in, 0, sizeof(*in));
	in->fd = in->tx = -1;
	if (getrandom(in->token, sizeof(in->token), 0) != sizeof(in->token))
		return -EIO;
	sbp_inbox_path(in->path, sizeof(in->path), dir, in->token);
	rc = to_sockaddr(&sa, in->path);
	if (rc)
		return rc;
	in->fd = (int)syscall(SYS_socket, AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
	in->tx = (int)syscall(SYS_socket, AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
	if (in->fd < 0 || in->tx < 0)
		goto fail;
	if (syscall(SYS_setsockopt, in->fd, SOL_SOCKET, SO_PASSCRED, &one, sizeof(one)) < 0)
		goto fail;
	/* The socket file's mode: anyone may send (connect needs write). */
	if (syscall(SYS_bind, in->fd, (struct sockaddr *)&sa, sizeof(sa)) < 0)
		goto fail;
	chmod(in->path, 0666);
	return 0;
fail:
	rc = -errno;
	raw_close(in->fd);
	raw_close(in->tx);
	in->fd = in->tx = -1;
	return rc;
}

void sbp_inbox_close(struct sbp_inbox *in)
{
	if (in->fd >= 0)
		unlink(in->path);
	raw_close(in->fd);
	raw_close(in->tx);
	in->fd = in->tx = -1;
}

int sbp_inbox_send(struct sbp_inbox *in, const char *dir, const uint8_t token[SBP_INBOX_TOKEN_LEN],
		   const struct sbp_inbox_msg *msg, int fd)
{
	char path[256], cbuf[CMSG_SPACE(sizeof(int))];
	struct iovec iov = { (void *)msg, sizeof(*msg) };
	struct msghdr mh;
	struct sockaddr_un sa;
	int rc;

	sbp_inbox_path(path, sizeof(path), dir, token);
	rc = to_sockaddr(&sa, path);
	if (rc)
		return rc;
	memset(&mh, 0, sizeof(mh));
	mh.msg_name = &sa;
	mh.msg_namelen = sizeof(sa);
	mh.msg_iov = &iov;
	mh.msg_iovlen = 1;
	if (fd >= 0) {
		struct cmsghdr *c;

		memset(cbuf, 0, sizeof(cbuf));
		mh.msg_control = cbuf;
		mh.msg_controllen = sizeof(cbuf);
		c = CMSG_FIRSTHDR(&mh);
		c->cmsg_level = SOL_SOCKET;
		c->cmsg_type = SCM_RIGHTS;
		c->cmsg_len = CMSG_LEN(sizeof(int));
		memcpy(CMSG_DATA(c), &fd, sizeof(int));
	}
	return syscall(SYS_sendmsg, in->tx, &mh, MSG_DONTWAIT | MSG_NOSIGNAL) == (long)sizeof(*msg) ? 0 : -errno;
}

int sbp_inbox_alive(const char *dir, const uint8_t token[SBP_INBOX_TOKEN_LEN])
{
	char path[256];
	struct sockaddr_un sa;
	int s, rc;

	sbp_inbox_path(path, sizeof(path), dir, token);
	rc = to_sockaddr(&sa, path);
	if (rc)
		return rc;
	s = (int)syscall(SYS_socket, AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	if (s < 0)
		return -errno;
	/* connect() sends nothing: it only finds the bound socket */
	rc = syscall(SYS_connect, s, (struct sockaddr *)&sa, sizeof(sa)) == 0 ? 1 : -errno;
	raw_close(s);
	return rc == -ECONNREFUSED || rc == -ENOENT ? 0 : rc;
}

int sbp_inbox_recv(struct sbp_inbox *in, struct sbp_inbox_rx *out)
{
	union {
		char buf[CMSG_SPACE(sizeof(struct ucred)) + CMSG_SPACE(4 * sizeof(int))];
		struct cmsghdr align;
	} cb;
	struct iovec iov = { &out->msg, sizeof(out->msg) };
	struct msghdr mh;
	struct cmsghdr *c;
	ssize_t n;
	int have_cred;

	for (;;) {
		memset(&mh, 0, sizeof(mh));
		mh.msg_iov = &iov;
		mh.msg_iovlen = 1;
		mh.msg_control = cb.buf;
		mh.msg_controllen = sizeof(cb.buf);
		n = syscall(SYS_recvmsg, in->fd, &mh, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
		if (n < 0)
			return errno == EAGAIN || errno == EWOULDBLOCK ? 0 : -errno;
		out->fd = -1;
		have_cred = 0;
		for (c = CMSG_FIRSTHDR(&mh); c; c = CMSG_NXTHDR(&mh, c)) {
			if (c->cmsg_level != SOL_SOCKET)
				continue;
			if (c->cmsg_type == SCM_CREDENTIALS &&
			    c->cmsg_len == CMSG_LEN(sizeof(struct ucred))) {
				struct ucred cr;

				memcpy(&cr, CMSG_DATA(c), sizeof(cr));
				out->pid = cr.pid;
				out->uid = cr.uid;
				have_cred = 1;
			} else if (c->cmsg_type == SCM_RIGHTS) {
				size_t k = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);

				/* Keep the first fd; a sender that sends more
				 * gets them closed. */
				for (size_t i = 0; i < k; i++) {
					int fd;

					memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof(int));
					if (out->fd < 0)
						out->fd = fd;
					else
						raw_close(fd);
				}
			}
		}
		if (n == (ssize_t)sizeof(out->msg) && have_cred && !(mh.msg_flags & MSG_CTRUNC) &&
		    out->msg.magic == SBP_INBOX_MSG_MAGIC && out->msg.version == SBP_INBOX_MSG_VERSION)
			return 1;
		raw_close(out->fd);     /* not a message of ours: drop it */
	}
}
