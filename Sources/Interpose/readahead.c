/* readahead.c - the leader's read-ahead round (docs/design/interpose.md, "Leader"): every client
 * epoll reports readable is read (up to INTERPOSE_READ_BYTES), the reads are packed in event
 * order into BATCH entries, proposed together (one consensus round for the lot) and waited for;
 * the read hook then hands each client's committed bytes to the server in log order. */
#define _GNU_SOURCE
#include <errno.h>
#include <stdlib.h>

#include "apus_leader.h"
#include "interpose.h"

/* One log entry of a round and its outcome. */
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

/* Reads each readable client once, without blocking; returns how many items. */
static int read_clients(struct epoll_event *events, int n, struct read_item *reads) {
    int m = 0;
    for (int i = 0; i < n; i++) {
        struct client *c = apus_client_for_event(events[i].data.u64);
        if (!c || c->broken || c->eof || c->buf || !(events[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR | EPOLLRDHUP))) continue;
        unsigned char *b = malloc(apus_read_ahead_bytes);
        if (!b) apus_fail_stop("out of memory reading ahead");
        ssize_t r = REAL(recv)(c->fd, b, apus_read_ahead_bytes, MSG_DONTWAIT);
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
    return m;
}

/* Packs the reads, in order, into as few BATCH entries as fit; returns how many. */
static int pack(struct read_item *reads, int m, struct round_item *batches) {
    int nb = 0;
    for (int i = 0; i < m;) {
        size_t total = 1;
        int j = i;
        while (j < m && (j == i || total + WIRE_ITEM_HEADER_BYTES + reads[j].len <= BATCH_BYTES_MAX))
            total += WIRE_ITEM_HEADER_BYTES + reads[j++].len;
        unsigned char *b = malloc(total);
        if (!b) apus_fail_stop("out of memory reading ahead");
        size_t off = wire_batch_start(b);
        for (int k = i; k < j; k++) off = wire_batch_item(b, off, reads[k].c->id, reads[k].bytes, reads[k].len);
        batches[nb++] = (struct round_item){ b, off, i, j - i, 1 };
        i = j;
    }
    /* A round in several entries says so: followers replay its parts in one turn. */
    for (int k = 0; k < nb; k++) wire_batch_part(batches[k].bytes, k, nb);
    return nb;
}

/* Proposes every batch and waits for all outcomes (the shim's lock not held). */
static void propose_and_wait(struct round_item *batches, int nb) {
    pthread_mutex_lock(&round_mu);
    round_pending = nb;
    pthread_mutex_unlock(&round_mu);
    apus_server_waits(1);
    for (int i = 0; i < nb; i++) {
        int rc = interpose_propose_async(batches[i].bytes, batches[i].len, round_done, &batches[i]);
        if (rc != INTERPOSE_OK) round_done(&batches[i], rc, 0);
    }
    pthread_mutex_lock(&round_mu);
    while (round_pending > 0) pthread_cond_wait(&round_cond, &round_mu);
    pthread_mutex_unlock(&round_mu);
    apus_server_waits(0);
}

void apus_read_ahead(struct epoll_event *events, int n) {
    apus_assert_locked("apus_read_ahead");
    struct read_item *reads = malloc((size_t)n * sizeof *reads);
    struct round_item *batches = malloc((size_t)n * sizeof *batches);
    if (!reads || !batches) apus_fail_stop("out of memory reading ahead");
    int m = read_clients(events, n, reads);
    int nb = pack(reads, m, batches);
    if (nb > 0) {
        apus_unlock();
        propose_and_wait(batches, nb);
        apus_lock();
    }
    for (int i = 0; i < nb; i++) {
        struct round_item *it = &batches[i];
        if (it->status == INTERPOSE_EUNKNOWN) apus_fail_stop("a proposal timed out and may still commit");
        for (int k = it->first; k < it->first + it->count; k++) {
            struct read_item *r = &reads[k];
            if (it->status == INTERPOSE_OK) {
                apus_take_committed(r->c, r->bytes, r->len);
                continue;
            }
            free(r->bytes);
            if (!r->bytes) r->c->close_logged = 0; /* the end did not commit: propose it again */
            apus_break_client(r->c);
        }
        free(it->bytes);
    }
    free(reads);
    free(batches);
}
