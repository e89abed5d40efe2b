/* qemu_hooks_standin.c - stands in for a patched QEMU, using include/interpose_vm.h alone.
 *
 *   qemu_hooks_standin serve|exit-on-save|hang-on-save SOCKET PAGES STATE_SIZE LOAD_OUT PRE SYNC
 *   qemu_hooks_standin geometry SOCKET PAGES
 *   qemu_hooks_standin raw-hello SOCKET PAGES VERSION
 *
 * serve: checks the library's argument errors, connects to the agent at SOCKET with PAGES pages
 * of 4 KiB, hands in the dirty bitmaps of PRE (groups of page numbers: "3,64;0,1" is two bitmaps,
 * "-" none), and serves the agent until it closes the connection. Its hooks: stop prints "STOP";
 * no cont hook; sync_dirty_log hands in the next group of SYNC (one group per call, in order);
 * save_device_state returns STATE_SIZE bytes of a known pattern (byte i = (i * 131 + (i >> 9)) &
 * 255) in pieces of varying size; load_device_state writes what it gets to LOAD_OUT, or fails
 * with a message when the state starts with "BAD". exit-on-save dies inside the save hook,
 * hang-on-save sleeps there for a minute. Exit status 0 once the agent closed the connection.
 *
 * geometry: connects and reports the result (the agent refuses a RAM size it does not expect).
 * raw-hello: speaks the wire format by hand, sends a hello of ABI VERSION and prints the answer.
 *
 * Results are "CHECK name code=N message=..." lines on standard output, for the test to read. */
#define _POSIX_C_SOURCE 200809L
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "interpose_vm.h"

#define PAGE 4096u

struct standin {
    interpose_vm *vm;
    const char *mode;
    uint64_t pages;
    size_t state_size;
    const char *load_out;
    char *sync_groups[64];
    int sync_count, sync_next;
};

static void report(const char *name, int code) {
    printf("CHECK %s code=%d message=%s\n", name, code, code == 0 ? "" : interpose_vm_last_error());
    fflush(stdout);
}

/* Splits `spec` at ';' into groups ("-" alone: none). */
static int split_groups(char *spec, char **groups, int max) {
    int n = 0;
    if (strcmp(spec, "-") == 0) return 0;
    for (char *save = NULL, *g = strtok_r(spec, ";", &save); g && n < max; g = strtok_r(NULL, ";", &save)) groups[n++] = g;
    return n;
}

/* Sets the bits of a group of page numbers ("3,64,999"); returns the lowest and highest word touched. */
static void fill(uint64_t *words, const char *group, size_t *lo, size_t *hi) {
    char copy[4096];
    snprintf(copy, sizeof copy, "%s", group);
    *lo = SIZE_MAX;
    *hi = 0;
    for (char *save = NULL, *p = strtok_r(copy, ",", &save); p; p = strtok_r(NULL, ",", &save)) {
        unsigned long long page = strtoull(p, NULL, 10);
        words[page / 64] |= UINT64_C(1) << (page % 64);
        if (page / 64 < *lo) *lo = (size_t)(page / 64);
        if (page / 64 > *hi) *hi = (size_t)(page / 64);
    }
}

static int on_stop(void *context) {
    (void)context;
    printf("STOP\n");
    fflush(stdout);
    return 0;
}

static int on_sync(void *context, interpose_vm *vm) {
    struct standin *s = context;
    if (s->sync_next >= s->sync_count) return 0;
    const char *group = s->sync_groups[s->sync_next++];
    if (strcmp(group, "") == 0 || strcmp(group, "-") == 0) return 0;
    size_t nwords = (size_t)((s->pages + 63) / 64), lo, hi;
    uint64_t *words = calloc(nwords, sizeof *words);
    fill(words, group, &lo, &hi);
    /* Only the words the group touches, as QEMU would hand in one memory slot's log. */
    int r = interpose_vm_dirty_log_range(vm, lo, words + lo, hi - lo + 1);
    free(words);
    report("sync-range", r);
    return r;
}

static int on_save(void *context, interpose_vm_state *out) {
    struct standin *s = context;
    if (strcmp(s->mode, "exit-on-save") == 0) {
        printf("dying inside save_device_state\n");
        fflush(stdout);
        _exit(0);
    }
    if (strcmp(s->mode, "hang-on-save") == 0) {
        struct timespec t = { 60, 0 };
        nanosleep(&t, NULL);
    }
    static const size_t pieces[] = { 1, 7, 4096, 100000, 3 };
    unsigned char *buf = malloc(100000);
    size_t done = 0;
    for (int k = 0; done < s->state_size; k = (k + 1) % 5) {
        size_t n = pieces[k] < s->state_size - done ? pieces[k] : s->state_size - done;
        for (size_t i = 0; i < n; i++) buf[i] = (unsigned char)(((done + i) * 131 + ((done + i) >> 9)) & 255);
        int r = interpose_vm_state_append(out, buf, n);
        if (r != INTERPOSE_VM_OK) { free(buf); return r; }
        done += n;
    }
    free(buf);
    return 0;
}

static int on_load(void *context, const void *data, size_t length) {
    struct standin *s = context;
    if (length >= 3 && memcmp(data, "BAD", 3) == 0) {
        interpose_vm_hook_error(s->vm, "device model rejected the stream: bad magic");
        return -1;
    }
    char tmp[4200];
    snprintf(tmp, sizeof tmp, "%s.tmp", s->load_out);
    FILE *f = fopen(tmp, "wb");
    if (!f) return -2;
    size_t w = fwrite(data, 1, length, f);
    if (fclose(f) != 0 || w != length || rename(tmp, s->load_out) != 0) return -3;
    return 0;
}

static int serve(int argc, char **argv) {
    if (argc != 8) { fprintf(stderr, "serve needs SOCKET PAGES STATE_SIZE LOAD_OUT PRE SYNC\n"); return 2; }
    struct standin s = { .mode = argv[1], .pages = strtoull(argv[3], NULL, 10),
                         .state_size = (size_t)strtoull(argv[4], NULL, 10), .load_out = argv[5] };
    s.sync_count = split_groups(argv[7], s.sync_groups, 64);
    interpose_vm_hooks hooks = { .stop = on_stop, .sync_dirty_log = on_sync, .save_device_state = on_save,
                                 .load_device_state = on_load };

    report("abi-version", interpose_vm_abi_version() == INTERPOSE_VM_ABI_VERSION ? 0 : -100);
    interpose_vm *bad = (interpose_vm *)&s;
    report("page-size-1000", interpose_vm_connect(argv[2], 1000 * 100, 1000, &hooks, &s, &bad));
    report("connect-null-out", interpose_vm_connect(argv[2], s.pages * PAGE, PAGE, &hooks, &s, NULL));
    report("missing-socket", interpose_vm_connect("/nonexistent/agent.sock", s.pages * PAGE, PAGE, &hooks, &s, &bad));
    report("out-cleared", bad == NULL ? 0 : -100);

    int r = interpose_vm_connect(argv[2], s.pages * PAGE, PAGE, &hooks, &s, &s.vm);
    report("connect", r);
    if (r != INTERPOSE_VM_OK) return 1;

    size_t nwords = (size_t)((s.pages + 63) / 64), lo, hi;
    uint64_t *words = calloc(nwords + 1, sizeof *words);
    report("wrong-size", interpose_vm_dirty_log(s.vm, words, nwords + 1));
    report("short", interpose_vm_dirty_log(s.vm, words, nwords - 1));
    if (s.pages % 64 != 0) {
        words[nwords - 1] = UINT64_C(1) << (s.pages % 64);
        report("past-last-page", interpose_vm_dirty_log(s.vm, words, nwords));
        words[nwords - 1] = 0;
    }
    report("range-outside", interpose_vm_dirty_log_range(s.vm, nwords, words, 1));
    report("null-vm", interpose_vm_dirty_log(NULL, words, nwords));
    report("null-words", interpose_vm_dirty_log(s.vm, NULL, nwords));

    char *pre[64];
    int npre = split_groups(argv[6], pre, 64);
    for (int i = 0; i < npre; i++) {
        memset(words, 0, nwords * sizeof *words);
        fill(words, pre[i], &lo, &hi);
        report("pre", interpose_vm_dirty_log(s.vm, words, nwords));
    }
    free(words);

    while ((r = interpose_vm_poll(s.vm, -1)) >= 0) {}
    report("end", r);
    report("after-end", interpose_vm_poll(s.vm, 0));
    interpose_vm_disconnect(s.vm);
    return r == INTERPOSE_VM_ECLOSED ? 0 : 1;
}

static int geometry(int argc, char **argv) {
    if (argc != 4) { fprintf(stderr, "geometry needs SOCKET PAGES\n"); return 2; }
    interpose_vm *vm = NULL;
    int r = interpose_vm_connect(argv[2], strtoull(argv[3], NULL, 10) * PAGE, PAGE, NULL, NULL, &vm);
    report("connect", r);
    interpose_vm_disconnect(vm);
    return 0;
}

static void put32(unsigned char *p, uint32_t v) { for (int i = 0; i < 4; i++) p[i] = (unsigned char)(v >> (8 * i)); }

/* A hello of any ABI version, by hand: 5-byte header, u32 version, u32 page size, u64 RAM bytes. */
static int raw_hello(int argc, char **argv) {
    if (argc != 5) { fprintf(stderr, "raw-hello needs SOCKET PAGES VERSION\n"); return 2; }
    int fd = socket(AF_UNIX, SOCK_STREAM, 0);
    struct sockaddr_un a = { .sun_family = AF_UNIX };
    snprintf(a.sun_path, sizeof a.sun_path, "%s", argv[2]);
    if (connect(fd, (struct sockaddr *)&a, sizeof a) != 0) { perror("connect"); return 1; }
    uint64_t ram = strtoull(argv[3], NULL, 10) * PAGE;
    unsigned char f[21];
    put32(f, 16);
    f[4] = 0x01;
    put32(f + 5, (uint32_t)strtoul(argv[4], NULL, 10));
    put32(f + 9, PAGE);
    put32(f + 13, (uint32_t)ram);
    put32(f + 17, (uint32_t)(ram >> 32));
    if (write(fd, f, sizeof f) != (ssize_t)sizeof f) { perror("write"); return 1; }
    unsigned char h[5];
    char body[2048] = { 0 };
    if (recv(fd, h, 5, MSG_WAITALL) != 5) { printf("REPLY none\n"); return 1; }
    uint32_t n = (uint32_t)h[0] | (uint32_t)h[1] << 8 | (uint32_t)h[2] << 16 | (uint32_t)h[3] << 24;
    if (n >= sizeof body) n = sizeof body - 1;
    ssize_t got = recv(fd, body, n, MSG_WAITALL);
    printf("REPLY type=0x%02x length=%zd message=%s\n", h[4], got, h[4] == 0x82 ? body : "");
    char extra;
    printf("CLOSED %s\n", recv(fd, &extra, 1, 0) == 0 ? "yes" : "no");
    close(fd);
    return 0;
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc >= 2 && (strcmp(argv[1], "serve") == 0 || strcmp(argv[1], "exit-on-save") == 0 || strcmp(argv[1], "hang-on-save") == 0))
        return serve(argc, argv);
    if (argc >= 2 && strcmp(argv[1], "geometry") == 0) return geometry(argc, argv);
    if (argc >= 2 && strcmp(argv[1], "raw-hello") == 0) return raw_hello(argc, argv);
    fprintf(stderr, "usage: %s serve|exit-on-save|hang-on-save|geometry|raw-hello SOCKET ...\n", argv[0]);
    return 2;
}
