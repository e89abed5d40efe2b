// Test support shared by the test targets (RDMAPaxosTests, VMReplicaTests): `VerbsFabric` over the
// software RDMA device of Tests/SoftRDMA. `package` access: visible to this package's tests only.

import CVerbs
import Foundation
import RDMAPaxos
import SoftRDMA
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// A subnet of the software RDMA device (`Tests/SoftRDMA`): a file in /dev/shm that contexts in this
/// and other processes attach to. The file goes when the last user lets go.
package final class SoftSubnet: Sendable {
    package let path: String

    package init() throws {
        path = "/dev/shm/plover-softrdma-\(getpid())-\(UUID().uuidString.prefix(8))"
        let rc = soft_rdma_subnet_create(path)
        guard rc == 0 else {
            throw VerbsError(operation: "soft_rdma_subnet_create", code: rc, message: "cannot create the software RDMA subnet \(path): errno \(rc)")
        }
    }

    deinit { _ = soft_rdma_subnet_remove(path) }
}

/// What a `SoftVerbs` driver opened and closed: every context must be closed once its fabric is
/// gone, which needs every queue pair, registration, CQ and PD released first (the device refuses
/// otherwise, as hardware does).
///
/// It also counts the queue pairs created and those moved to RTR, so a test can show that a peer
/// refused at connect got no queue pair, or none past INIT.
package final class SoftVerbsLedger: Sendable {
    private struct Counts { var opened = 0, closed = 0, queuePairs = 0, readyToReceive = 0 }
    private let counts = Mutex(Counts())
    package init() {}
    func opened() { counts.withLock { $0.opened += 1 } }
    func closed() { counts.withLock { $0.closed += 1 } }
    func createdQueuePair() { counts.withLock { $0.queuePairs += 1 } }
    func movedToReadyToReceive() { counts.withLock { $0.readyToReceive += 1 } }
    package var openContexts: Int { counts.withLock { $0.opened - $0.closed } }
    package var everOpened: Int { counts.withLock { $0.opened } }
    /// Queue pairs created through drivers that share this ledger.
    package var queuePairsCreated: Int { counts.withLock { $0.queuePairs } }
    /// Successful INIT → RTR transitions through drivers that share this ledger.
    package var queuePairsReadyToReceive: Int { counts.withLock { $0.readyToReceive } }
}

/// `VerbsDriver` over the software RDMA device: VerbsFabric's control path calls these; its data
/// path (`ibv_post_send`, `ibv_post_recv`, `ibv_poll_cq`) reaches the device through the context's ops.
package struct SoftVerbs: VerbsDriver {
    package let subnet: SoftSubnet
    /// A RoCE-like port (addressed by GID) instead of an InfiniBand one (addressed by LID).
    package var ethernet = false
    package var ledger = SoftVerbsLedger()
    /// Each WRITE's source bytes are read at a random point up to this long after its post
    /// (`soft_rdma_set_read_delay`); 0: as soon as the device's requester thread gets to it.
    package var readDelayMicroseconds: UInt32 = 0
    /// The memlock limit the device enforces on registrations (`soft_rdma_set_memlock_limit`); nil:
    /// none (as for a process with CAP_IPC_LOCK, which the tests are).
    package var memlockLimitBytes: UInt64?

    package init(subnet: SoftSubnet, ethernet: Bool = false, ledger: SoftVerbsLedger = SoftVerbsLedger(),
                 readDelayMicroseconds: UInt32 = 0) {
        self.subnet = subnet
        self.ethernet = ethernet
        self.ledger = ledger
        self.readDelayMicroseconds = readDelayMicroseconds
    }

    package var deviceName: String { ethernet ? "soft_roce" : "soft_ib" }

    package func deviceNames() throws(VerbsError) -> [String] { [deviceName] }

    package func openDevice(named name: String?) throws(VerbsError) -> (name: String, context: UnsafeMutablePointer<ibv_context>) {
        guard name == nil || name == deviceName else {
            throw VerbsError(operation: "soft_rdma_open_device", code: ENODEV, message: "no RDMA device named \(name ?? "?")")
        }
        let context = try Verbs.check(soft_rdma_open_device(subnet.path, ethernet ? 1 : 0), "soft_rdma_open_device")
        soft_rdma_set_read_delay(context, readDelayMicroseconds)
        soft_rdma_set_memlock_limit(context, memlockLimitBytes ?? 0)
        ledger.opened()
        return (deviceName, context)
    }

    package func closeDevice(_ context: UnsafeMutablePointer<ibv_context>) -> Int32 {
        let rc = soft_rdma_close_device(context)
        if rc == 0 { ledger.closed() }
        return rc
    }

    package func queryPort(_ context: UnsafeMutablePointer<ibv_context>, _ port: UInt8, _ attributes: inout ibv_port_attr) -> Int32 {
        soft_rdma_query_port(context, port, &attributes)
    }

    package func queryGID(_ context: UnsafeMutablePointer<ibv_context>, _ port: UInt8, _ index: Int32, _ gid: inout ibv_gid) -> Int32 {
        soft_rdma_query_gid(context, port, index, &gid)
    }

    package func allocateProtectionDomain(_ context: UnsafeMutablePointer<ibv_context>) -> UnsafeMutablePointer<ibv_pd>? {
        soft_rdma_alloc_pd(context)
    }

    package func deallocateProtectionDomain(_ pd: UnsafeMutablePointer<ibv_pd>) -> Int32 { soft_rdma_dealloc_pd(pd) }

    package func registerMemory(_ pd: UnsafeMutablePointer<ibv_pd>, _ base: UnsafeMutableRawPointer, _ lengthBytes: Int,
                        _ access: Int32) -> UnsafeMutablePointer<ibv_mr>? {
        soft_rdma_reg_mr(pd, base, lengthBytes, access)
    }

    package func deregisterMemory(_ mr: UnsafeMutablePointer<ibv_mr>) -> Int32 { soft_rdma_dereg_mr(mr) }

    package func createCompletionChannel(_ context: UnsafeMutablePointer<ibv_context>) -> UnsafeMutablePointer<ibv_comp_channel>? {
        soft_rdma_create_comp_channel(context)
    }

    package func destroyCompletionChannel(_ channel: UnsafeMutablePointer<ibv_comp_channel>) -> Int32 {
        soft_rdma_destroy_comp_channel(channel)
    }

    package func takeCompletionEvent(_ channel: UnsafeMutablePointer<ibv_comp_channel>) -> Int32 {
        var cq: UnsafeMutablePointer<ibv_cq>?
        return soft_rdma_get_cq_event(channel, &cq)
    }

    package func createCompletionQueue(_ context: UnsafeMutablePointer<ibv_context>, _ entries: Int32,
                                       _ channel: UnsafeMutablePointer<ibv_comp_channel>?) -> UnsafeMutablePointer<ibv_cq>? {
        soft_rdma_create_cq(context, entries, channel)
    }

    package func destroyCompletionQueue(_ cq: UnsafeMutablePointer<ibv_cq>) -> Int32 { soft_rdma_destroy_cq(cq) }

    package func createQueuePair(_ pd: UnsafeMutablePointer<ibv_pd>, _ attributes: inout ibv_qp_init_attr) -> UnsafeMutablePointer<ibv_qp>? {
        let qp = soft_rdma_create_qp(pd, &attributes)
        if qp != nil { ledger.createdQueuePair() }
        return qp
    }

    package func modifyQueuePair(_ qp: UnsafeMutablePointer<ibv_qp>, _ attributes: inout ibv_qp_attr, _ mask: Int32) -> Int32 {
        let rc = soft_rdma_modify_qp(qp, &attributes, mask)
        if rc == 0, attributes.qp_state == IBV_QPS_RTR { ledger.movedToReadyToReceive() }
        return rc
    }

    package func destroyQueuePair(_ qp: UnsafeMutablePointer<ibv_qp>) -> Int32 { soft_rdma_destroy_qp(qp) }

    package func memlockLimit() -> MemlockLimit { MemlockLimit(bytes: memlockLimitBytes, capabilityBypasses: false) }
}
