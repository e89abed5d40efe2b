/* apus.h - internal: the LD_PRELOAD replication of an unmodified TCP server (APUS mode).
 * Not part of the C ABI. docs/design/interpose.md describes the protocol.
 *
 * Threads and locks:
 * - the server thread (the one that waits on the epoll set watching the listener) runs every
 *   APUS path: leader read-ahead, the read hook, readiness, replay. Their state is under the
 *   shim's lock (apus_lock, fdtable.c), which is never held while waiting for the replica;
 * - the replica's node thread runs the deliver callback (replay.c) and proposal outcomes. It
 *   takes only the entry queue's lock and the CLOSE-retry lock, never the shim's lock: the
 *   server thread proposes while holding it, and a proposal can complete on the proposing
 *   thread. apus_lock() stops the process if the deliver callback's thread tries;
 * - a forked child touches no lock at all (hooks.c).
 * Functions that need the shim's lock check that their caller holds it (apus_assert_locked). */
#ifndef INTERPOSE_APUS_H
#define INTERPOSE_APUS_H

#include <stdatomic.h>
#include <stdint.h>
#include <stddef.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <sys/uio.h>

#include "wire.h"

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

/* Highest fd number (exclusive) the shim tracks. The shim keeps the server's soft fd limit at
 * or below it (limits.c), so the kernel hands out no fd it cannot track unless the server
 * raises the limit itself; such connections are refused with a message. */
#define APUS_FD_MAX 65536

enum apus_fd_kind { APUS_FD_NONE = 0, APUS_FD_CLIENT = 1, APUS_FD_REPLAY = 2 };

/* Set once INTERPOSE_CONFIG and INTERPOSE_PORT are present; cleared in a forked child. */
extern atomic_int apus_on;
/* Set on a thread while it runs inside a hook: nested libc calls pass straight through. */
extern __thread int apus_in_hook;

/* Returned by apus_after_accept for a connection it closed: the accept hook takes the next one. */
#define APUS_REFUSED (-2)

void apus_setup_from_env(void);
int apus_after_accept(int listen_fd, int fd);
ssize_t apus_read(int fd, void *buf, size_t count);
void apus_before_close(int fd);
void apus_after_epoll_ctl(int epfd, int op, int fd, const struct epoll_event *ev);
int apus_is_app_epoll(int epfd);
/* 1 if an epoll_ctl on the server's set concerns a client of an ended term: it is recorded, not made. */
int apus_epoll_ctl_recorded_only(int epfd, int op, int fd, const struct epoll_event *ev);
int apus_epoll_wait(int epfd, struct epoll_event *events, int max, int timeout, const sigset_t *mask, int pwait);
void apus_log(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* 1 when a rate-limited line may be written now: at most one every 10 s per `last` (the caller's
 * static; updated when it says yes). */
int apus_log_due(long long *last);
long long apus_now_ms(void);

/* MARK: limits (limits.c) */

/* Parsed from the environment by apus_setup_from_env (a bad value stops the server at start). */
extern size_t apus_read_ahead_bytes;   /* INTERPOSE_READ_BYTES */
extern size_t apus_queue_bytes_max;    /* INTERPOSE_QUEUE_BYTES */
extern long apus_clients_max;          /* INTERPOSE_MAX_CLIENTS, or computed at start (-1 until then) */
/* A whole number in [lo, hi] from variable `name`, or `fallback` when unset; stops the process
 * naming the variable when it is anything else. */
long apus_env_number(const char *name, long fallback, long lo, long hi);
/* Reads the INTERPOSE_* tuning variables; stops the process naming a bad one. */
void apus_read_limits_from_env(void);
/* Raises the soft fd limit to the hard one (at most APUS_FD_MAX). */
void apus_raise_fd_limit(void);
/* Once the replica runs: how many connections the leader may hold (a follower needs two
 * descriptors for each), unless INTERPOSE_MAX_CLIENTS says. */
void apus_compute_client_cap(void);
/* The soft fd limit and the number of open fds now (for messages). */
long apus_fd_limit(void);
int apus_open_fds(void);
/* 1 for errors that mean "out of a resource now" (descriptors, memory, ports): wait and retry. */
int apus_resource_error(int err);

/* MARK: shared between apus.c (leader, role, hooks) and replay.c (followers' replay) */

/* A loopback connection replaying another leader's client connection into the local server. */
struct replay {
    conn_id id;
    int cfd;            /* the shim's end, -1 until a socket could be made */
    int sfd;            /* the server's end (-1 until the server accepted it) */
    uint16_t port;      /* the shim's end's local port: how the accept hook recognises it */
    long unconsumed;    /* bytes the shim wrote into its end that the server has not read yet (snapshots) */
    int cclosed, sclosed, close_proposed;
    int ending;         /* the server read its committed end of stream: freed once it closed its end */
    /* How the server watches its end on its epoll (from epoll_ctl): how a round reports it. */
    uint64_t data;
    uint32_t events;
    int watched;
    long long retry_at;     /* when to try making the socket again after a resource error */
    long long backoff_ms;   /* the next wait after another failure */
    long long connected_at; /* when the connect was started, for the "not accepted yet" warning */
    int warned;
    struct replay *next;
};

/* Queued ops that are not wire ops: a snapshot's file for the server to load. */
enum { APUS_OP_LOAD = 0x31 };

/* A committed entry of another leader, waiting to be replayed. */
struct entry {
    struct entry *next;
    int op;             /* WIRE_OPEN, WIRE_CLOSE, WIRE_ITEM_DATA (an end of stream is a CLOSE),
                           WIRE_SNAPSHOT or APUS_OP_LOAD (data: the file) */
    conn_id id;
    uint64_t index;     /* the log entry it came from (a load: the snapshot's) */
    int round_end;      /* the last queued item of a round's last entry: the round ends here */
    int continues;      /* an item of an entry that continues the round of the entry before it */
    struct replay *r;   /* a round's item: its connection, once the round started */
    size_t len, off;
    unsigned char data[];
};

extern int apus_app_port;
extern int apus_wake_fd;
extern struct replay *apus_replays;
extern int apus_replay_count;

_Noreturn void apus_fail_stop(const char *why);
/* Stops the process before it serves: the server has a shape libinterpose cannot replicate. */
_Noreturn void apus_refuse_server(const char *why);
/* This process's incarnation (random, 64 bits): the first half of its connection ids. */
uint64_t apus_incarnation(void);
/* The incarnation, for a new connection id: from now on entries with it are this process's own. */
uint64_t apus_claim_incarnation(void);
/* The server accepted replay connection `r` as an fd the shim cannot track and it was closed:
 * make the connection again later. */
void apus_replay_retry(struct replay *r);
/* Queues an entry for the server thread (replica thread; waits while the queue is full). */
void apus_enqueue(int op, conn_id id, uint64_t index, const unsigned char *data, size_t len);
/* Replay connections by id (the shim's lock held). The shim's own connections into the server
 * (a snapshot's save or load command) have incarnation 0, which no process draws. */
struct replay *apus_replay_find(conn_id id);
struct replay *apus_replay_new(conn_id id);
/* 1 once the server accepted `r` (connecting, or retrying after a resource error, first). */
int apus_replay_accepted(struct replay *r);
/* Ends `r`: shuts the shim's end; 1 once the server closed its end too and `r` is freed. */
int apus_replay_end(struct replay *r);
/* The deliver callback (replica thread): queues other processes' committed entries. */
void apus_deliver(void *context, int kind, uint64_t index, const void *data, size_t len);
/* Replays queued entries as far as the server allows (server thread, the shim's lock held). */
void apus_pump(void);
/* A committed CLOSE of this process's own connection id (apus.c; server thread, the shim's lock held): 1 once done. */
int apus_own_close(conn_id id);
/* No entry is queued or half replayed. */
int apus_replay_idle(void);
/* Followers replay a leader's read-ahead round (one BATCH entry) in one turn of the server's loop,
 * as the leader's server took it (replay.c, the shim's lock held):
 * 1 while a round's items wait for the server to read them on connections it watches for input
 * (epoll_wait then returns at once); */
int apus_round_active(void);
/* epoll_wait during a round: strips the kernel's input events of replay connections and reports
 * every connection with an item left, in log order; returns the new count; */
int apus_round_report(struct epoll_event *events, int k, int max);
/* a read of the server's end of replay connection `r`: 1 with *n (and errno) set when the round
 * answers it (the head item's bytes, its end, or EAGAIN for a connection whose turn has not
 * come), 0 when the read goes to the socket (no round is being handed out). */
int apus_round_read(struct replay *r, void *buf, size_t count, ssize_t *n);
/* Adds EPOLLIN for `data` to the events (merged into an event with the same data); returns the count. */
int apus_add_event(struct epoll_event *events, int k, int max, uint64_t data);
/* Milliseconds until replay wants another turn without any event (a retry), or -1. */
int apus_replay_wait_ms(void);
/* Around every wait of the server thread for the replica (a proposal's commit): while it waits,
 * the deliver callback must not block on a full queue, or neither thread would move. */
void apus_server_waits(int waiting);
/* Wakes the server thread's epoll_wait (any thread; no lock). */
void apus_wake(void);

/* MARK: the server's snapshots (snapshot.c; docs/design/interpose.md, "Snapshots") */

/* Reads INTERPOSE_SNAPSHOT, INTERPOSE_SNAPSHOT_FILE and INTERPOSE_SNAPSHOT_BYTES (a bad value
 * stops the process naming it) and moves an earlier snapshot file aside, so the server starts
 * empty and loads only what the log says (constructor, before the server reads its files). */
void apus_snapshot_setup_from_env(void);
/* Before interpose_init: registers the function that takes restored snapshots. */
void apus_snapshot_register(void);
/* Deliver callback: counts an entry's bytes; a SNAPSHOT entry starts the count over. */
void apus_snapshot_count(size_t bytes, int snapshot_entry);
/* 1 if snapshots are configured. */
int apus_snapshots_on(void);
/* Leader: enough log since the last SNAPSHOT entry that a cut is due. */
int apus_snapshot_due(void);
/* Replay of a SNAPSHOT entry / of a snapshot to load (server thread, the shim's lock held):
 * 1 when done, 0 to wait for the server. */
int apus_snapshot_step(struct entry *e);
int apus_load_step(struct entry *e);
/* Milliseconds until a snapshot or load in progress wants another look, or -1. */
int apus_snapshot_wait_ms(const struct entry *e);

/* Defined by the Swift half (Sources/InterposeRuntime/ServerSnapshot.swift). */
int interpose_apus_set_restore(int (*fn)(uint64_t index, const void *file, size_t length));
int interpose_apus_snapshot_taken(uint64_t index, const void *file, size_t length);

#endif
