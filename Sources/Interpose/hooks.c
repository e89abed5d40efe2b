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
#include <stdlib.h>
#include <linux/close_range.h>
#include <string.h>
#include <unistd.h>

#include "fdtable.h"

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
    apus_real_fns.epoll_pwait2 = dlsym(RTLD_NEXT, "epoll_pwait2");
    apus_real_fns.write = dlsym(RTLD_NEXT, "write");
    apus_real_fns.writev = dlsym(RTLD_NEXT, "writev");
    apus_real_fns.send = dlsym(RTLD_NEXT, "send");
    apus_real_fns.sendto = dlsym(RTLD_NEXT, "sendto");
    apus_real_fns.sendmsg = dlsym(RTLD_NEXT, "sendmsg");
    apus_real_fns.preadv2 = dlsym(RTLD_NEXT, "preadv2");
    apus_real_fns.recvmmsg = dlsym(RTLD_NEXT, "recvmmsg");
    apus_real_fns.splice = dlsym(RTLD_NEXT, "splice");
    apus_real_fns.dup2 = dlsym(RTLD_NEXT, "dup2");
    apus_real_fns.dup3 = dlsym(RTLD_NEXT, "dup3");
    apus_real_fns.close_range = dlsym(RTLD_NEXT, "close_range");
}

static pthread_once_t resolved = PTHREAD_ONCE_INIT;
#define ENSURE() do { if (__builtin_expect(apus_real_fns.close == NULL, 0)) pthread_once(&resolved, resolve); } while (0)

/* A forked child (Redis forks to save) runs the server's code but no replica: every hook passes
 * through there. Locks another thread held at fork time stay locked in the child, so the child
 * must never reach them. It closes its copies of the shim's replay connections, found through
 * the fd table's atomic flags rather than the replay list (which another thread may have been changing):
 * the parent ends those connections, and a child holding a copy would keep them open. */
static void in_forked_child(void) {
    atomic_store(&apus_on, 0);
    apus_fd_close_shim_fds();
}

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

int apus_log_due(long long *last) {
    long long now = apus_now_ms();
    if (*last && now - *last < 10000) return 0;
    *last = now;
    return 1;
}

/* A connection the shim refuses (a follower's client, one past the cap) is closed and the next
 * one in the backlog is taken in the same call: an edge-triggered server that got EAGAIN would
 * not come back for the replay connections queued behind it. The bound keeps a flood of refused
 * connections from holding the server here forever; EAGAIN after it (level-triggered servers
 * come back at once). */
#define REFUSALS_PER_CALL 4096

static int accept_common(int fd, struct sockaddr *addr, socklen_t *len, int flags, int four) {
    socklen_t room = len ? *len : 0;
    for (int refused = 0; refused < REFUSALS_PER_CALL; refused++) {
        if (len) *len = room;
        int c = four ? REAL(accept4)(fd, addr, len, flags) : REAL(accept)(fd, addr, len);
        if (c < 0 || !atomic_load_explicit(&apus_on, memory_order_relaxed) || apus_in_hook) return c;
        int saved = errno;
        apus_in_hook = 1;
        int r = apus_after_accept(fd, c);
        apus_in_hook = 0;
        if (r != APUS_REFUSED) {
            errno = saved;
            return r;
        }
    }
    errno = EAGAIN;
    return -1;
}

int accept(int fd, struct sockaddr *addr, socklen_t *len) {
    ENSURE();
    return accept_common(fd, addr, len, 0, 0);
}

int accept4(int fd, struct sockaddr *addr, socklen_t *len, int flags) {
    ENSURE();
    return accept_common(fd, addr, len, flags, 1);
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

static void closing(int fd);

int close(int fd) {
    ENSURE();
    closing(fd);
    return REAL(close)(fd);
}

int epoll_ctl(int epfd, int op, int fd, struct epoll_event *ev) {
    ENSURE();
    if (atomic_load_explicit(&apus_on, memory_order_relaxed) && !apus_in_hook) {
        apus_in_hook = 1;
        int recorded = apus_epoll_ctl_recorded_only(epfd, op, fd, ev);
        apus_in_hook = 0;
        if (recorded) return 0;
    }
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

/* MARK: fortified reads (glibc's _FORTIFY_SOURCE builds call these instead of read/recv) */

ssize_t __read_chk(int fd, void *buf, size_t count, size_t buflen) {
    if (count > buflen) abort(); /* what glibc's own check does (__chk_fail) */
    return read(fd, buf, count);
}

ssize_t __recv_chk(int fd, void *buf, size_t len, size_t buflen, int flags) {
    if (len > buflen) abort();
    return recv(fd, buf, len, flags);
}

ssize_t __recvfrom_chk(int fd, void *buf, size_t len, size_t buflen, int flags, struct sockaddr *addr, socklen_t *alen) {
    if (len > buflen) abort();
    return recvfrom(fd, buf, len, flags, addr, alen);
}

ssize_t preadv2(int fd, const struct iovec *iov, int n, off_t offset, int flags) {
    ENSURE();
    /* Offset -1 on a socket is a plain scatter read. */
    if (!apus_tracked(fd) || offset != -1 || flags != 0) return REAL(preadv2)(fd, iov, n, offset, flags);
    return tracked_readv(fd, iov, n);
}

/* MARK: read paths the shim cannot replicate: refused before a client byte is consumed */

int recvmmsg(int fd, struct mmsghdr *msgs, unsigned int n, int flags, struct timespec *timeout) {
    ENSURE();
    if (apus_tracked(fd)) apus_refuse_server("it reads a client connection with recvmmsg, which libinterpose does not replicate");
    return REAL(recvmmsg)(fd, msgs, n, flags, timeout);
}

ssize_t splice(int in, off_t *in_off, int out, off_t *out_off, size_t len, unsigned int flags) {
    ENSURE();
    if (apus_tracked(in)) apus_refuse_server("it splices from a client connection, which libinterpose does not replicate");
    return REAL(splice)(in, in_off, out, out_off, len, flags);
}

/* MARK: writes to clients: an error is hidden, so the server drops a client only when the log
 * says it ended (a write error seen on one replica only would free it at a different point). */

static int is_client(int fd) {
    return apus_tracked(fd) && apus_fd_kind_of(fd) == APUS_FD_CLIENT;
}

/* A follower's replay connection (docs/design/interpose.md, "Followers"): followers answer no
 * one, so the server's replies are dropped here, without a system call, instead of crossing
 * loopback for the shim to read and throw away. The shim's own connections (id incarnation 0:
 * snapshots, snapshot.c) keep theirs. */
static int is_discarded(int fd) {
    if (apus_in_hook || !apus_tracked(fd) || apus_fd_kind_of(fd) != APUS_FD_REPLAY) return 0;
    apus_lock();
    const struct replay *r = apus_fd_replay(fd);
    int discard = r && r->id.inc != 0;
    apus_unlock();
    return discard;
}

static ssize_t hide_write_error(ssize_t r, size_t len) {
    if (r >= 0 || errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) return r;
    return (ssize_t)len;
}

static size_t iov_bytes(const struct iovec *iov, int n) {
    size_t total = 0;
    for (int i = 0; i < n; i++) total += iov[i].iov_len;
    return total;
}

ssize_t write(int fd, const void *buf, size_t count) {
    ENSURE();
    if (is_discarded(fd)) return (ssize_t)count;
    ssize_t r = REAL(write)(fd, buf, count);
    return is_client(fd) ? hide_write_error(r, count) : r;
}

ssize_t writev(int fd, const struct iovec *iov, int n) {
    ENSURE();
    if (is_discarded(fd)) return (ssize_t)iov_bytes(iov, n);
    ssize_t r = REAL(writev)(fd, iov, n);
    return is_client(fd) ? hide_write_error(r, iov_bytes(iov, n)) : r;
}

ssize_t send(int fd, const void *buf, size_t len, int flags) {
    ENSURE();
    if (is_discarded(fd)) return (ssize_t)len;
    ssize_t r = REAL(send)(fd, buf, len, flags);
    return is_client(fd) ? hide_write_error(r, len) : r;
}

ssize_t sendto(int fd, const void *buf, size_t len, int flags, const struct sockaddr *addr, socklen_t alen) {
    ENSURE();
    if (is_discarded(fd)) return (ssize_t)len;
    ssize_t r = REAL(sendto)(fd, buf, len, flags, addr, alen);
    return is_client(fd) ? hide_write_error(r, len) : r;
}

ssize_t sendmsg(int fd, const struct msghdr *msg, int flags) {
    ENSURE();
    if (is_discarded(fd)) return (ssize_t)iov_bytes(msg->msg_iov, (int)msg->msg_iovlen);
    ssize_t r = REAL(sendmsg)(fd, msg, flags);
    return is_client(fd) ? hide_write_error(r, iov_bytes(msg->msg_iov, (int)msg->msg_iovlen)) : r;
}

/* MARK: closes by other names */

static void closing(int fd) {
    if (fd < 0 || fd >= APUS_FD_MAX || !atomic_load_explicit(&apus_on, memory_order_relaxed) || apus_in_hook) return;
    int saved = errno;
    apus_in_hook = 1;
    apus_before_close(fd);
    apus_in_hook = 0;
    errno = saved;
}

int dup2(int old, int new) {
    ENSURE();
    if (old != new) closing(new);
    return REAL(dup2)(old, new);
}

int dup3(int old, int new, int flags) {
    ENSURE();
    if (old != new) closing(new);
    return REAL(dup3)(old, new, flags);
}

int close_range(unsigned int first, unsigned int last, int flags) {
    ENSURE();
    if (!(flags & CLOSE_RANGE_CLOEXEC)) {
        for (unsigned int fd = first; fd <= last && fd < APUS_FD_MAX; fd++) closing((int)fd);
    }
    return REAL(close_range)(first, last, flags);
}

int epoll_pwait2(int epfd, struct epoll_event *events, int max, const struct timespec *timeout, const sigset_t *mask) {
    ENSURE();
    if (!atomic_load_explicit(&apus_on, memory_order_relaxed) || apus_in_hook || !apus_is_app_epoll(epfd))
        return REAL(epoll_pwait2)(epfd, events, max, timeout, mask);
    int ms = -1;
    if (timeout) {
        long long t = (long long)timeout->tv_sec * 1000 + (timeout->tv_nsec + 999999) / 1000000;
        ms = t > 0x7fffffff ? 0x7fffffff : (int)t;
    }
    return apus_epoll_wait(epfd, events, max, ms, mask, 1);
}
