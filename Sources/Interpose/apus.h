/* apus.h - internal: the LD_PRELOAD replication of an unmodified TCP server (APUS mode).
 * Not part of the C ABI. docs/design/interpose.md describes the protocol. */
#ifndef INTERPOSE_APUS_H
#define INTERPOSE_APUS_H

#include <stdatomic.h>
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
int apus_epoll_wait(int epfd, struct epoll_event *events, int max, int timeout, const sigset_t *mask, int pwait);
void apus_log(const char *fmt, ...);

#endif
