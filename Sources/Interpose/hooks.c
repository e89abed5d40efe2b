/* hooks.c - the libc wrappers of libinterpose.so.
 *
 * Each hook passes the call straight to libc unless APUS mode is on (INTERPOSE_CONFIG and
 * INTERPOSE_PORT set), the thread is not already inside a hook, and the fd is one the shim tracks
 * (a client connection of the replicated server, or a replay connection). errno is preserved on
 * the pass-through path; the APUS paths set it as libc would. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "apus.h"

struct interpose_real apus_real_fns;
__thread int apus_in_hook;

static void resolve(void) {
    apus_real_fns.accept = dlsym(RTLD_NEXT, "accept");
    apus_real_fns.accept4 = dlsym(RTLD_NEXT, "accept4");
    apus_real_fns.read = dlsym(RTLD_NEXT, "read");
    apus_real_fns.recv = dlsym(RTLD_NEXT, "recv");
    apus_real_fns.recvfrom = dlsym(RTLD_NEXT, "recvfrom");
    apus_real_fns.recvmsg = dlsym(RTLD_NEXT, "recvmsg");
    apus_real_fns.readv = dlsym(RTLD_NEXT, "readv");
    apus_real_fns.close = dlsym(RTLD_NEXT, "close");
    apus_real_fns.epoll_ctl = dlsym(RTLD_NEXT, "epoll_ctl");
    apus_real_fns.epoll_wait = dlsym(RTLD_NEXT, "epoll_wait");
    apus_real_fns.epoll_pwait = dlsym(RTLD_NEXT, "epoll_pwait");
}

static pthread_once_t resolved = PTHREAD_ONCE_INIT;
#define ENSURE() do { if (__builtin_expect(apus_real_fns.close == NULL, 0)) pthread_once(&resolved, resolve); } while (0)

/* A forked child (Redis forks to save) runs the server's code but no replica: every hook passes
 * through there. Locks another thread held at fork time stay locked in the child, so the child
 * must never reach them. */
static void in_forked_child(void) { atomic_store(&apus_on, 0); }

__attribute__((constructor)) static void interpose_load(void) {
    pthread_once(&resolved, resolve);
    pthread_atfork(NULL, NULL, in_forked_child);
    apus_setup_from_env();
}

void apus_log(const char *fmt, ...) {
    char line[512];
    int n = snprintf(line, sizeof line, "interpose[%d]: ", (int)getpid());
    va_list ap;
    va_start(ap, fmt);
    n += vsnprintf(line + n, sizeof line - (size_t)n - 1, fmt, ap);
    va_end(ap);
    if (n > (int)sizeof line - 2) n = (int)sizeof line - 2;
    line[n++] = '\n';
    ssize_t w = write(2, line, (size_t)n);
    (void)w;
}

static int after_accept(int listen_fd, int fd) {
    if (fd < 0 || !atomic_load_explicit(&apus_on, memory_order_relaxed) || apus_in_hook) return fd;
    int saved = errno;
    apus_in_hook = 1;
    int r = apus_after_accept(listen_fd, fd);
    apus_in_hook = 0;
    if (r >= 0) errno = saved;
    return r;
}

int accept(int fd, struct sockaddr *addr, socklen_t *len) {
    ENSURE();
    return after_accept(fd, REAL(accept)(fd, addr, len));
}

int accept4(int fd, struct sockaddr *addr, socklen_t *len, int flags) {
    ENSURE();
    return after_accept(fd, REAL(accept4)(fd, addr, len, flags));
}

static ssize_t tracked_read(int fd, void *buf, size_t count) {
    apus_in_hook = 1;
    ssize_t n = apus_read(fd, buf, count);
    int e = errno;
    apus_in_hook = 0;
    errno = e;
    return n;
}

ssize_t read(int fd, void *buf, size_t count) {
    ENSURE();
    if (!apus_tracked(fd)) return REAL(read)(fd, buf, count);
    return tracked_read(fd, buf, count);
}

ssize_t recv(int fd, void *buf, size_t len, int flags) {
    ENSURE();
    /* Only plain reads are replicated; peeking or out-of-band reads pass through. */
    if (!apus_tracked(fd) || (flags & ~MSG_DONTWAIT) != 0) return REAL(recv)(fd, buf, len, flags);
    return tracked_read(fd, buf, len);
}

ssize_t recvfrom(int fd, void *buf, size_t len, int flags, struct sockaddr *addr, socklen_t *alen) {
    ENSURE();
    if (!apus_tracked(fd) || (flags & ~MSG_DONTWAIT) != 0) return REAL(recvfrom)(fd, buf, len, flags, addr, alen);
    if (alen) *alen = 0; /* a connected stream socket reports no source address */
    return tracked_read(fd, buf, len);
}

/* Scatter reads go through one bounce buffer (at most 64 KiB per call; a short read is legal). */
static ssize_t tracked_readv(int fd, const struct iovec *iov, int n) {
    size_t total = 0;
    for (int i = 0; i < n; i++) total += iov[i].iov_len;
    char bounce[65536];
    if (total > sizeof bounce) total = sizeof bounce;
    ssize_t got = tracked_read(fd, bounce, total);
    if (got <= 0) return got;
    size_t off = 0;
    for (int i = 0; i < n && off < (size_t)got; i++) {
        size_t k = iov[i].iov_len < (size_t)got - off ? iov[i].iov_len : (size_t)got - off;
        memcpy(iov[i].iov_base, bounce + off, k);
        off += k;
    }
    return got;
}

ssize_t readv(int fd, const struct iovec *iov, int n) {
    ENSURE();
    if (!apus_tracked(fd)) return REAL(readv)(fd, iov, n);
    return tracked_readv(fd, iov, n);
}

ssize_t recvmsg(int fd, struct msghdr *msg, int flags) {
    ENSURE();
    if (!apus_tracked(fd) || (flags & ~MSG_DONTWAIT) != 0 || msg->msg_controllen != 0)
        return REAL(recvmsg)(fd, msg, flags);
    msg->msg_flags = 0;
    msg->msg_namelen = 0;
    return tracked_readv(fd, msg->msg_iov, (int)msg->msg_iovlen);
}

int close(int fd) {
    ENSURE();
    if (fd >= 0 && fd < APUS_FD_MAX && atomic_load_explicit(&apus_on, memory_order_relaxed) && !apus_in_hook) {
        int saved = errno;
        apus_in_hook = 1;
        apus_before_close(fd);
        apus_in_hook = 0;
        errno = saved;
    }
    return REAL(close)(fd);
}

int epoll_ctl(int epfd, int op, int fd, struct epoll_event *ev) {
    ENSURE();
    int r = REAL(epoll_ctl)(epfd, op, fd, ev);
    if (r == 0 && atomic_load_explicit(&apus_on, memory_order_relaxed) && !apus_in_hook) {
        int saved = errno;
        apus_in_hook = 1;
        apus_after_epoll_ctl(epfd, op, fd, ev);
        apus_in_hook = 0;
        errno = saved;
    }
    return r;
}

int epoll_wait(int epfd, struct epoll_event *events, int max, int timeout) {
    ENSURE();
    if (!atomic_load_explicit(&apus_on, memory_order_relaxed) || apus_in_hook || !apus_is_app_epoll(epfd))
        return REAL(epoll_wait)(epfd, events, max, timeout);
    return apus_epoll_wait(epfd, events, max, timeout, NULL, 0);
}

int epoll_pwait(int epfd, struct epoll_event *events, int max, int timeout, const sigset_t *mask) {
    ENSURE();
    if (!atomic_load_explicit(&apus_on, memory_order_relaxed) || apus_in_hook || !apus_is_app_epoll(epfd))
        return REAL(epoll_pwait)(epfd, events, max, timeout, mask);
    return apus_epoll_wait(epfd, events, max, timeout, mask, 1);
}
