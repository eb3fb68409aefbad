// SPDX-License-Identifier: GPL-2.0
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <errno.h>
#include <unistd.h>

#include "libbpf.h"

static char log_buf[1 << 16];
static size_t log_len;

static int capture(enum libbpf_print_level level, const char *fmt, va_list ap)
{
	if (level == LIBBPF_DEBUG)
		return 0;
	if (log_len < sizeof(log_buf) - 1) {
		int n = vsnprintf(log_buf + log_len, sizeof(log_buf) - log_len, fmt, ap);
		if (n > 0)
			log_len += (size_t)n;
		if (log_len > sizeof(log_buf) - 1)
			log_len = sizeof(log_buf) - 1;
	}
	return 0;
}

void sbp_libbpf_capture(void)
{
	libbpf_set_print(capture);
}

const char *sbp_libbpf_log(void)
{
	log_buf[log_len] = '\0';
	return log_buf;
}

void sbp_libbpf_log_clear(void)
{
	log_len = 0;
	log_buf[0] = '\0';
}

int sbp_link_create(int prog_fd, int target_fd, int attach_type)
{
	int fd = bpf_link_create(prog_fd, target_fd, (enum bpf_attach_type)attach_type, NULL);
	return fd < 0 ? -errno : fd;
}

/* Create an iterator link for prog (over map_fd for a map iterator, or
 * -1) and open it: returns the fd to read, the link in *link_fd_out. */
int sbp_iter_open(int prog_fd, int map_fd, int *link_fd_out)
{
	DECLARE_LIBBPF_OPTS(bpf_link_create_opts, opts);
	union bpf_iter_link_info info;
	int link_fd, fd;

	if (map_fd >= 0) {
		memset(&info, 0, sizeof(info));
		info.map.map_fd = (__u32)map_fd;
		opts.iter_info = &info;
		opts.iter_info_len = sizeof(info);
	}
	link_fd = bpf_link_create(prog_fd, 0, BPF_TRACE_ITER, &opts);
	if (link_fd < 0)
		return -errno;
	fd = bpf_iter_create(link_fd);
	if (fd < 0) {
		fd = -errno;
		close(link_fd);
		return fd;
	}
	*link_fd_out = link_fd;
	return fd;
}
