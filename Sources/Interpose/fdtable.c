/* fdtable.c - the shim's fd table and lock (fdtable.h). */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#include "fdtable.h"

struct fd_slot apus_fds[APUS_FD_MAX];
static pthread_mutex_t apus_mu = PTHREAD_MUTEX_INITIALIZER;
static __thread int holding, replica_thread;

/* A broken locking rule is a bug in the shim: say which, and stop before state goes wrong. */
static _Noreturn void bug(const char *what, const char *who) {
    apus_log("internal error: %s (%s)", what, who);
    abort();
}

void apus_lock(void) {
    if (replica_thread) bug("the shim's lock taken on the replica's thread", "apus_lock");
    if (holding) bug("the shim's lock taken twice", "apus_lock");
    pthread_mutex_lock(&apus_mu);
    holding = 1;
}

void apus_unlock(void) {
    if (!holding) bug("the shim's lock released but not held", "apus_unlock");
    holding = 0;
    pthread_mutex_unlock(&apus_mu);
}

void apus_assert_locked(const char *who) {
    if (!holding) bug("called without the shim's lock", who);
}

void apus_on_replica_thread(int on) { replica_thread = on; }

void apus_fd_set_client(int fd, struct client *c) {
    apus_assert_locked("apus_fd_set_client");
    apus_fds[fd].client = c;
    atomic_store_explicit(&apus_fds[fd].kind, APUS_FD_CLIENT, memory_order_release);
}

void apus_fd_set_replay(int fd, struct replay *r) {
    apus_assert_locked("apus_fd_set_replay");
    apus_fds[fd].replay = r;
    atomic_store_explicit(&apus_fds[fd].kind, APUS_FD_REPLAY, memory_order_release);
}

struct client *apus_fd_client(int fd) {
    apus_assert_locked("apus_fd_client");
    return apus_fd_kind_of(fd) == APUS_FD_CLIENT ? apus_fds[fd].client : NULL;
}

struct replay *apus_fd_replay(int fd) {
    apus_assert_locked("apus_fd_replay");
    return apus_fd_kind_of(fd) == APUS_FD_REPLAY ? apus_fds[fd].replay : NULL;
}

int apus_fd_forget(int fd) {
    apus_assert_locked("apus_fd_forget");
    int kind = atomic_exchange(&apus_fds[fd].kind, APUS_FD_NONE);
    apus_fds[fd].client = NULL;
    apus_fds[fd].replay = NULL;
    return kind;
}

void apus_fd_mark_shim(int fd, int shim) {
    if (apus_fd_in_range(fd)) atomic_store_explicit(&apus_fds[fd].shim, (unsigned char)shim, memory_order_relaxed);
}

void apus_fd_close_shim_fds(void) {
    for (int fd = 0; fd < APUS_FD_MAX; fd++) {
        if (atomic_load_explicit(&apus_fds[fd].shim, memory_order_relaxed)) {
            atomic_store_explicit(&apus_fds[fd].shim, 0, memory_order_relaxed);
            REAL(close)(fd);
        }
    }
}
