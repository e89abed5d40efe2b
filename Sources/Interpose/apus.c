/* apus.c - replicating an unmodified TCP server through the C ABI (APUS mode): the leader's side
 * and the hooks' replicated paths.
 *
 * Leader: a connection accepted on the server's port (INTERPOSE_PORT) gets an id and an OPEN
 * entry; the bytes of every client epoll reports readable are read ahead, proposed as one BATCH
 * entry and handed to the server only once committed, in log order (the pending queue); end of
 * stream is an item of the batch, the server's close() a CLOSE entry. Readiness (role.c) decides
 * when a leader may take clients. Followers refuse clients and replay (replay.c).
 * docs/design/interpose.md has the whole protocol and its limits. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "apus_leader.h"
#include "interpose.h"

atomic_int apus_on;

static const char *config_path;
int apus_app_port;
atomic_int apus_app_epfd = -1;
int apus_wake_fd = -1;
/* The epoll data of the shim's wake-up eventfd ("interpos"); the server's own events never carry it. */
#define WAKE_TAG 0x696e746572706f73ULL

struct client *apus_clients;
int apus_client_count;
static uint64_t next_serial;
static int started;
static pid_t server_tid;
/* The calling thread's id, asked of the kernel once per thread: every read of a client checks
 * it, and a system call per read was the only one a follower's server made per request. (A
 * forked child inherits it, but runs no APUS path.) */
static __thread pid_t this_tid;
static pid_t thread_id(void) {
    if (!this_tid) this_tid = gettid();
    return this_tid;
}
/* Clients with committed input the server has not read, in log order; only the head may read. */
struct client *apus_pending_head;
static struct client *pending_tail;

void apus_setup_from_env(void) {
    const char *cfg = getenv("INTERPOSE_CONFIG");
    const char *port = getenv("INTERPOSE_PORT");
    if (!cfg || !*cfg) return;
    char *end = NULL;
    long p = port ? strtol(port, &end, 10) : 0;
    if (!port || *end || p <= 0 || p > 65535) {
        char why[160];
        snprintf(why, sizeof why, "INTERPOSE_CONFIG is set but INTERPOSE_PORT (the server's TCP port) is %s",
                 port ? "not a port number" : "missing");
        apus_refuse_server(why);
    }
    apus_read_limits_from_env();
    apus_snapshot_setup_from_env();
    apus_raise_fd_limit();
    /* A copy: servers that set their process title (Redis does) write over the environment. */
    config_path = strdup(cfg);
    if (!config_path) return;
    apus_app_port = (int)p;
    atomic_store(&apus_on, 1);
}

/* Stops this replica's server: its state can no longer be proven equal to the others'. A
 * restarted replica rebuilds it from the log. */
_Noreturn void apus_fail_stop(const char *why) {
    apus_log("stopping the server: %s (a restart rebuilds its state from the log)", why);
    _exit(70);
}

_Noreturn void apus_refuse_server(const char *why) {
    apus_log("refusing to run this server replicated: %s", why);
    _exit(78);
}

static int is_app_listener(int fd) {
    if (!apus_fd_in_range(fd)) return 0;
    int known = atomic_load(&apus_fds[fd].listener);
    if (known) return known == 1;
    struct sockaddr_storage a;
    socklen_t len = sizeof a;
    int listening = 0;
    socklen_t ilen = sizeof listening;
    int yes = getsockname(fd, (struct sockaddr *)&a, &len) == 0
        && getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &listening, &ilen) == 0 && listening
        && ((a.ss_family == AF_INET && ntohs(((struct sockaddr_in *)&a)->sin_port) == apus_app_port)
            || (a.ss_family == AF_INET6 && ntohs(((struct sockaddr_in6 *)&a)->sin6_port) == apus_app_port));
    atomic_store(&apus_fds[fd].listener, yes ? 1 : 2);
    return yes;
}

/* MARK: epoll_ctl */

void apus_after_epoll_ctl(int epfd, int op, int fd, const struct epoll_event *ev) {
    if (op == EPOLL_CTL_ADD && is_app_listener(fd)) atomic_store(&apus_app_epfd, epfd);
    int kind = apus_fd_kind_of(fd);
    if (epfd != atomic_load(&apus_app_epfd) || kind == APUS_FD_NONE) return;
    apus_lock();
    struct client *c = kind == APUS_FD_CLIENT ? apus_fd_client(fd) : NULL;
    struct replay *r = kind == APUS_FD_REPLAY ? apus_fd_replay(fd) : NULL;
    if (c) {
        c->watched = op != EPOLL_CTL_DEL;
        if (ev && op != EPOLL_CTL_DEL) { c->data = ev->data.u64; c->events = ev->events; }
    } else if (r) {
        /* A round reports the connection the way the server watches it. */
        r->watched = op != EPOLL_CTL_DEL;
        if (ev && op != EPOLL_CTL_DEL) { r->data = ev->data.u64; r->events = ev->events; }
    }
    apus_unlock();
}

int apus_epoll_ctl_recorded_only(int epfd, int op, int fd, const struct epoll_event *ev) {
    int kind = apus_fd_kind_of(fd);
    if (kind == APUS_FD_NONE) return 0;
    int app = atomic_load(&apus_app_epfd);
    if (op != EPOLL_CTL_DEL && app >= 0 && epfd != app) {
        /* Its reads would be ordered by another thread's loop (memcached hands connections to
         * worker threads): refused before a byte of the client is read. */
        char why[256];
        snprintf(why, sizeof why, "it watches a client connection (fd %d) in epoll set %d, not in the set that watches its "
                 "listener (%d): it serves clients from other threads, whose reads libinterpose cannot order", fd, epfd, app);
        apus_refuse_server(why);
    }
    if (epfd != app || kind != APUS_FD_CLIENT) return 0;
    apus_lock();
    struct client *c = apus_fd_client(fd);
    int recorded = c && c->broken;
    if (recorded) {
        c->watched = op != EPOLL_CTL_DEL;
        if (ev && op != EPOLL_CTL_DEL) { c->data = ev->data.u64; c->events = ev->events; }
    }
    apus_unlock();
    return recorded;
}

int apus_is_app_epoll(int epfd) { return epfd >= 0 && epfd == atomic_load_explicit(&apus_app_epfd, memory_order_relaxed); }

/* MARK: clients and the pending queue (the shim's lock held) */

void apus_break_client(struct client *c) {
    apus_assert_locked("apus_break_client");
    if (c->broken) return;
    c->broken = 1;
    shutdown(c->fd, SHUT_RDWR); /* the server's writes now fail, unseen (hooks.c) */
    int epfd = atomic_load(&apus_app_epfd);
    if (epfd >= 0) REAL(epoll_ctl)(epfd, EPOLL_CTL_DEL, c->fd, NULL);
}

static void queue_push(struct client *c) {
    apus_assert_locked("queue_push");
    if (c->queued) return;
    c->queued = 1;
    c->pending_next = NULL;
    if (pending_tail) pending_tail->pending_next = c; else apus_pending_head = c;
    pending_tail = c;
}

static void queue_remove(struct client *c) {
    apus_assert_locked("queue_remove");
    if (!c->queued) return;
    c->queued = 0;
    struct client *prev = NULL;
    for (struct client *p = apus_pending_head; p; prev = p, p = p->pending_next) {
        if (p != c) continue;
        if (prev) prev->pending_next = c->pending_next; else apus_pending_head = c->pending_next;
        if (pending_tail == c) pending_tail = prev;
        break;
    }
    c->pending_next = NULL;
}

/* Leaves the queue once the server has read all of a client's committed input. */
static void queue_settle(struct client *c) {
    if (c->queued && !c->buf && (!c->eof || c->eof_returned)) queue_remove(c);
}

static struct client *client_by_id(conn_id id) {
    for (struct client *c = apus_clients; c; c = c->next) if (conn_id_eq(c->id, id)) return c;
    return NULL;
}

int apus_own_close(conn_id id) {
    apus_assert_locked("apus_own_close");
    struct client *c = client_by_id(id);
    if (!c || !c->broken) return 1; /* gone, or a live client whose end the read path handled */
    if (!c->eof) { c->eof = 1; queue_push(c); }
    return 0; /* done once the server closed it */
}

/* MARK: proposals */

/* Proposes one client's bytes (or its end, `data` NULL) as a one-item BATCH and waits until it
 * committed. An outcome that is unknown stops the server: the input may commit while the
 * server never saw it. */
static int propose_item_sync(conn_id id, const void *data, size_t len) {
    unsigned char *buf = malloc(1 + WIRE_ITEM_HEADER_BYTES + len);
    if (!buf) return INTERPOSE_EINVAL;
    size_t n = wire_batch_item(buf, wire_batch_start(buf), id, data, len);
    apus_server_waits(1);
    int rc = interpose_propose(buf, n, NULL);
    apus_server_waits(0);
    free(buf);
    if (rc == INTERPOSE_EUNKNOWN) apus_fail_stop("a proposal timed out and may still commit");
    return rc;
}

/* MARK: start */

static void start(void) {
    started = 1;
    apus_wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (apus_wake_fd < 0) apus_fail_stop("cannot create the wake-up eventfd");
    struct epoll_event ev = { .events = EPOLLIN, .data.u64 = WAKE_TAG };
    if (REAL(epoll_ctl)(atomic_load(&apus_app_epfd), EPOLL_CTL_ADD, apus_wake_fd, &ev) != 0) apus_fail_stop("cannot watch the wake-up eventfd");
    interpose_set_deliver(apus_deliver, NULL);
    apus_snapshot_register();
    /* The replica may deliver while it starts; nothing drains the queue until this returns. */
    apus_server_waits(1);
    int rc = interpose_init(config_path);
    apus_server_waits(0);
    if (rc != INTERPOSE_OK) {
        apus_log("%s", interpose_last_error());
        apus_fail_stop("the replica did not start");
    }
    apus_compute_client_cap();
    apus_log("replicating the server on port %d (config %s)", apus_app_port, config_path);
}

/* MARK: epoll_wait (server thread; apus_in_hook is set) */

/* The client an epoll event is for, by the data the server registered (Redis: the fd). */
static struct client *client_for_event(uint64_t data) {
    if (data < APUS_FD_MAX) {
        struct client *c = apus_fd_client((int)data);
        if (c && c->watched && c->data == data) return c;
    }
    for (struct client *c = apus_clients; c; c = c->next) if (c->watched && c->data == data) return c;
    return NULL;
}

/* Committed bytes (or an end of stream) the server has not read yet, on an fd it watches. */
static int has_leftover(const struct client *c) {
    return c->queued && c->watched && (c->events & EPOLLIN);
}

/* A client told "nothing to read" only because another client's input came first: an
 * edge-triggered server will not look at it again until told. */
static int is_owed(const struct client *c) {
    return c->owed && !c->broken && c->watched && (c->events & EPOLLIN);
}

int apus_add_event(struct epoll_event *events, int k, int max, uint64_t data) {
    for (int i = 0; i < k; i++) if (events[i].data.u64 == data) { events[i].events |= EPOLLIN; return k; }
    if (k < max) events[k++] = (struct epoll_event){ .events = EPOLLIN, .data.u64 = data };
    return k;
}

/* With committed input still unread, the server hears only of those clients, in log order, and
 * of everything that is not client input: new bytes read now would be handled before older
 * committed ones, in an order the log does not record. */
static int report_leftovers(struct epoll_event *events, int k, int max) {
    int j = 0;
    for (int i = 0; i < k; i++) {
        /* Clients keep their write readiness; only input waits for its turn. An edge-triggered
         * server would not hear of input withheld now again: the client is owed an event. */
        struct client *c = client_for_event(events[i].data.u64);
        uint32_t input = EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR | EPOLLPRI;
        if (c && (events[i].events & input)) c->owed = 1;
        if (c) events[i].events &= ~input;
        if (events[i].events) events[j++] = events[i];
    }
    k = j;
    for (struct client *c = apus_pending_head; c; c = c->pending_next) if (has_leftover(c)) k = apus_add_event(events, k, max, c->data);
    return k;
}

int apus_epoll_wait(int epfd, struct epoll_event *events, int max, int timeout, const sigset_t *mask, int pwait) {
    apus_in_hook = 1;
    if (!started) start();
    if (!server_tid) server_tid = thread_id();
    long long deadline = timeout < 0 ? -1 : apus_now_ms() + timeout;
    int n, k, leftovers, owed, replaying;
    for (;;) {
        apus_lock();
        apus_update_role();
        leftovers = owed = 0;
        for (struct client *c = apus_pending_head; c; c = c->pending_next) leftovers += has_leftover(c);
        for (struct client *c = apus_clients; c; c = c->next) owed += is_owed(c);
        replaying = apus_round_active();
        int shim_wait = apus_replay_wait_ms();
        apus_unlock();
        /* With committed bytes still unread, the server must come back at once. */
        long long left = deadline < 0 ? -1 : deadline - apus_now_ms();
        if (deadline >= 0 && left < 0) left = 0;
        int t = leftovers || owed || replaying ? 0 : (int)left;
        if (shim_wait >= 0 && (t < 0 || shim_wait < t)) t = shim_wait;
        apus_in_hook = 0;
        n = pwait ? REAL(epoll_pwait)(epfd, events, max, t, mask) : REAL(epoll_wait)(epfd, events, max, t);
        if (n < 0) return n;
        apus_in_hook = 1;
        k = 0;
        for (int i = 0; i < n; i++) {
            if (events[i].data.u64 == WAKE_TAG) {
                uint64_t v;
                if (REAL(read)(apus_wake_fd, &v, sizeof v) < 0) { /* already reset */ }
                continue;
            }
            events[k++] = events[i];
        }
        /* Woken only for the shim (an entry to replay, a barrier, a retry): its turn comes on the
         * next pass; the server sleeps on until its own timeout. */
        if (k > 0 || leftovers || owed || replaying || (deadline >= 0 && apus_now_ms() >= deadline)) break;
    }
    int saved = errno;
    apus_lock();
    if (leftovers) {
        k = report_leftovers(events, k, max);
    } else if (apus_round_active()) {
        /* A follower: a committed round of the leader's, handed out in this turn. */
        k = apus_round_report(events, k, max);
    } else if (apus_clients) {
        for (struct client *c = apus_clients; c; c = c->next) {
            if (!is_owed(c)) continue;
            c->owed = 0;
            k = apus_add_event(events, k, max, c->data);
        }
        if (k > 0) apus_read_ahead(events, k);
    }
    apus_unlock();
    apus_in_hook = 0;
    errno = saved;
    return k;
}

/* MARK: accept */

/* The replay connection whose shim end is the peer of an accepted connection, or NULL. */
static struct replay *replay_by_peer(int fd) {
    struct sockaddr_in peer;
    socklen_t len = sizeof peer;
    if (getpeername(fd, (struct sockaddr *)&peer, &len) != 0 || peer.sin_family != AF_INET
        || peer.sin_addr.s_addr != htonl(INADDR_LOOPBACK)) return NULL;
    for (struct replay *r = apus_replays; r; r = r->next) {
        if (r->sfd < 0 && r->cfd >= 0 && r->port == ntohs(peer.sin_port)) return r;
    }
    return NULL;
}

/* A line at most every 10 s about refused clients (a storm of them would flood the log). */
static void complain_refused(const char *fmt, long a, long b) {
    static long long last;
    if (!apus_log_due(&last)) return;
    char line[384];
    snprintf(line, sizeof line, fmt, a, b);
    apus_log("%s", line);
}

int apus_after_accept(int listen_fd, int fd) {
    apus_lock();
    if (!is_app_listener(listen_fd)) { apus_unlock(); return fd; }
    struct replay *r = replay_by_peer(fd);
    if (r && fd >= APUS_FD_MAX) {
        apus_log("the server accepted replay connection %016llx:%llu as fd %d, above the %d the shim tracks "
                 "(did it raise its fd limit?): closed, retried later",
                 (unsigned long long)r->id.inc, (unsigned long long)r->id.serial, fd, APUS_FD_MAX - 1);
        REAL(close)(fd);
        apus_replay_retry(r);
        apus_unlock();
        return APUS_REFUSED;
    }
    if (r) {
        r->sfd = fd;
        apus_fd_set_replay(fd, r);
        apus_unlock();
        return fd;
    }
    int refuse = 0;
    if (fd >= APUS_FD_MAX) {
        /* Untracked, its bytes would reach the server unreplicated. */
        complain_refused("refusing a client: the server accepted it as fd %ld, above the %ld the shim tracks (did it raise its fd limit?)",
                         fd, APUS_FD_MAX - 1);
        refuse = 1;
    } else if (!apus_ready()) {
        /* A follower (or a leader still catching up) serves no clients: they must use the leader. */
        refuse = 1;
    } else if (apus_client_count + apus_replay_count >= apus_clients_max) {
        complain_refused("refusing a client: %ld connections are open, the most a follower with this fd limit can replay (%ld; "
                         "INTERPOSE_MAX_CLIENTS sets it)", apus_client_count + apus_replay_count, apus_clients_max);
        refuse = 1;
    }
    if (refuse) {
        apus_unlock();
        REAL(close)(fd);
        return APUS_REFUSED;
    }
    struct client *c = calloc(1, sizeof *c);
    if (!c) apus_fail_stop("out of memory accepting a connection");
    c->id = (conn_id){ apus_claim_incarnation(), ++next_serial };
    c->fd = fd;
    /* Not waited for: the client's first bytes are proposed after it from this thread, so they
     * commit only if it did (a connection storm costs no round trip per connection). */
    unsigned char open[WIRE_CONTROL_BYTES];
    interpose_propose_async(open, wire_control(open, WIRE_OPEN, c->id), apus_ignore_outcome, NULL);
    c->next = apus_clients;
    apus_clients = c;
    apus_client_count++;
    apus_fd_set_client(fd, c);
    apus_unlock();
    return fd;
}

/* MARK: read */

/* The server's end of a replay connection: a round's committed bytes from memory, in log order;
 * otherwise the socket (the shim's own commands, an end the shim made by closing its end). */
static ssize_t read_replay(int fd, void *buf, size_t count) {
    ssize_t n;
    apus_lock();
    struct replay *r = apus_fd_replay(fd);
    int answered = r && apus_round_read(r, buf, count, &n);
    int e = errno;
    apus_unlock();
    if (answered) { errno = e; return n; }
    n = REAL(read)(fd, buf, count);
    e = errno;
    apus_lock();
    r = apus_fd_replay(fd);
    if (r && n > 0) r->unconsumed -= n;
    apus_unlock();
    errno = e;
    return n;
}

/* Not read ahead (a server that reads without being told by epoll, or an edge-triggered one
 * reading on until EAGAIN): read as much as a read-ahead would, commit, hand over what fits;
 * the rest waits as committed input (one consensus round per read-ahead, not per small read). */
static ssize_t read_direct(struct client *c, void *buf, size_t count) {
    size_t want = apus_read_ahead_bytes; /* fits one entry, whatever the server asked for */
    unsigned char *b = malloc(want);
    if (!b) apus_fail_stop("out of memory reading a client");
    ssize_t n = REAL(read)(c->fd, b, want);
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) {
        int e = errno;
        free(b);
        errno = e;
        return n;
    }
    apus_lock();
    int logged = n <= 0 && c->close_logged;
    if (n <= 0) c->close_logged = 1;
    apus_unlock();
    /* End of stream or a reset: the server hears it once it committed. */
    int rc = logged ? INTERPOSE_OK : propose_item_sync(c->id, n > 0 ? b : NULL, n > 0 ? (size_t)n : 0);
    apus_lock();
    if (rc != INTERPOSE_OK) {
        free(b);
        if (n <= 0) c->close_logged = 0;
        apus_break_client(c);
        apus_unlock();
        errno = EAGAIN;
        return -1;
    }
    if (n <= 0) {
        free(b);
        c->eof = c->eof_returned = 1;
        apus_unlock();
        return 0;
    }
    size_t k = (size_t)n < count ? (size_t)n : count;
    memcpy(buf, b, k);
    if (k < (size_t)n) {
        memmove(b, b + k, (size_t)n - k);
        apus_take_committed(c, b, (size_t)n - k);
    } else {
        free(b);
    }
    apus_unlock();
    return (ssize_t)k;
}

ssize_t apus_read(int fd, void *buf, size_t count) {
    if (server_tid && thread_id() != server_tid) {
        char why[200];
        snprintf(why, sizeof why, "thread %d reads a client connection (fd %d), but thread %d waits on the listener's epoll set: "
                 "libinterpose orders the reads of one thread only", (int)thread_id(), fd, (int)server_tid);
        apus_refuse_server(why);
    }
    int kind = apus_fd_kind_of(fd);
    if (kind == APUS_FD_REPLAY) return read_replay(fd, buf, count);
    apus_lock();
    struct client *c = apus_fd_client(fd);
    if (kind != APUS_FD_CLIENT || !c) { apus_unlock(); return REAL(read)(fd, buf, count); }
    if (count == 0) { apus_unlock(); return 0; } /* reads nothing, ends nothing */
    if (c->queued && c != apus_pending_head) {
        /* Another client's committed input comes first in the log: this one waits its turn. */
        c->owed = 1;
        apus_unlock();
        errno = EAGAIN;
        return -1;
    }
    if (c->buf) {
        /* Read ahead in epoll_wait and already committed. */
        size_t k = c->buf_len - c->buf_off < count ? c->buf_len - c->buf_off : count;
        memcpy(buf, c->buf + c->buf_off, k);
        c->buf_off += k;
        if (c->buf_off == c->buf_len) { free(c->buf); c->buf = NULL; }
        queue_settle(c);
        apus_unlock();
        return (ssize_t)k;
    }
    if (c->eof) {
        c->eof_returned = 1;
        queue_settle(c);
        apus_unlock();
        return 0;
    }
    if (c->broken || apus_pending_head) {
        /* A client of a lost term reads nothing until a committed CLOSE ends it; and no client
         * reads new bytes while committed ones wait. */
        if (!c->broken) c->owed = 1;
        apus_unlock();
        errno = EAGAIN;
        return -1;
    }
    apus_unlock();
    return read_direct(c, buf, count);
}

/* MARK: read-ahead results (the shim's lock held) */

void apus_take_committed(struct client *c, unsigned char *bytes, size_t len) {
    apus_assert_locked("apus_take_committed");
    if (bytes) {
        c->buf = bytes;
        c->buf_off = 0;
        c->buf_len = len;
    } else {
        c->eof = 1;
    }
    queue_push(c);
}

struct client *apus_client_for_event(uint64_t data) { return client_for_event(data); }

/* MARK: close */

/* A line at most every 10 s, with the count, when the server closes a client whose committed
 * bytes it has not read (a CLIENT KILL from another client of the same round, QUIT with more
 * behind it): they are dropped. When a command in the log caused the close, each follower drops
 * them too, its server having closed the connection at the same place of the log (a close the
 * leader's server alone decides is a limit: docs/design/interpose.md, "Leader"). */
static void note_dropped(size_t bytes) {
    static long clients;
    static long long total, last;
    clients++;
    total += (long long)bytes;
    if (!apus_log_due(&last)) return;
    apus_log("the server closed a client before reading its committed input: dropped "
             "(%ld clients, %lld bytes so far)", clients, total);
}

void apus_before_close(int fd) {
    atomic_store(&apus_fds[fd].listener, 0);
    if (apus_fd_kind_of(fd) == APUS_FD_NONE) return;
    apus_lock();
    struct client *c = apus_fd_client(fd);
    struct replay *r = apus_fd_replay(fd);
    apus_fd_forget(fd);
    if (c) {
        for (struct client **p = &apus_clients; *p; p = &(*p)->next) {
            if (*p == c) { *p = c->next; break; }
        }
        apus_client_count--;
        queue_remove(c);
        if (!c->close_logged) apus_propose_close(c->id, 1);
        if (c->buf) note_dropped(c->buf_len - c->buf_off);
        free(c->buf);
        free(c);
    } else if (r) {
        r->sclosed = 1;
    }
    apus_unlock();
}
