/* role.c - readiness: when a leader may take clients (docs/design/interpose.md, "Becoming leader").
 *
 * Readiness follows the log by leader term. In a term, a leader (1) commits a barrier, so every
 * entry committed before it has been delivered; (2) replays all of it (and lets the server read
 * its own committed input still pending); (3) proposes CLOSE for every replay connection of
 * earlier leaders, for its own clients of earlier terms and for freed clients whose CLOSE did
 * not commit, and commits a second barrier behind them; (4) replays those. If connections are
 * still open then (a CLOSE did not commit), it goes back to (3). Only then is it ready.
 *
 * Nothing here waits for the replica: barriers are proposed asynchronously and looked at on the
 * server's next epoll_wait. The server thread must keep running its loop meanwhile, because
 * replay needs it, and because the deliver callback waits for replay when its queue is full (a
 * blocking barrier behind a full queue would never commit).
 *
 * A ready leader with a snapshot protocol also cuts the log now and then (cut() below). */
#define _GNU_SOURCE
#include <stdlib.h>

#include "apus_leader.h"
#include "interpose.h"

enum { B_PENDING, B_OK, B_FAILED, B_ABANDONED };

/* A barrier in flight. Its outcome arrives on the replica thread; whichever of the two sides
 * comes last frees it. */
struct barrier { atomic_int state; };

enum phase { P_BARRIER, P_WAIT_BARRIER, P_CLOSE, P_WAIT_CLOSED, P_SETTLE, P_READY };

static uint64_t current_term;
static enum phase phase;
static struct barrier *barrier;

void apus_ignore_outcome(void *context, int status, uint64_t index) { (void)context, (void)status, (void)index; }

static void barrier_done(void *context, int status, uint64_t index) {
    (void)index;
    struct barrier *b = context;
    int expected = B_PENDING;
    if (!atomic_compare_exchange_strong(&b->state, &expected, status == INTERPOSE_OK ? B_OK : B_FAILED)) free(b);
    apus_wake();
}

/* Proposes a BARRIER (or, with `snapshot`, a SNAPSHOT entry, a barrier every replica saves its
 * server at) and tracks its outcome. */
static void marker_propose(int snapshot) {
    struct barrier *b = calloc(1, sizeof *b);
    if (!b) apus_fail_stop("out of memory proposing a barrier");
    unsigned char e[1];
    if (interpose_propose_async(e, snapshot ? wire_snapshot(e) : wire_barrier(e), barrier_done, b) != INTERPOSE_OK) {
        /* Not proposed (the outcome callback will not run): look again on the next call. */
        free(b);
        return;
    }
    barrier = b;
}

static void barrier_propose(void) { marker_propose(0); }

/* B_OK, B_PENDING or B_FAILED (no barrier counts as failed); a finished barrier is freed. */
static int barrier_outcome(void) {
    if (!barrier) return B_FAILED;
    int s = atomic_load(&barrier->state);
    if (s == B_PENDING) return s;
    free(barrier);
    barrier = NULL;
    return s;
}

static void barrier_abandon(void) {
    if (!barrier) return;
    int expected = B_PENDING;
    if (!atomic_compare_exchange_strong(&barrier->state, &expected, B_ABANDONED)) free(barrier);
    barrier = NULL;
}

/* MARK: CLOSE proposals */

struct closing { conn_id id; struct closing *next; };
/* Freed clients whose CLOSE did not commit. Filled by outcome callbacks (replica thread, or the
 * proposing thread itself), so under a lock of its own, never the shim's lock. */
static pthread_mutex_t retry_mu = PTHREAD_MUTEX_INITIALIZER;
static struct closing *retry_list;

static void close_done(void *context, int status, uint64_t index) {
    (void)index;
    struct closing *c = context;
    if (status == INTERPOSE_OK) { free(c); return; }
    pthread_mutex_lock(&retry_mu);
    c->next = retry_list;
    retry_list = c;
    pthread_mutex_unlock(&retry_mu);
}

void apus_propose_close(conn_id id, int retry) {
    unsigned char e[WIRE_CONTROL_BYTES];
    size_t n = wire_control(e, WIRE_CLOSE, id);
    struct closing *c = retry ? calloc(1, sizeof *c) : NULL;
    if (c) c->id = id;
    if (interpose_propose_async(e, n, c ? close_done : apus_ignore_outcome, c) != INTERPOSE_OK && c) close_done(c, INTERPOSE_ESTOPPED, 0);
}

static void propose_retried_closes(void) {
    pthread_mutex_lock(&retry_mu);
    struct closing *list = retry_list;
    retry_list = NULL;
    pthread_mutex_unlock(&retry_mu);
    while (list) {
        struct closing *next = list->next;
        apus_propose_close(list->id, 1);
        free(list);
        list = next;
    }
}

/* MARK: phases */

static void propose_closes(void) {
    for (struct replay *r = apus_replays; r; r = r->next) {
        if (!r->close_proposed) { r->close_proposed = 1; apus_propose_close(r->id, 0); }
    }
    for (struct client *c = apus_clients; c; c = c->next) {
        if (c->broken && !c->close_logged) { c->close_logged = 1; apus_propose_close(c->id, 0); }
    }
    propose_retried_closes();
}

/* Connections of earlier terms still open once their CLOSEs should have been replayed. */
static int connections_left(void) {
    int left = apus_replays != NULL;
    for (struct replay *r = apus_replays; r; r = r->next) r->close_proposed = 0;
    for (struct client *c = apus_clients; c; c = c->next) {
        if (c->broken && !c->eof) { left = 1; c->close_logged = 0; }
    }
    return left;
}

static void new_term(uint64_t term) {
    for (struct client *c = apus_clients; c; c = c->next) apus_break_client(c);
    /* A CLOSE proposed in an ended term may never have committed: propose it again. */
    for (struct replay *r = apus_replays; r; r = r->next) r->close_proposed = 0;
    for (struct client *c = apus_clients; c; c = c->next) if (!c->eof) c->close_logged = 0;
    barrier_abandon();
    current_term = term;
    phase = P_BARRIER;
}

/* A cut (snapshot.c): every client of this term ends, as if the term had, and a SNAPSHOT entry
 * commits behind their CLOSEs; the leader takes clients again once it has replayed it, so no
 * connection of the log is open at the entry. Then it goes on as after (3) above: if a CLOSE
 * did not commit, it proposes it again behind a barrier (no replica saves where one is open). */
static void cut(void) {
    for (struct client *c = apus_clients; c; c = c->next) apus_break_client(c);
    propose_closes();
    marker_propose(1);
    phase = barrier ? P_WAIT_CLOSED : P_CLOSE;
}

void apus_update_role(void) {
    apus_assert_locked("apus_update_role");
    uint64_t term = interpose_leader_term();
    if (term != current_term) new_term(term);
    /* This replica's own committed bytes come before anything it replays. */
    if (!apus_pending_head) apus_pump();
    if (term == 0) return;
    int settled = !apus_pending_head && apus_replay_idle();
    switch (phase) {
    case P_BARRIER:
        barrier_propose();
        if (barrier) phase = P_WAIT_BARRIER;
        break;
    case P_WAIT_BARRIER:
        switch (barrier_outcome()) {
        case B_OK: phase = P_CLOSE; break;
        case B_FAILED: phase = P_BARRIER; break;
        default: break;
        }
        break;
    case P_CLOSE:
        if (!settled) break;
        propose_closes();
        barrier_propose(); /* commits after those CLOSEs */
        if (barrier) phase = P_WAIT_CLOSED;
        break;
    case P_WAIT_CLOSED:
        switch (barrier_outcome()) {
        case B_OK: phase = P_SETTLE; break;
        case B_FAILED: phase = P_CLOSE; break;
        default: break;
        }
        break;
    case P_SETTLE:
        if (!settled) break;
        phase = connections_left() ? P_CLOSE : P_READY;
        break;
    case P_READY:
        /* Freed clients whose CLOSE failed in this term: propose again now. */
        propose_retried_closes();
        if (apus_snapshot_due()) cut();
        break;
    }
}

int apus_ready(void) {
    return phase == P_READY && current_term != 0 && interpose_leader_term() == current_term;
}
