// The software RDMA device (soft_rdma.h says what it does). How:
//
// The subnet file holds, for every port, a packet ring with a process-shared (robust) mutex, and
// for every QP number a shared slot: its state and two words its peer's responder writes — the
// last message that landed (`acked`) and the first that failed (`nak`). A poster copies its
// packets into the target port's ring; the target context's responder thread checks and lands
// them and writes the ack into the sender's slot; the sender's `poll_cq` turns acks into
// completions. One mechanism serves QPs in one process and across processes.
//
// Lock order: context → QP → CQ; a port ring's lock and the MR lock are taken alone or last.
// A QP's send lock serializes its posters and is never taken by the responder, so a poster may
// wait for ring space without blocking the completions it waits for.
#define _GNU_SOURCE
#include "soft_rdma.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

enum {
    PORTS_MAX = 32,
    QP_SLOTS = 1024,          // a QP number is generation << 10 | slot; slots 0 and 1 are never used
    RING_BYTES = 2 << 20,     // packets in flight towards one port
    WR_MAX = 16384,
    SGE_MAX = 16,
    STUCK_MS = 5000,          // a packet that finds the target's ring full this long: retry exceeded
    PEER_CHECK_MS = 50,       // outstanding this long: check that the target still exists
    PSN_MASK = 0xFFFFFF,
};
static const uint64_t SUBNET_MAGIC = 0x504C5653524D4131ull;
static const uint64_t MESSAGE_MASK = (1ull << 40) - 1;

// ---- shared memory: the subnet file ----

struct shared_port {
    _Atomic uint32_t live;
    int32_t pid;
    uint32_t ethernet;
    pthread_mutex_t lock;
    pthread_cond_t readable, writable;
    uint64_t head, tail;      // unwrapped ring positions, under `lock`
};

struct shared_qp {
    _Atomic uint32_t qpn;     // 0: the slot is free
    _Atomic uint32_t state;   // enum ibv_qp_state
    uint32_t port;
    _Atomic uint64_t acked;   // qpn << 40 | last message landed
    _Atomic uint64_t nak;     // qpn << 40 | status << 32 | low 32 bits of the first message that failed
};

struct subnet {
    uint64_t magic;
    pthread_mutex_t lock;     // attaching ports, allocating QP numbers
    uint32_t generation, next_slot;
    _Atomic uint32_t next_key;
    struct shared_port ports[PORTS_MAX];
    struct shared_qp qps[QP_SLOTS];
};

#define SUBNET_HEADER_BYTES ((sizeof(struct subnet) + 4095) & ~(size_t)4095)
#define SUBNET_BYTES (SUBNET_HEADER_BYTES + (size_t)PORTS_MAX * RING_BYTES)

enum { PACKET_DATA = 1, PACKET_PAD = 2 };   // PAD: the rest of the ring is empty, go to its start
enum { FIRST = 1, LAST = 2, WITH_IMM = 4 };

struct packet {
    uint32_t kind, bytes;                // bytes: payload following this header
    uint32_t dest_qpn, src_qpn;
    uint32_t psn, flags;
    uint64_t message;                    // the sender's message number, named by acks
    uint64_t va;                         // where this packet's bytes go
    uint64_t message_va;                 // the whole message's range, checked on its first packet
    uint32_t message_bytes, rkey;
    uint32_t imm, unused;
};
_Static_assert(sizeof(struct packet) == 64, "packet header");

// ---- process-local objects (the public structure first, so a cast finds the rest) ----

struct soft_pd { struct ibv_pd ibv; _Atomic int users; };
struct soft_mr { struct ibv_mr ibv; int access; };

struct soft_cq {
    struct ibv_cq ibv;
    pthread_mutex_t lock;
    struct ibv_wc *entries;
    int capacity, head, count;
    unsigned long overruns;
    _Atomic int users;
};

struct send_entry {
    uint64_t wr_id, message;
    uint32_t bytes;
    bool signaled;
    enum ibv_wc_status failed;           // set when it failed before reaching the target
    struct timespec posted;
};

struct soft_context;

struct soft_qp {
    struct ibv_qp ibv;
    struct soft_context *ctx;
    struct shared_qp *shared;
    pthread_mutex_t lock, send_lock;
    struct ibv_qp_cap cap;
    bool signal_all, global;
    int access;
    uint32_t dest_qpn, mtu_bytes, expected_psn, next_psn;
    uint16_t dlid;
    union ibv_gid dgid;
    uint64_t next_message;
    struct send_entry *sq;
    int sq_head, sq_count;
    uint64_t *rq;
    int rq_head, rq_count;
};

struct soft_context {
    struct ibv_context ibv;
    struct ibv_device device;
    struct subnet *net;
    int port;
    pthread_t responder;
    _Atomic bool stopping;
    pthread_rwlock_t mr_lock;            // readers land bytes; deregistration writes
    struct soft_mr **mrs;
    int mr_count, mr_capacity;
    pthread_mutex_t lock;                // qps and the counts
    struct soft_qp *qps[QP_SLOTS];
    int pds, cqs, qp_count;
};

static struct soft_context *context_of(struct ibv_context *c) { return (struct soft_context *)c; }
static struct soft_qp *qp_of(struct ibv_qp *q) { return (struct soft_qp *)q; }
static struct soft_cq *cq_of(struct ibv_cq *c) { return (struct soft_cq *)c; }
static uint8_t *ring_of(struct subnet *n, int port) { return (uint8_t *)n + SUBNET_HEADER_BYTES + (size_t)port * RING_BYTES; }
static size_t packet_stride(uint32_t bytes) { return sizeof(struct packet) + ((bytes + 7u) & ~7u); }
static uint16_t lid_of(int port) { return (uint16_t)(port + 1); }

static void gid_of(struct subnet *n, int port, union ibv_gid *gid) {
    memset(gid, 0, sizeof *gid);
    if (n->ports[port].ethernet) {       // ::ffff:127.0.1.<port>, an IPv4-mapped RoCE v2 GID
        gid->raw[10] = gid->raw[11] = 0xFF;
        gid->raw[12] = 127; gid->raw[14] = 1; gid->raw[15] = (uint8_t)port;
    } else {                             // fe80::5350:0:0:<port>
        gid->raw[0] = 0xFE; gid->raw[1] = 0x80;
        gid->raw[8] = 'S'; gid->raw[9] = 'P'; gid->raw[15] = (uint8_t)port;
    }
}

static void lock_shared(pthread_mutex_t *m) {
    if (pthread_mutex_lock(m) == EOWNERDEAD) pthread_mutex_consistent(m);  // its holder died
}

static void wait_shared(pthread_cond_t *c, pthread_mutex_t *m, int ms) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    t.tv_nsec += (long)ms * 1000000L;
    t.tv_sec += t.tv_nsec / 1000000000L;
    t.tv_nsec %= 1000000000L;
    if (pthread_cond_timedwait(c, m, &t) == EOWNERDEAD) pthread_mutex_consistent(m);
}

static long elapsed_ms(const struct timespec *since) {
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (now.tv_sec - since->tv_sec) * 1000L + (now.tv_nsec - since->tv_nsec) / 1000000L;
}

static bool port_alive(struct shared_port *p) {
    if (!atomic_load(&p->live)) return false;
    return p->pid == getpid() || kill(p->pid, 0) == 0 || errno != ESRCH;
}

/// The shared slot of `qpn`, or NULL when no such QP exists now.
static struct shared_qp *shared_qp(struct subnet *n, uint32_t qpn) {
    struct shared_qp *s = &n->qps[qpn & (QP_SLOTS - 1)];
    return qpn != 0 && atomic_load(&s->qpn) == qpn ? s : NULL;
}

// ---- subnet ----

int soft_rdma_subnet_create(const char *path) {
    int fd = open(path, O_RDWR | O_CREAT | O_EXCL, 0600);
    if (fd < 0) return errno;
    if (ftruncate(fd, (off_t)SUBNET_BYTES) != 0) { int e = errno; close(fd); unlink(path); return e; }
    struct subnet *n = mmap(NULL, SUBNET_HEADER_BYTES, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (n == MAP_FAILED) { int e = errno; unlink(path); return e; }
    pthread_mutexattr_t ma;
    pthread_mutexattr_init(&ma);
    pthread_mutexattr_setpshared(&ma, PTHREAD_PROCESS_SHARED);
    pthread_mutexattr_setrobust(&ma, PTHREAD_MUTEX_ROBUST);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setpshared(&ca, PTHREAD_PROCESS_SHARED);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_mutex_init(&n->lock, &ma);
    for (int i = 0; i < PORTS_MAX; i++) {
        pthread_mutex_init(&n->ports[i].lock, &ma);
        pthread_cond_init(&n->ports[i].readable, &ca);
        pthread_cond_init(&n->ports[i].writable, &ca);
    }
    n->next_slot = 2;
    atomic_store(&n->next_key, 1u + ((uint32_t)getpid() & 0xFFFFu) * 0x10000u);
    atomic_thread_fence(memory_order_release);
    n->magic = SUBNET_MAGIC;
    munmap(n, SUBNET_HEADER_BYTES);
    return 0;
}

int soft_rdma_subnet_remove(const char *path) { return unlink(path) == 0 ? 0 : errno; }

// ---- completions ----

static void cq_push(struct soft_cq *cq, const struct ibv_wc *wc) {
    pthread_mutex_lock(&cq->lock);
    if (cq->count == cq->capacity) cq->overruns++;
    else cq->entries[(cq->head + cq->count++) % cq->capacity] = *wc;
    pthread_mutex_unlock(&cq->lock);
}

static void complete_send(struct soft_qp *qp, const struct send_entry *e, enum ibv_wc_status status) {
    if (status == IBV_WC_SUCCESS && !e->signaled) return;
    struct ibv_wc wc = {.wr_id = e->wr_id, .status = status, .opcode = IBV_WC_RDMA_WRITE,
                        .byte_len = e->bytes, .qp_num = qp->ibv.qp_num};
    cq_push(cq_of(qp->ibv.send_cq), &wc);
}

static void set_state(struct soft_qp *qp, enum ibv_qp_state s) {
    atomic_store(&qp->shared->state, (uint32_t)s);
    qp->ibv.state = s;
}

/// ERR: every outstanding send and posted receive completes flushed. Caller holds qp->lock.
static void enter_error(struct soft_qp *qp) {
    set_state(qp, IBV_QPS_ERR);
    for (; qp->sq_count > 0; qp->sq_count--, qp->sq_head = (qp->sq_head + 1) % (int)qp->cap.max_send_wr)
        complete_send(qp, &qp->sq[qp->sq_head], IBV_WC_WR_FLUSH_ERR);
    for (; qp->rq_count > 0; qp->rq_count--, qp->rq_head = (qp->rq_head + 1) % (int)qp->cap.max_recv_wr) {
        struct ibv_wc wc = {.wr_id = qp->rq[qp->rq_head], .status = IBV_WC_WR_FLUSH_ERR, .opcode = IBV_WC_RECV,
                            .qp_num = qp->ibv.qp_num};
        cq_push(cq_of(qp->ibv.recv_cq), &wc);
    }
}

/// Whether the QP this one sends to still exists, in a live process.
static bool target_alive(struct soft_qp *qp) {
    struct shared_qp *d = shared_qp(qp->ctx->net, qp->dest_qpn);
    return d && port_alive(&qp->ctx->net->ports[d->port]);
}

/// Turns the acks the target wrote into completions, in posting order. Caller holds qp->lock.
static void harvest(struct soft_qp *qp) {
    uint32_t qpn = qp->ibv.qp_num;
    uint64_t ack = atomic_load(&qp->shared->acked), nak = atomic_load(&qp->shared->nak);
    uint64_t acked = (ack >> 40) == qpn ? ack & MESSAGE_MASK : 0;
    bool naked = nak != 0 && (nak >> 40) == qpn;
    while (qp->sq_count > 0) {
        struct send_entry *e = &qp->sq[qp->sq_head];
        enum ibv_wc_status status;
        if (e->failed != IBV_WC_SUCCESS) status = e->failed;
        else if (e->message <= acked) status = IBV_WC_SUCCESS;
        else if (naked && (uint32_t)e->message == (uint32_t)nak) status = (enum ibv_wc_status)((nak >> 32) & 0xFF);
        else if (elapsed_ms(&e->posted) >= PEER_CHECK_MS && !target_alive(qp)) status = IBV_WC_RETRY_EXC_ERR;
        else return;
        struct send_entry done = *e;
        qp->sq_head = (qp->sq_head + 1) % (int)qp->cap.max_send_wr;
        qp->sq_count--;
        complete_send(qp, &done, status);
        if (status != IBV_WC_SUCCESS) { enter_error(qp); return; }
    }
}

static void ack(struct shared_qp *src, const struct packet *h) {
    if (!src) return;
    uint64_t old = atomic_load(&src->acked);
    while ((uint32_t)(old >> 40) == h->src_qpn && (old & MESSAGE_MASK) < h->message &&
           !atomic_compare_exchange_weak(&src->acked, &old, (uint64_t)h->src_qpn << 40 | h->message)) {}
}

static void nak(struct shared_qp *src, const struct packet *h, enum ibv_wc_status status) {
    if (!src) return;
    uint64_t none = 0;
    atomic_compare_exchange_strong(&src->nak, &none,
                                   (uint64_t)h->src_qpn << 40 | (uint64_t)status << 32 | (uint32_t)h->message);
}

static int poll_cq(struct ibv_cq *ibcq, int n, struct ibv_wc *wc) {
    struct soft_cq *cq = cq_of(ibcq);
    struct soft_context *ctx = context_of(ibcq->context);
    pthread_mutex_lock(&ctx->lock);
    for (int i = 0; i < QP_SLOTS; i++) {
        struct soft_qp *qp = ctx->qps[i];
        if (!qp || qp->ibv.send_cq != ibcq) continue;
        pthread_mutex_lock(&qp->lock);
        harvest(qp);
        pthread_mutex_unlock(&qp->lock);
    }
    pthread_mutex_unlock(&ctx->lock);
    pthread_mutex_lock(&cq->lock);
    int k = n < cq->count ? n : cq->count;
    for (int i = 0; i < k; i++) wc[i] = cq->entries[(cq->head + i) % cq->capacity];
    cq->head = (cq->head + k) % cq->capacity;
    cq->count -= k;
    pthread_mutex_unlock(&cq->lock);
    return k;
}

// ---- the requester ----

/// Copies one packet into `port`'s ring, waiting while the ring is full. False: the target is gone
/// or stuck.
static bool ring_push(struct subnet *n, int port, const struct packet *h, const uint8_t *payload) {
    struct shared_port *p = &n->ports[port];
    uint8_t *ring = ring_of(n, port);
    size_t need = packet_stride(h->bytes);
    lock_shared(&p->lock);
    size_t at, to_end;
    for (int waited = 0;; waited += 100) {
        at = p->head % RING_BYTES;
        to_end = RING_BYTES - at;
        size_t total = need <= to_end ? need : to_end + need;
        if (RING_BYTES - (p->head - p->tail) >= total) break;
        if (waited >= STUCK_MS || !port_alive(p)) { pthread_mutex_unlock(&p->lock); return false; }
        wait_shared(&p->writable, &p->lock, 100);
    }
    if (need > to_end) {
        ((struct packet *)(ring + at))->kind = PACKET_PAD;
        p->head += to_end;
        at = 0;
    }
    memcpy(ring + at, h, sizeof *h);
    if (h->bytes) memcpy(ring + at + sizeof *h, payload, h->bytes);
    p->head += need;
    pthread_cond_signal(&p->readable);
    pthread_mutex_unlock(&p->lock);
    return true;
}

/// Finds the MR with `key` (an lkey or rkey: they are equal here). Caller holds mr_lock.
static struct soft_mr *find_mr(struct soft_context *ctx, uint32_t key) {
    for (int i = 0; i < ctx->mr_count; i++)
        if (ctx->mrs[i]->ibv.rkey == key) return ctx->mrs[i];
    return NULL;
}

static bool covers(const struct soft_mr *mr, uint64_t va, uint64_t bytes) {
    uint64_t base = (uint64_t)(uintptr_t)mr->ibv.addr;
    return va >= base && bytes <= mr->ibv.length && va - base <= mr->ibv.length - bytes;
}

/// Local protection: every gathered range lies in an MR of the QP's PD (unless sent inline).
static bool local_access_ok(struct soft_qp *qp, const struct ibv_send_wr *wr) {
    if (wr->send_flags & IBV_SEND_INLINE) return true;
    bool ok = true;
    pthread_rwlock_rdlock(&qp->ctx->mr_lock);
    for (int i = 0; ok && i < wr->num_sge; i++) {
        struct soft_mr *mr = find_mr(qp->ctx, wr->sg_list[i].lkey);
        ok = mr && mr->ibv.pd == qp->ibv.pd && covers(mr, wr->sg_list[i].addr, wr->sg_list[i].length);
    }
    pthread_rwlock_unlock(&qp->ctx->mr_lock);
    return ok;
}

/// Marks message `m` failed (if it is still outstanding). Caller holds qp->lock.
static void fail_message(struct soft_qp *qp, uint64_t m, enum ibv_wc_status status) {
    for (int i = 0; i < qp->sq_count; i++) {
        struct send_entry *e = &qp->sq[(qp->sq_head + i) % (int)qp->cap.max_send_wr];
        if (e->message == m) { e->failed = status; return; }
    }
}

/// The target port of this QP's connection, or -1 when no port answers to its address.
static int route(struct soft_qp *qp) {
    struct subnet *n = qp->ctx->net;
    struct shared_qp *d = shared_qp(n, qp->dest_qpn);
    if (!d) return -1;
    int port = (int)d->port;
    if (qp->global) {
        union ibv_gid gid;
        gid_of(n, port, &gid);
        return memcmp(&gid, &qp->dgid, sizeof gid) == 0 ? port : -1;
    }
    return !n->ports[port].ethernet && qp->dlid == lid_of(port) ? port : -1;
}

static int post_send(struct ibv_qp *ibqp, struct ibv_send_wr *wr, struct ibv_send_wr **bad_wr) {
    struct soft_qp *qp = qp_of(ibqp);
    int rc = 0;
    pthread_mutex_lock(&qp->send_lock);
    for (; wr; wr = wr->next) {
        pthread_mutex_lock(&qp->lock);
        uint32_t state = atomic_load(&qp->shared->state);
        if (state != IBV_QPS_RTS && state != IBV_QPS_ERR) rc = EINVAL;
        else if (wr->opcode != IBV_WR_RDMA_WRITE && wr->opcode != IBV_WR_RDMA_WRITE_WITH_IMM) rc = EINVAL;
        else if (wr->num_sge < 0 || (uint32_t)wr->num_sge > qp->cap.max_send_sge) rc = EINVAL;
        else if ((uint32_t)qp->sq_count >= qp->cap.max_send_wr) rc = ENOMEM;
        if (rc) { pthread_mutex_unlock(&qp->lock); break; }
        uint64_t total = 0;
        for (int i = 0; i < wr->num_sge; i++) total += wr->sg_list[i].length;
        struct send_entry *e = &qp->sq[(qp->sq_head + qp->sq_count++) % (int)qp->cap.max_send_wr];
        *e = (struct send_entry){.wr_id = wr->wr_id, .message = ++qp->next_message, .bytes = (uint32_t)total,
                                 .signaled = qp->signal_all || (wr->send_flags & IBV_SEND_SIGNALED),
                                 .failed = IBV_WC_SUCCESS};
        clock_gettime(CLOCK_MONOTONIC, &e->posted);
        if (state == IBV_QPS_ERR) { enter_error(qp); pthread_mutex_unlock(&qp->lock); continue; }
        int port = route(qp);
        if (!local_access_ok(qp, wr)) e->failed = IBV_WC_LOC_PROT_ERR;
        else if (total > (1u << 31)) e->failed = IBV_WC_LOC_LEN_ERR;
        else if (port < 0) e->failed = IBV_WC_RETRY_EXC_ERR;  // nobody answers at that address
        if (e->failed != IBV_WC_SUCCESS) { pthread_mutex_unlock(&qp->lock); continue; }
        uint32_t packets = total == 0 ? 1 : (uint32_t)((total + qp->mtu_bytes - 1) / qp->mtu_bytes);
        struct packet h = {.kind = PACKET_DATA, .dest_qpn = qp->dest_qpn, .src_qpn = qp->ibv.qp_num,
                           .psn = qp->next_psn, .message = e->message, .va = wr->wr.rdma.remote_addr,
                           .message_va = wr->wr.rdma.remote_addr, .message_bytes = (uint32_t)total,
                           .rkey = wr->wr.rdma.rkey,
                           .imm = wr->opcode == IBV_WR_RDMA_WRITE_WITH_IMM ? wr->imm_data : 0};
        qp->next_psn = (qp->next_psn + packets) & PSN_MASK;
        uint32_t mtu = qp->mtu_bytes;
        pthread_mutex_unlock(&qp->lock);

        // Gather now (hardware reads the buffers later; callers may not touch them before the
        // completion either way), then send the packets holding only the send lock.
        uint8_t *payload = malloc(total ? total : 1);
        if (!payload) { rc = ENOMEM; break; }
        size_t at = 0;
        for (int i = 0; i < wr->num_sge; at += wr->sg_list[i].length, i++)
            memcpy(payload + at, (void *)(uintptr_t)wr->sg_list[i].addr, wr->sg_list[i].length);
        for (uint32_t i = 0; i < packets; i++) {
            uint64_t offset = (uint64_t)i * mtu;
            h.bytes = (uint32_t)(total - offset < mtu ? total - offset : mtu);
            h.flags = (i == 0 ? FIRST : 0) | (i == packets - 1 ? LAST : 0) |
                      (wr->opcode == IBV_WR_RDMA_WRITE_WITH_IMM ? WITH_IMM : 0);
            h.va = wr->wr.rdma.remote_addr + offset;
            if (!ring_push(qp->ctx->net, port, &h, payload + offset)) {
                pthread_mutex_lock(&qp->lock);
                fail_message(qp, h.message, IBV_WC_RETRY_EXC_ERR);
                pthread_mutex_unlock(&qp->lock);
                break;
            }
            h.psn = (h.psn + 1) & PSN_MASK;
        }
        free(payload);
    }
    pthread_mutex_unlock(&qp->send_lock);
    if (rc) *bad_wr = wr;
    return rc;
}

static int post_recv(struct ibv_qp *ibqp, struct ibv_recv_wr *wr, struct ibv_recv_wr **bad_wr) {
    struct soft_qp *qp = qp_of(ibqp);
    int rc = 0;
    pthread_mutex_lock(&qp->lock);
    for (; wr; wr = wr->next) {
        uint32_t state = atomic_load(&qp->shared->state);
        if (state == IBV_QPS_RESET || wr->num_sge < 0 || (uint32_t)wr->num_sge > qp->cap.max_recv_sge) rc = EINVAL;
        else if ((uint32_t)qp->rq_count >= qp->cap.max_recv_wr) rc = ENOMEM;
        if (rc) break;
        qp->rq[(qp->rq_head + qp->rq_count++) % (int)qp->cap.max_recv_wr] = wr->wr_id;
        if (state == IBV_QPS_ERR) enter_error(qp);
    }
    pthread_mutex_unlock(&qp->lock);
    if (rc) *bad_wr = wr;
    return rc;
}

// ---- the responder ----

/// Checks the rkey, PD, access and bounds, and lands the packet's bytes.
static bool land(struct soft_qp *qp, const struct packet *h, const uint8_t *payload) {
    if (!(qp->access & IBV_ACCESS_REMOTE_WRITE)) return false;
    if (h->message_bytes == 0) return true;
    pthread_rwlock_rdlock(&qp->ctx->mr_lock);
    struct soft_mr *mr = find_mr(qp->ctx, h->rkey);
    bool ok = mr && mr->ibv.pd == qp->ibv.pd && (mr->access & IBV_ACCESS_REMOTE_WRITE) &&
              (!(h->flags & FIRST) || covers(mr, h->message_va, h->message_bytes)) && covers(mr, h->va, h->bytes);
    if (ok && h->bytes) memcpy((void *)(uintptr_t)h->va, payload, h->bytes);
    pthread_rwlock_unlock(&qp->ctx->mr_lock);
    return ok;
}

/// Executes one packet. False: it must wait (a WRITE_WITH_IMM and no receive posted).
static bool deliver(struct soft_context *ctx, const struct packet *h, const uint8_t *payload) {
    struct shared_qp *src = shared_qp(ctx->net, h->src_qpn);
    pthread_mutex_lock(&ctx->lock);
    struct soft_qp *qp = ctx->qps[h->dest_qpn & (QP_SLOTS - 1)];
    if (!qp || qp->ibv.qp_num != h->dest_qpn) {
        pthread_mutex_unlock(&ctx->lock);
        nak(src, h, IBV_WC_RETRY_EXC_ERR);
        return true;
    }
    pthread_mutex_lock(&qp->lock);
    pthread_mutex_unlock(&ctx->lock);
    bool consumed = true;
    uint32_t state = atomic_load(&qp->shared->state);
    uint32_t src_state = src ? atomic_load(&src->state) : IBV_QPS_RESET;
    if (src_state == IBV_QPS_ERR || src_state == IBV_QPS_RESET) {
        // The sender flushed this work: it never executes.
    } else if ((state != IBV_QPS_RTR && state != IBV_QPS_RTS) || qp->dest_qpn != h->src_qpn || h->psn != qp->expected_psn) {
        nak(src, h, IBV_WC_RETRY_EXC_ERR);     // dropped; the sender's retries run out
    } else if ((h->flags & WITH_IMM) && (h->flags & FIRST) && qp->rq_count == 0) {
        consumed = false;                      // receiver not ready: retry (RNR)
    } else if (!land(qp, h, payload)) {
        nak(src, h, IBV_WC_REM_ACCESS_ERR);
        enter_error(qp);
    } else {
        qp->expected_psn = (qp->expected_psn + 1) & PSN_MASK;
        if (h->flags & LAST) {
            if (h->flags & WITH_IMM) {
                struct ibv_wc wc = {.wr_id = qp->rq[qp->rq_head], .status = IBV_WC_SUCCESS,
                                    .opcode = IBV_WC_RECV_RDMA_WITH_IMM, .byte_len = h->message_bytes,
                                    .imm_data = h->imm, .qp_num = qp->ibv.qp_num, .src_qp = h->src_qpn,
                                    .wc_flags = IBV_WC_WITH_IMM};
                qp->rq_head = (qp->rq_head + 1) % (int)qp->cap.max_recv_wr;
                qp->rq_count--;
                cq_push(cq_of(qp->ibv.recv_cq), &wc);
            }
            ack(src, h);
        }
    }
    pthread_mutex_unlock(&qp->lock);
    return consumed;
}

static void *responder(void *arg) {
    struct soft_context *ctx = arg;
    struct shared_port *p = &ctx->net->ports[ctx->port];
    uint8_t *ring = ring_of(ctx->net, ctx->port);
    lock_shared(&p->lock);
    while (!atomic_load(&ctx->stopping)) {
        if (p->head == p->tail) { wait_shared(&p->readable, &p->lock, 50); continue; }
        size_t at = p->tail % RING_BYTES;
        const struct packet *h = (const struct packet *)(ring + at);
        if (h->kind == PACKET_PAD) {
            p->tail += RING_BYTES - at;
            pthread_cond_broadcast(&p->writable);
            continue;
        }
        // Posters write only past `head`: the packet stays put while it is executed unlocked.
        pthread_mutex_unlock(&p->lock);
        bool consumed = deliver(ctx, h, (const uint8_t *)(h + 1));
        if (!consumed) usleep(1000);
        lock_shared(&p->lock);
        if (consumed) {
            p->tail += packet_stride(h->bytes);
            pthread_cond_broadcast(&p->writable);
        }
    }
    pthread_mutex_unlock(&p->lock);
    return NULL;
}

// ---- the control path ----

struct ibv_context *soft_rdma_open_device(const char *subnet_path, int ethernet) {
    int fd = open(subnet_path, O_RDWR);
    if (fd < 0) return NULL;
    struct subnet *n = mmap(NULL, SUBNET_BYTES, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (n == MAP_FAILED) return NULL;
    if (n->magic != SUBNET_MAGIC) { munmap(n, SUBNET_BYTES); errno = EINVAL; return NULL; }
    struct soft_context *ctx = calloc(1, sizeof *ctx);
    if (!ctx) { munmap(n, SUBNET_BYTES); errno = ENOMEM; return NULL; }
    lock_shared(&n->lock);
    int port = -1;
    for (int i = 0; i < PORTS_MAX && port < 0; i++)
        if (!atomic_load(&n->ports[i].live) || !port_alive(&n->ports[i])) port = i;
    if (port >= 0) {
        struct shared_port *p = &n->ports[port];
        lock_shared(&p->lock);
        p->head = p->tail = 0;
        p->pid = getpid();
        p->ethernet = ethernet != 0;
        atomic_store(&p->live, 1);
        pthread_mutex_unlock(&p->lock);
    }
    pthread_mutex_unlock(&n->lock);
    if (port < 0) { free(ctx); munmap(n, SUBNET_BYTES); errno = ENOSPC; return NULL; }
    ctx->net = n;
    ctx->port = port;
    ctx->device.node_type = IBV_NODE_CA;
    ctx->device.transport_type = IBV_TRANSPORT_IB;
    snprintf(ctx->device.name, sizeof ctx->device.name, "soft_%s%d", ethernet ? "roce" : "ib", port);
    ctx->ibv.device = &ctx->device;
    ctx->ibv.ops.post_send = post_send;
    ctx->ibv.ops.post_recv = post_recv;
    ctx->ibv.ops.poll_cq = poll_cq;
    ctx->ibv.cmd_fd = ctx->ibv.async_fd = -1;
    ctx->ibv.num_comp_vectors = 1;
    pthread_mutex_init(&ctx->ibv.mutex, NULL);
    pthread_mutex_init(&ctx->lock, NULL);
    pthread_rwlock_init(&ctx->mr_lock, NULL);
    int rc = pthread_create(&ctx->responder, NULL, responder, ctx);
    if (rc) {
        atomic_store(&n->ports[port].live, 0);
        free(ctx);
        munmap(n, SUBNET_BYTES);
        errno = rc;
        return NULL;
    }
    return &ctx->ibv;
}

int soft_rdma_close_device(struct ibv_context *context) {
    struct soft_context *ctx = context_of(context);
    pthread_mutex_lock(&ctx->lock);
    bool busy = ctx->pds || ctx->cqs || ctx->qp_count;
    pthread_mutex_unlock(&ctx->lock);
    if (busy) return EBUSY;
    atomic_store(&ctx->stopping, true);
    pthread_join(ctx->responder, NULL);
    atomic_store(&ctx->net->ports[ctx->port].live, 0);
    munmap(ctx->net, SUBNET_BYTES);
    free(ctx->mrs);
    free(ctx);
    return 0;
}

int soft_rdma_query_port(struct ibv_context *context, uint8_t port_num, struct ibv_port_attr *attr) {
    struct soft_context *ctx = context_of(context);
    if (port_num != 1) return EINVAL;
    bool ethernet = ctx->net->ports[ctx->port].ethernet;
    memset(attr, 0, sizeof *attr);
    attr->state = IBV_PORT_ACTIVE;
    attr->max_mtu = attr->active_mtu = IBV_MTU_4096;
    attr->gid_tbl_len = 1;
    attr->max_msg_sz = 1u << 31;
    attr->pkey_tbl_len = 1;
    attr->lid = ethernet ? 0 : lid_of(ctx->port);
    attr->link_layer = ethernet ? IBV_LINK_LAYER_ETHERNET : IBV_LINK_LAYER_INFINIBAND;
    attr->phys_state = 5;  // LinkUp
    attr->active_width = 1;
    attr->active_speed = 1;
    return 0;
}

int soft_rdma_query_gid(struct ibv_context *context, uint8_t port_num, int index, union ibv_gid *gid) {
    struct soft_context *ctx = context_of(context);
    if (port_num != 1 || index != 0) return EINVAL;
    gid_of(ctx->net, ctx->port, gid);
    return 0;
}

struct ibv_pd *soft_rdma_alloc_pd(struct ibv_context *context) {
    struct soft_context *ctx = context_of(context);
    struct soft_pd *pd = calloc(1, sizeof *pd);
    if (!pd) { errno = ENOMEM; return NULL; }
    pd->ibv.context = context;
    pthread_mutex_lock(&ctx->lock);
    pd->ibv.handle = (uint32_t)++ctx->pds;
    pthread_mutex_unlock(&ctx->lock);
    return &pd->ibv;
}

int soft_rdma_dealloc_pd(struct ibv_pd *ibpd) {
    struct soft_pd *pd = (struct soft_pd *)ibpd;
    if (atomic_load(&pd->users)) return EBUSY;
    struct soft_context *ctx = context_of(ibpd->context);
    pthread_mutex_lock(&ctx->lock);
    ctx->pds--;
    pthread_mutex_unlock(&ctx->lock);
    free(pd);
    return 0;
}

struct ibv_mr *soft_rdma_reg_mr(struct ibv_pd *ibpd, void *addr, size_t length, int access) {
    struct soft_context *ctx = context_of(ibpd->context);
    // Remote write needs local write (IB spec; hardware refuses it too).
    if (!addr || length == 0 || ((access & IBV_ACCESS_REMOTE_WRITE) && !(access & IBV_ACCESS_LOCAL_WRITE))) {
        errno = EINVAL;
        return NULL;
    }
    struct soft_mr *mr = calloc(1, sizeof *mr);
    if (!mr) { errno = ENOMEM; return NULL; }
    // Unique but never adjacent (an odd multiplier is a bijection mod 2^32), so "a key off by one"
    // names no MR, as on hardware.
    uint32_t key = atomic_fetch_add(&ctx->net->next_key, 1) * 0x9E3779B1u;
    mr->ibv = (struct ibv_mr){.context = ibpd->context, .pd = ibpd, .addr = addr, .length = length,
                              .handle = key, .lkey = key, .rkey = key};
    mr->access = access;
    pthread_rwlock_wrlock(&ctx->mr_lock);
    if (ctx->mr_count == ctx->mr_capacity) {
        int capacity = ctx->mr_capacity ? 2 * ctx->mr_capacity : 16;
        struct soft_mr **grown = realloc(ctx->mrs, (size_t)capacity * sizeof *grown);
        if (!grown) { pthread_rwlock_unlock(&ctx->mr_lock); free(mr); errno = ENOMEM; return NULL; }
        ctx->mrs = grown;
        ctx->mr_capacity = capacity;
    }
    ctx->mrs[ctx->mr_count++] = mr;
    pthread_rwlock_unlock(&ctx->mr_lock);
    atomic_fetch_add(&((struct soft_pd *)ibpd)->users, 1);
    return &mr->ibv;
}

int soft_rdma_dereg_mr(struct ibv_mr *ibmr) {
    struct soft_context *ctx = context_of(ibmr->context);
    struct soft_mr *mr = (struct soft_mr *)ibmr;
    // Once this returns, no remote write lands in the memory any more.
    pthread_rwlock_wrlock(&ctx->mr_lock);
    int i = 0;
    while (i < ctx->mr_count && ctx->mrs[i] != mr) i++;
    if (i == ctx->mr_count) { pthread_rwlock_unlock(&ctx->mr_lock); return EINVAL; }
    ctx->mrs[i] = ctx->mrs[--ctx->mr_count];
    pthread_rwlock_unlock(&ctx->mr_lock);
    atomic_fetch_sub(&((struct soft_pd *)ibmr->pd)->users, 1);
    free(mr);
    return 0;
}

struct ibv_cq *soft_rdma_create_cq(struct ibv_context *context, int cqe) {
    struct soft_context *ctx = context_of(context);
    if (cqe <= 0 || cqe > (1 << 22)) { errno = EINVAL; return NULL; }
    struct soft_cq *cq = calloc(1, sizeof *cq);
    if (cq) cq->entries = calloc((size_t)cqe, sizeof *cq->entries);
    if (!cq || !cq->entries) { free(cq); errno = ENOMEM; return NULL; }
    cq->ibv.context = context;
    cq->ibv.cqe = cq->capacity = cqe;
    pthread_mutex_init(&cq->lock, NULL);
    pthread_mutex_lock(&ctx->lock);
    ctx->cqs++;
    pthread_mutex_unlock(&ctx->lock);
    return &cq->ibv;
}

int soft_rdma_destroy_cq(struct ibv_cq *ibcq) {
    struct soft_cq *cq = cq_of(ibcq);
    if (atomic_load(&cq->users)) return EBUSY;
    struct soft_context *ctx = context_of(ibcq->context);
    pthread_mutex_lock(&ctx->lock);
    ctx->cqs--;
    pthread_mutex_unlock(&ctx->lock);
    free(cq->entries);
    free(cq);
    return 0;
}

unsigned long soft_rdma_cq_overruns(struct ibv_cq *ibcq) {
    struct soft_cq *cq = cq_of(ibcq);
    pthread_mutex_lock(&cq->lock);
    unsigned long n = cq->overruns;
    pthread_mutex_unlock(&cq->lock);
    return n;
}

struct ibv_qp *soft_rdma_create_qp(struct ibv_pd *pd, struct ibv_qp_init_attr *attr) {
    struct soft_context *ctx = context_of(pd->context);
    struct ibv_qp_cap *cap = &attr->cap;
    if (attr->qp_type != IBV_QPT_RC || attr->srq || !attr->send_cq || !attr->recv_cq ||
        attr->send_cq->context != pd->context || attr->recv_cq->context != pd->context ||
        cap->max_send_wr == 0 || cap->max_send_wr > WR_MAX || cap->max_recv_wr > WR_MAX ||
        cap->max_send_sge > SGE_MAX || cap->max_recv_sge > SGE_MAX) {
        errno = EINVAL;
        return NULL;
    }
    struct soft_qp *qp = calloc(1, sizeof *qp);
    if (qp) {
        qp->sq = calloc(cap->max_send_wr, sizeof *qp->sq);
        qp->rq = calloc(cap->max_recv_wr ? cap->max_recv_wr : 1, sizeof *qp->rq);
    }
    if (!qp || !qp->sq || !qp->rq) {
        if (qp) { free(qp->sq); free(qp->rq); }
        free(qp);
        errno = ENOMEM;
        return NULL;
    }
    struct subnet *n = ctx->net;
    lock_shared(&n->lock);
    int slot = -1;
    for (int i = 0; i < QP_SLOTS - 2 && slot < 0; i++) {
        int s = 2 + (int)((n->next_slot - 2 + (uint32_t)i) % (QP_SLOTS - 2));
        if (atomic_load(&n->qps[s].qpn) == 0) slot = s;
    }
    uint32_t qpn = 0;
    if (slot >= 0) {
        n->next_slot = (uint32_t)slot + 1;
        n->generation = n->generation % 0x3FFF + 1;
        qpn = n->generation << 10 | (uint32_t)slot;
        struct shared_qp *s = &n->qps[slot];
        s->port = (uint32_t)ctx->port;
        atomic_store(&s->state, IBV_QPS_RESET);
        atomic_store(&s->acked, (uint64_t)qpn << 40);
        atomic_store(&s->nak, 0);
        atomic_store(&s->qpn, qpn);
    }
    pthread_mutex_unlock(&n->lock);
    if (slot < 0) { free(qp->sq); free(qp->rq); free(qp); errno = ENOMEM; return NULL; }
    qp->ibv = (struct ibv_qp){.context = pd->context, .qp_context = attr->qp_context, .pd = pd,
                              .send_cq = attr->send_cq, .recv_cq = attr->recv_cq, .handle = qpn, .qp_num = qpn,
                              .state = IBV_QPS_RESET, .qp_type = IBV_QPT_RC};
    qp->ctx = ctx;
    qp->shared = &n->qps[slot];
    qp->cap = *cap;
    if (qp->cap.max_recv_wr == 0) qp->cap.max_recv_wr = 1;
    qp->signal_all = attr->sq_sig_all != 0;
    pthread_mutex_init(&qp->lock, NULL);
    pthread_mutex_init(&qp->send_lock, NULL);
    atomic_fetch_add(&((struct soft_pd *)pd)->users, 1);
    atomic_fetch_add(&cq_of(attr->send_cq)->users, 1);
    atomic_fetch_add(&cq_of(attr->recv_cq)->users, 1);
    pthread_mutex_lock(&ctx->lock);
    ctx->qps[slot] = qp;
    ctx->qp_count++;
    pthread_mutex_unlock(&ctx->lock);
    return &qp->ibv;
}

/// The attributes a transition must carry (IB spec 11.2.4.2, RC; optional ones are accepted too).
static int required_attributes(uint32_t from, enum ibv_qp_state to) {
    if (from == IBV_QPS_RESET && to == IBV_QPS_INIT)
        return IBV_QP_STATE | IBV_QP_PKEY_INDEX | IBV_QP_PORT | IBV_QP_ACCESS_FLAGS;
    if (from == IBV_QPS_INIT && to == IBV_QPS_RTR)
        return IBV_QP_STATE | IBV_QP_AV | IBV_QP_PATH_MTU | IBV_QP_DEST_QPN | IBV_QP_RQ_PSN |
               IBV_QP_MAX_DEST_RD_ATOMIC | IBV_QP_MIN_RNR_TIMER;
    if (from == IBV_QPS_RTR && to == IBV_QPS_RTS)
        return IBV_QP_STATE | IBV_QP_SQ_PSN | IBV_QP_TIMEOUT | IBV_QP_RETRY_CNT | IBV_QP_RNR_RETRY |
               IBV_QP_MAX_QP_RD_ATOMIC;
    return IBV_QP_STATE;
}

static bool legal_transition(uint32_t from, enum ibv_qp_state to) {
    return to == IBV_QPS_RESET || to == IBV_QPS_ERR ||
           (to == IBV_QPS_INIT && (from == IBV_QPS_RESET || from == IBV_QPS_INIT)) ||
           (to == IBV_QPS_RTR && from == IBV_QPS_INIT) ||
           (to == IBV_QPS_RTS && (from == IBV_QPS_RTR || from == IBV_QPS_RTS));
}

int soft_rdma_modify_qp(struct ibv_qp *ibqp, struct ibv_qp_attr *a, int mask) {
    struct soft_qp *qp = qp_of(ibqp);
    if (!(mask & IBV_QP_STATE)) return EINVAL;
    pthread_mutex_lock(&qp->lock);
    uint32_t from = atomic_load(&qp->shared->state);
    int need = required_attributes(from, a->qp_state);
    bool ethernet = qp->ctx->net->ports[qp->ctx->port].ethernet;
    int rc = 0;
    if (!legal_transition(from, a->qp_state) || (mask & need) != need) rc = EINVAL;
    else if ((mask & IBV_QP_PORT) && a->port_num != 1) rc = EINVAL;
    else if ((mask & IBV_QP_PKEY_INDEX) && a->pkey_index != 0) rc = EINVAL;
    else if ((mask & IBV_QP_PATH_MTU) && (a->path_mtu < IBV_MTU_256 || a->path_mtu > IBV_MTU_4096)) rc = EINVAL;
    // A RoCE port is reached by GID only: an address vector without GRH cannot route.
    else if ((mask & IBV_QP_AV) && ((ethernet && !a->ah_attr.is_global) ||
                                    (a->ah_attr.is_global && a->ah_attr.grh.sgid_index != 0))) rc = EINVAL;
    if (rc) { pthread_mutex_unlock(&qp->lock); return rc; }
    if (mask & IBV_QP_ACCESS_FLAGS) qp->access = (int)a->qp_access_flags;
    if (mask & IBV_QP_PATH_MTU) qp->mtu_bytes = 128u << a->path_mtu;
    if (mask & IBV_QP_AV) {
        qp->global = a->ah_attr.is_global != 0;
        qp->dlid = a->ah_attr.dlid;
        qp->dgid = a->ah_attr.grh.dgid;
    }
    if (mask & IBV_QP_DEST_QPN) qp->dest_qpn = a->dest_qp_num;
    if (mask & IBV_QP_RQ_PSN) qp->expected_psn = a->rq_psn & PSN_MASK;
    if (mask & IBV_QP_SQ_PSN) qp->next_psn = a->sq_psn & PSN_MASK;
    if (a->qp_state == IBV_QPS_ERR) {
        harvest(qp);  // what already landed completes as such; the rest is flushed
        enter_error(qp);
    } else if (a->qp_state == IBV_QPS_RESET) {
        qp->sq_count = qp->rq_count = 0;
        atomic_store(&qp->shared->acked, (uint64_t)qp->ibv.qp_num << 40);
        atomic_store(&qp->shared->nak, 0);
        set_state(qp, IBV_QPS_RESET);
    } else {
        set_state(qp, a->qp_state);
    }
    pthread_mutex_unlock(&qp->lock);
    return 0;
}

int soft_rdma_destroy_qp(struct ibv_qp *ibqp) {
    struct soft_qp *qp = qp_of(ibqp);
    struct soft_context *ctx = qp->ctx;
    pthread_mutex_lock(&ctx->lock);
    ctx->qps[ibqp->qp_num & (QP_SLOTS - 1)] = NULL;
    ctx->qp_count--;
    pthread_mutex_lock(&qp->lock);     // a responder that found the QP is done with it
    pthread_mutex_unlock(&qp->lock);
    pthread_mutex_unlock(&ctx->lock);
    set_state(qp, IBV_QPS_RESET);
    atomic_store(&qp->shared->qpn, 0);
    atomic_fetch_sub(&((struct soft_pd *)ibqp->pd)->users, 1);
    atomic_fetch_sub(&cq_of(ibqp->send_cq)->users, 1);
    atomic_fetch_sub(&cq_of(ibqp->recv_cq)->users, 1);
    free(qp->sq);
    free(qp->rq);
    free(qp);
    return 0;
}
