/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * sbp-pingpong: a plain socket ping-pong / stream / echo program.
 *
 * It is the "unmodified application" of the benchmark: it uses only socket,
 * bind, listen, accept, connect, send, recv, shutdown and close, so it runs
 * the same on loopback TCP, a Unix stream socket, under the kernel tier
 * (`shmbypass run --tier kernel -- sbp-pingpong ...`) and under the LD_PRELOAD
 * shm tier, and the numbers compare like with like.
 *
 * Usage
 *   sbp-pingpong server ADDR [--cpu N] [--poll[=US]] [--once] [--threads]
 *                            [--stats-file PATH]
 *   sbp-pingpong echo   ADDR [same options as server]
 *   sbp-pingpong client ADDR [--cpu N] [--poll[=US]] [--stdin] [--hold]
 *                            [--mode rtt|stream|connrate] [--size BYTES]
 *                            [--iters N | --duration SEC] [--warmup N]
 *                            [--bytes N] [--reps N]
 *   sbp-pingpong self   ADDR [--cpu N] [--size BYTES] [--iters N] [--warmup N]
 *                            [--hold]
 *
 * ADDR is HOST:PORT (IPv4 or a name), [V6ADDR]:PORT, unix:/path or unix:@abstract.
 * A server on port 0 picks a free port. Every server prints one JSON line on
 * stdout once it listens: {"listening": "127.0.0.1:40123"}.
 *
 * Server modes
 *   server  speaks the bench protocol below (rtt, stream, ping ops);
 *   echo    sends back whatever it receives (for connrate and app tests).
 *   --once         exit after the first connection closes
 *   --threads      one thread per connection (default: one at a time)
 *   --stats-file   on exit (SIGINT/SIGTERM or --once) write JSON with the
 *                  server's CPU seconds, connections and bytes
 *
 * Client
 *   --mode rtt       ping-pong of --size bytes (default 64); --iters N, or
 *                    --duration SEC (iterations sized from the warm-up).
 *                    Prints p50/p99/p999/mean/min/max ns per round trip.
 *   --mode stream    one-way stream of --size byte sends (default 65536) for
 *                    --bytes N or --duration SEC; prints GB/s (1e9 bytes/s).
 *   --mode connrate  connect, one 64 B exchange, close, for --iters N
 *                    connections or --duration SEC; prints connections/s.
 *   --warmup N       rtt: warm-up round trips before each measurement
 *                    (default 1000); stream: warm-up bytes (default 16 MiB)
 *   --reps N         repeat the measurement N times on the same connection,
 *                    one JSON line each
 *   --stdin          read commands from stdin instead, one per line, run each
 *                    on the same connection and print one JSON line per command:
 *                      rtt SIZE SECONDS [WARMUP_ITERS]
 *                      stream SIZE SECONDS
 *                      connrate SECONDS
 *                      quit
 *   --hold           after the last measurement, keep the connection open until
 *                    stdin reaches EOF (lets a caller inspect the live connection)
 *
 * Self (self.c): both ends in this process, a send and a recv --iters
 * times; prints ns per pair: the data calls' cost with nothing to wait for.
 *
 * Common
 *   --cpu N          pin this process to CPU N (sched_setaffinity)
 *   --poll[=US]      busy-poll recv(MSG_DONTWAIT) for up to US microseconds
 *                    (default 50) before a blocking recv
 *
 * Every JSON result carries the client's and the server's CPU seconds over the
 * measured window (getrusage; the server sends its figure back in-band) and
 * the machine's busy and steal time over the same window (/proc/stat), so the
 * caller can tell when other processes were using the CPU.
 *
 * Bench protocol (server mode): the client sends a 64-byte hello naming one
 * op; the server performs it and answers with a 64-byte stats block. Many ops
 * may follow on one connection; EOF ends it.
 *   OP_RTT:    count round trips of `size` bytes each way
 *   OP_STREAM: the client sends `count` bytes; the server reads them all
 *   OP_PING:   the hello itself is the 64 B request; the server echoes it
 *              (no stats block), used for connection-rate runs
 */
#include <errno.h>
#include <getopt.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "pingpong.h"

static void usage(void)
{
	fprintf(stderr,
		"usage: sbp-pingpong server|echo ADDR [--cpu N] [--poll[=US]] [--once] [--threads] [--stats-file F]\n"
		"       sbp-pingpong client ADDR [--cpu N] [--poll[=US]] [--mode rtt|stream|connrate]\n"
		"                    [--size B] [--iters N | --duration S] [--warmup N] [--bytes N]\n"
		"                    [--reps N] [--stdin] [--hold]\n"
		"       sbp-pingpong self ADDR [--cpu N] [--size B] [--iters N] [--warmup N] [--hold]\n"
		"ADDR: HOST:PORT, [V6]:PORT, unix:/path, unix:@abstract (see the top of native/tools/sbp-pingpong/main.c)\n");
	exit(2);
}

static unsigned long long parse_num(const char *s, const char *what)
{
	char *end;
	errno = 0;
	unsigned long long v = strtoull(s, &end, 0);
	if (errno || end == s)
		goto bad;
	if (*end == 'k' || *end == 'K')
		v <<= 10, end++;
	else if (*end == 'm' || *end == 'M')
		v <<= 20, end++;
	else if (*end == 'g' || *end == 'G')
		v <<= 30, end++;
	if (*end == '\0')
		return v;
bad:
	fprintf(stderr, "sbp-pingpong: bad %s: %s\n", what, s);
	exit(2);
}

int main(int argc, char **argv)
{
	static const struct option opts[] = {
		{"cpu", required_argument, NULL, 'c'},
		{"poll", optional_argument, NULL, 'p'},
		{"once", no_argument, NULL, 'o'},
		{"threads", no_argument, NULL, 't'},
		{"stats-file", required_argument, NULL, 'f'},
		{"mode", required_argument, NULL, 'm'},
		{"size", required_argument, NULL, 's'},
		{"iters", required_argument, NULL, 'n'},
		{"duration", required_argument, NULL, 'd'},
		{"warmup", required_argument, NULL, 'w'},
		{"bytes", required_argument, NULL, 'b'},
		{"reps", required_argument, NULL, 'r'},
		{"stdin", no_argument, NULL, 'i'},
		{"hold", no_argument, NULL, 'H'},
		{"help", no_argument, NULL, 'h'},
		{NULL, 0, NULL, 0},
	};
	const char *mode = "rtt";
	uint32_t size = 0;
	uint64_t iters = 0, bytes = 0;
	double duration = 1.0;
	long long warmup = -1;
	int reps = 1, use_stdin = 0, hold = 0, c;

	if (argc < 3)
		usage();
	const char *role = argv[1], *addr = argv[2];
	optind = 3;
	while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
		switch (c) {
		case 'c': opt_cpu = (int)parse_num(optarg, "cpu"); break;
		case 'p': opt_poll_us = optarg ? (long)parse_num(optarg, "poll") : 50; break;
		case 'o': opt_once = 1; break;
		case 't': opt_threads = 1; break;
		case 'f': opt_stats_file = optarg; break;
		case 'm': mode = optarg; break;
		case 's': size = (uint32_t)parse_num(optarg, "size"); break;
		case 'n': iters = parse_num(optarg, "iters"); break;
		case 'd': duration = atof(optarg); break;
		case 'w': warmup = (long long)parse_num(optarg, "warmup"); break;
		case 'b': bytes = parse_num(optarg, "bytes"); break;
		case 'r': reps = (int)parse_num(optarg, "reps"); break;
		case 'i': use_stdin = 1; break;
		case 'H': hold = 1; break;
		default: usage();
		}
	}
	if (optind != argc)
		usage();
	if (strcmp(role, "server") == 0)
		return run_server(addr);
	if (strcmp(role, "echo") == 0) {
		echo_mode = 1;
		return run_server(addr);
	}
	if (strcmp(role, "self") == 0)
		return run_self(addr, size ? size : 64, iters, warmup, hold);
	if (strcmp(role, "client") != 0)
		usage();
	if (strcmp(mode, "rtt") && strcmp(mode, "stream") && strcmp(mode, "connrate"))
		usage();
	if (size == 0)
		size = strcmp(mode, "stream") == 0 ? 65536 : 64;
	if (size > MAX_SIZE || duration <= 0 || reps < 1)
		usage();
	return run_client(addr, mode, size, iters, duration, warmup, bytes, reps, use_stdin, hold);
}
