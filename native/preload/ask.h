/* SPDX-License-Identifier: GPL-2.0 */
/* ask.h: asking BPF for the shm tier and learning its answer, through the
 * socket options of bpf/ask.bpf.c (SOL_SHMBYPASS). */
#ifndef SBP_PRELOAD_ASK_H
#define SBP_PRELOAD_ASK_H

#include <stdint.h>

#include "../../bpf/bypass.h"

/* Ask for the shm tier on fd (before connect/listen, or on an accepted
 * socket by the process that will use it), naming this process's inbox
 * (its token, memory.h mem_inbox_token).
 * 0, or -errno: -ENOPROTOOPT means nothing answers (not in a bypass
 * group), and then no socket of this process will get an answer. */
int ask_socket(int fd, const uint8_t inbox[SBP_INBOX_LEN]);
/* What BPF decided for fd: 0 and *out, or -errno. */
int ask_info(int fd, struct sbp_info *out);
/* Tell BPF (for `status`) why fd's shm-tier pair stays on TCP. */
void ask_kept(int fd, uint32_t reason);

#endif
