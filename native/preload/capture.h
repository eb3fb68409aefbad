/* SPDX-License-Identifier: GPL-2.0 */
/* capture.h: `shmbypass capture` of the shm tier (docs/CAPTURE.md): the
 * bytes a process moves through its rings, copied into a capture ring of
 * its own while a capture runs. Needs nothing of the rest of the
 * interposer (sys.h and bpf/capture.h only), so the tests build it alone.
 *
 * Where the calls go (the interposer's send path, io.c):
 *   capture_init()  once, where the interposer sets itself up (before any
 *                   socket call); safe to call again.
 *   if (capture_on())
 *           capture_data(cookie, SBP_CAP_TX, offset, iov, iovcnt, n);
 *                   after each successful write of n bytes into a ring
 *                   (send, write, sendmsg, writev, sendfile, splice),
 *                   with the bytes just written.
 * cookie: the socket's own cookie, sbp_info.cookie from getsockopt
 * (SOL_SHMBYPASS, SBP_SO_INFO); dir: SBP_CAP_TX for bytes the socket sent
 * (SBP_CAP_RX, bytes it received, exists for a path that sees only those);
 * offset: the bytes that socket had sent on the connection before these,
 * over TCP and through rings alike (its sequence number is ISN + 1 +
 * offset), so records put the bytes where they were even when some were
 * lost. For sendfile/splice, whose bytes never pass through a buffer of the
 * caller, pass the ring's reserved pieces (sbp_ring_reserve's iov) after
 * the commit. */
#ifndef SBP_PRELOAD_CAPTURE_H
#define SBP_PRELOAD_CAPTURE_H

#include <stddef.h>
#include <stdint.h>
#include <sys/uio.h>

#include "../../bpf/capture.h"

/* The `on` word of /run/<instance>/capture once capture_init() mapped it;
 * a zero of our own before, or where there is no such file. */
extern const volatile uint32_t *capture_word;

void capture_init(void);

/* One load of a word every process has mapped, one branch that is not
 * taken while no capture runs. */
static inline int capture_on(void)
{
	return __builtin_expect(*capture_word != 0, 0);
}

/* Copy n bytes (iov[0..iovcnt), in order) into this process's capture ring.
 * Never blocks, never fails the caller: a record that does not fit is
 * counted in the ring (the capture reports it), and errno is kept. */
void capture_data(uint64_t cookie, int dir, uint64_t offset, const struct iovec *iov,
		  int iovcnt, size_t n);

/* n bytes were sent that no copy can be made of any more (a pipe the
 * kernel spliced): counted as dropped, as a full ring's would be. */
void capture_missed(size_t n);

#endif
