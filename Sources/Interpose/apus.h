/* apus.h - internal: the LD_PRELOAD replication of an unmodified TCP server (APUS mode).
 * Not part of the C ABI. docs/design/interpose.md describes the protocol. */
#ifndef INTERPOSE_APUS_H
#define INTERPOSE_APUS_H

#include <stdatomic.h>
#include <stdint.h>
#include <stddef.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <sys/uio.h>

/* The libc functions the hooks wrap, resolved with dlsym(RTLD_NEXT). */
struct interpose_real {
    int (*accept)(int, struct sockaddr *, socklen_t *);
    int (*accept4)(int, struct sockaddr *, socklen_t *, int);
    ssize_t (*read)(int, void *, size_t);
    ssize_t (*recv)(int, void *, size_t, int);
    ssize_t (*recvfrom)(int, void *, size_t, int, struct sockaddr *, socklen_t *);
    ssize_t (*recvmsg)(int, struct msghdr *, int);
    ssize_t (*readv)(int, const struct iovec *, int);
    int (*close)(int);
    int (*epoll_ctl)(int, int, int, struct epoll_event *);
    int (*epoll_wait)(int, struct epoll_event *, int, int);
    int (*epoll_pwait)(int, struct epoll_event *, int, int, const sigset_t *);
    int (*epoll_pwait2)(int, struct epoll_event *, int, const struct timespec *, const sigset_t *);
    ssize_t (*write)(int, const void *, size_t);
    ssize_t (*writev)(int, const struct iovec *, int);
    ssize_t (*send)(int, const void *, size_t, int);
    ssize_t (*sendto)(int, const void *, size_t, int, const struct sockaddr *, socklen_t);
    ssize_t (*sendmsg)(int, const struct msghdr *, int);
    ssize_t (*preadv2)(int, const struct iovec *, int, off_t, int);
    int (*recvmmsg)(int, struct mmsghdr *, unsigned int, int, struct timespec *);
    ssize_t (*splice)(int, off_t *, int, off_t *, size_t, unsigned int);
    int (*dup2)(int, int);
    int (*dup3)(int, int, int);
    int (*close_range)(unsigned int, unsigned int, int);
};
extern struct interpose_real apus_real_fns;
#define REAL(name) (apus_real_fns.name)

/* Highest fd number (exclusive) the shim tracks; connections above it are passed through. */
#define APUS_FD_MAX 65536

enum apus_fd_kind { APUS_FD_NONE = 0, APUS_FD_CLIENT = 1, APUS_FD_REPLAY = 2 };

/* Set once INTERPOSE_CONFIG and INTERPOSE_PORT are present; cleared in a forked child. */
extern atomic_int apus_on;
/* Per fd: what the shim knows it to be (enum apus_fd_kind). */
extern _Atomic unsigned char apus_fd_kind[APUS_FD_MAX];
/* Set on a thread while it runs inside a hook: nested libc calls pass straight through. */
extern __thread int apus_in_hook;

static inline int apus_tracked(int fd) {
    return atomic_load_explicit(&apus_on, memory_order_relaxed) && !apus_in_hook && fd >= 0 && fd < APUS_FD_MAX
        && atomic_load_explicit(&apus_fd_kind[fd], memory_order_acquire) != APUS_FD_NONE;
}

void apus_setup_from_env(void);
int apus_after_accept(int listen_fd, int fd);
ssize_t apus_read(int fd, void *buf, size_t count);
void apus_before_close(int fd);
void apus_after_epoll_ctl(int epfd, int op, int fd, const struct epoll_event *ev);
int apus_is_app_epoll(int epfd);
/* 1 if an epoll_ctl on the server's set concerns a client of an ended term: it is recorded, not made. */
int apus_epoll_ctl_recorded_only(int epfd, int op, int fd, const struct epoll_event *ev);
int apus_epoll_wait(int epfd, struct epoll_event *events, int max, int timeout, const sigset_t *mask, int pwait);
void apus_log(const char *fmt, ...);

/* MARK: shared between apus.c (leader, role, hooks) and replay.c (followers' replay) */

enum { OP_OPEN = 1, OP_DATA = 2, OP_CLOSE = 3, OP_BATCH = 4 };
/* A BATCH entry carries a read-ahead round: id 0, then for each client its id (u64 LE), a length
 * (u32 LE) and that many bytes, in the order the server will read them. One log entry per round
 * keeps the replicas' per-entry costs off the per-client path. */
#define ITEM_HEADER_BYTES 12
/* An item length that marks the client's end of stream (no bytes follow), in its place in the round. */
#define ITEM_END_OF_STREAM 0xFFFFFFFFu
#define HEADER_BYTES 9 /* op, connection id (little-endian u64) */

/* A loopback connection replaying another leader's client connection into the local server. */
struct replay {
    uint64_t id;
    int cfd;            /* the shim's end */
    int sfd;            /* the server's end (-1 until the server accepted it) */
    uint16_t port;      /* the shim's end's local port: how the accept hook recognises it */
    long unconsumed;    /* bytes written that the server has not read yet */
    int cclosed, sclosed, close_proposed;
    struct replay *next;
};

/* A committed entry of another leader, waiting to be replayed. */
struct entry {
    struct entry *next;
    int op;
    uint64_t id;
    size_t len, off;
    unsigned char data[];
};

extern int apus_app_port;
extern int apus_wake_fd;
extern uint32_t apus_incarnation;
extern struct replay *apus_replays;
extern struct replay *apus_replay_by_sfd[APUS_FD_MAX];

_Noreturn void apus_fail_stop(const char *why);
size_t apus_encode(unsigned char *out, int op, uint64_t id);
void apus_propose_async(int op, uint64_t id);
/* The deliver callback (replica thread): queues other processes' committed entries. */
void apus_deliver(void *context, int kind, uint64_t index, const void *data, size_t len);
/* Replays queued entries as far as the server allows (server thread, mu held). */
void apus_pump(void);
/* A committed CLOSE of this process's own connection id (apus.c; server thread, mu held): 1 once done. */
int apus_own_close(uint64_t id);
/* No entry is queued or half replayed. */
int apus_replay_idle(void);

#endif
