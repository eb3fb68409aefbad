/* SPDX-License-Identifier: GPL-2.0-only */
/* pingpong.h: what the parts of sbp-pingpong share: the bench protocol on
 * the wire, the options, and the helpers of net.c (main.c has the usage). */
#ifndef SBP_PINGPONG_H
#define SBP_PINGPONG_H

#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>
#include <sys/types.h>

#include "sys.h"
#include "tool.h"

#define HELLO_MAGIC 0x50504253u /* "SBPP" little-endian */
#define STATS_MAGIC 0x54534253u /* "SBST" */
#define PROTO_VERSION 1
#define OP_RTT 1
#define OP_STREAM 2
#define OP_PING 3
#define MAX_SIZE (64u << 20)
#define MAX_RTT_SAMPLES (20u * 1000 * 1000)

struct hello {
	uint32_t magic;
	uint16_t version;
	uint16_t op;
	uint32_t size;
	uint32_t flags;
	uint64_t count;
	uint8_t pad[40];
};

struct stats {
	uint32_t magic;
	uint32_t pad0;
	uint64_t cpu_user_ns;
	uint64_t cpu_sys_ns;
	uint64_t wall_ns;
	uint64_t bytes;
	uint8_t pad[24];
};

_Static_assert(sizeof(struct hello) == 64, "hello is 64 bytes on the wire");
_Static_assert(sizeof(struct stats) == 64, "stats is 64 bytes on the wire");

/* Options (main.c sets them). */
extern int opt_cpu;                     /* --cpu, -1: unpinned */
extern long opt_poll_us;                /* --poll, < 0: never poll */
extern const char *opt_stats_file;      /* server --stats-file */
extern int opt_once, opt_threads, echo_mode;

/* net.c */
struct machine { double busy, steal; int ok; };
struct addr {
	struct sockaddr_storage ss;
	socklen_t len;
	int family;
};
extern unsigned long spurious_eagain;   /* blocking recv()s that said EAGAIN */

void die(const char *what) __attribute__((noreturn));
void fail(const char *msg) __attribute__((noreturn));
void cpu_ns(uint64_t *user, uint64_t *sys);
struct machine machine_now(void);
void pin_cpu(int cpu);
int cmp_u64(const void *a, const void *b);
void parse_addr(const char *text, struct addr *a);
void format_addr(const struct sockaddr_storage *ss, char *out, size_t n);
void tune_socket(int fd, int family);
int connect_to(const struct addr *a);
int try_send_all(int fd, const void *buf, size_t len);
void send_all(int fd, const void *buf, size_t len);
ssize_t recv_some(int fd, void *buf, size_t len);
int try_recv_all(int fd, void *buf, size_t len);
int recv_all(int fd, void *buf, size_t len);

/* server.c, client.c */
int run_self(const char *addr_text, uint32_t size, uint64_t iters, long long warmup, int hold);
int run_server(const char *addr_text);
int run_client(const char *addr_text, const char *mode, uint32_t size, uint64_t iters,
	       double duration, long long warmup, uint64_t bytes, int reps, int use_stdin, int hold);

#endif
