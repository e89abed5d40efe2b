// A software RDMA device for tests: the public libibverbs structures with reliable-connected (RC)
// semantics carried out in software, so code written against verbs runs without an RDMA device.
// A test double, not a product (docs/design/fabric.md, "Verbs under test").
//
// Contexts attach to a *subnet*: a file in shared memory that contexts in one process or in several
// processes on the host map. Each context is one port (LID, GID) with a packet ring in the subnet.
// The data path is the real one: a context's `ops` carry `post_send`, `post_recv` and `poll_cq`, so
// libibverbs' inline `ibv_post_send`, `ibv_post_recv` and `ibv_poll_cq` dispatch here exactly as
// they dispatch to a hardware provider. The control path is the functions below; they take and
// return the public verbs structures and follow libibverbs' conventions: pointer results are NULL
// with errno set, int results are 0 or an errno value.
//
// What it does, as RC hardware does:
// - QPs move RESET → INIT → RTR → RTS (any state → ERR or RESET); each transition must carry the
//   attribute mask verbs requires for it (EINVAL otherwise). Sends need RTS; receives need INIT+.
// - RDMA WRITE and WRITE_WITH_IMM are cut into path-MTU packets with consecutive PSNs; the responder
//   lands them only if its QP is in RTR/RTS, is connected to the sender's QP, expects that PSN, and
//   the rkey names an MR of the QP's PD with REMOTE_WRITE covering the range, with REMOTE_WRITE in
//   the QP's access flags. Writes on one QP land in posting order.
// - A WRITE's source bytes are read after the post, when the context's requester thread sends its
//   packets (a NIC reads them by DMA then), so a send buffer reused before its completion sends
//   the new bytes. `soft_rdma_set_read_delay` makes that moment a random point later still.
// - Completions: the sender's after the bytes landed (signalled ones, and every error); the
//   target's for WRITE_WITH_IMM only (IBV_WC_RECV_RDMA_WITH_IMM, consuming a posted receive; with
//   none posted the responder waits, as with an infinite RNR retry count).
// - A bad rkey, bounds or access: IBV_WC_REM_ACCESS_ERR for the sender, and both QPs enter ERR.
// - A target QP that is gone, not connected to the sender, in ERR/RESET, or behind a dead process:
//   the write is dropped and the sender gets IBV_WC_RETRY_EXC_ERR (its retries would run out).
// - Moving a QP to ERR completes every outstanding work request with IBV_WC_WR_FLUSH_ERR (posted
//   receives too), and incoming writes are refused from then on. Moving it to RESET discards them
//   without completions, as the IB spec and hardware do. Writes from a QP in ERR never land.
// - Destroying a PD, CQ or context that still has users fails with EBUSY, as hardware does.
// - Registering memory past a memlock limit fails with ENOMEM, as `ibv_reg_mr` does past
//   RLIMIT_MEMLOCK; the limit is set per context (`soft_rdma_set_memlock_limit`), since the tests
//   run as root, whose CAP_IPC_LOCK lifts the real one.
#ifndef SOFT_RDMA_H
#define SOFT_RDMA_H

#include <infiniband/verbs.h>

#ifdef __cplusplus
extern "C" {
#endif

/// Creates the subnet file at `path` (it must not exist): 0 or an errno value.
int soft_rdma_subnet_create(const char *path);
/// Removes the subnet file; contexts still attached keep working.
int soft_rdma_subnet_remove(const char *path);

/// Attaches a new port to the subnet and opens a context on it. `ethernet` non-zero makes it a
/// RoCE-like port (LID 0, addressed by GID only); otherwise an InfiniBand port with a LID.
struct ibv_context *soft_rdma_open_device(const char *subnet_path, int ethernet);
int soft_rdma_close_device(struct ibv_context *context);

/// Reads each WRITE's source bytes at a random point up to `max_microseconds` after its post (still
/// in posting order on each QP) instead of as soon as the requester thread gets to it: tests that
/// check a caller leaves its send buffers alone until their completion. 0 (the default) turns it off.
void soft_rdma_set_read_delay(struct ibv_context *context, unsigned max_microseconds);

/// Limits the bytes the context's MRs may pin (whole pages, as the kernel counts them against
/// RLIMIT_MEMLOCK): `soft_rdma_reg_mr` past it fails with ENOMEM. 0 (the default): no limit.
void soft_rdma_set_memlock_limit(struct ibv_context *context, uint64_t bytes);

int soft_rdma_query_port(struct ibv_context *context, uint8_t port_num, struct ibv_port_attr *port_attr);
int soft_rdma_query_gid(struct ibv_context *context, uint8_t port_num, int index, union ibv_gid *gid);

struct ibv_pd *soft_rdma_alloc_pd(struct ibv_context *context);
int soft_rdma_dealloc_pd(struct ibv_pd *pd);

struct ibv_mr *soft_rdma_reg_mr(struct ibv_pd *pd, void *addr, size_t length, int access);
int soft_rdma_dereg_mr(struct ibv_mr *mr);

/// A CQ; with a `channel` (or NULL), `ibv_req_notify_cq` arms it, and its next completion puts one
/// event on the channel, as a NIC's interrupt does.
struct ibv_cq *soft_rdma_create_cq(struct ibv_context *context, int cqe, struct ibv_comp_channel *channel);
int soft_rdma_destroy_cq(struct ibv_cq *cq);
/// Completions dropped because the CQ was full (hardware would raise a CQ error).
unsigned long soft_rdma_cq_overruns(struct ibv_cq *cq);

/// A completion channel: its `fd` (non-blocking) is readable while it holds events.
struct ibv_comp_channel *soft_rdma_create_comp_channel(struct ibv_context *context);
/// EBUSY while a CQ uses it.
int soft_rdma_destroy_comp_channel(struct ibv_comp_channel *channel);
/// Takes one event off the channel: 0 and its CQ, or -1 with errno EAGAIN when none is there.
int soft_rdma_get_cq_event(struct ibv_comp_channel *channel, struct ibv_cq **cq);

struct ibv_qp *soft_rdma_create_qp(struct ibv_pd *pd, struct ibv_qp_init_attr *attr);
int soft_rdma_modify_qp(struct ibv_qp *qp, struct ibv_qp_attr *attr, int attr_mask);
int soft_rdma_destroy_qp(struct ibv_qp *qp);

#ifdef __cplusplus
}
#endif

#endif
