/* SPDX-License-Identifier: GPL-2.0 */
/*
 * The LD_PRELOAD interposer (libshmbypass-preload.so): internal interfaces
 * shared by interpose.c (set-up, fd table, channels, socket life cycle),
 * interpose_io.c (the data path) and interpose_poll.c (readiness).
 *
 * The application's fd stays the real TCP socket. A connection the BPF
 * handshake put in the shm tier gets a *channel*: two rings in the region
 * (tx: we write, rx: we read). The TCP connection stays open as the control
 * channel: after the handshake it carries only doorbell bytes (wake-ups),
 * and its FIN/RST tell us when the peer is gone. Waits (blocking calls,
 * poll, select, epoll) spin briefly on the ring, then arm it and sleep on
 * the TCP socket; the peer sends one doorbell byte when it finds us armed.
 * A futex cannot tell a sleeper that the peer process died; the TCP socket
 * can (docs: "The interposer").
 */
#ifndef SHMBYPASS_INTERPOSE_H
#define SHMBYPASS_INTERPOSE_H

#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/epoll.h>
#include <sys/select.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <time.h>

#include "region.h"
#include "ring.h"
#include "../bpf/bypass.h"

#define EXPORT __attribute__((visibility("default")))
#define unlikely(x) __builtin_expect(!!(x), 0)
#define likely(x) __builtin_expect(!!(x), 1)

/* ---- the real functions (dlsym RTLD_NEXT), resolved at load ---------- */

#define SBP_REAL_LIST(X)                                                                   \
	X(int, socket, int, int, int)                                                      \
	X(int, connect, int, const struct sockaddr *, socklen_t)                           \
	X(int, listen, int, int)                                                           \
	X(int, accept, int, struct sockaddr *, socklen_t *)                                \
	X(int, accept4, int, struct sockaddr *, socklen_t *, int)                          \
	X(int, close, int)                                                                 \
	X(int, close_range, unsigned int, unsigned int, int)                               \
	X(void, closefrom, int)                                                            \
	X(int, shutdown, int, int)                                                         \
	X(int, dup, int)                                                                   \
	X(int, dup2, int, int)                                                             \
	X(int, dup3, int, int, int)                                                        \
	X(int, fcntl, int, int, void *)                                                    \
	X(int, fcntl64, int, int, void *)                                                  \
	X(int, ioctl, int, unsigned long, void *)                                          \
	X(int, getsockopt, int, int, int, void *, socklen_t *)                             \
	X(int, setsockopt, int, int, int, const void *, socklen_t)                         \
	X(ssize_t, read, int, void *, size_t)                                              \
	X(ssize_t, write, int, const void *, size_t)                                       \
	X(ssize_t, readv, int, const struct iovec *, int)                                  \
	X(ssize_t, writev, int, const struct iovec *, int)                                 \
	X(ssize_t, recv, int, void *, size_t, int)                                         \
	X(ssize_t, send, int, const void *, size_t, int)                                   \
	X(ssize_t, recvfrom, int, void *, size_t, int, struct sockaddr *, socklen_t *)     \
	X(ssize_t, sendto, int, const void *, size_t, int, const struct sockaddr *,        \
	  socklen_t)                                                                       \
	X(ssize_t, recvmsg, int, struct msghdr *, int)                                     \
	X(ssize_t, sendmsg, int, const struct msghdr *, int)                               \
	X(int, recvmmsg, int, struct mmsghdr *, unsigned int, int, struct timespec *)      \
	X(int, sendmmsg, int, struct mmsghdr *, unsigned int, int)                         \
	X(ssize_t, sendfile, int, int, off_t *, size_t)                                    \
	X(ssize_t, sendfile64, int, int, off_t *, size_t)                                  \
	X(ssize_t, splice, int, off_t *, int, off_t *, size_t, unsigned int)               \
	X(ssize_t, __read_chk, int, void *, size_t, size_t)                                \
	X(ssize_t, __recv_chk, int, void *, size_t, size_t, int)                           \
	X(ssize_t, __recvfrom_chk, int, void *, size_t, size_t, int, struct sockaddr *,    \
	  socklen_t *)                                                                     \
	X(int, poll, struct pollfd *, nfds_t, int)                                         \
	X(int, __poll_chk, struct pollfd *, nfds_t, int, size_t)                           \
	X(int, ppoll, struct pollfd *, nfds_t, const struct timespec *, const sigset_t *)  \
	X(int, __ppoll_chk, struct pollfd *, nfds_t, const struct timespec *,              \
	  const sigset_t *, size_t)                                                        \
	X(int, select, int, fd_set *, fd_set *, fd_set *, struct timeval *)                \
	X(int, pselect, int, fd_set *, fd_set *, fd_set *, const struct timespec *,        \
	  const sigset_t *)                                                                \
	X(int, epoll_ctl, int, int, int, struct epoll_event *)                             \
	X(int, epoll_wait, int, struct epoll_event *, int, int)                            \
	X(int, epoll_pwait, int, struct epoll_event *, int, int, const sigset_t *)         \
	X(int, epoll_pwait2, int, struct epoll_event *, int, const struct timespec *,      \
	  const sigset_t *)

#define SBP_REAL_DECL(ret, name, ...) extern ret (*real_##name)(__VA_ARGS__);
SBP_REAL_LIST(SBP_REAL_DECL)
#undef SBP_REAL_DECL
/* Resolve one real function now (a hook called before our constructor). */
void *sbp_real(const char *name, void **slot);
#define REAL(name) (likely(real_##name) ? real_##name :                                     \
		    (__typeof__(real_##name))sbp_real(#name, (void **)&real_##name))

/* ---- process-wide state ---------------------------------------------- */

struct sbp_global {
	int enabled;            /* 0: SHMBYPASS_DISABLE or init refused: pure pass-through */
	int debug;
	int doorbell;           /* no futex wake-ups (ivshmem: the peer is in another VM) */
	_Atomic int shm_state;  /* 0 not tried, 1 usable, -1 unusable (reason logged) */
	int map_fd;             /* pinned sk_state (kept at a high fd, O_CLOEXEC) */
	int arena_fd;           /* arena backend: kept to re-map in forked children */
	void *region;           /* base of the region mapping */
	size_t region_size;
	struct sbp_region_info info;
	void *wake;             /* arena: companion segment of futex words */
	size_t wake_size;
	uint32_t part_first;    /* this kernel's part of the region (BPF `region` map): */
	uint32_t part_count;    /*   a peer slot outside it is another VM's (0: unknown) */
	uint32_t spin_ns;       /* ring spin budget (SHMBYPASS_SPIN_NS) */
	uint32_t epoll_spin_ns; /* poll/epoll spin before sleeping */
	char instance[128];
	char pin_dir[256];
	char region_spec[300];  /* "<backend>:<path>" */
};
extern struct sbp_global g;

void sbp_log(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
#define DBG(...) do { if (unlikely(g.debug)) sbp_log(__VA_ARGS__); } while (0)

/* Map the region and open sk_state once; 1 if the shm tier can be used. */
int sbp_shm_usable(void);

/* ---- channels --------------------------------------------------------- */

/* Channel state flags (chan_sh.flags). */
#define CH_RX_ATTACHED  0x0001u  /* rx ring attached (the peer formatted it) */
#define CH_NONBLOCK     0x0002u  /* O_NONBLOCK on the file description */
#define CH_SHUT_RD      0x0004u  /* our shutdown(SHUT_RD) */
#define CH_SHUT_WR      0x0008u  /* our shutdown(SHUT_WR) */
#define CH_TCP_EOF      0x0010u  /* the TCP control connection said FIN */
#define CH_TCP_RST      0x0020u  /* ... or reset */
#define CH_PEER_GONE    0x0040u  /* the peer's socket is closed (FIN/RST without a ring FIN) */
#define CH_GONE_RESET   0x0080u  /* ... and TCP would have said ECONNRESET */
#define CH_BROKEN       0x0100u  /* set-up failed or a ring was corrupt: ECONNRESET */
#define CH_DATA         0x0200u  /* data has flowed through the rings */
#define CH_APP_NODELAY  0x0400u  /* what the app set with TCP_NODELAY (we keep it on) */
#define CH_APP_CORK     0x0800u  /* what the app set with TCP_CORK (never applied) */
#define CH_BELL_SEEN    0x1000u  /* a byte came from the peer: it has formatted its ring */

/* Shared between the processes that hold the socket after fork(): one
 * MAP_SHARED anonymous page per channel. Locks are process-shared and
 * robust (a holder killed mid-call does not wedge the others). */
struct chan_sh {
	pthread_mutex_t rx_lock;        /* one reader at a time (the ring is SPSC) */
	pthread_mutex_t tx_lock;        /* one writer at a time */
	_Atomic uint32_t rx_sleeping;   /* the rx lock holder is waiting for data */
	_Atomic uint32_t tx_sleeping;   /* the tx lock holder is waiting for room */
	_Atomic uint32_t flags;         /* CH_* */
	_Atomic uint32_t attaching;     /* one thread attaches the rx view */
	uint32_t reason;                /* CH_BROKEN: why (SBP_RESET_*, or ours) */
	int kick[2];                    /* doorbell mode: eventfd per direction (rx, tx), or -1 */
	struct sbp_ring rx;             /* views (guarded by the locks) */
	struct sbp_ring tx;
	void *rx_slot, *tx_slot;
	uint32_t rx_idx, tx_idx;
	uint64_t rx_gen, tx_gen;
	size_t slot_size;
	uint64_t rx_consumed;           /* bytes we took from rx (epoll edge detection) */
	uint64_t tx_written;            /* bytes we put in tx */
	int64_t slice_ns[2];            /* chan_wait back-off when no doorbell can come */
	int64_t last_probe_ns;
};

/* Per process (private memory, type-stable: never unmapped, only reused). */
struct chan {
	_Atomic int refs;       /* fd table entries + calls in flight; 0 = free */
	unsigned sh_epoch;      /* fork epoch when sh was made (pooled only if unchanged) */
	_Atomic int nfds;       /* fds of this process naming this channel */
	_Atomic int shared;     /* another process may hold the socket (fork, exec, SCM_RIGHTS) */
	struct chan_sh *sh;
	struct chan *next_free;
};

int chan_tryget(struct chan *ch);
void chan_put(struct chan *ch);

/* ---- the fd table ----------------------------------------------------- */

/* An entry is a pointer (8-aligned) with the kind in the low 3 bits. */
enum fd_kind {
	K_UNKNOWN = 0,  /* not seen yet: probed on first use */
	K_PLAIN = 1,    /* not ours: pass straight through */
	K_TCP = 2,      /* a TCP socket not connected yet: mark at connect/listen */
	K_CONNECTING = 3, /* connect() said EINPROGRESS */
	K_LISTEN = 4,   /* a marked listener: accepted sockets are looked up */
	K_SHM = 5,      /* ptr = struct chan */
	K_EPOLL = 6,    /* ptr = struct ep (an epoll fd holding shm sockets) */
	K_BUSY = 7,     /* a thread is setting this fd up: others wait */
};
#define FD_KIND(v) ((int)((v) & 7))
#define FD_PTR(v) ((void *)(uintptr_t)((v) & ~(uint64_t)7))

uint64_t fdt_load(int fd);
void fdt_store(int fd, uint64_t v);
uint64_t fdt_xchg(int fd, uint64_t v);
int fdt_cas(int fd, uint64_t old, uint64_t v);
int fdt_max(void);
/* What the app set on a socket we saw created (socket/accept): saves the
 * syscalls that would ask the kernel at set-up and close. */
#define FDO_KNOWN       0x01u   /* the other bits are reliable */
#define FDO_NONBLOCK    0x02u
#define FDO_NODELAY     0x04u
#define FDO_CORK        0x08u
#define FDO_LINGER0     0x10u   /* SO_LINGER {1, 0}: close is an abort */
unsigned fdo_get(int fd);
void fdo_set(int fd, unsigned bits);
void fdo_update(int fd, unsigned bit, int on);

/* Move an fd of ours to a high number (close-on-exec) and protect it from
 * the app's close()/close_range()/dup2(). */
int sbp_internal_fd(int fd);

/* What fd is; for K_SHM *chp is a referenced channel (chan_put it).
 * Probes unknown fds and finishes pending connects on the way. */
int fd_class(int fd, struct chan **chp);

/* ---- the control connection --------------------------------------------- */

void ctl_doorbell(int fd);              /* one byte, never blocks, keeps errno */
/* Consume doorbell bytes; notes FIN/RST. Returns CH_TCP_EOF/RST bits seen. */
uint32_t ctl_drain(int fd, struct chan *ch);
/* The peer can no longer send us doorbells (its write side is shut). */
int peer_tx_shut(struct chan *ch);
int rx_try_attach(int fd, struct chan *ch);     /* 1 attached; fd -1 if unknown */
void chan_break(int fd, struct chan *ch, uint32_t reason, const char *why);

/* ---- waiting --------------------------------------------------------------- */

#define DL_NONE INT64_MAX
int64_t now_ns(void);
/* -1 when the socket has no SO_RCVTIMEO/SO_SNDTIMEO, else ns. */
int64_t sock_timeout_ns(int fd, int optname);
/* Sleep on the TCP socket of a channel until a doorbell or a state change.
 * dir 0: wait for rx data; 1: wait for tx room. 0 woken (re-check),
 * -ETIMEDOUT, -EINTR. Call with the direction lock held. */
int chan_wait(int fd, struct chan *ch, int dir, int64_t deadline);

/* ---- readiness (interpose_poll.c) ---------------------------------------------- */

/* Current poll mask of a shm socket (POLLIN/OUT/RDHUP/HUP/ERR bits). */
uint32_t chan_poll_mask(int fd, struct chan *ch);
void ep_forget_fd(int fd);              /* close(): drop fd from every epoll set */
void ep_free(void *ep);                 /* close() of an epoll fd */
/* An fd registered in epoll sets while connecting became a shm socket. */
void ep_fd_became_shm(int fd);
void ep_atfork_child(void);

/* ---- the data path (interpose_io.c) --------------------------------------------- */

ssize_t shm_send(int fd, struct chan *ch, const struct iovec *iov, int iovcnt, int flags);
ssize_t shm_recv(int fd, struct chan *ch, const struct iovec *iov, int iovcnt, int flags);

/* After a signal interrupted a blocking wait: would the kernel restart the
 * call (every installed handler has SA_RESTART)? */
int sbp_restartable(void);

#endif
