/* limits.c - the shim's resource limits: its tuning variables, the fd limit, and the cap on the
 * leader's connections that keeps followers within theirs (docs/design/interpose.md, "Limits"). */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#include "apus.h"

size_t apus_read_ahead_bytes = 16384;
size_t apus_queue_bytes_max = 64u << 20;
long apus_clients_max = -1;
static long clients_max_from_env = -1;

/* Descriptors left for everything but replay connections: the server's own files (Redis keeps
 * 32 for itself), a fork's pipes, the replica's sockets opened later. */
#define FD_RESERVE 64

long long apus_now_ms(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (long long)t.tv_sec * 1000 + t.tv_nsec / 1000000;
}

/* A positive integer in [lo, hi] from variable `name`, or `fallback` when unset. A value that is
 * not one stops the process: running with a setting other than the one asked for is worse. */
long apus_env_number(const char *name, long fallback, long lo, long hi) {
    const char *v = getenv(name);
    if (!v || !*v) return fallback;
    char *end;
    errno = 0;
    long n = strtol(v, &end, 10);
    if (errno || *end || n < lo || n > hi) {
        char why[256];
        snprintf(why, sizeof why, "%s=%s is not a whole number from %ld to %ld", name, v, lo, hi);
        apus_refuse_server(why);
    }
    return n;
}

void apus_read_limits_from_env(void) {
    /* One read must fit a BATCH entry (below the log's batch limit); Redis reads 16 KiB. */
    apus_read_ahead_bytes = (size_t)apus_env_number("INTERPOSE_READ_BYTES", 16384, 512, 128 * 1024);
    apus_queue_bytes_max = (size_t)apus_env_number("INTERPOSE_QUEUE_BYTES", 64L << 20, 1L << 20, 1L << 40);
    clients_max_from_env = apus_env_number("INTERPOSE_MAX_CLIENTS", -1, 1, APUS_FD_MAX / 2);
}

long apus_fd_limit(void) {
    struct rlimit r;
    if (getrlimit(RLIMIT_NOFILE, &r) != 0) return -1;
    return r.rlim_cur == RLIM_INFINITY ? APUS_FD_MAX : (long)r.rlim_cur;
}

int apus_open_fds(void) {
    DIR *d = opendir("/proc/self/fd");
    if (!d) return -1;
    int n = 0;
    for (struct dirent *e; (e = readdir(d)) != NULL;) if (e->d_name[0] != '.') n++;
    closedir(d);
    return n - 1; /* the directory's own fd */
}

void apus_raise_fd_limit(void) {
    struct rlimit r;
    if (getrlimit(RLIMIT_NOFILE, &r) != 0) return;
    rlim_t want = r.rlim_max == RLIM_INFINITY || r.rlim_max > APUS_FD_MAX ? APUS_FD_MAX : r.rlim_max;
    if (r.rlim_cur == want) return;
    rlim_t was = r.rlim_cur;
    r.rlim_cur = want;
    if (setrlimit(RLIMIT_NOFILE, &r) != 0) {
        apus_log("cannot set the fd limit to %lu: %s", (unsigned long)want, strerror(errno));
        return;
    }
    /* Lowered too when above APUS_FD_MAX: an fd the shim cannot track is one it must refuse. */
    if (was > want) apus_log("fd limit lowered to %lu (from %lu): the shim tracks descriptors below %d", (unsigned long)want, (unsigned long)was, APUS_FD_MAX);
}

void apus_compute_client_cap(void) {
    long limit = apus_fd_limit();
    int open = apus_open_fds();
    if (limit > APUS_FD_MAX) limit = APUS_FD_MAX;
    /* A follower with the same limit holds two descriptors per connection of the leader. */
    long cap = limit > 0 && open >= 0 ? (limit - open - FD_RESERVE) / 2 : 1024;
    if (cap < 1) cap = 1;
    if (clients_max_from_env > 0) {
        if (clients_max_from_env > cap)
            apus_log("INTERPOSE_MAX_CLIENTS=%ld is more than a follower with this fd limit (%ld, %d open) can hold (%ld): "
                     "every follower needs a higher limit", clients_max_from_env, limit, open, cap);
        cap = clients_max_from_env;
    }
    apus_clients_max = cap;
    apus_log("at most %ld client connections (fd limit %ld, %d open; a follower holds two descriptors per connection)", cap, limit, open);
}

int apus_resource_error(int err) {
    return err == EMFILE || err == ENFILE || err == ENOBUFS || err == ENOMEM || err == EADDRINUSE || err == EADDRNOTAVAIL;
}
