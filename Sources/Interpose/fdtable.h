/* fdtable.h - internal: what the shim knows about each fd below APUS_FD_MAX, in one table, and
 * the shim's lock, with its rules checked in code.
 *
 * `kind`, `shim` and `listener` are atomics, read without the lock: by every hook's fast path,
 * and by a forked child, which must touch no lock. `client` and `replay` are read and written
 * only under apus_mu, and the functions that touch them check that the caller holds it. */
#ifndef INTERPOSE_FDTABLE_H
#define INTERPOSE_FDTABLE_H

#include <stdatomic.h>

#include "apus.h"

struct client;

struct fd_slot {
    _Atomic unsigned char kind;     /* enum apus_fd_kind */
    _Atomic unsigned char shim;     /* the shim's own end of a replay connection */
    _Atomic unsigned char listener; /* 0 not known yet, 1 the server's listener, 2 something else */
    struct client *client;          /* kind CLIENT: its client (under apus_mu) */
    struct replay *replay;          /* kind REPLAY: the replay this is the server's end of (under apus_mu) */
};

extern struct fd_slot apus_fds[APUS_FD_MAX];

static inline int apus_fd_in_range(int fd) { return fd >= 0 && fd < APUS_FD_MAX; }

/* Lock-free reads. */
static inline int apus_fd_kind_of(int fd) {
    return apus_fd_in_range(fd) ? atomic_load_explicit(&apus_fds[fd].kind, memory_order_acquire) : APUS_FD_NONE;
}

/* 1 if the hooks handle `fd` on this call: APUS mode, not nested in a hook, an fd the shim tracks. */
static inline int apus_tracked(int fd) {
    return atomic_load_explicit(&apus_on, memory_order_relaxed) && !apus_in_hook && apus_fd_kind_of(fd) != APUS_FD_NONE;
}

/* The shim's lock. Never taken on the replica's thread (its callbacks would deadlock with a
 * server thread that proposes under the lock), never held while waiting for the replica. */
void apus_lock(void);
void apus_unlock(void);
/* Stops with a message naming `who` unless this thread holds the lock (a bug, not a state). */
void apus_assert_locked(const char *who);
/* Marks the calling thread as the replica's for the duration of a callback: apus_lock() there
 * is a bug and stops the process with a message. */
void apus_on_replica_thread(int on);

/* Under the lock. */
void apus_fd_set_client(int fd, struct client *c);
void apus_fd_set_replay(int fd, struct replay *r);
struct client *apus_fd_client(int fd);
struct replay *apus_fd_replay(int fd);
/* Forgets the fd (its close); returns what it was. */
int apus_fd_forget(int fd);

/* Any thread. */
void apus_fd_mark_shim(int fd, int shim);
/* In a forked child: closes the shim's replay ends, without a lock. */
void apus_fd_close_shim_fds(void);

#endif
