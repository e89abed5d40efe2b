// soft-rdma-peer SUBNET: one queue pair on the software RDMA device, in a process of its own, driven
// line by line on stdin (the software device's cross-process tests, VerbsFabricTests.swift).
//
// It prints "endpoint QPN LID PSN VA RKEY" (its 4 KiB region), then answers:
//   connect QPN LID PSN       INIT→RTR→RTS towards that queue pair          → "ok"
//   write VA RKEY IMM TEXT    WRITE_WITH_IMM of TEXT, wait for completion  → "sent STATUS"
//   await                     wait for a WRITE_WITH_IMM into its region    → "received STATUS IMM TEXT"
// Failures print "error WHAT ERRNO". End of input ends it.
#include "soft_rdma.h"

#include <arpa/inet.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

enum { REGION_BYTES = 4096, OUTGOING = 2048 };

static int wait_completion(struct ibv_cq *cq, struct ibv_wc *wc) {
    for (int i = 0; i < 10000; i++) {
        if (ibv_poll_cq(cq, 1, wc) == 1) return 1;
        usleep(1000);
    }
    return 0;
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc != 2) { fprintf(stderr, "usage: soft-rdma-peer SUBNET\n"); return 2; }
    struct ibv_context *ctx = soft_rdma_open_device(argv[1], 0);
    if (!ctx) { printf("error open %d\n", errno); return 1; }
    struct ibv_pd *pd = soft_rdma_alloc_pd(ctx);
    struct ibv_cq *cq = soft_rdma_create_cq(ctx, 64, NULL);
    char *region = aligned_alloc(4096, REGION_BYTES);
    memset(region, 0, REGION_BYTES);
    struct ibv_mr *mr = soft_rdma_reg_mr(pd, region, REGION_BYTES, IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE);
    struct ibv_qp_init_attr init = {.send_cq = cq, .recv_cq = cq, .qp_type = IBV_QPT_RC,
                                    .cap = {.max_send_wr = 16, .max_recv_wr = 16, .max_send_sge = 1, .max_recv_sge = 1}};
    struct ibv_qp *qp = pd && cq && mr ? soft_rdma_create_qp(pd, &init) : NULL;
    if (!qp) { printf("error setup %d\n", errno); return 1; }
    struct ibv_qp_attr a = {.qp_state = IBV_QPS_INIT, .port_num = 1,
                            .qp_access_flags = IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE};
    if (soft_rdma_modify_qp(qp, &a, IBV_QP_STATE | IBV_QP_PKEY_INDEX | IBV_QP_PORT | IBV_QP_ACCESS_FLAGS)) {
        printf("error init %d\n", errno);
        return 1;
    }
    for (int i = 0; i < 4; i++) {
        struct ibv_recv_wr r = {.wr_id = (uint64_t)i}, *bad;
        ibv_post_recv(qp, &r, &bad);
    }
    struct ibv_port_attr port;
    soft_rdma_query_port(ctx, 1, &port);
    uint32_t psn = (uint32_t)getpid() & 0xFFFFFF;
    printf("endpoint %u %u %u %" PRIu64 " %u\n", qp->qp_num, port.lid, psn, (uint64_t)(uintptr_t)region, mr->rkey);

    char line[512];
    while (fgets(line, sizeof line, stdin)) {
        unsigned dest, lid, dest_psn, rkey, imm;
        uint64_t va;
        char text[256];
        struct ibv_wc wc;
        if (sscanf(line, "connect %u %u %u", &dest, &lid, &dest_psn) == 3) {
            struct ibv_qp_attr rtr = {.qp_state = IBV_QPS_RTR, .path_mtu = IBV_MTU_1024, .dest_qp_num = dest,
                                      .rq_psn = dest_psn, .max_dest_rd_atomic = 1, .min_rnr_timer = 12,
                                      .ah_attr = {.dlid = (uint16_t)lid, .port_num = 1}};
            struct ibv_qp_attr rts = {.qp_state = IBV_QPS_RTS, .sq_psn = psn, .timeout = 14, .retry_cnt = 7,
                                      .rnr_retry = 7, .max_rd_atomic = 1};
            int rc = soft_rdma_modify_qp(qp, &rtr, IBV_QP_STATE | IBV_QP_AV | IBV_QP_PATH_MTU | IBV_QP_DEST_QPN |
                                                       IBV_QP_RQ_PSN | IBV_QP_MAX_DEST_RD_ATOMIC | IBV_QP_MIN_RNR_TIMER);
            if (!rc) rc = soft_rdma_modify_qp(qp, &rts, IBV_QP_STATE | IBV_QP_SQ_PSN | IBV_QP_TIMEOUT | IBV_QP_RETRY_CNT |
                                                            IBV_QP_RNR_RETRY | IBV_QP_MAX_QP_RD_ATOMIC);
            if (rc) printf("error connect %d\n", rc); else printf("ok\n");
        } else if (sscanf(line, "write %" SCNu64 " %u %u %255s", &va, &rkey, &imm, text) == 4) {
            size_t n = strlen(text);
            memcpy(region + OUTGOING, text, n);
            struct ibv_sge sge = {.addr = (uintptr_t)(region + OUTGOING), .length = (uint32_t)n, .lkey = mr->lkey};
            struct ibv_send_wr wr = {.wr_id = 1, .sg_list = &sge, .num_sge = 1, .opcode = IBV_WR_RDMA_WRITE_WITH_IMM,
                                     .send_flags = IBV_SEND_SIGNALED, .imm_data = htonl(imm)}, *bad;
            wr.wr.rdma.remote_addr = va;
            wr.wr.rdma.rkey = rkey;
            int rc = ibv_post_send(qp, &wr, &bad);
            if (rc) printf("error post %d\n", rc);
            else if (!wait_completion(cq, &wc)) printf("error timeout 0\n");
            else printf("sent %d\n", wc.status);
        } else if (strncmp(line, "await", 5) == 0) {
            if (!wait_completion(cq, &wc)) printf("error timeout 0\n");
            else printf("received %d %u %.*s\n", wc.status, ntohl(wc.imm_data), (int)wc.byte_len, region);
        } else {
            printf("error command 0\n");
        }
    }
    soft_rdma_destroy_qp(qp);
    soft_rdma_dereg_mr(mr);
    soft_rdma_destroy_cq(cq);
    soft_rdma_dealloc_pd(pd);
    soft_rdma_close_device(ctx);
    free(region);
    return 0;
}
