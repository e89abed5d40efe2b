/* replay.c - followers' side of APUS mode: committed entries of other processes are queued by
 * the deliver callback (replica thread) and replayed into the local server by its own thread,
 * one entry at a time, over loopback connections (docs/design/interpose.md, "Followers"). */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "apus.h"
#include "interpose.h"

static pthread_mutex_t qmu = PTHREAD_MUTEX_INITIALIZER; /* the entry queue (filled on the replica thread) */
static struct entry *q_head, *q_tail, *current;

static void enqueue_entry(int op, uint64_t id, const unsigned char *data, size_t len);

/* Runs on the replica thread: queues another leader's committed entries for the server thread. */
void apus_deliver(void *context, int kind, uint64_t index, const void *data, size_t len) {
    (void)context, (void)index;
    const unsigned char *p = data;
    if (kind != INTERPOSE_ENTRY_INPUT || len < HEADER_BYTES) return;
    uint64_t id = 0;
    for (int i = 0; i < 8; i++) id |= (uint64_t)p[1 + i] << (8 * i);
    if (p[0] == OP_BATCH) {
        size_t off = HEADER_BYTES;
        while (off + ITEM_HEADER_BYTES <= len) {
            uint64_t item_id = 0;
            uint32_t item_len = 0;
            for (int i = 0; i < 8; i++) item_id |= (uint64_t)p[off + i] << (8 * i);
            for (int i = 0; i < 4; i++) item_len |= (uint32_t)p[off + 8 + i] << (8 * i);
            off += ITEM_HEADER_BYTES;
            if (item_len == ITEM_END_OF_STREAM) { enqueue_entry(OP_CLOSE, item_id, NULL, 0); continue; }
            if (item_len > len - off) break;
            enqueue_entry(OP_DATA, item_id, p + off, item_len);
            off += item_len;
        }
    } else {
        enqueue_entry(p[0], id, p + HEADER_BYTES, len - HEADER_BYTES);
    }
    uint64_t one = 1;
    if (apus_wake_fd >= 0 && write(apus_wake_fd, &one, sizeof one) < 0) { /* the counter is already non-zero */ }
}

/* Queues another process's committed entry for the server thread and wakes it. */
static void enqueue_entry(int op, uint64_t id, const unsigned char *data, size_t len) {
    /* This process's own connections: the read path already handed their bytes to the server.
     * Their CLOSEs still count: one may end a client of a term this replica lost. */
    if ((uint32_t)(id >> 32) == apus_incarnation && op != OP_CLOSE) return;
    struct entry *e = malloc(sizeof *e + len);
    if (!e) apus_fail_stop("out of memory queueing a committed entry");
    e->next = NULL;
    e->op = op;
    e->id = id;
    e->len = len;
    e->off = 0;
    if (len) memcpy(e->data, data, len);
    pthread_mutex_lock(&qmu);
    if (q_tail) q_tail->next = e; else q_head = e;
    q_tail = e;
    pthread_mutex_unlock(&qmu);
}

static struct entry *dequeue(void) {
    pthread_mutex_lock(&qmu);
    struct entry *e = q_head;
    if (e) { q_head = e->next; if (!q_head) q_tail = NULL; }
    pthread_mutex_unlock(&qmu);
    return e;
}

static int queue_empty(void) {
    pthread_mutex_lock(&qmu);
    int empty = q_head == NULL;
    pthread_mutex_unlock(&qmu);
    return empty;
}

/* MARK: replay (server thread, under mu) */

static struct replay *find_replay(uint64_t id) {
    for (struct replay *r = apus_replays; r; r = r->next) if (r->id == id) return r;
    return NULL;
}

static struct replay *replay_open(uint64_t id) {
    int s = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (s < 0) apus_fail_stop("cannot create a replay socket");
    struct sockaddr_in a = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
    socklen_t len = sizeof a;
    if (bind(s, (struct sockaddr *)&a, sizeof a) != 0 || getsockname(s, (struct sockaddr *)&a, &len) != 0)
        apus_fail_stop("cannot bind a replay socket on 127.0.0.1");
    struct replay *r = calloc(1, sizeof *r);
    if (!r) apus_fail_stop("out of memory opening a replay connection");
    r->id = id;
    r->cfd = s;
    r->sfd = -1;
    r->port = ntohs(a.sin_port);
    r->next = apus_replays;
    apus_replays = r;
    /* Known before connecting, so the accept hook recognises the server's end. The listen
     * backlog completes the handshake; the server accepts it on its next loop. */
    struct sockaddr_in server = { .sin_family = AF_INET, .sin_port = htons((uint16_t)apus_app_port),
                                  .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
    if (connect(s, (struct sockaddr *)&server, sizeof server) != 0)
        apus_fail_stop("cannot connect a replay connection to the server on 127.0.0.1:INTERPOSE_PORT");
    fcntl(s, F_SETFL, fcntl(s, F_GETFL) | O_NONBLOCK);
    return r;
}

static void replay_free(struct replay *r) {
    for (struct replay **p = &apus_replays; *p; p = &(*p)->next) {
        if (*p == r) { *p = r->next; break; }
    }
    if (!r->cclosed) REAL(close)(r->cfd);
    if (r->sfd >= 0 && !r->sclosed && apus_replay_by_sfd[r->sfd] == r) apus_replay_by_sfd[r->sfd] = NULL;
    free(r);
}

/* Advances one entry as far as the server allows: 1 when done, 0 to wait for the server. */
static int replay_step(struct entry *e) {
    struct replay *r = find_replay(e->id);
    switch (e->op) {
    case OP_OPEN:
        if (!r) r = replay_open(e->id);
        return r->sfd >= 0;
    case OP_DATA:
        if (!r) r = replay_open(e->id); /* only if its OPEN was compacted away or came from a restart */
        if (r->sfd < 0 || r->sclosed) return r->sclosed; /* a server that closed it drops the rest */
        while (e->off < e->len) {
            ssize_t w = write(r->cfd, e->data + e->off, e->len - e->off);
            if (w < 0) {
                if (errno == EAGAIN || errno == EWOULDBLOCK) return 0;
                return 1; /* the server closed it: nothing more can be delivered */
            }
            e->off += (size_t)w;
            r->unconsumed += w;
        }
        return r->unconsumed <= 0;
    case OP_CLOSE:
        if ((uint32_t)(e->id >> 32) == apus_incarnation) return apus_own_close(e->id);
        if (!r) return 1;
        if (!r->cclosed) { REAL(close)(r->cfd); r->cclosed = 1; }
        if (r->sfd >= 0 && !r->sclosed) return 0;
        replay_free(r);
        return 1;
    default:
        return 1;
    }
}

/* Discards the server's replies on a replay connection (followers answer no one). */
static void drain_replies(struct replay *r) {
    char sink[16384];
    if (r && !r->cclosed) while (REAL(recv)(r->cfd, sink, sizeof sink, MSG_DONTWAIT) > 0) {}
}

void apus_pump(void) {
    /* The server writes its replies before it waits again, so the connection of an entry just
     * handled holds them now; every 256 calls all are swept (replies written later, in parts). */
    static unsigned calls;
    if (++calls % 256 == 0) for (struct replay *r = apus_replays; r; r = r->next) drain_replies(r);
    for (;;) {
        if (!current) current = dequeue();
        if (!current) break;
        int done = replay_step(current);
        if (current->op == OP_DATA) drain_replies(find_replay(current->id));
        if (!done) break;
        free(current);
        current = NULL;
    }
}

int apus_replay_idle(void) { return !current && queue_empty(); }
