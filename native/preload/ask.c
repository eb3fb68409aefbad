// SPDX-License-Identifier: GPL-2.0
/* ask.c: the SOL_SHMBYPASS socket options (ask.h), made with raw syscalls:
 * the application's own setsockopt/getsockopt go through our hooks. */
#include <string.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "ask.h"
#include "setup.h"

static _Atomic int no_group;    /* ENOPROTOOPT seen: nothing here answers */

int ask_socket(int fd, const uint8_t inbox[SBP_INBOX_LEN])
{
	struct sbp_ask a;
	int saved = errno, rc;

	if (atomic_load_explicit(&no_group, memory_order_relaxed))
		return -ENOPROTOOPT;
	memset(&a, 0, sizeof(a));
	a.version = SBP_ASK_VERSION;
	a.flags = SBP_ASK_SHM;
	memcpy(a.inbox, inbox, SBP_INBOX_LEN);
	rc = syscall(SYS_setsockopt, fd, SOL_SHMBYPASS, SBP_SO_ASK, &a, sizeof(a)) < 0 ? -errno : 0;
	if (rc == -ENOPROTOOPT && !atomic_exchange(&no_group, 1))
		DBG("no bypass group answers here (ENOPROTOOPT): plain TCP");
	errno = saved;
	return rc;
}

int ask_info(int fd, struct sbp_info *out)
{
	socklen_t len = sizeof(*out);
	int saved = errno, rc;

	memset(out, 0, sizeof(*out));
	rc = syscall(SYS_getsockopt, fd, SOL_SHMBYPASS, SBP_SO_INFO, out, &len) < 0 ? -errno : 0;
	if (rc == 0 && (len != sizeof(*out) || out->version != SBP_ASK_VERSION))
		rc = -EPROTO;
	errno = saved;
	return rc;
}

void ask_kept(int fd, uint32_t reason)
{
	int saved = errno;

	syscall(SYS_setsockopt, fd, SOL_SHMBYPASS, SBP_SO_KEPT, &reason, sizeof(reason));
	errno = saved;
}
