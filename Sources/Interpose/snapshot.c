/* snapshot.c - the log's end: the server's own snapshots (docs/design/interpose.md, "Snapshots").
 *
 * With INTERPOSE_SNAPSHOT set, a leader cuts the log every INTERPOSE_SNAPSHOT_BYTES of entries
 * (role.c): it ends every client connection and commits a SNAPSHOT entry behind their CLOSEs.
 * Every replica that replays a SNAPSHOT entry with no connection of the log open sends its
 * server the protocol's save command over a connection of the shim's own, reads the file the
 * server wrote, and hands it to the replica, which compacts the log through that entry. The
 * server's file holds its data, not its connections (a half-read command, a transaction, a
 * blocked pop): that is why a snapshot is taken only where the log has no connection open.
 *
 * A snapshot restored by the replica (its own after a restart, or a peer's when this replica is
 * too far behind) is loaded the other way, in log order: every connection still open is ended,
 * the file is written and the server told to load it, and only then are the entries after it
 * replayed. At load time the constructor moves any earlier file aside: a server starts empty and
 * holds only what the log (from its snapshot on) says. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "apus_leader.h"
#include "interpose.h"

/* MARK: protocols and configuration */

/* How to make a server save its state to its file and load it back; both answer "+OK". */
struct protocol { const char *name, *save, *load; };

static const struct protocol protocols[] = {
    /* Redis 7: SAVE writes dir/dbfilename (to a temporary file, then renamed); DEBUG RELOAD NOSAVE
     * empties the data set and loads that file (it needs enable-debug-command yes or local). */
    { "redis", "*1\r\n$4\r\nSAVE\r\n", "*3\r\n$5\r\nDEBUG\r\n$6\r\nRELOAD\r\n$6\r\nNOSAVE\r\n" },
};

static const struct protocol *protocol;
static char *file;            /* INTERPOSE_SNAPSHOT_FILE */
static long snapshot_bytes;   /* INTERPOSE_SNAPSHOT_BYTES */
static _Atomic long long bytes_since; /* log bytes delivered since the last SNAPSHOT entry */

void apus_snapshot_setup_from_env(void) {
    const char *name = getenv("INTERPOSE_SNAPSHOT");
    const char *path = getenv("INTERPOSE_SNAPSHOT_FILE");
    const char *bytes = getenv("INTERPOSE_SNAPSHOT_BYTES");
    char why[512];
    if (!name || !*name) {
        if ((path && *path) || (bytes && *bytes)) {
            snprintf(why, sizeof why, "%s is set but INTERPOSE_SNAPSHOT (the server's snapshot protocol: redis) is not",
                     path && *path ? "INTERPOSE_SNAPSHOT_FILE" : "INTERPOSE_SNAPSHOT_BYTES");
            apus_refuse_server(why);
        }
        return;
    }
    for (size_t i = 0; i < sizeof protocols / sizeof protocols[0]; i++) {
        if (strcmp(protocols[i].name, name) == 0) protocol = &protocols[i];
    }
    if (!protocol) {
        snprintf(why, sizeof why, "INTERPOSE_SNAPSHOT=%.100s is not a snapshot protocol libinterpose knows (redis)", name);
        apus_refuse_server(why);
    }
    if (!path || path[0] != '/') {
        snprintf(why, sizeof why, "INTERPOSE_SNAPSHOT_FILE %s%.300s%s: it must be the absolute path of the file the server "
                 "saves to (Redis: dir/dbfilename)", path && *path ? "is " : "is missing", path ? path : "", path && *path ? ", not an absolute path" : "");
        apus_refuse_server(why);
    }
    char *copy = strdup(path);
    struct stat st;
    if (!copy || stat(dirname(copy), &st) != 0 || !S_ISDIR(st.st_mode)) {
        snprintf(why, sizeof why, "INTERPOSE_SNAPSHOT_FILE=%.300s: its directory does not exist", path);
        apus_refuse_server(why);
    }
    free(copy);
    /* A cut ends every client connection: not more often than every 64 KiB of log. */
    snapshot_bytes = apus_env_number("INTERPOSE_SNAPSHOT_BYTES", 64L << 20, 64L << 10, 1L << 40);
    file = strdup(path);
    if (!file) apus_refuse_server("out of memory reading INTERPOSE_SNAPSHOT_FILE");
    /* The server must not load a file of its own: its state comes from the log and the snapshot
     * the log was compacted to (loaded through the protocol once the replica restores it). */
    if (access(file, F_OK) == 0) {
        char aside[4096];
        snprintf(aside, sizeof aside, "%s.previous", file);
        if (rename(file, aside) != 0) {
            snprintf(why, sizeof why, "INTERPOSE_SNAPSHOT_FILE=%.300s exists and cannot be moved aside (%s): the server would "
                     "load a state the log does not vouch for", file, strerror(errno));
            apus_refuse_server(why);
        }
        apus_log("moved %s aside to %s: the server starts empty and loads only the snapshot its log was compacted to", file, aside);
    }
}

int apus_snapshots_on(void) { return protocol != NULL; }

void apus_snapshot_count(size_t bytes, int snapshot_entry) {
    if (snapshot_entry) atomic_store(&bytes_since, 0);
    else atomic_fetch_add(&bytes_since, (long long)bytes);
}

int apus_snapshot_due(void) { return protocol && atomic_load(&bytes_since) >= snapshot_bytes; }

/* MARK: restore (replica thread) */

static int take_restored(uint64_t index, const void *data, size_t len) {
    if (!protocol) return -1;
    apus_snapshot_count(0, 1);
    apus_enqueue(APUS_OP_LOAD, (conn_id){ 0, index }, index, data, len);
    apus_wake();
    return 0;
}

void apus_snapshot_register(void) {
    if (protocol) interpose_apus_set_restore(take_restored);
}

/* MARK: one command over the shim's own connection (server thread, the shim's lock held) */

enum { J_IDLE, J_CLOSE, J_COMMAND, J_END };

/* The snapshot or load being replayed (one at a time: replay is sequential). */
static struct job {
    int stage;
    struct replay *r;
    size_t sent;
    char reply[256];
    size_t reply_len;
} job;

/* Sends `cmd` once the server accepted the connection, waits until the server read all of it
 * and came back to epoll_wait (its reply is written by then), and reads the reply's first line.
 * 1 once the reply (or the connection's failure, as text) is in job.reply; 0 to wait. */
static int command_step(const char *cmd) {
    struct replay *r = job.r;
    if (!apus_replay_accepted(r)) return 0;
    size_t n = strlen(cmd);
    while (job.sent < n) {
        ssize_t w = write(r->cfd, cmd + job.sent, n - job.sent);
        if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return 0;
        if (w < 0) {
            snprintf(job.reply, sizeof job.reply, "(the connection failed: %s)", strerror(errno));
            return 1;
        }
        job.sent += (size_t)w;
        r->unconsumed += w;
    }
    if (r->unconsumed > 0 && !r->sclosed) return 0;
    for (;;) {
        if (job.reply_len >= sizeof job.reply - 1) return 1;
        ssize_t k = REAL(recv)(r->cfd, job.reply + job.reply_len, sizeof job.reply - 1 - job.reply_len, MSG_DONTWAIT);
        if (k > 0) {
            job.reply_len += (size_t)k;
            job.reply[job.reply_len] = 0;
            char *eol = strstr(job.reply, "\r\n");
            if (eol) { *eol = 0; return 1; }
            continue;
        }
        if (k < 0 && (errno == EAGAIN || errno == EWOULDBLOCK) && !r->sclosed) return 0;
        if (job.reply_len == 0) snprintf(job.reply, sizeof job.reply, "(the server closed the connection without answering)");
        return 1;
    }
}

static void job_start(uint64_t index) {
    job = (struct job){ .stage = J_COMMAND, .r = apus_replay_new((conn_id){ 0, index }) };
}

/* Ends the job's connection: 1 once the server closed it too. */
static int job_end(void) {
    if (!apus_replay_end(job.r)) return 0;
    job = (struct job){ .stage = J_IDLE };
    return 1;
}

int apus_snapshot_wait_ms(const struct entry *e) {
    (void)e;
    /* The server writes the reply before it waits again; look soon without an event. */
    return 10;
}

/* MARK: taking a snapshot at a SNAPSHOT entry */

/* Connections of the log open here (not the shim's own). The set is the same on every replica
 * at the same entry: OPENs, CLOSEs and ends of stream are all in the log. */
static int log_connections_open(void) {
    int n = 0;
    for (struct replay *r = apus_replays; r; r = r->next) n += r->id.inc != 0;
    for (struct client *c = apus_clients; c; c = c->next) n++;
    return n;
}

/* The saved file, whole, into a malloc'd buffer; NULL with a message naming what is wrong. */
static unsigned char *read_file(size_t *len, char *why, size_t cap) {
    int fd = open(file, O_RDONLY | O_CLOEXEC);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) != 0) {
        snprintf(why, cap, "INTERPOSE_SNAPSHOT_FILE=%s cannot be read after the server saved (%s): it must name the file the "
                 "server saves to (Redis: dir/dbfilename)", file, strerror(errno));
        if (fd >= 0) close(fd);
        return NULL;
    }
    unsigned char *b = st.st_size > 0 ? malloc((size_t)st.st_size) : NULL;
    size_t got = 0;
    while (b && got < (size_t)st.st_size) {
        ssize_t k = read(fd, b + got, (size_t)st.st_size - got);
        if (k <= 0) break;
        got += (size_t)k;
    }
    close(fd);
    if (!b || got != (size_t)st.st_size) {
        snprintf(why, cap, "INTERPOSE_SNAPSHOT_FILE=%s is empty or could not be read whole after the server saved", file);
        free(b);
        return NULL;
    }
    *len = got;
    return b;
}

int apus_snapshot_step(struct entry *e) {
    switch (job.stage) {
    case J_IDLE: {
        int open = log_connections_open();
        if (open) {
            /* A CLOSE of the cut did not commit: the file could not hold those connections. */
            apus_log("no snapshot at log entry %llu: %d connections of the log are open there", (unsigned long long)e->index, open);
            return 1;
        }
        /* A stale file must never pass for this entry's: the server writes a new one or none. */
        if (unlink(file) != 0 && errno != ENOENT) {
            apus_log("no snapshot at log entry %llu: cannot remove the earlier %s: %s", (unsigned long long)e->index, file, strerror(errno));
            return 1;
        }
        apus_log("saving the server at log entry %llu", (unsigned long long)e->index);
        job_start(e->index);
    }
    /* fallthrough */
    case J_COMMAND: {
        if (!command_step(protocol->save)) return 0;
        if (strcmp(job.reply, "+OK") != 0) {
            /* This replica keeps its log a while longer; its server's state is not touched. */
            apus_log("no snapshot at log entry %llu: the server answered its save command with: %s", (unsigned long long)e->index, job.reply);
        } else {
            char why[512];
            size_t len = 0;
            unsigned char *b = read_file(&len, why, sizeof why);
            if (!b) {
                apus_log("no snapshot at log entry %llu: %s", (unsigned long long)e->index, why);
            } else {
                if (interpose_apus_snapshot_taken(e->index, b, len) == 0)
                    apus_log("saved the server at log entry %llu: %zu bytes; the log is compacted through it", (unsigned long long)e->index, len);
                else
                    apus_log("no snapshot at log entry %llu: %s", (unsigned long long)e->index, interpose_last_error());
                free(b);
            }
        }
        job.stage = J_END;
    }
    /* fallthrough */
    default:
        return job_end();
    }
}

/* MARK: loading a restored snapshot */

/* Writes the file whole and durably under its name (a temporary file renamed over it). */
static void write_file(const struct entry *e) {
    char tmp[4096];
    snprintf(tmp, sizeof tmp, "%s.loading", file);
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    size_t put = 0;
    while (fd >= 0 && put < e->len) {
        ssize_t k = write(fd, e->data + put, e->len - put);
        if (k <= 0) break;
        put += (size_t)k;
    }
    if (fd < 0 || put != e->len || fsync(fd) != 0 || close(fd) != 0 || rename(tmp, file) != 0) {
        char why[512];
        snprintf(why, sizeof why, "cannot write the snapshot of log entry %llu (%zu bytes) to INTERPOSE_SNAPSHOT_FILE=%s: %s",
                 (unsigned long long)e->index, e->len, file, strerror(errno));
        apus_fail_stop(why);
    }
}

int apus_load_step(struct entry *e) {
    switch (job.stage) {
    case J_IDLE:
        job.stage = J_CLOSE;
    /* fallthrough */
    case J_CLOSE: {
        /* No connection was open at the snapshot: end the ones this replica still has (their
         * CLOSEs are in the part of the log the snapshot replaces). */
        int left = 0;
        for (struct replay *r = apus_replays, *next; r; r = next) {
            next = r->next;
            if (r->id.inc != 0 && !apus_replay_end(r)) left = 1;
        }
        for (struct client *c = apus_clients; c; c = c->next) {
            apus_break_client(c);
            if (!apus_own_close(c->id)) left = 1;
        }
        if (left) return 0;
        write_file(e);
        job_start(e->index);
    }
    /* fallthrough */
    case J_COMMAND: {
        if (!command_step(protocol->load)) return 0;
        if (strcmp(job.reply, "+OK") != 0) {
            char why[768];
            snprintf(why, sizeof why, "the server did not load the snapshot of log entry %llu from INTERPOSE_SNAPSHOT_FILE=%s: it "
                     "answered %s (Redis needs enable-debug-command yes or local for DEBUG RELOAD)",
                     (unsigned long long)e->index, file, job.reply);
            apus_fail_stop(why);
        }
        apus_log("loaded the snapshot of log entry %llu (%zu bytes) into the server", (unsigned long long)e->index, e->len);
        job.stage = J_END;
    }
    /* fallthrough */
    default:
        return job_end();
    }
}
