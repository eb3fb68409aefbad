/* SPDX-License-Identifier: GPL-2.0 */
/* Small helpers around libbpf that are awkward to express through cffi. */
#ifndef SHMBYPASS_LIBBPF_H
#define SHMBYPASS_LIBBPF_H

#include <bpf/libbpf.h>
#include <bpf/bpf.h>

/* Route libbpf's log (verifier output included) into a buffer, so a failed
 * load can show why. */
void sbp_libbpf_capture(void);
const char *sbp_libbpf_log(void);
void sbp_libbpf_log_clear(void);

/* Create a cgroup link and return its fd (libbpf 1.1's bpf_link_create needs
 * an opts struct; this keeps the Python side simple). */
int sbp_link_create(int prog_fd, int target_fd, int attach_type);
/* Attach an iterator program to a sock map/hash and return an iterator fd
 * whose read() runs the program over every socket (and the link fd). */
int sbp_iter_open(int prog_fd, int map_fd, int *link_fd_out);

#endif
