/* vmhooks.c - the QEMU side of the VM replica hooks (include/interpose_vm.h).
 *
 * Pure C over one Unix stream socket to the agent; the wire format is documented in the header.
 * The socket is a Unix one, which the APUS libc hooks in hooks.c always pass through, so the
 * plain libc calls here reach libc even in a process that preloads the library. */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "interpose_vm.h"

enum {
    FRAME_HELLO = 0x01, FRAME_DIRTY_LOG = 0x02, FRAME_OK = 0x03, FRAME_STATE = 0x04, FRAME_ERROR = 0x05,
    FRAME_WELCOME = 0x81, FRAME_REFUSE = 0x82, FRAME_STOP = 0x83, FRAME_CONT = 0x84, FRAME_SYNC_DIRTY = 0x85,
    FRAME_SAVE = 0x86, FRAME_LOAD = 0x87,
};

#define HELLO_TIMEOUT_MS 10000
#define STALL_TIMEOUT_MS 30000
/* Words per DIRTY_LOG frame: 64 KiB of bitmap, 2 GiB of 4 KiB pages. */
#define DIRTY_CHUNK_WORDS 8192

struct interpose_vm {
    int fd;
    atomic_int broken; /* a connection-level failure happened: only disconnect is left */
    char path[sizeof(((struct sockaddr_un *)0)->sun_path)];
    uint64_t ram_bytes;
    uint32_t page_size;
    uint64_t pages;
    size_t nwords;
    uint64_t tail_mask; /* valid bits of the last word */
    interpose_vm_hooks hooks;
    void *context;
    pthread_mutex_t mu; /* guards dirty */
    uint64_t *dirty;
    uint64_t *snapshot; /* the poll thread's copy while it sends the union */
    char hook_message[512];
    int hook_message_set;
    int stall_ms;              /* STALL_TIMEOUT_MS, or INTERPOSE_VM_STALL_MS */
    long long send_deadline;   /* the whole answer to the request being served must be sent by then */
};

struct interpose_vm_state {
    unsigned char *data;
    size_t length, capacity;
    int too_big;
};

static __thread char last_error[512];

static int fail(int code, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static int fail(int code, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(last_error, sizeof last_error, fmt, ap);
    va_end(ap);
    return code;
}

int interpose_vm_abi_version(void) { return INTERPOSE_VM_ABI_VERSION; }

const char *interpose_vm_last_error(void) { return last_error; }

int interpose_vm_fd(const interpose_vm *vm) { return vm ? vm->fd : -1; }

static void put32(unsigned char *p, uint32_t v) { for (int i = 0; i < 4; i++) p[i] = (unsigned char)(v >> (8 * i)); }
static void put64(unsigned char *p, uint64_t v) { for (int i = 0; i < 8; i++) p[i] = (unsigned char)(v >> (8 * i)); }
static uint32_t get32(const unsigned char *p) {
    uint32_t v = 0;
    for (int i = 3; i >= 0; i--) v = v << 8 | p[i];
    return v;
}

static long long now_ms(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (long long)t.tv_sec * 1000 + t.tv_nsec / 1000000;
}

/* Marks the connection unusable and returns `code` (its message is already set). */
static int broke(interpose_vm *vm, int code) {
    atomic_store(&vm->broken, 1);
    return code;
}

/* Sends everything by vm->send_deadline (set by the answer's first send). The deadline covers
 * the whole answer to one request (or the hello),
 * not each send: the poll thread holds QEMU's big lock, and an agent that takes a few bytes now
 * and then would otherwise hold QEMU for as long as it likes. */
static int write_all(interpose_vm *vm, const void *data, size_t length) {
    const unsigned char *p = data;
    if (vm->send_deadline == 0) vm->send_deadline = now_ms() + vm->stall_ms;
    while (length > 0) {
        long long left = vm->send_deadline - now_ms();
        struct pollfd w = { .fd = vm->fd, .events = POLLOUT };
        int ready = left > 0 ? poll(&w, 1, (int)left) : 0;
        if (ready < 0 && errno == EINTR) continue;
        if (ready == 0)
            return broke(vm, fail(INTERPOSE_VM_ETIMEDOUT, "the agent at %s did not take an answer within %d ms (%zu bytes were left to send)",
                                  vm->path, vm->stall_ms, length));
        ssize_t n = send(vm->fd, p, length, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (n < 0 && (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK)) continue;
        if (n <= 0) return broke(vm, fail(INTERPOSE_VM_ECLOSED, "sending to the agent at %s: %s", vm->path, strerror(errno)));
        p += n;
        length -= (size_t)n;
    }
    return INTERPOSE_VM_OK;
}

/* Sends one frame: `head` and `body` together are its body. */
static int send_frame(interpose_vm *vm, int type, const void *head, size_t head_length, const void *body, size_t body_length) {
    unsigned char h[5];
    put32(h, (uint32_t)(head_length + body_length));
    h[4] = (unsigned char)type;
    int r = write_all(vm, h, sizeof h);
    if (r == 0 && head_length) r = write_all(vm, head, head_length);
    if (r == 0 && body_length) r = write_all(vm, body, body_length);
    return r;
}

/* Waits up to `timeout_ms` (-1: no limit) for the socket to be readable: 1 readable, 0 not. */
static int wait_readable(int fd, int timeout_ms) {
    struct pollfd p = { .fd = fd, .events = POLLIN };
    for (;;) {
        int r = poll(&p, 1, timeout_ms);
        if (r < 0 && errno == EINTR) continue;
        return r > 0;
    }
}

/* Reads exactly `length` bytes, allowing `timeout_ms` for all of them. */
static int read_full(interpose_vm *vm, void *data, size_t length, int timeout_ms) {
    unsigned char *p = data;
    long long deadline = now_ms() + timeout_ms;
    while (length > 0) {
        long long left = deadline - now_ms();
        if (left <= 0 || !wait_readable(vm->fd, (int)left))
            return broke(vm, fail(INTERPOSE_VM_ETIMEDOUT, "the agent at %s stalled for %d ms inside a frame", vm->path, timeout_ms));
        ssize_t n = recv(vm->fd, p, length, 0);
        if (n < 0 && errno == EINTR) continue;
        if (n == 0) return broke(vm, fail(INTERPOSE_VM_ECLOSED, "the agent at %s closed the connection", vm->path));
        if (n < 0) return broke(vm, fail(INTERPOSE_VM_ECLOSED, "reading from the agent at %s: %s", vm->path, strerror(errno)));
        p += n;
        length -= (size_t)n;
    }
    return INTERPOSE_VM_OK;
}

/* Reads one frame if one starts within `timeout_ms`: 1 with `*body` malloc'ed (NUL-terminated,
 * for messages), 0 when none started, or a negative code. */
static int read_frame(interpose_vm *vm, int timeout_ms, int *type, unsigned char **body, uint32_t *length) {
    *body = NULL;
    if (!wait_readable(vm->fd, timeout_ms)) return 0;
    unsigned char h[5];
    int r = read_full(vm, h, sizeof h, vm->stall_ms);
    if (r < 0) return r;
    uint32_t n = get32(h);
    if (n > INTERPOSE_VM_MAX_FRAME)
        return broke(vm, fail(INTERPOSE_VM_EPROTO, "the agent at %s sent a frame of %u bytes (type 0x%02x); the limit is %u",
                              vm->path, n, h[4], INTERPOSE_VM_MAX_FRAME));
    unsigned char *b = malloc((size_t)n + 1);
    if (!b) return broke(vm, fail(INTERPOSE_VM_ECLOSED, "no memory for a frame of %u bytes from the agent at %s", n, vm->path));
    r = read_full(vm, b, n, vm->stall_ms);
    if (r < 0) { free(b); return r; }
    b[n] = 0;
    *type = h[4];
    *body = b;
    *length = n;
    return 1;
}

int interpose_vm_connect(const char *socket_path, uint64_t ram_bytes, uint32_t page_size,
                         const interpose_vm_hooks *hooks, void *context, interpose_vm **out) {
    if (out) *out = NULL;
    if (!socket_path || !out) return fail(INTERPOSE_VM_EINVAL, "interpose_vm_connect: socket_path and out must not be NULL");
    struct sockaddr_un addr = { .sun_family = AF_UNIX };
    if (strlen(socket_path) >= sizeof addr.sun_path)
        return fail(INTERPOSE_VM_EINVAL, "socket path %s is longer than %zu bytes", socket_path, sizeof addr.sun_path - 1);
    if (page_size < 512 || page_size > (2u << 20) || (page_size & (page_size - 1)) != 0)
        return fail(INTERPOSE_VM_EINVAL, "page size %u is not a power of two from 512 to 2 MiB", page_size);
    if (ram_bytes == 0 || ram_bytes % page_size != 0)
        return fail(INTERPOSE_VM_EINVAL, "RAM of %llu bytes is not a whole, non-zero number of %u-byte pages",
                    (unsigned long long)ram_bytes, page_size);
    strcpy(addr.sun_path, socket_path);
    int stall_ms = STALL_TIMEOUT_MS;
    const char *stall = getenv("INTERPOSE_VM_STALL_MS");
    if (stall && *stall) {
        char *end;
        long v = strtol(stall, &end, 10);
        if (*end || v < 100 || v > 3600000)
            return fail(INTERPOSE_VM_EINVAL, "INTERPOSE_VM_STALL_MS=%s is not a whole number of milliseconds from 100 to 3600000", stall);
        stall_ms = (int)v;
    }

    interpose_vm *vm = calloc(1, sizeof *vm);
    if (!vm) return fail(INTERPOSE_VM_EINVAL, "no memory for the connection");
    vm->fd = -1;
    vm->stall_ms = stall_ms;
    strcpy(vm->path, socket_path);
    vm->ram_bytes = ram_bytes;
    vm->page_size = page_size;
    vm->pages = ram_bytes / page_size;
    vm->nwords = (size_t)((vm->pages + 63) / 64);
    vm->tail_mask = vm->pages % 64 ? (UINT64_C(1) << (vm->pages % 64)) - 1 : ~UINT64_C(0);
    if (hooks) vm->hooks = *hooks;
    vm->context = context;
    pthread_mutex_init(&vm->mu, NULL);
    vm->dirty = calloc(vm->nwords, sizeof(uint64_t));
    vm->snapshot = calloc(vm->nwords, sizeof(uint64_t));
    if (!vm->dirty || !vm->snapshot) {
        interpose_vm_disconnect(vm);
        return fail(INTERPOSE_VM_EINVAL, "no memory for a dirty bitmap of %llu pages", (unsigned long long)(ram_bytes / page_size));
    }

    vm->fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (vm->fd < 0 || connect(vm->fd, (struct sockaddr *)&addr, sizeof addr) != 0) {
        int e = errno;
        interpose_vm_disconnect(vm);
        return fail(INTERPOSE_VM_ECONNECT, "cannot connect to the agent at %s: %s", socket_path, strerror(e));
    }

    unsigned char hello[16];
    put32(hello, INTERPOSE_VM_ABI_VERSION);
    put32(hello + 4, page_size);
    put64(hello + 8, ram_bytes);
    int r = send_frame(vm, FRAME_HELLO, hello, sizeof hello, NULL, 0);
    int type = 0;
    unsigned char *body = NULL;
    uint32_t length = 0;
    if (r == 0) {
        r = read_frame(vm, HELLO_TIMEOUT_MS, &type, &body, &length);
        if (r == 0) r = fail(INTERPOSE_VM_ETIMEDOUT, "the agent at %s did not answer the hello within %d s", socket_path, HELLO_TIMEOUT_MS / 1000);
        else if (r == 1 && type == FRAME_WELCOME && length == 4) r = INTERPOSE_VM_OK;
        else if (r == 1 && type == FRAME_REFUSE) r = fail(INTERPOSE_VM_EREFUSED, "the agent at %s refused the connection: %s", socket_path, (char *)body);
        else if (r == 1) r = fail(INTERPOSE_VM_EPROTO, "the agent at %s answered the hello with frame type 0x%02x of %u bytes", socket_path, type, length);
    }
    free(body);
    if (r != INTERPOSE_VM_OK) {
        interpose_vm_disconnect(vm);
        return r;
    }
    *out = vm;
    return INTERPOSE_VM_OK;
}

int interpose_vm_dirty_log_range(interpose_vm *vm, uint64_t first_word, const uint64_t *words, size_t nwords) {
    if (!vm || (!words && nwords > 0)) return fail(INTERPOSE_VM_EINVAL, "interpose_vm_dirty_log: vm and words must not be NULL");
    if (atomic_load(&vm->broken)) return fail(INTERPOSE_VM_ESTATE, "the connection to the agent at %s failed earlier", vm->path);
    if (first_word > vm->nwords || nwords > vm->nwords - first_word)
        return fail(INTERPOSE_VM_EBITMAP, "dirty log words %llu..%llu lie outside the %zu-word bitmap of %llu pages",
                    (unsigned long long)first_word, (unsigned long long)first_word + nwords - 1, vm->nwords,
                    (unsigned long long)vm->pages);
    if (nwords > 0 && first_word + nwords == vm->nwords && (words[nwords - 1] & ~vm->tail_mask) != 0)
        return fail(INTERPOSE_VM_EBITMAP, "dirty log sets bits past the last page (%llu) in its last word",
                    (unsigned long long)vm->pages - 1);
    pthread_mutex_lock(&vm->mu);
    for (size_t i = 0; i < nwords; i++) vm->dirty[first_word + i] |= words[i];
    pthread_mutex_unlock(&vm->mu);
    return INTERPOSE_VM_OK;
}

int interpose_vm_dirty_log(interpose_vm *vm, const uint64_t *words, size_t nwords) {
    if (vm && nwords != vm->nwords)
        return fail(INTERPOSE_VM_EBITMAP, "dirty log of %zu words for %llu pages of %u bytes: it needs exactly %zu words",
                    nwords, (unsigned long long)vm->pages, vm->page_size, vm->nwords);
    return interpose_vm_dirty_log_range(vm, 0, words, nwords);
}

int interpose_vm_state_append(interpose_vm_state *out, const void *data, size_t length) {
    if (!out || (!data && length > 0)) return fail(INTERPOSE_VM_EINVAL, "interpose_vm_state_append: out and data must not be NULL");
    const size_t limit = INTERPOSE_VM_MAX_FRAME - 4; /* the STATE frame also carries the request number */
    if (out->too_big || length > limit - out->length) {
        out->too_big = 1;
        return fail(INTERPOSE_VM_ETOOBIG, "device state exceeds %zu bytes", limit);
    }
    if (out->length + length > out->capacity) {
        size_t c = out->capacity ? out->capacity : 64 * 1024;
        while (c < out->length + length) c *= 2;
        if (c > limit) c = limit;
        unsigned char *d = realloc(out->data, c);
        if (!d) return fail(INTERPOSE_VM_ETOOBIG, "no memory for %zu bytes of device state", c);
        out->data = d;
        out->capacity = c;
    }
    if (length) memcpy(out->data + out->length, data, length);
    out->length += length;
    return INTERPOSE_VM_OK;
}

void interpose_vm_hook_error(interpose_vm *vm, const char *message) {
    if (!vm || !message) return;
    snprintf(vm->hook_message, sizeof vm->hook_message, "%s", message);
    vm->hook_message_set = 1;
}

static int reply_error(interpose_vm *vm, uint32_t seq, int code, const char *message) {
    unsigned char head[8];
    put32(head, seq);
    put32(head + 4, (uint32_t)code);
    return send_frame(vm, FRAME_ERROR, head, sizeof head, message, strlen(message));
}

static int reply_ok(interpose_vm *vm, uint32_t seq) {
    unsigned char head[4];
    put32(head, seq);
    return send_frame(vm, FRAME_OK, head, sizeof head, NULL, 0);
}

/* The answer to a request whose hook returned `status`. */
static int reply_hook(interpose_vm *vm, uint32_t seq, const char *hook, int status) {
    if (status == 0) return reply_ok(vm, seq);
    char m[600];
    if (vm->hook_message_set) snprintf(m, sizeof m, "%s: %s", hook, vm->hook_message);
    else snprintf(m, sizeof m, "%s failed (returned %d)", hook, status);
    return reply_error(vm, seq, INTERPOSE_VM_EHOOK, m);
}

static int no_hook(interpose_vm *vm, uint32_t seq, const char *hook) {
    char m[160];
    snprintf(m, sizeof m, "QEMU registered no %s hook", hook);
    return reply_error(vm, seq, INTERPOSE_VM_ENOHOOK, m);
}

/* SYNC_DIRTY: the hook hands in the last bits, then the union goes out and starts over. */
static int serve_sync_dirty(interpose_vm *vm, uint32_t seq) {
    if (vm->hooks.sync_dirty_log) {
        int status = vm->hooks.sync_dirty_log(vm->context, vm);
        if (status != 0) return reply_hook(vm, seq, "sync_dirty_log", status); /* the union is kept */
    }
    pthread_mutex_lock(&vm->mu);
    memcpy(vm->snapshot, vm->dirty, vm->nwords * sizeof(uint64_t));
    memset(vm->dirty, 0, vm->nwords * sizeof(uint64_t));
    pthread_mutex_unlock(&vm->mu);
    unsigned char *chunk = malloc(12 + 8 * DIRTY_CHUNK_WORDS);
    if (!chunk) return reply_error(vm, seq, INTERPOSE_VM_EINVAL, "no memory to send the dirty log");
    for (size_t first = 0; first < vm->nwords; first += DIRTY_CHUNK_WORDS) {
        size_t n = vm->nwords - first < DIRTY_CHUNK_WORDS ? vm->nwords - first : DIRTY_CHUNK_WORDS;
        int any = 0;
        for (size_t i = 0; i < n && !any; i++) any = vm->snapshot[first + i] != 0;
        if (!any) continue;
        put32(chunk, seq);
        put64(chunk + 4, first);
        for (size_t i = 0; i < n; i++) put64(chunk + 12 + 8 * i, vm->snapshot[first + i]);
        int r = send_frame(vm, FRAME_DIRTY_LOG, chunk, 12 + 8 * n, NULL, 0);
        if (r < 0) { free(chunk); return r; }
    }
    free(chunk);
    return reply_ok(vm, seq);
}

static int serve_save(interpose_vm *vm, uint32_t seq) {
    if (!vm->hooks.save_device_state) return no_hook(vm, seq, "save_device_state");
    interpose_vm_state out = { 0 };
    int status = vm->hooks.save_device_state(vm->context, &out);
    int r;
    if (status == 0 && out.too_big)
        r = reply_error(vm, seq, INTERPOSE_VM_ETOOBIG, "save_device_state produced more than INTERPOSE_VM_MAX_FRAME bytes");
    else if (status != 0)
        r = reply_hook(vm, seq, "save_device_state", status);
    else {
        unsigned char head[4];
        put32(head, seq);
        r = send_frame(vm, FRAME_STATE, head, sizeof head, out.data, out.length);
    }
    free(out.data);
    return r;
}

/* Serves one request frame; negative only when the connection failed. */
static int serve(interpose_vm *vm, int type, const unsigned char *body, uint32_t length) {
    if (type == FRAME_REFUSE)
        return broke(vm, fail(INTERPOSE_VM_EREFUSED, "the agent at %s closed the connection: %s", vm->path, (const char *)body));
    int known = type == FRAME_STOP || type == FRAME_CONT || type == FRAME_SYNC_DIRTY || type == FRAME_SAVE || type == FRAME_LOAD;
    if (!known)
        return broke(vm, fail(INTERPOSE_VM_EPROTO, "the agent at %s sent frame type 0x%02x, which is not a request", vm->path, type));
    if (length < 4 || (type != FRAME_LOAD && length != 4))
        return broke(vm, fail(INTERPOSE_VM_EPROTO, "the agent at %s sent a request (type 0x%02x) of %u bytes", vm->path, type, length));
    uint32_t seq = get32(body);
    vm->hook_message_set = 0;
    vm->send_deadline = 0; /* starts at the answer's first byte: the hooks' own time does not count */
    switch (type) {
    case FRAME_STOP:
        return vm->hooks.stop ? reply_hook(vm, seq, "stop", vm->hooks.stop(vm->context)) : no_hook(vm, seq, "stop");
    case FRAME_CONT:
        return vm->hooks.cont ? reply_hook(vm, seq, "cont", vm->hooks.cont(vm->context)) : no_hook(vm, seq, "cont");
    case FRAME_SYNC_DIRTY:
        return serve_sync_dirty(vm, seq);
    case FRAME_SAVE:
        return serve_save(vm, seq);
    default:
        if (!vm->hooks.load_device_state) return no_hook(vm, seq, "load_device_state");
        return reply_hook(vm, seq, "load_device_state", vm->hooks.load_device_state(vm->context, body + 4, length - 4));
    }
}

int interpose_vm_poll(interpose_vm *vm, int timeout_ms) {
    if (!vm) return fail(INTERPOSE_VM_EINVAL, "interpose_vm_poll: vm must not be NULL");
    if (atomic_load(&vm->broken)) return fail(INTERPOSE_VM_ESTATE, "the connection to the agent at %s failed earlier", vm->path);
    int served = 0;
    for (;;) {
        int type = 0;
        unsigned char *body = NULL;
        uint32_t length = 0;
        int r = read_frame(vm, served ? 0 : timeout_ms, &type, &body, &length);
        if (r == 0) return served; /* no frame started */
        if (r < 0) return r;
        r = serve(vm, type, body, length);
        free(body);
        if (r < 0) return r;
        served++;
    }
}

void interpose_vm_disconnect(interpose_vm *vm) {
    if (!vm) return;
    if (vm->fd >= 0) close(vm->fd);
    pthread_mutex_destroy(&vm->mu);
    free(vm->dirty);
    free(vm->snapshot);
    free(vm);
}
