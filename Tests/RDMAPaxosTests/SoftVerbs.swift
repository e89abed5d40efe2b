import Foundation
import SoftRDMA
import Synchronization
@testable import RDMAPaxos

#if canImport(Glibc)
import Glibc
#endif

/// A subnet of the software RDMA device (`Tests/SoftRDMA`): a file in /dev/shm that contexts in this
/// and other processes attach to. The file goes when the last user lets go.
final class SoftSubnet: Sendable {
    let path: String

    init() throws {
        path = "/dev/shm/plover-softrdma-\(getpid())-\(UUID().uuidString.prefix(8))"
        let rc = soft_rdma_subnet_create(path)
        guard rc == 0 else { throw CommandError("cannot create the software RDMA subnet \(path): errno \(rc)") }
    }

    deinit { _ = soft_rdma_subnet_remove(path) }
}

/// What a `SoftVerbs` driver opened and closed: every context must be closed once its fabric is
/// gone, which needs every queue pair, registration, CQ and PD released first (the device refuses
/// otherwise, as hardware does).
final class SoftVerbsLedger: Sendable {
    private let counts = Mutex((opened: 0, closed: 0))
    func opened() { counts.withLock { $0.opened += 1 } }
    func closed() { counts.withLock { $0.closed += 1 } }
    var openContexts: Int { counts.withLock { $0.opened - $0.closed } }
    var everOpened: Int { counts.withLock { $0.opened } }
}

/// `VerbsDriver` over the software RDMA device: VerbsFabric's control path calls these; its data
/// path (`ibv_post_send`, `ibv_post_recv`, `ibv_poll_cq`) reaches the device through the context's ops.
struct SoftVerbs: VerbsDriver {
    let subnet: SoftSubnet
    /// A RoCE-like port (addressed by GID) instead of an InfiniBand one (addressed by LID).
    var ethernet = false
    var ledger = SoftVerbsLedger()

    var deviceName: String { ethernet ? "soft_roce" : "soft_ib" }

    func deviceNames() throws(VerbsError) -> [String] { [deviceName] }

    func openDevice(named name: String?) throws(VerbsError) -> (name: String, context: UnsafeMutablePointer<ibv_context>) {
        guard name == nil || name == deviceName else {
            throw VerbsError(operation: "soft_rdma_open_device", code: ENODEV, message: "no RDMA device named \(name ?? "?")")
        }
        let context = try Verbs.check(soft_rdma_open_device(subnet.path, ethernet ? 1 : 0), "soft_rdma_open_device")
        ledger.opened()
        return (deviceName, context)
    }

    func closeDevice(_ context: UnsafeMutablePointer<ibv_context>) -> Int32 {
        let rc = soft_rdma_close_device(context)
        if rc == 0 { ledger.closed() }
        return rc
    }

    func queryPort(_ context: UnsafeMutablePointer<ibv_context>, _ port: UInt8, _ attributes: inout ibv_port_attr) -> Int32 {
        soft_rdma_query_port(context, port, &attributes)
    }

    func queryGID(_ context: UnsafeMutablePointer<ibv_context>, _ port: UInt8, _ index: Int32, _ gid: inout ibv_gid) -> Int32 {
        soft_rdma_query_gid(context, port, index, &gid)
    }

    func allocateProtectionDomain(_ context: UnsafeMutablePointer<ibv_context>) -> UnsafeMutablePointer<ibv_pd>? {
        soft_rdma_alloc_pd(context)
    }

    func deallocateProtectionDomain(_ pd: UnsafeMutablePointer<ibv_pd>) -> Int32 { soft_rdma_dealloc_pd(pd) }

    func registerMemory(_ pd: UnsafeMutablePointer<ibv_pd>, _ base: UnsafeMutableRawPointer, _ lengthBytes: Int,
                        _ access: Int32) -> UnsafeMutablePointer<ibv_mr>? {
        soft_rdma_reg_mr(pd, base, lengthBytes, access)
    }

    func deregisterMemory(_ mr: UnsafeMutablePointer<ibv_mr>) -> Int32 { soft_rdma_dereg_mr(mr) }

    func createCompletionQueue(_ context: UnsafeMutablePointer<ibv_context>, _ entries: Int32) -> UnsafeMutablePointer<ibv_cq>? {
        soft_rdma_create_cq(context, entries)
    }

    func destroyCompletionQueue(_ cq: UnsafeMutablePointer<ibv_cq>) -> Int32 { soft_rdma_destroy_cq(cq) }

    func createQueuePair(_ pd: UnsafeMutablePointer<ibv_pd>, _ attributes: inout ibv_qp_init_attr) -> UnsafeMutablePointer<ibv_qp>? {
        soft_rdma_create_qp(pd, &attributes)
    }

    func modifyQueuePair(_ qp: UnsafeMutablePointer<ibv_qp>, _ attributes: inout ibv_qp_attr, _ mask: Int32) -> Int32 {
        soft_rdma_modify_qp(qp, &attributes, mask)
    }

    func destroyQueuePair(_ qp: UnsafeMutablePointer<ibv_qp>) -> Int32 { soft_rdma_destroy_qp(qp) }
}
