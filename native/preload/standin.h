/* SPDX-License-Identifier: GPL-2.0 */
/* standin.h: a closed peer's final bytes, in a stand-in socket for a
 * program that cannot read the rings (standin.c). */
#ifndef SBP_PRELOAD_STANDIN_H
#define SBP_PRELOAD_STANDIN_H

#include "channel.h"

/* When chan_give_back() said -ESHUTDOWN (before exec, or before fd is sent
 * in SCM_RIGHTS): read the rest of the peer's stream and put an AF_UNIX
 * socket holding it, then EOF, in fd's place (fd's table entry is left to
 * the caller). 0, or -errno (nothing was put in its place). */
int standin_put(int fd, struct chan *ch);

#endif
