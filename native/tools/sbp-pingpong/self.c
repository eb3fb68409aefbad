/* SPDX-License-Identifier: GPL-2.0-only */
/* self: both ends of one connection in this process. It listens on ADDR,
 * connects to itself and accepts; then, --iters times after --warmup, one
 * send and one recv of --size bytes. What the data calls cost with nothing
 * to wait for: under the shm tier the interposer's path and the ring's
 * copies, no core-to-core traffic (sbp-ringbench --mode self is the raw
 * ring's figure). One JSON line: {"op": "self", "size", "iters",
 * "ns_per_pair", "port"}; --hold keeps the connection until stdin's EOF. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "pingpong.h"

static void pairs(int a, int b, char *buf, uint32_t size, uint64_t n)
{
	for (uint64_t i = 0; i < n; i++) {
		send_all(a, buf, size);
		if (!recv_all(b, buf, size))
			fail("the connection closed");
	}
}

int run_self(const char *addr_text, uint32_t size, uint64_t iters, long long warmup, int hold)
{
	struct addr a;
	int lfd, cfd, sfd;
	char *buf = calloc(1, size);

	if (!buf)
		fail("out of memory");
	if (size > (64u << 10))
		fail("self: --size at most 64 KiB (both ends are this one thread)");
	parse_addr(addr_text, &a);
	lfd = socket(a.family, SOCK_STREAM, 0);
	if (lfd < 0 || bind(lfd, (struct sockaddr *)&a.ss, a.len) < 0 || listen(lfd, 1) < 0)
		die("listen");
	a.len = sizeof(a.ss);
	if (getsockname(lfd, (struct sockaddr *)&a.ss, &a.len) < 0)
		die("getsockname");
	cfd = connect_to(&a);
	sfd = accept(lfd, NULL, NULL);
	if (sfd < 0)
		die("accept");
	tune_socket(sfd, a.family);
	pin_cpu(opt_cpu);
	/* both directions, so that both go live on the shm tier */
	pairs(cfd, sfd, buf, size, warmup < 0 ? 2000 : (uint64_t)warmup);
	pairs(sfd, cfd, buf, size, warmup < 0 ? 2000 : (uint64_t)warmup);
	if (!iters)
		iters = 2000000;
	uint64_t t0 = now_ns();
	pairs(cfd, sfd, buf, size, iters);
	double per = (double)(now_ns() - t0) / (double)iters;
	char where[128];
	format_addr(&a.ss, where, sizeof(where));
	printf("{\"op\": \"self\", \"size\": %u, \"iters\": %llu, \"ns_per_pair\": %.1f, \"port\": %s}\n",
	       size, (unsigned long long)iters, per, strrchr(where, ':') + 1);
	fflush(stdout);
	if (hold)
		while (getchar() != EOF)
			;
	close(cfd);
	close(sfd);
	close(lfd);
	free(buf);
	return 0;
}
