// The software RDMA device, inside (soft_rdma.h says what it does). How:
//
// The subnet file holds, for every port, a packet ring with a process-shared (robust) mutex, and
// for every QP number a shared slot: its state and two words its peer's responder writes — the
// last message that landed (`acked`) and the first that failed (`nak`). A poster queues its work
// request (the gather list, not the bytes); the context's requester thread later reads the source
// bytes straight into the target port's ring, as a NIC reads them by DMA after the post (so a
// buffer reused before its completion sends the new bytes); the target context's responder thread
// checks and lands the packets and writes the ack into the sender's slot; the sender's `poll_cq`
// turns acks into completions. One mechanism serves QPs in one process and across processes.
//
// Lock order: context → QP → CQ; context → a QP's send lock; a port ring's lock, then the MR
// lock; each taken alone or in that order. A QP's send lock is held by the requester while it
// transmits (it may wait for ring space then) and by `destroy_qp` to wait for that; neither the
// responder nor a poster takes it, so waiting for ring space blocks no completion.
#ifndef SOFT_RDMA_PRIVATE_H
#define SOFT_RDMA_PRIVATE_H

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

struct soft_channel {
    struct ibv_comp_channel ibv;         // ibv.fd: the read end of a pipe
    int write_fd;
    _Atomic int users;                   // CQs bound to it
};

struct soft_cq {
    struct ibv_cq ibv;
    pthread_mutex_t lock;
    struct soft_channel *channel;        // NULL: no events
    bool armed;                          // under `lock`: ibv_req_notify_cq since the last event
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
    struct timespec due;                 // not read before this (the optional read delay)
    // What the requester needs to transmit it later. The gather list is kept, not its bytes: they
    // are read when the packets go out.
    int port;                            // the target port, routed at post time
    uint32_t psn, packets, imm, rkey;
    bool with_imm;
    uint64_t remote_addr;
    int num_sge;
    struct ibv_sge sge[SGE_MAX];
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
    int sq_sent;                         // the first sq_sent entries from sq_head were transmitted
    uint64_t *rq;
    int rq_head, rq_count;
};

struct soft_context {
    struct ibv_context ibv;
    struct ibv_device device;
    struct subnet *net;
    int port;
    pthread_t responder, requester;
    _Atomic bool stopping;
    pthread_cond_t work;                 // with `lock`: a poster queued work for the requester
    _Atomic uint32_t read_delay_us;      // soft_rdma_set_read_delay
    _Atomic uint64_t random;             // splitmix64 state for the read delays
    uint64_t memlock_limit, pinned;      // bytes, under mr_lock; a limit of 0: none
    pthread_rwlock_t mr_lock;            // readers land bytes; deregistration writes
    struct soft_mr **mrs;
    int mr_count, mr_capacity;
    pthread_mutex_t lock;                // qps and the counts
    struct soft_qp *qps[QP_SLOTS];
    int pds, cqs, qp_count;
};

static inline struct soft_context *context_of(struct ibv_context *c) { return (struct soft_context *)c; }
static inline struct soft_qp *qp_of(struct ibv_qp *q) { return (struct soft_qp *)q; }
static inline struct soft_cq *cq_of(struct ibv_cq *c) { return (struct soft_cq *)c; }
static inline uint8_t *ring_of(struct subnet *n, int port) { return (uint8_t *)n + SUBNET_HEADER_BYTES + (size_t)port * RING_BYTES; }
static inline size_t packet_stride(uint32_t bytes) { return sizeof(struct packet) + ((bytes + 7u) & ~7u); }
static inline uint16_t lid_of(int port) { return (uint16_t)(port + 1); }

static inline void gid_of(struct subnet *n, int port, union ibv_gid *gid) {
    memset(gid, 0, sizeof *gid);
    if (n->ports[port].ethernet) {       // ::ffff:127.0.1.<port>, an IPv4-mapped RoCE v2 GID
        gid->raw[10] = gid->raw[11] = 0xFF;
        gid->raw[12] = 127; gid->raw[14] = 1; gid->raw[15] = (uint8_t)port;
    } else {                             // fe80::5350:0:0:<port>
        gid->raw[0] = 0xFE; gid->raw[1] = 0x80;
        gid->raw[8] = 'S'; gid->raw[9] = 'P'; gid->raw[15] = (uint8_t)port;
    }
}

static inline void lock_shared(pthread_mutex_t *m) {
    if (pthread_mutex_lock(m) == EOWNERDEAD) pthread_mutex_consistent(m);  // its holder died
}

static inline void wait_shared(pthread_cond_t *c, pthread_mutex_t *m, int ms) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    t.tv_nsec += (long)ms * 1000000L;
    t.tv_sec += t.tv_nsec / 1000000000L;
    t.tv_nsec %= 1000000000L;
    if (pthread_cond_timedwait(c, m, &t) == EOWNERDEAD) pthread_mutex_consistent(m);
}

static inline long elapsed_ms(const struct timespec *since) {
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (now.tv_sec - since->tv_sec) * 1000L + (now.tv_nsec - since->tv_nsec) / 1000000L;
}

static inline bool port_alive(struct shared_port *p) {
    if (!atomic_load(&p->live)) return false;
    return p->pid == getpid() || kill(p->pid, 0) == 0 || errno != ESRCH;
}

/// The shared slot of `qpn`, or NULL when no such QP exists now.
static inline struct shared_qp *shared_qp(struct subnet *n, uint32_t qpn) {
    struct shared_qp *s = &n->qps[qpn & (QP_SLOTS - 1)];
    return qpn != 0 && atomic_load(&s->qpn) == qpn ? s : NULL;
}

// Between the data path (data_path.c) and the control path (control_path.c).
#define SOFT_HIDDEN __attribute__((visibility("hidden")))
SOFT_HIDDEN void soft_set_state(struct soft_qp *qp, enum ibv_qp_state s);
/// Turns the acks the target wrote into completions, in posting order. Caller holds qp->lock.
SOFT_HIDDEN void soft_harvest(struct soft_qp *qp);
/// ERR: every outstanding send and posted receive completes flushed. Caller holds qp->lock.
SOFT_HIDDEN void soft_enter_error(struct soft_qp *qp);
/// Marks message `m` failed (if it is still outstanding). Caller holds qp->lock.
SOFT_HIDDEN void soft_fail_message(struct soft_qp *qp, uint64_t m, enum ibv_wc_status status);
SOFT_HIDDEN int soft_post_send(struct ibv_qp *qp, struct ibv_send_wr *wr, struct ibv_send_wr **bad_wr);
SOFT_HIDDEN int soft_post_recv(struct ibv_qp *qp, struct ibv_recv_wr *wr, struct ibv_recv_wr **bad_wr);
SOFT_HIDDEN int soft_poll_cq(struct ibv_cq *cq, int n, struct ibv_wc *wc);
/// A context's responder thread: executes the packets that arrive at its port.
SOFT_HIDDEN void *soft_responder(void *context);
/// A context's requester thread: reads posted WRITEs' source bytes and sends their packets.
SOFT_HIDDEN void *soft_requester(void *context);
/// Finds the MR with `key` (an lkey or rkey: they are equal here). Caller holds mr_lock.
SOFT_HIDDEN struct soft_mr *soft_find_mr(struct soft_context *ctx, uint32_t key);
SOFT_HIDDEN bool soft_covers(const struct soft_mr *mr, uint64_t va, uint64_t bytes);
SOFT_HIDDEN void soft_cq_push(struct soft_cq *cq, const struct ibv_wc *wc);
SOFT_HIDDEN int soft_req_notify_cq(struct ibv_cq *cq, int solicited_only);
SOFT_HIDDEN bool soft_cq_armed(struct ibv_cq *cq);

#endif
