/* replay.c - followers' side of APUS mode: committed entries of other processes are queued by
 * the deliver callback (replica thread) and replayed into the local server by its own thread,
 * one entry at a time, over loopback connections (docs/design/interpose.md, "Followers").
 *
 * Nothing here stops the process because of what the log holds: a replay connection that cannot
 * be made now (no descriptor, no port) waits and is retried, and says so. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <unistd.h>

#include "fdtable.h"
#include "interpose.h"

/* MARK: incarnation */

static _Atomic uint64_t incarnation;
static atomic_int incarnation_used;

static uint64_t random64(void) {
    uint64_t v = 0;
    while (v == 0) {
        if (getrandom(&v, sizeof v, 0) != sizeof v) v = ((uint64_t)getpid() << 32) ^ (uint64_t)apus_now_ms();
    }
    return v;
}

uint64_t apus_incarnation(void) {
    uint64_t v = atomic_load(&incarnation);
    if (v == 0) {
        uint64_t zero = 0;
        atomic_compare_exchange_strong(&incarnation, &zero, random64());
        v = atomic_load(&incarnation);
    }
    return v;
}

uint64_t apus_claim_incarnation(void) {
    atomic_store(&incarnation_used, 1);
    return apus_incarnation();
}

/* Whether a committed connection id is this process's own. An id with this incarnation seen
 * before this process made any id is another process's that drew the same random number: this
 * one draws again. Every entry committed before this process's first id was delivered first
 * (readiness waits for a barrier), so such a collision is always seen in time. */
static int is_own(uint64_t inc) {
    uint64_t mine = apus_incarnation();
    if (inc != mine) return 0;
    if (atomic_load(&incarnation_used)) return 1;
    atomic_compare_exchange_strong(&incarnation, &mine, random64());
    apus_log("another process used this process's random incarnation; drew a new one");
    return 0;
}

/* MARK: the entry queue (filled on the replica thread, drained on the server thread) */

static pthread_mutex_t qmu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t q_room = PTHREAD_COND_INITIALIZER;
static struct entry *q_head, *q_tail, *current;
static size_t q_bytes;      /* held by queued entries and the one being replayed */
static uint64_t delivered_through; /* the last log index the deliver callback saw */
static int server_waiting;  /* the server thread waits for a commit: delivery must not block */

void apus_server_waits(int waiting) {
    pthread_mutex_lock(&qmu);
    server_waiting = waiting;
    if (waiting) pthread_cond_broadcast(&q_room);
    pthread_mutex_unlock(&qmu);
}

void apus_wake(void) {
    uint64_t one = 1;
    if (apus_wake_fd >= 0 && write(apus_wake_fd, &one, sizeof one) < 0) { /* the counter is already non-zero */ }
}

static size_t entry_bytes(const struct entry *e) { return sizeof *e + e->len; }

static struct entry *make_entry(int op, conn_id id, uint64_t index, const unsigned char *data, size_t len) {
    struct entry *e = malloc(sizeof *e + len);
    if (!e) apus_fail_stop("out of memory queueing a committed entry");
    *e = (struct entry){ .op = op, .id = id, .index = index, .len = len };
    if (len) memcpy(e->data, data, len);
    return e;
}

/* Queues a chain of entries for the server thread, all at once (a BATCH's items arrive whole, so
 * the server never sees half a round). Back-pressure: past apus_queue_bytes_max the replica
 * thread waits here until the server has replayed enough, so a slow server slows this replica's
 * delivery (and, through consensus flow control, its intake) instead of growing memory without
 * end. Never while the server thread itself waits for a commit: the commit it waits for may be
 * behind these entries, and neither thread would move. */
static void append(struct entry *head, struct entry *tail, size_t bytes) {
    pthread_mutex_lock(&qmu);
    while (q_bytes > apus_queue_bytes_max && !server_waiting) {
        apus_wake();
        pthread_cond_wait(&q_room, &qmu);
    }
    if (q_tail) q_tail->next = head; else q_head = head;
    q_tail = tail;
    q_bytes += bytes;
    pthread_mutex_unlock(&qmu);
}

void apus_enqueue(int op, conn_id id, uint64_t index, const unsigned char *data, size_t len) {
    struct entry *e = make_entry(op, id, index, data, len);
    append(e, e, entry_bytes(e));
}

static struct entry *dequeue(void) {
    pthread_mutex_lock(&qmu);
    struct entry *e = q_head;
    if (e) { q_head = e->next; if (!q_head) q_tail = NULL; e->next = NULL; }
    pthread_mutex_unlock(&qmu);
    return e;
}

static void release(struct entry *e) {
    pthread_mutex_lock(&qmu);
    q_bytes -= entry_bytes(e);
    if (q_bytes <= apus_queue_bytes_max) pthread_cond_broadcast(&q_room);
    pthread_mutex_unlock(&qmu);
    free(e);
}

static int queue_empty(void) {
    pthread_mutex_lock(&qmu);
    int empty = q_head == NULL;
    pthread_mutex_unlock(&qmu);
    return empty;
}

static int is_item(const struct entry *e) { return e->op == WIRE_ITEM_DATA || e->op == WIRE_ITEM_END; }

/* MARK: delivery (replica thread) */

/* One decoded log entry's queue entries, chained before they are queued together. */
struct chain { uint64_t index; struct entry *head, *tail; size_t bytes; };

static void chain_add(struct chain *c, int op, conn_id id, const unsigned char *data, size_t len) {
    struct entry *e = make_entry(op, id, c->index, data, len);
    if (c->tail) c->tail->next = e; else c->head = e;
    c->tail = e;
    c->bytes += entry_bytes(e);
}

static void visit(void *ctx, int op, conn_id id, const unsigned char *data, size_t len) {
    struct chain *c = ctx;
    switch (op) {
    case WIRE_OPEN:
    case WIRE_ITEM_DATA:
    case WIRE_ITEM_END:
        /* This process's own connections: the read path already handed their input over. An
         * end of stream of its own is a CLOSE: it may end a client of a term it lost. */
        if (!is_own(id.inc)) chain_add(c, op, id, data, len);
        else if (op == WIRE_ITEM_END) chain_add(c, WIRE_CLOSE, id, NULL, 0);
        break;
    case WIRE_CLOSE:
        /* Own ones count too: a CLOSE may end a client of a term this replica lost. */
        chain_add(c, WIRE_CLOSE, id, NULL, 0);
        break;
    case WIRE_SNAPSHOT:
        /* Every replica's, the leader's own included: each saves its own server here. */
        apus_snapshot_count(0, 1);
        if (apus_snapshots_on()) chain_add(c, WIRE_SNAPSHOT, (conn_id){ 0, c->index }, NULL, 0);
        break;
    default: /* BARRIER: a leader's own marker */
        break;
    }
}

void apus_deliver(void *context, int kind, uint64_t index, const void *data, size_t len) {
    (void)context;
    static int complaints;
    if (kind != INTERPOSE_ENTRY_INPUT) {
        pthread_mutex_lock(&qmu);
        delivered_through = index; /* cuts short a round whose next part did not commit */
        pthread_mutex_unlock(&qmu);
        apus_wake();
        return;
    }
    const char *why = NULL;
    struct chain c = { .index = index };
    apus_on_replica_thread(1);
    apus_snapshot_count(len, 0);
    int rc = wire_decode(data, len, visit, &c, &why);
    /* A BATCH entry (or the parts of one too large for an entry) is one round of the leader's
     * server loop: its items are replayed together. */
    int part = rc == 0 ? wire_round_part(data, len) : 0;
    for (struct entry *e = c.head; e; e = e->next) e->continues = (part & WIRE_ROUND_CONTINUES) != 0;
    if (c.tail && is_item(c.tail) && !(part & WIRE_ROUND_GOES_ON)) c.tail->round_end = 1;
    if (c.head) append(c.head, c.tail, c.bytes);
    apus_on_replica_thread(0);
    pthread_mutex_lock(&qmu);
    delivered_through = index;
    pthread_mutex_unlock(&qmu);
    if (rc != 0 && complaints < 10) {
        /* Every replica decodes the same bytes and skips the same entry. */
        complaints++;
        apus_log("skipping log entry %llu: %s", (unsigned long long)index, why);
    }
    apus_wake();
}

/* MARK: replay connections (server thread, the shim's lock held) */

struct replay *apus_replays;
int apus_replay_count;

struct replay *apus_replay_find(conn_id id) {
    for (struct replay *r = apus_replays; r; r = r->next) if (conn_id_eq(r->id, id)) return r;
    return NULL;
}

struct replay *apus_replay_new(conn_id id) {
    struct replay *r = calloc(1, sizeof *r);
    if (!r) apus_fail_stop("out of memory opening a replay connection");
    r->id = id;
    r->cfd = r->sfd = -1;
    r->next = apus_replays;
    apus_replays = r;
    apus_replay_count++;
    return r;
}

/* One line about replay waiting on a resource, at most every 10 s (it retries far more often). */
static void complain(struct replay *r, const char *what, int err) {
    static long long last;
    if (!apus_log_due(&last)) return;
    apus_log("replay of connection %016llx:%llu waits: cannot %s: %s (%d descriptors open, limit %ld; %d replay connections); "
             "retrying. A follower holds two descriptors per connection of the leader: raise this replica's fd limit "
             "or lower INTERPOSE_MAX_CLIENTS on the leader",
             (unsigned long long)r->id.inc, (unsigned long long)r->id.serial, what, strerror(err), apus_open_fds(),
             apus_fd_limit(), apus_replay_count);
}

static void give_up_socket(struct replay *r, int s, const char *what, int err) {
    if (s >= 0) REAL(close)(s);
    r->backoff_ms = r->backoff_ms ? (r->backoff_ms * 2 > 2000 ? 2000 : r->backoff_ms * 2) : 50;
    r->retry_at = apus_now_ms() + r->backoff_ms;
    complain(r, what, err);
}

/* Makes the shim's end and starts a non-blocking connect to the server (no waiting under the
 * shim's lock: the server accepts it on a later turn of its loop). 1 once started. */
static int replay_connect(struct replay *r) {
    if (apus_now_ms() < r->retry_at) return 0;
    int s = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (s < 0) { give_up_socket(r, -1, "make a socket", errno); return 0; }
    if (s >= APUS_FD_MAX) { give_up_socket(r, s, "get a descriptor below 65536", EMFILE); return 0; }
    struct sockaddr_in a = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
    socklen_t len = sizeof a;
    if (bind(s, (struct sockaddr *)&a, sizeof a) != 0 || getsockname(s, (struct sockaddr *)&a, &len) != 0) {
        give_up_socket(r, s, "bind a socket on 127.0.0.1", errno);
        return 0;
    }
    /* The server needs a descriptor of its own to accept it; without one its accept fails and a
     * level-triggered server retries it in a loop. */
    int probe = fcntl(s, F_DUPFD_CLOEXEC, 0);
    if (probe < 0) { give_up_socket(r, s, "leave a descriptor for the server to accept it", errno); return 0; }
    REAL(close)(probe);
    /* The port is known before connecting, so the accept hook recognises the server's end. */
    r->port = ntohs(a.sin_port);
    struct sockaddr_in server = { .sin_family = AF_INET, .sin_port = htons((uint16_t)apus_app_port),
                                  .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
    if (connect(s, (struct sockaddr *)&server, sizeof server) != 0 && errno != EINPROGRESS) {
        give_up_socket(r, s, "connect to the server on 127.0.0.1:INTERPOSE_PORT", errno);
        return 0;
    }
    r->cfd = s;
    apus_fd_mark_shim(s, 1);
    r->connected_at = apus_now_ms();
    r->backoff_ms = 0;
    r->warned = 0;
    return 1;
}

static void close_shim_end(struct replay *r) {
    if (r->cfd < 0 || r->cclosed) return;
    /* A forked child (Redis's BGSAVE) may still hold a copy of this fd: shutting the socket down
     * ends the connection for the server now, not when the child exits. */
    shutdown(r->cfd, SHUT_RDWR);
    apus_fd_mark_shim(r->cfd, 0);
    REAL(close)(r->cfd);
    r->cclosed = 1;
}

void apus_replay_retry(struct replay *r) {
    close_shim_end(r);
    r->cfd = -1;
    r->cclosed = 0;
    r->port = 0;
    give_up_socket(r, -1, "replay into a descriptor the shim tracks", EMFILE);
}

int apus_replay_accepted(struct replay *r) {
    if (r->sfd >= 0) return 1;
    if (r->cfd < 0) { replay_connect(r); return 0; }
    int err = 0;
    socklen_t len = sizeof err;
    if (getsockopt(r->cfd, SOL_SOCKET, SO_ERROR, &err, &len) == 0 && err != 0) {
        /* The connect failed (nothing was accepted): start over later. */
        close_shim_end(r);
        r->cfd = -1;
        r->cclosed = 0;
        give_up_socket(r, -1, "connect to the server on 127.0.0.1:INTERPOSE_PORT", err);
        return 0;
    }
    if (!r->warned && apus_now_ms() - r->connected_at > 5000) {
        r->warned = 1;
        apus_log("the server has not accepted replay connection %016llx:%llu for 5 s; replay waits for it "
                 "(is its accept failing? %d descriptors open, limit %ld)",
                 (unsigned long long)r->id.inc, (unsigned long long)r->id.serial, apus_open_fds(), apus_fd_limit());
    }
    return 0;
}

static int ending_count; /* replays whose end the server read, not freed yet */

static void replay_free(struct replay *r) {
    if (r->ending) ending_count--;
    for (struct replay **p = &apus_replays; *p; p = &(*p)->next) {
        if (*p == r) { *p = r->next; break; }
    }
    close_shim_end(r);
    if (r->sfd >= 0 && !r->sclosed && apus_fd_replay(r->sfd) == r) apus_fd_forget(r->sfd);
    apus_replay_count--;
    free(r);
}

int apus_replay_end(struct replay *r) {
    close_shim_end(r);
    if (r->sfd >= 0 && !r->sclosed) return 0;
    replay_free(r);
    return 1;
}

/* Advances one entry (not a round's item) as far as the server allows: 1 when done, 0 to wait
 * for the server. */
static int replay_step(struct entry *e) {
    struct replay *r = apus_replay_find(e->id);
    switch (e->op) {
    case WIRE_OPEN:
        if (!r) r = apus_replay_new(e->id);
        return apus_replay_accepted(r);
    case WIRE_CLOSE:
        if (is_own(e->id.inc)) return apus_own_close(e->id);
        return r ? apus_replay_end(r) : 1;
    case WIRE_SNAPSHOT:
        return apus_snapshot_step(e);
    case APUS_OP_LOAD:
        return apus_load_step(e);
    default:
        return 1;
    }
}

/* MARK: rounds (server thread, the shim's lock held)
 *
 * A BATCH entry is what one read-ahead round of the leader handed its server in one turn of the
 * server's loop: each connection's bytes (or its end) in the order the server read them. A
 * follower hands its server the same round in one turn, the way the leader's read hook does:
 * the bytes stay in memory, epoll_wait reports the round's connections in log order, and only
 * the connection of the first item not yet read (the head) may read, at most to the end of that
 * item; any other gets EAGAIN. A server that reads only part of an item (Redis reading the rest
 * of a large bulk value) is told again on the next turn, and the next round starts only once
 * every item of this one was read, as on the leader. */

static struct entry *round_head, *round_tail;
static int round_complete;             /* every part of the round is here */
static int round_open;                 /* every connection of the round was accepted: the server may read */
static struct replay *round_blocker;   /* the connection the round waits for the server to accept */

static int item_done(const struct entry *e) {
    if (e->r && (e->r->sclosed || e->r->ending)) return 1; /* nothing more reaches it */
    return e->op == WIRE_ITEM_END ? e->off > 0 : e->off >= e->len;
}

/* The server read the connection's end of stream: it frees it, and the shim's end goes with it. */
static void replay_ending(struct replay *r) {
    if (r->ending) return;
    r->ending = 1;
    ending_count++;
}

/* Drops the items at the head of the round that are done. */
static void round_trim(void) {
    while (round_head && round_open && item_done(round_head)) {
        struct entry *e = round_head;
        if (e->op == WIRE_ITEM_END) replay_ending(e->r);
        round_head = e->next;
        if (!round_head) round_tail = NULL;
        release(e);
    }
    if (!round_head) round_open = 0;
}

/* Moves the rest of the round from the queue: the items of the same entry (queued together),
 * then those of entries that continue it, each the log entry right after the one before. 1 once
 * it is whole; 0 while its next part may still come (a part that did not commit is known once a
 * later entry arrived: the round is cut short there, as the leader's server took it). */
static int round_gather(void) {
    pthread_mutex_lock(&qmu);
    while (!round_tail->round_end) {
        struct entry *e = q_head;
        int same = e && is_item(e) && e->index == round_tail->index;
        int next = e && is_item(e) && e->continues && e->index == round_tail->index + 1;
        if (!same && !next) {
            if (!e && delivered_through <= round_tail->index) { pthread_mutex_unlock(&qmu); return 0; }
            break;
        }
        q_head = e->next;
        if (!q_head) q_tail = NULL;
        e->next = NULL;
        round_tail->next = e;
        round_tail = e;
    }
    pthread_mutex_unlock(&qmu);
    round_complete = 1;
    return 1;
}

/* 1 once the server accepted every connection of the round. */
static int round_prepare(void) {
    for (struct entry *e = round_head; e; e = e->next) {
        if (e->r) continue;
        struct replay *r = apus_replay_find(e->id);
        if (!r) r = apus_replay_new(e->id); /* not expected: its OPEN comes first */
        if (!r->sclosed && !r->ending && !apus_replay_accepted(r)) { round_blocker = r; return 0; }
        e->r = r;
    }
    round_blocker = NULL;
    round_open = 1;
    return 1;
}

/* Replays whose end the server read and which it closed since. Never during a round: its items
 * point at their connections. */
static void sweep_ended(void) {
    if (!ending_count || round_head) return;
    for (struct replay *r = apus_replays, *next; r; r = next) {
        next = r->next;
        if (r->ending && r->sclosed) replay_free(r);
    }
}

static int item_reportable(const struct entry *e) {
    return !item_done(e) && e->r->watched && (e->r->events & EPOLLIN);
}

int apus_round_active(void) {
    apus_assert_locked("apus_round_active");
    round_trim();
    /* A connection the server does not watch for input is never reported (as on the leader): a
     * server that stops reading the head's connection stalls replay, but is not woken in a loop. */
    for (struct entry *e = round_head; e && round_open; e = e->next) if (item_reportable(e)) return 1;
    return 0;
}

static struct replay *replay_for_event(uint64_t data) {
    if (data < APUS_FD_MAX) {
        struct replay *r = apus_fd_replay((int)data);
        if (r && r->watched && r->data == data) return r;
    }
    for (struct replay *r = apus_replays; r; r = r->next) if (r->sfd >= 0 && r->watched && r->data == data) return r;
    return NULL;
}

int apus_round_report(struct epoll_event *events, int k, int max) {
    apus_assert_locked("apus_round_report");
    /* The kernel has no bytes for replay connections (the round's are in memory); what it
     * reports for them (an end the shim made) waits until the round is over. */
    int j = 0;
    for (int i = 0; i < k; i++) {
        if (replay_for_event(events[i].data.u64)) events[i].events &= ~(uint32_t)(EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR | EPOLLPRI);
        if (events[i].events) events[j++] = events[i];
    }
    k = j;
    for (struct entry *e = round_head; e && round_open; e = e->next) {
        if (!item_reportable(e)) continue;
        k = apus_add_event(events, k, max, e->r->data);
    }
    return k;
}

int apus_round_read(struct replay *r, void *buf, size_t count, ssize_t *n) {
    apus_assert_locked("apus_round_read");
    round_trim();
    if (!round_open) return 0;
    struct entry *e = round_head;
    if (e->r != r) {
        /* An earlier item of the round, on another connection, comes first. */
        errno = EAGAIN;
        *n = -1;
        return 1;
    }
    if (count == 0) { *n = 0; return 1; } /* reads nothing, ends nothing */
    if (e->op == WIRE_ITEM_END) {
        e->off = 1;
        *n = 0;
    } else {
        size_t k = e->len - e->off < count ? e->len - e->off : count;
        memcpy(buf, e->data + e->off, k);
        e->off += k;
        *n = (ssize_t)k;
    }
    round_trim();
    return 1;
}

/* MARK: the pump (server thread, the shim's lock held) */

void apus_pump(void) {
    apus_assert_locked("apus_pump");
    /* The server's replies on replay connections never reach the shim's end: the write hooks
     * drop them (hooks.c). */
    for (;;) {
        if (round_head) {
            if (!round_complete && !round_gather()) break;
            if (!round_open && !round_prepare()) break;
            round_trim();
            if (round_head) break; /* the server reads it on this turn */
            continue;
        }
        sweep_ended();
        if (!current) current = dequeue();
        if (!current) break;
        if (is_item(current)) {
            round_head = round_tail = current;
            round_complete = 0;
            current = NULL;
            continue;
        }
        int done = replay_step(current);
        if (!done) break;
        release(current);
        current = NULL;
    }
}

int apus_replay_idle(void) { return !current && !round_head && queue_empty(); }

int apus_replay_wait_ms(void) {
    if (current && (current->op == WIRE_SNAPSHOT || current->op == APUS_OP_LOAD)) return apus_snapshot_wait_ms(current);
    struct replay *r = NULL;
    if (round_head && !round_open) r = round_blocker;
    else if (current && current->op == WIRE_OPEN) r = apus_replay_find(current->id);
    if (!r || r->sfd >= 0) return -1;
    if (r->cfd >= 0) return 500; /* connecting: look at its error and the 5 s warning */
    long long left = r->retry_at - apus_now_ms();
    return left <= 0 ? 0 : (int)left;
}
