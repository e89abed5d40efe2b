/* apus.c - replicating an unmodified TCP server through the C ABI (APUS mode).
 *
 * Leader: a connection accepted on the server's port (INTERPOSE_PORT) gets an id and an OPEN
 * entry; bytes the server reads from it are proposed as DATA and handed to the server only once
 * committed; end of stream or the server's close() is a CLOSE entry. Followers refuse clients and
 * replay committed entries into their own server over loopback connections, one per connection id,
 * one entry at a time: the next entry is written only after the server read all of the previous
 * one and came back to epoll_wait, so the server handles inputs in log order, as the leader did.
 * docs/design/interpose.md has the whole protocol and its limits. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/random.h>
#include <unistd.h>

#include "apus.h"
#include "interpose.h"

atomic_int apus_on;
_Atomic unsigned char apus_fd_kind[APUS_FD_MAX];

static const char *config_path;
int apus_app_port;
static atomic_int app_epfd = -1;
int apus_wake_fd = -1;
/* The epoll data of the shim's wake-up eventfd ("interpos"); the server's own events never carry it. */
#define WAKE_TAG 0x696e746572706f73ULL


/* A client connection the server accepted while this replica led.
 *
 * Everything the server learns of a client follows the log: its bytes and its end of stream are
 * handed out only once committed, and only in log order across clients (the pending queue); a
 * client of a lost term reads nothing more until a committed CLOSE ends it; write errors are
 * hidden, so the server never frees a client at a point of its own choosing. */
struct client {
    uint64_t id;
    int fd;
    int broken;       /* leadership was lost or a proposal failed: reads wait for a committed CLOSE */
    int close_logged; /* a CLOSE entry (or an end-of-stream item) was proposed */
    int eof;          /* a committed end of stream: reads return 0 once buf is consumed */
    int eof_returned; /* the server has read that 0 */
    int queued;       /* on the pending queue: committed bytes or a committed end not yet read */
    struct client *pending_next;
    /* Bytes read ahead in epoll_wait and committed, not yet handed to the server. */
    unsigned char *buf;
    size_t buf_len, buf_off;
    /* How the server watches the fd on its epoll (from epoll_ctl). */
    uint64_t data;
    uint32_t events;
    int watched;
    struct client *next;
};



static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;  /* clients, apus_replays, listener cache, role */
static unsigned char listener_kind[APUS_FD_MAX];        /* 0 unknown, 1 the server's listener, 2 other */
static struct client *clients;
static struct client *client_by_fd[APUS_FD_MAX];
struct replay *apus_replays;
struct replay *apus_replay_by_sfd[APUS_FD_MAX];
uint32_t apus_incarnation;
static uint32_t next_conn;
static int started, ready;
/* Readiness follows the log: the leader term it was reached in, and how far the steps of becoming
 * ready (barrier, CLOSEs of the earlier leaders' connections, replay) went in the current term. */
static uint64_t current_term;
static int ready_phase;
/* Clients with committed input the server has not read, in log order; only the head may read. */
static struct client *pending_head, *pending_tail;
static size_t read_ahead_bytes = 16384;

void apus_setup_from_env(void) {
    const char *cfg = getenv("INTERPOSE_CONFIG");
    const char *port = getenv("INTERPOSE_PORT");
    if (!cfg || !*cfg) return;
    long p = port ? strtol(port, NULL, 10) : 0;
    if (p <= 0 || p > 65535) {
        apus_log("INTERPOSE_CONFIG is set but INTERPOSE_PORT (the server's TCP port) is %s; not replicating",
                      port ? "not a port number" : "missing");
        return;
    }
    /* A copy: servers that set their process title (Redis does) write over the environment. */
    config_path = strdup(cfg);
    if (!config_path) return;
    const char *ahead = getenv("INTERPOSE_READ_BYTES");
    if (ahead && strtol(ahead, NULL, 10) >= 512) read_ahead_bytes = (size_t)strtol(ahead, NULL, 10);
    if (read_ahead_bytes > 128 * 1024) read_ahead_bytes = 128 * 1024; /* one read must fit a BATCH entry */
    apus_app_port = (int)p;
    atomic_store(&apus_on, 1);
}

/* Stops this replica's server: its state can no longer be proven equal to the others'. A
 * restarted replica rebuilds it from the log. */
_Noreturn void apus_fail_stop(const char *why) {
    apus_log("stopping the server: %s (a restart rebuilds its state from the log)", why);
    _exit(70);
}

static int is_app_listener(int fd) {
    if (fd < 0 || fd >= APUS_FD_MAX) return 0;
    if (listener_kind[fd]) return listener_kind[fd] == 1;
    struct sockaddr_storage a;
    socklen_t len = sizeof a;
    int listening = 0;
    socklen_t ilen = sizeof listening;
    int yes = getsockname(fd, (struct sockaddr *)&a, &len) == 0
        && getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &listening, &ilen) == 0 && listening
        && ((a.ss_family == AF_INET && ntohs(((struct sockaddr_in *)&a)->sin_port) == apus_app_port)
            || (a.ss_family == AF_INET6 && ntohs(((struct sockaddr_in6 *)&a)->sin6_port) == apus_app_port));
    listener_kind[fd] = yes ? 1 : 2;
    return yes;
}

void apus_after_epoll_ctl(int epfd, int op, int fd, const struct epoll_event *ev) {
    if (op == EPOLL_CTL_ADD && is_app_listener(fd)) atomic_store(&app_epfd, epfd);
    if (epfd != atomic_load(&app_epfd) || fd < 0 || fd >= APUS_FD_MAX || atomic_load(&apus_fd_kind[fd]) != APUS_FD_CLIENT) return;
    pthread_mutex_lock(&mu);
    struct client *c = client_by_fd[fd];
    if (c) {
        c->watched = op != EPOLL_CTL_DEL;
        if (ev && op != EPOLL_CTL_DEL) { c->data = ev->data.u64; c->events = ev->events; }
    }
    pthread_mutex_unlock(&mu);
}

int apus_epoll_ctl_recorded_only(int epfd, int op, int fd, const struct epoll_event *ev) {
    if (epfd != atomic_load(&app_epfd) || fd < 0 || fd >= APUS_FD_MAX || atomic_load(&apus_fd_kind[fd]) != APUS_FD_CLIENT) return 0;
    pthread_mutex_lock(&mu);
    struct client *c = client_by_fd[fd];
    int recorded = c && c->broken;
    if (recorded) {
        c->watched = op != EPOLL_CTL_DEL;
        if (ev && op != EPOLL_CTL_DEL) { c->data = ev->data.u64; c->events = ev->events; }
    }
    pthread_mutex_unlock(&mu);
    return recorded;
}

int apus_is_app_epoll(int epfd) { return epfd >= 0 && epfd == atomic_load_explicit(&app_epfd, memory_order_relaxed); }

/* MARK: proposals */

size_t apus_encode(unsigned char *out, int op, uint64_t id) {
    out[0] = (unsigned char)op;
    for (int i = 0; i < 8; i++) out[1 + i] = (unsigned char)(id >> (8 * i));
    return HEADER_BYTES;
}

/* Proposes one entry and waits until it committed. A DATA entry whose outcome is unknown stops
 * the server (it may commit while the server never saw it); an OPEN that commits late only gives
 * followers an idle replay connection. */
static int propose_sync(int op, uint64_t id, const void *data, size_t len) {
    unsigned char small[HEADER_BYTES + 4096];
    unsigned char *buf = len <= 4096 ? small : malloc(HEADER_BYTES + len);
    if (!buf) return INTERPOSE_EINVAL;
    apus_encode(buf, op, id);
    if (len) memcpy(buf + HEADER_BYTES, data, len);
    int rc = interpose_propose(buf, HEADER_BYTES + len, NULL);
    if (buf != small) free(buf);
    if (rc == INTERPOSE_EUNKNOWN && op == OP_DATA) apus_fail_stop("a proposal timed out and may still commit");
    return rc;
}

static void ignore_outcome(void *context, int status, uint64_t index) { (void)context, (void)status, (void)index; }

/* Proposes an entry without waiting (CLOSE entries: their order still follows the calls). */
void apus_propose_async(int op, uint64_t id) {
    unsigned char buf[HEADER_BYTES];
    apus_encode(buf, op, id);
    interpose_propose_async(buf, sizeof buf, ignore_outcome, NULL);
}

/* MARK: role */

/* A client of an ended term: the real client hears the end at once, the server only when a
 * committed CLOSE says so. Its fd leaves the kernel's epoll set (a shut-down socket would wake
 * the server in a loop) and the server's later epoll_ctl calls on it are only recorded. */
static void break_client(struct client *c) {
    if (c->broken) return;
    c->broken = 1;
    shutdown(c->fd, SHUT_RDWR); /* the server's writes now fail, unseen (hooks.c) */
    int epfd = atomic_load(&app_epfd);
    if (epfd >= 0) REAL(epoll_ctl)(epfd, EPOLL_CTL_DEL, c->fd, NULL);
}

static void queue_push(struct client *c) {
    if (c->queued) return;
    c->queued = 1;
    c->pending_next = NULL;
    if (pending_tail) pending_tail->pending_next = c; else pending_head = c;
    pending_tail = c;
}

static void queue_remove(struct client *c) {
    if (!c->queued) return;
    c->queued = 0;
    struct client *prev = NULL;
    for (struct client *p = pending_head; p; prev = p, p = p->pending_next) {
        if (p != c) continue;
        if (prev) prev->pending_next = c->pending_next; else pending_head = c->pending_next;
        if (pending_tail == c) pending_tail = prev;
        break;
    }
    c->pending_next = NULL;
}

/* Leaves the queue once the server has read all of a client's committed input. */
static void queue_settle(struct client *c) {
    if (c->queued && !c->buf && (!c->eof || c->eof_returned)) queue_remove(c);
}

static struct client *client_by_id(uint64_t id) {
    for (struct client *c = clients; c; c = c->next) if (c->id == id) return c;
    return NULL;
}

/* A committed CLOSE of one of this process's own connections (replay thread of the server,
 * under mu): for a client of a lost term it is the end the server may now read; 1 once done. */
int apus_own_close(uint64_t id) {
    struct client *c = client_by_id(id);
    if (!c || !c->broken) return 1; /* gone, or a live client whose end the read path handled */
    if (!c->eof) { c->eof = 1; queue_push(c); }
    return 0; /* done once the server closed it */
}

/* Follows leadership in log terms. A replica serves clients ("ready") only once, in the term it
 * leads now: a barrier of its own committed (every earlier entry was delivered), everything
 * before it was replayed into the server, CLOSEs for the connections of earlier terms (other
 * leaders' replays and its own broken clients) committed behind a second barrier and were
 * replayed too. A term that ends at any step starts over in the next. Called on the server
 * thread, without mu held. */
static void update_role(void) {
    uint64_t term = interpose_leader_term();
    pthread_mutex_lock(&mu);
    if (term != current_term) {
        for (struct client *c = clients; c; c = c->next) break_client(c);
        /* A CLOSE proposed in an ended term may never have committed: propose it again. */
        for (struct replay *r = apus_replays; r; r = r->next) r->close_proposed = 0;
        for (struct client *c = clients; c; c = c->next) if (!c->eof) c->close_logged = 0;
        current_term = term;
        ready_phase = 0;
        ready = 0;
    }
    int phase = ready_phase;
    pthread_mutex_unlock(&mu);
    if (term != 0 && phase == 0) {
        /* A barrier that fails changes nothing in the server: try again on the next call. */
        if (interpose_checkpoint(NULL) == INTERPOSE_OK) {
            pthread_mutex_lock(&mu);
            if (current_term == term) ready_phase = 1;
            pthread_mutex_unlock(&mu);
        }
    }
    pthread_mutex_lock(&mu);
    /* This replica's own committed bytes come before anything it replays. */
    if (!pending_head) apus_pump();
    int settled = !pending_head && apus_replay_idle();
    phase = current_term == term ? ready_phase : -1;
    if (term != 0 && phase == 1 && settled) {
        for (struct replay *r = apus_replays; r; r = r->next) {
            if (!r->close_proposed) { r->close_proposed = 1; apus_propose_async(OP_CLOSE, r->id); }
        }
        for (struct client *c = clients; c; c = c->next) {
            if (c->broken && !c->close_logged) { c->close_logged = 1; apus_propose_async(OP_CLOSE, c->id); }
        }
        pthread_mutex_unlock(&mu);
        int rc = interpose_checkpoint(NULL); /* commits after those CLOSEs */
        pthread_mutex_lock(&mu);
        if (rc == INTERPOSE_OK && current_term == term) ready_phase = 2;
        if (!pending_head) apus_pump();
        settled = !pending_head && apus_replay_idle();
    }
    if (term != 0 && current_term == term && ready_phase == 2 && settled && interpose_leader_term() == term) {
        ready_phase = 3;
        ready = 1;
    }
    pthread_mutex_unlock(&mu);
}

static void start(void) {
    started = 1;
    while (apus_incarnation == 0) {
        if (getrandom(&apus_incarnation, sizeof apus_incarnation, 0) != sizeof apus_incarnation) apus_incarnation = (uint32_t)getpid();
    }
    apus_wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (apus_wake_fd < 0) apus_fail_stop("cannot create the wake-up eventfd");
    struct epoll_event ev = { .events = EPOLLIN, .data.u64 = WAKE_TAG };
    if (REAL(epoll_ctl)(atomic_load(&app_epfd), EPOLL_CTL_ADD, apus_wake_fd, &ev) != 0) apus_fail_stop("cannot watch the wake-up eventfd");
    interpose_set_deliver(apus_deliver, NULL);
    if (interpose_init(config_path) != INTERPOSE_OK) {
        apus_log("%s", interpose_last_error());
        apus_fail_stop("the replica did not start");
    }
    apus_log("replicating the server on port %d (config %s)", apus_app_port, config_path);
}

/* MARK: hooks' APUS paths (server thread; apus_in_hook is set) */

/* The client an epoll event is for, by the data the server registered (Redis: the fd). */
static struct client *client_for_event(uint64_t data) {
    if (data < APUS_FD_MAX) {
        struct client *c = client_by_fd[data];
        if (c && c->watched && c->data == data) return c;
    }
    for (struct client *c = clients; c; c = c->next) if (c->watched && c->data == data) return c;
    return NULL;
}

/* Committed bytes (or an end of stream) the server has not read yet, on an fd it watches. */
static int has_leftover(const struct client *c) {
    return c->queued && c->watched && (c->events & EPOLLIN);
}

/* One log entry of a round (a BATCH of clients' bytes) and its outcome. */
struct round_item { unsigned char *bytes; size_t len; int first, count; int status; };
static pthread_mutex_t round_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t round_cond = PTHREAD_COND_INITIALIZER;
static int round_pending;
/* Most bytes in one BATCH entry: below the log's default batch_bytes_max (256 KiB). */
#define BATCH_BYTES_MAX (192 * 1024)

static void round_done(void *context, int status, uint64_t index) {
    (void)index;
    struct round_item *it = context;
    pthread_mutex_lock(&round_mu);
    it->status = status;
    if (--round_pending == 0) pthread_cond_signal(&round_cond);
    pthread_mutex_unlock(&round_mu);
}

/* One client's part of a round: bytes, or its end of stream (bytes NULL). */
struct read_item { struct client *c; unsigned char *bytes; size_t len; };

/* Reads ahead every client the events report readable, proposes all the bytes as BATCH entries
 * (one consensus round for the whole lot) and waits for the commit; the read hook then hands
 * each client's committed bytes to the server. Called with mu held; returns with it held. */
static void read_ahead(struct epoll_event *events, int n) {
    struct read_item *reads = malloc((size_t)n * sizeof *reads);
    struct round_item *batches = malloc((size_t)n * sizeof *batches);
    if (!reads || !batches) apus_fail_stop("out of memory reading ahead");
    int m = 0;
    for (int i = 0; i < n; i++) {
        struct client *c = client_for_event(events[i].data.u64);
        if (!c || c->broken || c->eof || c->buf || !(events[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR | EPOLLRDHUP))) continue;
        unsigned char *b = malloc(read_ahead_bytes);
        if (!b) apus_fail_stop("out of memory reading ahead");
        ssize_t r = REAL(recv)(c->fd, b, read_ahead_bytes, MSG_DONTWAIT);
        if (r > 0) {
            reads[m++] = (struct read_item){ c, b, (size_t)r };
            continue;
        }
        free(b);
        if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) continue;
        /* End of stream, or a reset: either way the client is gone, and the server learns it at
         * this place of the round, in the log, like every replica. */
        if (!c->close_logged) { c->close_logged = 1; reads[m++] = (struct read_item){ c, NULL, 0 }; }
    }
    /* Pack the reads, in event order, into as few BATCH entries as fit. */
    int nb = 0;
    for (int i = 0; i < m;) {
        size_t total = HEADER_BYTES;
        int j = i;
        while (j < m && (j == i || total + ITEM_HEADER_BYTES + reads[j].len <= BATCH_BYTES_MAX)) total += ITEM_HEADER_BYTES + reads[j++].len;
        unsigned char *b = malloc(total);
        if (!b) apus_fail_stop("out of memory reading ahead");
        size_t off = apus_encode(b, OP_BATCH, 0);
        for (int k = i; k < j; k++) {
            for (int x = 0; x < 8; x++) b[off + x] = (unsigned char)(reads[k].c->id >> (8 * x));
            uint32_t mark = reads[k].bytes ? (uint32_t)reads[k].len : ITEM_END_OF_STREAM;
            for (int x = 0; x < 4; x++) b[off + 8 + x] = (unsigned char)(mark >> (8 * x));
            if (reads[k].len) memcpy(b + off + ITEM_HEADER_BYTES, reads[k].bytes, reads[k].len);
            off += ITEM_HEADER_BYTES + reads[k].len;
        }
        batches[nb++] = (struct round_item){ b, total, i, j - i, 1 };
        i = j;
    }
    pthread_mutex_unlock(&mu);
    if (nb > 0) {
        pthread_mutex_lock(&round_mu);
        round_pending = nb;
        pthread_mutex_unlock(&round_mu);
        for (int i = 0; i < nb; i++) {
            int rc = interpose_propose_async(batches[i].bytes, batches[i].len, round_done, &batches[i]);
            if (rc != INTERPOSE_OK) round_done(&batches[i], rc, 0);
        }
        pthread_mutex_lock(&round_mu);
        while (round_pending > 0) pthread_cond_wait(&round_cond, &round_mu);
        pthread_mutex_unlock(&round_mu);
    }
    pthread_mutex_lock(&mu);
    for (int i = 0; i < nb; i++) {
        struct round_item *it = &batches[i];
        if (it->status == INTERPOSE_EUNKNOWN) apus_fail_stop("a proposal timed out and may still commit");
        for (int k = it->first; k < it->first + it->count; k++) {
            struct read_item *r = &reads[k];
            if (it->status == INTERPOSE_OK && r->bytes) {
                r->c->buf = r->bytes;
                r->c->buf_off = 0;
                r->c->buf_len = r->len;
                queue_push(r->c);
            } else if (it->status == INTERPOSE_OK) {
                r->c->eof = 1;
                queue_push(r->c);
            } else {
                free(r->bytes);
                if (!r->bytes) r->c->close_logged = 0; /* the end did not commit: propose it again */
                break_client(r->c);
            }
        }
        free(it->bytes);
    }
    free(reads);
    free(batches);
}

int apus_epoll_wait(int epfd, struct epoll_event *events, int max, int timeout, const sigset_t *mask, int pwait) {
    apus_in_hook = 1;
    if (!started) start();
    update_role();
    pthread_mutex_lock(&mu);
    int leftovers = 0;
    for (struct client *c = pending_head; c; c = c->pending_next) leftovers += has_leftover(c);
    pthread_mutex_unlock(&mu);
    apus_in_hook = 0;
    /* With committed bytes still unread, the server must come back at once. */
    int n = pwait ? REAL(epoll_pwait)(epfd, events, max, leftovers ? 0 : timeout, mask)
                  : REAL(epoll_wait)(epfd, events, max, leftovers ? 0 : timeout);
    if (n < 0) return n;
    int saved = errno, k = 0;
    apus_in_hook = 1;
    for (int i = 0; i < n; i++) {
        if (events[i].data.u64 == WAKE_TAG) {
            uint64_t v;
            if (REAL(read)(apus_wake_fd, &v, sizeof v) < 0) { /* already reset */ }
            continue;
        }
        events[k++] = events[i];
    }
    pthread_mutex_lock(&mu);
    if (leftovers) {
        /* Until the server has read every committed byte, it hears only of those clients (and of
         * fds that are not clients): new bytes read now would be handled before older committed
         * ones, in an order the log does not record. */
        int j = 0;
        for (int i = 0; i < k; i++) {
            /* Clients keep their write readiness; only input waits for its turn. */
            if (client_for_event(events[i].data.u64)) events[i].events &= ~(uint32_t)(EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR | EPOLLPRI);
            if (events[i].events) events[j++] = events[i];
        }
        k = j;
        /* The clients with committed input, in log order. */
        for (struct client *c = pending_head; c; c = c->pending_next) {
            if (!has_leftover(c)) continue;
            int merged = 0;
            for (int i = 0; i < k && !merged; i++) if (events[i].data.u64 == c->data) { events[i].events |= EPOLLIN; merged = 1; }
            if (!merged && k < max) events[k++] = (struct epoll_event){ .events = EPOLLIN, .data.u64 = c->data };
        }
    } else if (clients && k > 0) {
        read_ahead(events, k);
    }
    pthread_mutex_unlock(&mu);
    apus_in_hook = 0;
    errno = saved;
    return k;
}

int apus_after_accept(int listen_fd, int fd) {
    pthread_mutex_lock(&mu);
    if (!is_app_listener(listen_fd)) { pthread_mutex_unlock(&mu); return fd; }
    if (fd >= APUS_FD_MAX) {
        /* Untracked, its bytes would reach the server unreplicated: refuse it. */
        pthread_mutex_unlock(&mu);
        REAL(close)(fd);
        errno = EAGAIN;
        return -1;
    }
    struct sockaddr_in peer;
    socklen_t len = sizeof peer;
    if (getpeername(fd, (struct sockaddr *)&peer, &len) == 0 && peer.sin_family == AF_INET
        && peer.sin_addr.s_addr == htonl(INADDR_LOOPBACK)) {
        for (struct replay *r = apus_replays; r; r = r->next) {
            if (r->sfd < 0 && r->port == ntohs(peer.sin_port)) {
                r->sfd = fd;
                apus_replay_by_sfd[fd] = r;
                atomic_store(&apus_fd_kind[fd], APUS_FD_REPLAY);
                pthread_mutex_unlock(&mu);
                return fd;
            }
        }
    }
    if (!ready || interpose_leader_term() != current_term) {
        /* A follower (or a leader still catching up) serves no clients: they must use the leader. */
        pthread_mutex_unlock(&mu);
        REAL(close)(fd);
        errno = EAGAIN;
        return -1;
    }
    struct client *c = calloc(1, sizeof *c);
    if (!c) apus_fail_stop("out of memory accepting a connection");
    c->id = ((uint64_t)apus_incarnation << 32) | ++next_conn;
    c->fd = fd;
    /* Not waited for: the client's first bytes are proposed after it from this thread, so they
     * commit only if it did (a connection storm costs no round trip per connection). */
    apus_propose_async(OP_OPEN, c->id);
    c->next = clients;
    clients = c;
    client_by_fd[fd] = c;
    atomic_store(&apus_fd_kind[fd], APUS_FD_CLIENT);
    pthread_mutex_unlock(&mu);
    return fd;
}

ssize_t apus_read(int fd, void *buf, size_t count) {
    pthread_mutex_lock(&mu);
    int kind = atomic_load(&apus_fd_kind[fd]);
    if (kind == APUS_FD_REPLAY) {
        pthread_mutex_unlock(&mu);
        ssize_t n = REAL(read)(fd, buf, count);
        int e = errno;
        pthread_mutex_lock(&mu);
        struct replay *r = apus_replay_by_sfd[fd];
        if (r && n > 0) r->unconsumed -= n;
        pthread_mutex_unlock(&mu);
        errno = e;
        return n;
    }
    struct client *c = client_by_fd[fd];
    pthread_mutex_unlock(&mu);
    if (kind != APUS_FD_CLIENT || !c) return REAL(read)(fd, buf, count);
    if (count == 0) return 0; /* reads nothing, ends nothing */
    pthread_mutex_lock(&mu);
    if (c->queued && c != pending_head) {
        /* Another client's committed input comes first in the log: this one waits its turn. */
        pthread_mutex_unlock(&mu);
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
        pthread_mutex_unlock(&mu);
        return (ssize_t)k;
    }
    if (c->eof) {
        c->eof_returned = 1;
        queue_settle(c);
        pthread_mutex_unlock(&mu);
        return 0;
    }
    if (c->broken || pending_head) {
        /* A client of a lost term reads nothing until a committed CLOSE ends it; and no client
         * reads new bytes while committed ones wait. */
        pthread_mutex_unlock(&mu);
        errno = EAGAIN;
        return -1;
    }
    pthread_mutex_unlock(&mu);
    /* Not read ahead (a server that reads without being told by epoll): read, commit, hand over. */
    ssize_t n = REAL(read)(fd, buf, count);
    if (n > 0) {
        if (propose_sync(OP_DATA, c->id, buf, (size_t)n) != INTERPOSE_OK) {
            pthread_mutex_lock(&mu);
            break_client(c);
            pthread_mutex_unlock(&mu);
            errno = EAGAIN;
            return -1;
        }
        return n;
    }
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) return n;
    /* End of stream or a reset: the server hears it once the CLOSE committed. */
    pthread_mutex_lock(&mu);
    int logged = c->close_logged;
    c->close_logged = 1;
    pthread_mutex_unlock(&mu);
    if (!logged && propose_sync(OP_CLOSE, c->id, NULL, 0) != INTERPOSE_OK) {
        pthread_mutex_lock(&mu);
        c->close_logged = 0;
        break_client(c);
        pthread_mutex_unlock(&mu);
        errno = EAGAIN;
        return -1;
    }
    pthread_mutex_lock(&mu);
    c->eof = 1;
    c->eof_returned = 1;
    pthread_mutex_unlock(&mu);
    return 0;
}

void apus_before_close(int fd) {
    listener_kind[fd] = 0;
    if (atomic_load(&apus_fd_kind[fd]) == APUS_FD_NONE) return;
    pthread_mutex_lock(&mu);
    int kind = atomic_load(&apus_fd_kind[fd]);
    atomic_store(&apus_fd_kind[fd], APUS_FD_NONE);
    if (kind == APUS_FD_CLIENT && client_by_fd[fd]) {
        struct client *c = client_by_fd[fd];
        client_by_fd[fd] = NULL;
        for (struct client **p = &clients; *p; p = &(*p)->next) {
            if (*p == c) { *p = c->next; break; }
        }
        queue_remove(c);
        if (!c->close_logged) apus_propose_async(OP_CLOSE, c->id);
        free(c->buf);
        free(c);
    } else if (kind == APUS_FD_REPLAY && apus_replay_by_sfd[fd]) {
        apus_replay_by_sfd[fd]->sclosed = 1;
        apus_replay_by_sfd[fd] = NULL;
    }
    pthread_mutex_unlock(&mu);
}
