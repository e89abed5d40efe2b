// Sending: posting WRITEs and the requester thread that carries them out.
//
// `ibv_post_send` only queues the work request: its gather list (addresses and lengths), the remote
// address and key. The context's requester thread reads the source bytes later, packet by packet,
// straight into the target port's ring — when a NIC's DMA engine would read them. Verbs lets a
// caller reuse a send buffer only once its completion (or a later signalled one) arrived; a caller
// that reuses it earlier sends whatever is there when the requester gets to it, as on hardware.
// `soft_rdma_set_read_delay` pushes that moment to a random point later still.
#include "soft_rdma_private.h"

static inline struct send_entry *sq_at(struct soft_qp *qp, int i) {
    return &qp->sq[(qp->sq_head + i) % (int)qp->cap.max_send_wr];
}

void soft_fail_message(struct soft_qp *qp, uint64_t m, enum ibv_wc_status status) {
    for (int i = 0; i < qp->sq_count; i++) {
        struct send_entry *e = sq_at(qp, i);
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

/// splitmix64: a random read delay per work request, without a lock.
static uint64_t next_random(struct soft_context *ctx) {
    uint64_t z = atomic_fetch_add(&ctx->random, 0x9E3779B97F4A7C15ull) + 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static void add_microseconds(struct timespec *t, uint64_t us) {
    t->tv_nsec += (long)(us % 1000000u) * 1000L;
    t->tv_sec += (time_t)(us / 1000000u) + t->tv_nsec / 1000000000L;
    t->tv_nsec %= 1000000000L;
}

static bool before(const struct timespec *a, const struct timespec *b) {
    return a->tv_sec < b->tv_sec || (a->tv_sec == b->tv_sec && a->tv_nsec < b->tv_nsec);
}

void soft_rdma_set_read_delay(struct ibv_context *context, unsigned max_microseconds) {
    atomic_store(&context_of(context)->read_delay_us, max_microseconds);
}

int soft_post_send(struct ibv_qp *ibqp, struct ibv_send_wr *wr, struct ibv_send_wr **bad_wr) {
    struct soft_qp *qp = qp_of(ibqp);
    struct soft_context *ctx = qp->ctx;
    int rc = 0, queued = 0;
    uint32_t delay = atomic_load(&ctx->read_delay_us);
    pthread_mutex_lock(&qp->lock);
    for (; wr; wr = wr->next) {
        uint32_t state = atomic_load(&qp->shared->state);
        if (state != IBV_QPS_RTS && state != IBV_QPS_ERR) rc = EINVAL;
        else if (wr->opcode != IBV_WR_RDMA_WRITE && wr->opcode != IBV_WR_RDMA_WRITE_WITH_IMM) rc = EINVAL;
        else if (wr->num_sge < 0 || (uint32_t)wr->num_sge > qp->cap.max_send_sge) rc = EINVAL;
        // No inline data (its bytes would have to be read now): max_inline_data is 0 here.
        else if (wr->send_flags & IBV_SEND_INLINE) rc = EINVAL;
        else if ((uint32_t)qp->sq_count >= qp->cap.max_send_wr) rc = ENOMEM;
        if (rc) break;
        uint64_t total = 0;
        for (int i = 0; i < wr->num_sge; i++) total += wr->sg_list[i].length;
        struct send_entry *e = sq_at(qp, qp->sq_count++);
        *e = (struct send_entry){.wr_id = wr->wr_id, .message = ++qp->next_message, .bytes = (uint32_t)total,
                                 .signaled = qp->signal_all || (wr->send_flags & IBV_SEND_SIGNALED),
                                 .failed = IBV_WC_SUCCESS, .num_sge = wr->num_sge,
                                 .with_imm = wr->opcode == IBV_WR_RDMA_WRITE_WITH_IMM,
                                 .imm = wr->opcode == IBV_WR_RDMA_WRITE_WITH_IMM ? wr->imm_data : 0,
                                 .remote_addr = wr->wr.rdma.remote_addr, .rkey = wr->wr.rdma.rkey};
        memcpy(e->sge, wr->sg_list, (size_t)wr->num_sge * sizeof *e->sge);
        clock_gettime(CLOCK_MONOTONIC, &e->posted);
        e->due = e->posted;
        if (delay) add_microseconds(&e->due, next_random(ctx) % (delay + 1u));
        if (state == IBV_QPS_ERR) { soft_enter_error(qp); continue; }
        e->port = route(qp);
        if (total > (1u << 31)) e->failed = IBV_WC_LOC_LEN_ERR;
        else if (e->port < 0) e->failed = IBV_WC_RETRY_EXC_ERR;  // nobody answers at that address
        if (e->failed != IBV_WC_SUCCESS) continue;
        e->packets = total == 0 ? 1 : (uint32_t)((total + qp->mtu_bytes - 1) / qp->mtu_bytes);
        e->psn = qp->next_psn;
        qp->next_psn = (qp->next_psn + e->packets) & PSN_MASK;
        queued++;
    }
    pthread_mutex_unlock(&qp->lock);
    if (queued) {
        pthread_mutex_lock(&ctx->lock);
        pthread_cond_signal(&ctx->work);
        pthread_mutex_unlock(&ctx->lock);
    }
    if (rc) *bad_wr = wr;
    return rc;
}

/// Local protection, checked when the device reads the buffers: every gathered range lies in an
/// MR of the QP's PD.
static bool local_access_ok(struct soft_qp *qp, const struct send_entry *e) {
    bool ok = true;
    pthread_rwlock_rdlock(&qp->ctx->mr_lock);
    for (int i = 0; ok && i < e->num_sge; i++) {
        struct soft_mr *mr = soft_find_mr(qp->ctx, e->sge[i].lkey);
        ok = mr && mr->ibv.pd == qp->ibv.pd && soft_covers(mr, e->sge[i].addr, e->sge[i].length);
    }
    pthread_rwlock_unlock(&qp->ctx->mr_lock);
    return ok;
}

/// Reads `bytes` of `e`'s gather list from byte `offset` on into `to`: the moment the device looks
/// at the source buffers.
static void gather(const struct send_entry *e, uint64_t offset, uint32_t bytes, uint8_t *to) {
    for (int i = 0; i < e->num_sge && bytes > 0; i++) {
        uint64_t length = e->sge[i].length;
        if (offset >= length) { offset -= length; continue; }
        uint32_t n = (uint32_t)(length - offset < bytes ? length - offset : bytes);
        memcpy(to, (const uint8_t *)(uintptr_t)e->sge[i].addr + offset, n);
        to += n;
        bytes -= n;
        offset = 0;
    }
}

/// Puts one packet into `port`'s ring, reading its payload from the source buffers, waiting while
/// the ring is full. False: the target is gone or stuck.
static bool ring_push(struct subnet *n, int port, const struct packet *h, const struct send_entry *e, uint64_t offset) {
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
    gather(e, offset, h->bytes, ring + at + sizeof *h);
    p->head += need;
    pthread_cond_signal(&p->readable);
    pthread_mutex_unlock(&p->lock);
    return true;
}

/// Sends the packets of one work request. Caller holds qp->send_lock and nothing else.
static void transmit(struct soft_qp *qp, const struct send_entry *e) {
    if (!local_access_ok(qp, e)) {
        pthread_mutex_lock(&qp->lock);
        soft_fail_message(qp, e->message, IBV_WC_LOC_PROT_ERR);
        pthread_mutex_unlock(&qp->lock);
        return;
    }
    uint32_t mtu = qp->mtu_bytes;
    struct packet h = {.kind = PACKET_DATA, .dest_qpn = qp->dest_qpn, .src_qpn = qp->ibv.qp_num, .psn = e->psn,
                       .message = e->message, .message_va = e->remote_addr, .message_bytes = e->bytes,
                       .rkey = e->rkey, .imm = e->imm};
    for (uint32_t i = 0; i < e->packets; i++) {
        uint64_t offset = (uint64_t)i * mtu;
        h.bytes = (uint32_t)(e->bytes - offset < mtu ? e->bytes - offset : mtu);
        h.flags = (i == 0 ? FIRST : 0) | (i == e->packets - 1 ? LAST : 0) | (e->with_imm ? WITH_IMM : 0);
        h.va = e->remote_addr + offset;
        if (!ring_push(qp->ctx->net, e->port, &h, e, offset)) {
            pthread_mutex_lock(&qp->lock);
            soft_fail_message(qp, e->message, IBV_WC_RETRY_EXC_ERR);
            pthread_mutex_unlock(&qp->lock);
            return;
        }
        h.psn = (h.psn + 1) & PSN_MASK;
    }
}

/// The next due work request of `qp`, copied into `out` and counted as sent. Otherwise false, and
/// `earliest` moves to when its next one falls due. Caller holds qp->lock.
static bool take_due(struct soft_qp *qp, const struct timespec *now, struct send_entry *out, struct timespec *earliest) {
    // Work that failed at post time has nothing to send.
    while (qp->sq_sent < qp->sq_count && sq_at(qp, qp->sq_sent)->failed != IBV_WC_SUCCESS) qp->sq_sent++;
    if (qp->sq_sent == qp->sq_count) return false;
    struct send_entry *e = sq_at(qp, qp->sq_sent);
    if (before(now, &e->due)) {
        if (before(&e->due, earliest)) *earliest = e->due;
        return false;
    }
    *out = *e;
    qp->sq_sent++;
    return true;
}

void *soft_requester(void *arg) {
    struct soft_context *ctx = arg;
    struct send_entry e;
    int next = 0;  // round robin over the QPs, one work request each
    pthread_mutex_lock(&ctx->lock);
    while (!atomic_load(&ctx->stopping)) {
        struct timespec now, earliest;
        clock_gettime(CLOCK_MONOTONIC, &now);
        earliest = now;
        add_microseconds(&earliest, 50000);  // wakes regardless now and then
        struct soft_qp *qp = NULL;
        for (int k = 0; k < QP_SLOTS && !qp; k++) {
            struct soft_qp *q = ctx->qps[(next + k) % QP_SLOTS];
            if (!q) continue;
            pthread_mutex_lock(&q->lock);
            // A NIC raises a send's completion when its ack comes back; here the acks are words
            // the target writes in shared memory, so while a CQ waits for an event they are
            // looked at every millisecond.
            if (q->sq_count > 0 && soft_cq_armed(q->ibv.send_cq)) {
                soft_harvest(q);
                struct timespec soon = now;
                add_microseconds(&soon, 1000);
                if (q->sq_count > 0 && before(&soon, &earliest)) earliest = soon;
            }
            if (take_due(q, &now, &e, &earliest)) {
                qp = q;
                next = (next + k + 1) % QP_SLOTS;
            }
            pthread_mutex_unlock(&q->lock);
        }
        if (!qp) {
            pthread_cond_timedwait(&ctx->work, &ctx->lock, &earliest);
            continue;
        }
        // Taken before the context lock goes: `destroy_qp` waits for it before freeing the QP.
        pthread_mutex_lock(&qp->send_lock);
        pthread_mutex_unlock(&ctx->lock);
        transmit(qp, &e);
        pthread_mutex_unlock(&qp->send_lock);
        pthread_mutex_lock(&ctx->lock);
    }
    pthread_mutex_unlock(&ctx->lock);
    return NULL;
}
