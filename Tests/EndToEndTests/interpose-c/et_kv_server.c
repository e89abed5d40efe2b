/* et_kv_server.c - a small key-value server of another shape than Redis, for the libinterpose
 * tests: one thread, edge-triggered epoll (EPOLLET) on the listener and the clients, and fair
 * reading: at most CHUNK bytes per client per turn, clients with more input stay on a ready list
 * and the loop polls with timeout 0 until it is empty, else waits without a timeout.
 *
 *   et_kv_server PORT ADMIN_SOCKET
 *
 * Clients on 127.0.0.1:PORT send lines: "SET k v" -> "OK", "APPEND k v" (v appended after a
 * comma) -> "OK <length>", "GET k" -> "VALUE v" or "NIL", "DEL k" -> "OK". The admin Unix socket
 * (not replicated by the shim) answers one line per connection: "DIGEST" -> a hash of the whole
 * state (independent of hash table order), "GET k" -> the value. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#define CHUNK 700
#define LINE_MAX_BYTES (1 << 20)
#define BUCKETS 4096
#define FDS 65536

struct item { char *key, *value; size_t vlen; struct item *next; };
static struct item *table[BUCKETS];

struct conn {
    char *in; size_t in_len, in_cap;
    char *out; size_t out_len, out_off, out_cap;
    int ready; /* on the ready list: may have more input */
};
static struct conn *conns[FDS];
static int ready_list[FDS], ready_count;

static uint64_t fnv(const void *p, size_t n, uint64_t h) {
    const unsigned char *b = p;
    for (size_t i = 0; i < n; i++) h = (h ^ b[i]) * 1099511628211ULL;
    return h;
}

static struct item **find(const char *key) {
    struct item **p = &table[fnv(key, strlen(key), 1469598103934665603ULL) % BUCKETS];
    while (*p && strcmp((*p)->key, key) != 0) p = &(*p)->next;
    return p;
}

static void append(char **buf, size_t *len, size_t *cap, const char *data, size_t n) {
    if (*len + n + 1 > *cap) {
        *cap = (*len + n + 1) * 2;
        *buf = realloc(*buf, *cap);
        if (!*buf) { perror("realloc"); exit(1); }
    }
    memcpy(*buf + *len, data, n);
    *len += n;
    (*buf)[*len] = 0;
}

static void set(const char *key, const char *value, int add) {
    struct item **p = find(key);
    if (!*p) {
        *p = calloc(1, sizeof **p);
        (*p)->key = strdup(key);
        (*p)->value = strdup("");
    }
    size_t cap = (*p)->vlen + 1;
    if (!add) (*p)->vlen = 0;
    else if ((*p)->vlen) append(&(*p)->value, &(*p)->vlen, &cap, ",", 1);
    append(&(*p)->value, &(*p)->vlen, &cap, value, strlen(value));
}

/* Executes one command line; the reply goes to `reply` (a line). */
static void execute(char *line, char **reply, size_t *len, size_t *cap) {
    char *cmd = strtok(line, " "), *key = strtok(NULL, " "), *value = strtok(NULL, "");
    char head[64];
    if (cmd && key && value && strcmp(cmd, "SET") == 0) {
        set(key, value, 0);
        append(reply, len, cap, "OK\n", 3);
    } else if (cmd && key && value && strcmp(cmd, "APPEND") == 0) {
        set(key, value, 1);
        int n = snprintf(head, sizeof head, "OK %zu\n", (*find(key))->vlen);
        append(reply, len, cap, head, (size_t)n);
    } else if (cmd && key && strcmp(cmd, "GET") == 0) {
        struct item *it = *find(key);
        if (!it) { append(reply, len, cap, "NIL\n", 4); return; }
        append(reply, len, cap, "VALUE ", 6);
        append(reply, len, cap, it->value, it->vlen);
        append(reply, len, cap, "\n", 1);
    } else if (cmd && key && strcmp(cmd, "DEL") == 0) {
        struct item **p = find(key), *it = *p;
        if (it) { *p = it->next; free(it->key); free(it->value); free(it); }
        append(reply, len, cap, "OK\n", 3);
    } else {
        append(reply, len, cap, "ERR\n", 4);
    }
}

static uint64_t digest(void) {
    uint64_t sum = 0, count = 0;
    for (int b = 0; b < BUCKETS; b++) {
        for (struct item *it = table[b]; it; it = it->next) {
            uint64_t h = fnv(it->key, strlen(it->key) + 1, 1469598103934665603ULL);
            sum += fnv(it->value, it->vlen, h);
            count++;
        }
    }
    return sum ^ (count * 0x9E3779B97F4A7C15ULL);
}

static void drop(int ep, int fd) {
    epoll_ctl(ep, EPOLL_CTL_DEL, fd, NULL);
    close(fd);
    struct conn *c = conns[fd];
    conns[fd] = NULL;
    if (c) { free(c->in); free(c->out); free(c); }
}

static void flush(int fd) {
    struct conn *c = conns[fd];
    while (c->out_off < c->out_len) {
        ssize_t w = write(fd, c->out + c->out_off, c->out_len - c->out_off);
        if (w <= 0) return; /* EAGAIN: EPOLLOUT comes; an error: the read side ends it */
        c->out_off += (size_t)w;
    }
    c->out_len = c->out_off = 0;
}

/* One turn for a client: one read of at most CHUNK bytes, then every complete line. Returns 0
 * while it may have more input, 1 when drained (EAGAIN), -1 when it ended. */
static int serve_turn(int fd) {
    struct conn *c = conns[fd];
    char buf[CHUNK];
    ssize_t n = read(fd, buf, sizeof buf);
    if (n == 0) return -1;
    if (n < 0) return errno == EAGAIN || errno == EWOULDBLOCK ? 1 : -1;
    append(&c->in, &c->in_len, &c->in_cap, buf, (size_t)n);
    if (c->in_len > LINE_MAX_BYTES) return -1;
    char *start = c->in, *nl;
    while ((nl = memchr(start, '\n', c->in_len - (size_t)(start - c->in))) != NULL) {
        *nl = 0;
        execute(start, &c->out, &c->out_len, &c->out_cap);
        start = nl + 1;
    }
    size_t rest = c->in_len - (size_t)(start - c->in);
    memmove(c->in, start, rest);
    c->in_len = rest;
    flush(fd);
    return 0;
}

static void admin(int lfd) {
    int fd = accept(lfd, NULL, NULL);
    if (fd < 0) return;
    char line[512];
    size_t got = 0;
    while (got < sizeof line - 1) {
        ssize_t n = read(fd, line + got, 1);
        if (n <= 0 || line[got] == '\n') break;
        got++;
    }
    line[got] = 0;
    char *reply = NULL;
    size_t len = 0, cap = 0;
    if (strcmp(line, "DIGEST") == 0) {
        char h[32];
        int n = snprintf(h, sizeof h, "%016llx\n", (unsigned long long)digest());
        append(&reply, &len, &cap, h, (size_t)n);
    } else {
        execute(line, &reply, &len, &cap);
    }
    for (size_t off = 0; off < len;) {
        ssize_t w = write(fd, reply + off, len - off);
        if (w <= 0) break;
        off += (size_t)w;
    }
    free(reply);
    close(fd);
}

int main(int argc, char **argv) {
    if (argc != 3) { fprintf(stderr, "usage: %s PORT ADMIN_SOCKET\n", argv[0]); return 2; }
    int ep = epoll_create1(EPOLL_CLOEXEC);
    int lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    int one = 1;
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons((uint16_t)atoi(argv[1])), .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
    if (bind(lfd, (struct sockaddr *)&a, sizeof a) != 0 || listen(lfd, 512) != 0) { perror("listen"); return 1; }
    int afd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_un u = { .sun_family = AF_UNIX };
    snprintf(u.sun_path, sizeof u.sun_path, "%s", argv[2]);
    unlink(argv[2]);
    if (bind(afd, (struct sockaddr *)&u, sizeof u) != 0 || listen(afd, 16) != 0) { perror("admin socket"); return 1; }
    struct epoll_event ev = { .events = EPOLLIN | EPOLLET, .data.u64 = (uint64_t)lfd };
    epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &ev);
    ev = (struct epoll_event){ .events = EPOLLIN, .data.u64 = (uint64_t)afd };
    epoll_ctl(ep, EPOLL_CTL_ADD, afd, &ev);
    fprintf(stderr, "et_kv_server on port %s\n", argv[1]);
    struct epoll_event events[64];
    for (;;) {
        int n = epoll_wait(ep, events, 64, ready_count ? 0 : -1);
        if (n < 0 && errno != EINTR) { perror("epoll_wait"); return 1; }
        for (int i = 0; i < n; i++) {
            int fd = (int)events[i].data.u64;
            if (fd == afd) { admin(afd); continue; }
            if (fd == lfd) {
                /* Edge-triggered: accept until the backlog is empty. */
                for (int c; (c = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC)) >= 0;) {
                    if (c >= FDS) { close(c); continue; }
                    conns[c] = calloc(1, sizeof *conns[c]);
                    struct epoll_event cev = { .events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET, .data.u64 = (uint64_t)c };
                    epoll_ctl(ep, EPOLL_CTL_ADD, c, &cev);
                }
                continue;
            }
            if (fd < 0 || fd >= FDS || !conns[fd]) continue;
            if (events[i].events & EPOLLOUT) flush(fd);
            if ((events[i].events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR)) && !conns[fd]->ready) {
                conns[fd]->ready = 1;
                ready_list[ready_count++] = fd;
            }
        }
        /* One turn per ready client, in the order they became ready. */
        int kept = 0, turns = ready_count;
        for (int i = 0; i < turns; i++) {
            int fd = ready_list[i];
            int r = serve_turn(fd);
            if (r == 0) { ready_list[kept++] = fd; continue; }
            if (r < 0) drop(ep, fd);
            else conns[fd]->ready = 0;
        }
        ready_count = kept;
    }
}
