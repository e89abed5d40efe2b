// The control path: the subnet, contexts, PDs, MRs, CQs, QPs and their transitions.
#include "soft_rdma_private.h"

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
    ctx->ibv.ops.post_send = soft_post_send;
    ctx->ibv.ops.post_recv = soft_post_recv;
    ctx->ibv.ops.poll_cq = soft_poll_cq;
    ctx->ibv.ops.req_notify_cq = soft_req_notify_cq;
    ctx->ibv.cmd_fd = ctx->ibv.async_fd = -1;
    ctx->ibv.num_comp_vectors = 1;
    pthread_mutex_init(&ctx->ibv.mutex, NULL);
    pthread_mutex_init(&ctx->lock, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&ctx->work, &ca);
    pthread_rwlock_init(&ctx->mr_lock, NULL);
    struct timespec seed;
    clock_gettime(CLOCK_MONOTONIC, &seed);
    atomic_store(&ctx->random, (uint64_t)seed.tv_nsec ^ (uint64_t)getpid() << 32 ^ (uint64_t)port);
    int rc = pthread_create(&ctx->responder, NULL, soft_responder, ctx);
    if (!rc) {
        rc = pthread_create(&ctx->requester, NULL, soft_requester, ctx);
        if (rc) {
            atomic_store(&ctx->stopping, true);
            pthread_join(ctx->responder, NULL);
        }
    }
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
    pthread_mutex_lock(&ctx->lock);
    pthread_cond_signal(&ctx->work);
    pthread_mutex_unlock(&ctx->lock);
    pthread_join(ctx->requester, NULL);
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

/// The bytes of the whole pages `length` bytes at `addr` touch.
static uint64_t pinned_bytes(const void *addr, size_t length) {
    uint64_t page = (uint64_t)sysconf(_SC_PAGESIZE), start = (uint64_t)(uintptr_t)addr;
    return ((start + length + page - 1) / page - start / page) * page;
}

void soft_rdma_set_memlock_limit(struct ibv_context *context, uint64_t bytes) {
    struct soft_context *ctx = context_of(context);
    pthread_rwlock_wrlock(&ctx->mr_lock);
    ctx->memlock_limit = bytes;
    pthread_rwlock_unlock(&ctx->mr_lock);
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
    // Pinning counts whole pages, as the kernel does against RLIMIT_MEMLOCK; over the limit
    // ibv_reg_mr fails with ENOMEM (a process with CAP_IPC_LOCK, like the tests', has no limit
    // there: this one is set with soft_rdma_set_memlock_limit).
    uint64_t pages = pinned_bytes(addr, length);
    if (ctx->memlock_limit && ctx->pinned + pages > ctx->memlock_limit) {
        pthread_rwlock_unlock(&ctx->mr_lock);
        free(mr);
        errno = ENOMEM;
        return NULL;
    }
    ctx->pinned += pages;
    if (ctx->mr_count == ctx->mr_capacity) {
        int capacity = ctx->mr_capacity ? 2 * ctx->mr_capacity : 16;
        struct soft_mr **grown = realloc(ctx->mrs, (size_t)capacity * sizeof *grown);
        if (!grown) { ctx->pinned -= pages; pthread_rwlock_unlock(&ctx->mr_lock); free(mr); errno = ENOMEM; return NULL; }
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
    ctx->pinned -= pinned_bytes(ibmr->addr, ibmr->length);
    pthread_rwlock_unlock(&ctx->mr_lock);
    atomic_fetch_sub(&((struct soft_pd *)ibmr->pd)->users, 1);
    free(mr);
    return 0;
}

struct ibv_cq *soft_rdma_create_cq(struct ibv_context *context, int cqe, struct ibv_comp_channel *channel) {
    struct soft_context *ctx = context_of(context);
    if (cqe <= 0 || cqe > (1 << 22)) { errno = EINVAL; return NULL; }
    struct soft_cq *cq = calloc(1, sizeof *cq);
    if (cq) cq->entries = calloc((size_t)cqe, sizeof *cq->entries);
    if (!cq || !cq->entries) { free(cq); errno = ENOMEM; return NULL; }
    cq->ibv.context = context;
    cq->ibv.channel = channel;
    cq->ibv.cqe = cq->capacity = cqe;
    cq->channel = (struct soft_channel *)channel;
    if (cq->channel) atomic_fetch_add(&cq->channel->users, 1);
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
    if (cq->channel) atomic_fetch_sub(&cq->channel->users, 1);
    free(cq->entries);
    free(cq);
    return 0;
}

struct ibv_comp_channel *soft_rdma_create_comp_channel(struct ibv_context *context) {
    struct soft_channel *ch = calloc(1, sizeof *ch);
    if (!ch) { errno = ENOMEM; return NULL; }
    int fds[2];
    if (pipe2(fds, O_NONBLOCK | O_CLOEXEC) != 0) { int e = errno; free(ch); errno = e; return NULL; }
    ch->ibv.context = context;
    ch->ibv.fd = fds[0];
    ch->write_fd = fds[1];
    return &ch->ibv;
}

int soft_rdma_destroy_comp_channel(struct ibv_comp_channel *channel) {
    struct soft_channel *ch = (struct soft_channel *)channel;
    if (atomic_load(&ch->users)) return EBUSY;
    close(ch->ibv.fd);
    close(ch->write_fd);
    free(ch);
    return 0;
}

int soft_rdma_get_cq_event(struct ibv_comp_channel *channel, struct ibv_cq **cq) {
    uint64_t handle;
    ssize_t n = read(channel->fd, &handle, sizeof handle);
    if (n != (ssize_t)sizeof handle) { if (n >= 0) errno = EIO; return -1; }
    *cq = (struct ibv_cq *)(uintptr_t)handle;
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
        soft_harvest(qp);  // what already landed completes as such; the rest is flushed
        soft_enter_error(qp);
    } else if (a->qp_state == IBV_QPS_RESET) {
        qp->sq_count = qp->sq_sent = qp->rq_count = 0;
        atomic_store(&qp->shared->acked, (uint64_t)qp->ibv.qp_num << 40);
        atomic_store(&qp->shared->nak, 0);
        soft_set_state(qp, IBV_QPS_RESET);
    } else {
        soft_set_state(qp, a->qp_state);
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
    pthread_mutex_lock(&qp->send_lock);  // the requester is done sending for it
    pthread_mutex_unlock(&qp->send_lock);
    soft_set_state(qp, IBV_QPS_RESET);
    atomic_store(&qp->shared->qpn, 0);
    atomic_fetch_sub(&((struct soft_pd *)ibqp->pd)->users, 1);
    atomic_fetch_sub(&cq_of(ibqp->send_cq)->users, 1);
    atomic_fetch_sub(&cq_of(ibqp->recv_cq)->users, 1);
    free(qp->sq);
    free(qp->rq);
    free(qp);
    return 0;
}
