/* replica_driver.c - a C program that uses plover through include/interpose.h alone.
 *
 *   replica_driver CONFIG OUTPUT COUNT
 *
 * Starts the replica CONFIG names. Whichever replica leads proposes "item-1" .. "item-COUNT"
 * (alternating interpose_propose and interpose_propose_async), then a checkpoint and "end".
 * Every replica records each delivered entry, and once "end" arrives writes them to OUTPUT as
 * "INDEX KIND PAYLOAD" lines, shuts down and exits 0. Checks of the ABI's error paths print
 * "FAIL ..." and make the exit status 1. A replica that takes over as leader first commits a
 * checkpoint, so it has seen every entry committed before it and never proposes an item twice. */
#define _POSIX_C_SOURCE 200809L
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "interpose.h"

struct delivered { uint64_t index; int kind; char payload[32]; };

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t changed = PTHREAD_COND_INITIALIZER;
static struct delivered *log_entries;
static size_t log_count, log_capacity;
static int items_seen, ended, failures;
static int async_status = 1; /* 1: pending */

static void check(int ok, const char *what) {
    if (!ok) { printf("FAIL %s (last error: %s)\n", what, interpose_last_error()); fflush(stdout); failures++; }
}

static void on_deliver(void *context, int kind, uint64_t index, const void *data, size_t length) {
    (void)context;
    pthread_mutex_lock(&mu);
    if (log_count == log_capacity) {
        log_capacity = log_capacity ? 2 * log_capacity : 256;
        log_entries = realloc(log_entries, log_capacity * sizeof *log_entries);
    }
    struct delivered *d = &log_entries[log_count++];
    d->index = index;
    d->kind = kind;
    size_t n = length < sizeof d->payload - 1 ? length : sizeof d->payload - 1;
    memcpy(d->payload, data, n);
    d->payload[n] = 0;
    if (kind == INTERPOSE_ENTRY_INPUT && strncmp(d->payload, "item-", 5) == 0) items_seen++;
    if (kind == INTERPOSE_ENTRY_INPUT && strcmp(d->payload, "end") == 0) ended = 1;
    pthread_cond_broadcast(&changed);
    pthread_mutex_unlock(&mu);
}

static void on_done(void *context, int status, uint64_t index) {
    (void)context, (void)index;
    pthread_mutex_lock(&mu);
    async_status = status;
    pthread_cond_broadcast(&changed);
    pthread_mutex_unlock(&mu);
}

static void sleep_ms(int ms) {
    struct timespec t = { ms / 1000, (long)(ms % 1000) * 1000000L };
    nanosleep(&t, NULL);
}

int main(int argc, char **argv) {
    if (argc != 4) { fprintf(stderr, "usage: %s CONFIG OUTPUT COUNT\n", argv[0]); return 2; }
    int count = atoi(argv[3]);
    setvbuf(stdout, NULL, _IOLBF, 0);

    check(interpose_abi_version() == INTERPOSE_ABI_VERSION, "abi version matches the header");
    check(interpose_propose("x", 1, NULL) == INTERPOSE_ESTATE, "propose before init is ESTATE");
    check(interpose_init(NULL) == INTERPOSE_EINVAL, "init(NULL) is EINVAL");
    check(interpose_init("/nonexistent/node.toml") == INTERPOSE_ECONFIG, "init with a missing config is ECONFIG");
    check(strstr(interpose_last_error(), "/nonexistent/node.toml") != NULL, "the config error names the file");
    check(interpose_set_deliver(on_deliver, NULL) == INTERPOSE_OK, "set_deliver before init");
    if (interpose_init(argv[1]) != INTERPOSE_OK) { printf("FAIL init: %s\n", interpose_last_error()); return 1; }
    check(interpose_init(argv[1]) == INTERPOSE_ESTATE, "a second init is ESTATE");
    check(interpose_set_deliver(on_deliver, NULL) == INTERPOSE_ESTATE, "set_deliver after init is ESTATE");
    check(interpose_propose(NULL, 3, NULL) == INTERPOSE_EINVAL, "propose(NULL) is EINVAL");
    check(interpose_propose("x", 0, NULL) == INTERPOSE_EINVAL, "an empty input is EINVAL");
    char status[1024];
    int slen = interpose_status(status, sizeof status);
    check(slen > 0 && strstr(status, "role=") != NULL, "status has a role line");
    check(interpose_status(status, 4) == slen && strlen(status) == 3, "a short buffer is truncated and NUL-terminated");

    int was_leader = 0, checked_follower = 0, sequence = 0;
    for (;;) {
        pthread_mutex_lock(&mu);
        int done = ended, next = items_seen + 1;
        pthread_mutex_unlock(&mu);
        if (done) break;
        if (!interpose_is_leader()) {
            if (!checked_follower && interpose_leader_id() != 0) {
                int rc = interpose_propose("not-here", 8, NULL);
                check(rc == INTERPOSE_ENOTLEADER, "a follower's propose is ENOTLEADER");
                checked_follower = 1;
            }
            was_leader = 0;
            sleep_ms(5);
            continue;
        }
        if (!was_leader) {
            /* Newly leading: a committed checkpoint means every earlier entry was delivered here. */
            if (interpose_checkpoint(NULL) != INTERPOSE_OK) continue;
            was_leader = 1;
            continue;
        }
        char item[32];
        if (next <= count) {
            int n = snprintf(item, sizeof item, "item-%d", next);
            if (sequence++ % 2 == 0) {
                uint64_t index = 0;
                int rc = interpose_propose(item, (size_t)n, &index);
                if (rc == INTERPOSE_OK) check(index > 0, "propose returns the entry's index");
                else was_leader = 0;
            } else {
                pthread_mutex_lock(&mu);
                async_status = 1;
                pthread_mutex_unlock(&mu);
                if (interpose_propose_async(item, (size_t)n, on_done, NULL) != INTERPOSE_OK) { was_leader = 0; continue; }
                pthread_mutex_lock(&mu);
                while (async_status == 1) pthread_cond_wait(&changed, &mu);
                int rc = async_status;
                pthread_mutex_unlock(&mu);
                if (rc != INTERPOSE_OK) was_leader = 0;
            }
            sleep_ms(2); /* pace the run so a test can kill the leader half-way */
        } else {
            uint64_t index = 0;
            if (interpose_checkpoint(&index) != INTERPOSE_OK || interpose_propose("end", 3, NULL) != INTERPOSE_OK) was_leader = 0;
        }
    }
    /* Give the other replicas time to learn the last commit before this one stops. */
    sleep_ms(300);
    FILE *out = fopen(argv[2], "w");
    if (!out) { printf("FAIL cannot write %s\n", argv[2]); return 1; }
    pthread_mutex_lock(&mu);
    for (size_t i = 0; i < log_count; i++) fprintf(out, "%llu %d %s\n", (unsigned long long)log_entries[i].index, log_entries[i].kind, log_entries[i].payload);
    pthread_mutex_unlock(&mu);
    fclose(out);
    check(interpose_shutdown() == INTERPOSE_OK, "shutdown");
    check(interpose_shutdown() == INTERPOSE_ESTATE, "a second shutdown is ESTATE");
    return failures ? 1 : 0;
}
