/* SPDX-License-Identifier: GPL-2.0 */
/* standin.h: a closed peer's final bytes, in a stand-in socket for a
 * program that cannot read the rings (standin.c). */
#ifndef SBP_PRELOAD_STANDIN_H
#define SBP_PRELOAD_STANDIN_H

#include "channel.h"

/* Just before exec, when chan_give_back() said -ESHUTDOWN: read the rest of
 * the peer's stream and put an AF_UNIX socket holding it, then EOF, in fd's
 * place. 0, or -errno (nothing was put in its place). */
int standin_for_exec(int fd, struct chan *ch);

#endif
