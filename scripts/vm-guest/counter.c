/* The guest's stateful service for the VM replication tests: a UDP counter.
 *
 * Request  "INC <client> <seq>\n": adds one to the counter, answers "<client> <seq> <value>\n".
 * Request  "GET <client> <seq>\n": answers the current value without changing it.
 * Request  "PUT <client> <seq> <kib>\n": like INC, and also writes <kib> KiB (at most 1024) of
 *          data derived from <seq> into the service's 4 MiB store, as a key-value SET of a large
 *          value would (the memory-heavy workload of the benchmark).
 * Request  "DISK <client> <seq> <kib>": like INC, and also writes <kib> KiB (at most 1024) of
 *          data derived from <seq> over the start of /data/<client> and fsyncs it (the guest's
 *          disk, when it has one).
 * With a disk, a second process writes one 4 KiB block of the guest clock's nanoseconds every
 * 100 ms, at a place in /data/noise chosen by them, and fsyncs it. It stands for what a real
 * guest writes that is not a function of its inputs (logs, timestamps, journal commits): the
 * primary's and the backup's guests write it at different times, so to different blocks.
 * (Random bytes would not do: after a checkpoint both guests' kernels hold the same random
 * generator state.)
 * A request that repeats a client's last <seq> gets the same answer again without taking
 * effect twice, so clients may resend a request whose answer never came back.
 * The state lives only in this process's memory (guest RAM). */
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define CLIENTS_MAX 64

struct client {
    char name[32];
    unsigned long seq;
    char answer[96];
};

static struct client clients[CLIENTS_MAX];
static unsigned long counter;

#define STORE_BYTES (4u << 20)
/* volatile: the store is never read back, and the compiler must not drop the writes. */
static volatile unsigned char store[STORE_BYTES];
static unsigned long store_next;

static void put(unsigned long seq, unsigned long kib) {
    if (kib > 1024) kib = 1024;
    for (unsigned long i = 0; i < kib * 1024; i++) {
        store[store_next] = (unsigned char)(seq * 131 + i);
        store_next = (store_next + 1) % STORE_BYTES;
    }
}

#define NOISE_BLOCKS 256

/* DISK: deterministic data for <client>, fsynced. */
static void disk(const char *name, unsigned long seq, unsigned long kib) {
    static unsigned char buf[1024 * 1024];
    char path[64];
    if (kib > 1024) kib = 1024;
    for (unsigned long i = 0; i < kib * 1024; i++) buf[i] = (unsigned char)(seq * 131 + i);
    snprintf(path, sizeof path, "/data/%s", name);
    int fd = open(path, O_WRONLY | O_CREAT, 0644);
    if (fd < 0) return;
    if (pwrite(fd, buf, kib * 1024, 0) < 0) perror("counter: write");
    fsync(fd);
    close(fd);
}

/* The guest's own nondeterministic disk writes (see the top of this file). */
static void noise(void) {
    int nf = open("/data/noise", O_WRONLY);
    if (nf < 0) return;
    if (fork() != 0) { close(nf); return; }
    unsigned long long block[512];
    for (;;) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        unsigned long long ns = (unsigned long long)ts.tv_sec * 1000000000ull + (unsigned long long)ts.tv_nsec;
        for (int i = 0; i < 512; i++) block[i] = ns * 2654435761ull + (unsigned long long)i;
        if (pwrite(nf, block, sizeof block, (off_t)(ns / 1000 % NOISE_BLOCKS) * 4096) < 0) perror("counter: noise");
        fsync(nf);
        usleep(100000);
    }
}

static struct client *lookup(const char *name) {
    for (int i = 0; i < CLIENTS_MAX; i++)
        if (clients[i].name[0] && strcmp(clients[i].name, name) == 0) return &clients[i];
    for (int i = 0; i < CLIENTS_MAX; i++)
        if (!clients[i].name[0]) {
            snprintf(clients[i].name, sizeof clients[i].name, "%s", name);
            return &clients[i];
        }
    return NULL;
}

int main(int argc, char **argv) {
    int port = argc > 1 ? atoi(argv[1]) : 7000;
    int fd = socket(AF_INET, SOCK_DGRAM, 0);
    struct sockaddr_in me = {.sin_family = AF_INET, .sin_port = htons(port), .sin_addr.s_addr = htonl(INADDR_ANY)};
    if (fd < 0 || bind(fd, (struct sockaddr *)&me, sizeof me) != 0) {
        perror("counter: bind");
        return 1;
    }
    /* Touch the store once so its pages are resident before the first checkpoint. */
    for (unsigned i = 0; i < STORE_BYTES; i += 4096) store[i] = 1;
    noise();
    printf("counter: listening on udp port %d\n", port);
    fflush(stdout);
    for (;;) {
        char buf[512], op[8], name[32];
        unsigned long seq, kib = 0;
        struct sockaddr_in from;
        socklen_t fromlen = sizeof from;
        ssize_t n = recvfrom(fd, buf, sizeof buf - 1, 0, (struct sockaddr *)&from, &fromlen);
        if (n <= 0) continue;
        buf[n] = 0;
        if (sscanf(buf, "%7s %31s %lu %lu", op, name, &seq, &kib) < 3) continue;
        struct client *c = lookup(name);
        if (!c) continue;
        if (c->seq != seq || !c->answer[0]) {
            if (strcmp(op, "INC") == 0) counter++;
            else if (strcmp(op, "PUT") == 0) { counter++; put(seq, kib); }
            else if (strcmp(op, "DISK") == 0) { counter++; disk(name, seq, kib); }
            else if (strcmp(op, "GET") != 0) continue;
            c->seq = seq;
            snprintf(c->answer, sizeof c->answer, "%s %lu %lu\n", name, seq, counter);
        }
        sendto(fd, c->answer, strlen(c->answer), 0, (struct sockaddr *)&from, fromlen);
    }
}
