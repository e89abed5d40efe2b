// The data path: completions, posted receives, and the responder that lands packets (sending is in
// requester.c).
#include "soft_rdma_private.h"

// ---- completions ----

void soft_cq_push(struct soft_cq *cq, const struct ibv_wc *wc) {
    pthread_mutex_lock(&cq->lock);
    if (cq->count == cq->capacity) cq->overruns++;
    else cq->entries[(cq->head + cq->count++) % cq->capacity] = *wc;
    bool event = cq->armed && cq->channel;
    cq->armed = false;
    // The channel outlives the CQ (it counts the CQs bound to it), and the CQ its QPs.
    if (event) {
        uint64_t handle = (uint64_t)(uintptr_t)&cq->ibv;
        (void)!write(cq->channel->write_fd, &handle, sizeof handle);
    }
    pthread_mutex_unlock(&cq->lock);
}

int soft_req_notify_cq(struct ibv_cq *ibcq, int solicited_only) {
    (void)solicited_only;  // every completion here is one a caller asked for
    struct soft_cq *cq = cq_of(ibcq);
    if (!cq->channel) return EINVAL;
    pthread_mutex_lock(&cq->lock);
    cq->armed = true;
    pthread_mutex_unlock(&cq->lock);
    // The requester looks at outstanding sends' acks while their CQ is armed: wake it now rather
    // than at its next timed pass.
    struct soft_context *ctx = context_of(ibcq->context);
    pthread_mutex_lock(&ctx->lock);
    pthread_cond_signal(&ctx->work);
    pthread_mutex_unlock(&ctx->lock);
    return 0;
}

bool soft_cq_armed(struct ibv_cq *ibcq) {
    struct soft_cq *cq = cq_of(ibcq);
    pthread_mutex_lock(&cq->lock);
    bool armed = cq->armed;
    pthread_mutex_unlock(&cq->lock);
    return armed;
}

static void complete_send(struct soft_qp *qp, const struct send_entry *e, enum ibv_wc_status status) {
    if (status == IBV_WC_SUCCESS && !e->signaled) return;
    struct ibv_wc wc = {.wr_id = e->wr_id, .status = status, .opcode = IBV_WC_RDMA_WRITE,
                        .byte_len = e->bytes, .qp_num = qp->ibv.qp_num};
    soft_cq_push(cq_of(qp->ibv.send_cq), &wc);
}

void soft_set_state(struct soft_qp *qp, enum ibv_qp_state s) {
    atomic_store(&qp->shared->state, (uint32_t)s);
    qp->ibv.state = s;
}

/// ERR: every outstanding send and posted receive completes flushed. Caller holds qp->lock.
void soft_enter_error(struct soft_qp *qp) {
    soft_set_state(qp, IBV_QPS_ERR);
    for (; qp->sq_count > 0; qp->sq_count--, qp->sq_head = (qp->sq_head + 1) % (int)qp->cap.max_send_wr)
        complete_send(qp, &qp->sq[qp->sq_head], IBV_WC_WR_FLUSH_ERR);
    qp->sq_sent = 0;
    for (; qp->rq_count > 0; qp->rq_count--, qp->rq_head = (qp->rq_head + 1) % (int)qp->cap.max_recv_wr) {
        struct ibv_wc wc = {.wr_id = qp->rq[qp->rq_head], .status = IBV_WC_WR_FLUSH_ERR, .opcode = IBV_WC_RECV,
                            .qp_num = qp->ibv.qp_num};
        soft_cq_push(cq_of(qp->ibv.recv_cq), &wc);
    }
}

/// Whether the QP this one sends to still exists, in a live process.
static bool target_alive(struct soft_qp *qp) {
    struct shared_qp *d = shared_qp(qp->ctx->net, qp->dest_qpn);
    return d && port_alive(&qp->ctx->net->ports[d->port]);
}

/// Turns the acks the target wrote into completions, in posting order. Caller holds qp->lock.
void soft_harvest(struct soft_qp *qp) {
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
        if (qp->sq_sent > 0) qp->sq_sent--;  // a dead target fails work not yet sent too
        complete_send(qp, &done, status);
        if (status != IBV_WC_SUCCESS) { soft_enter_error(qp); return; }
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

int soft_poll_cq(struct ibv_cq *ibcq, int n, struct ibv_wc *wc) {
    struct soft_cq *cq = cq_of(ibcq);
    struct soft_context *ctx = context_of(ibcq->context);
    pthread_mutex_lock(&ctx->lock);
    for (int i = 0; i < QP_SLOTS; i++) {
        struct soft_qp *qp = ctx->qps[i];
        if (!qp || qp->ibv.send_cq != ibcq) continue;
        pthread_mutex_lock(&qp->lock);
        soft_harvest(qp);
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

int soft_post_recv(struct ibv_qp *ibqp, struct ibv_recv_wr *wr, struct ibv_recv_wr **bad_wr) {
    struct soft_qp *qp = qp_of(ibqp);
    int rc = 0;
    pthread_mutex_lock(&qp->lock);
    for (; wr; wr = wr->next) {
        uint32_t state = atomic_load(&qp->shared->state);
        if (state == IBV_QPS_RESET || wr->num_sge < 0 || (uint32_t)wr->num_sge > qp->cap.max_recv_sge) rc = EINVAL;
        else if ((uint32_t)qp->rq_count >= qp->cap.max_recv_wr) rc = ENOMEM;
        if (rc) break;
        qp->rq[(qp->rq_head + qp->rq_count++) % (int)qp->cap.max_recv_wr] = wr->wr_id;
        if (state == IBV_QPS_ERR) soft_enter_error(qp);
    }
    pthread_mutex_unlock(&qp->lock);
    if (rc) *bad_wr = wr;
    return rc;
}

// ---- the responder ----

struct soft_mr *soft_find_mr(struct soft_context *ctx, uint32_t key) {
    for (int i = 0; i < ctx->mr_count; i++)
        if (ctx->mrs[i]->ibv.rkey == key) return ctx->mrs[i];
    return NULL;
}

bool soft_covers(const struct soft_mr *mr, uint64_t va, uint64_t bytes) {
    uint64_t base = (uint64_t)(uintptr_t)mr->ibv.addr;
    return va >= base && bytes <= mr->ibv.length && va - base <= mr->ibv.length - bytes;
}

/// Checks the rkey, PD, access and bounds, and lands the packet's bytes.
static bool land(struct soft_qp *qp, const struct packet *h, const uint8_t *payload) {
    if (!(qp->access & IBV_ACCESS_REMOTE_WRITE)) return false;
    if (h->message_bytes == 0) return true;
    pthread_rwlock_rdlock(&qp->ctx->mr_lock);
    struct soft_mr *mr = soft_find_mr(qp->ctx, h->rkey);
    bool ok = mr && mr->ibv.pd == qp->ibv.pd && (mr->access & IBV_ACCESS_REMOTE_WRITE) &&
              (!(h->flags & FIRST) || soft_covers(mr, h->message_va, h->message_bytes)) && soft_covers(mr, h->va, h->bytes);
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
        soft_enter_error(qp);
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
                soft_cq_push(cq_of(qp->ibv.recv_cq), &wc);
            }
            ack(src, h);
        }
    }
    pthread_mutex_unlock(&qp->lock);
    return consumed;
}

void *soft_responder(void *arg) {
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
