import CVerbs

#if canImport(Glibc)
import Glibc
#endif

/// The control path of an RDMA device: everything `VerbsFabric` does to a device besides posting
/// and polling — open it, query its port and GID, allocate a protection domain, register memory,
/// create the completion queue and queue pairs, move queue pairs between states.
///
/// Posting and polling are not here on purpose: they are libibverbs' inline `ibv_post_send`,
/// `ibv_post_recv` and `ibv_poll_cq`, which call through the `ops` of whatever context the driver
/// opened, so the data path is the same code under every driver. `SystemVerbs` is libibverbs on
/// hardware; the tests pass a software RDMA device (`Tests/SoftRDMA`) through this seam.
///
/// Each method returns what the C call returns (a pointer, or NULL with errno set; 0 or an errno
/// value); callers pass results through `Verbs.check`, the one place that turns them into errors.
package protocol VerbsDriver: Sendable {
    func deviceNames() throws(VerbsError) -> [String]
    /// Opens the device called `name` (the first one when nil).
    func openDevice(named name: String?) throws(VerbsError) -> (name: String, context: UnsafeMutablePointer<ibv_context>)
    func closeDevice(_ context: UnsafeMutablePointer<ibv_context>) -> Int32
    func queryPort(_ context: UnsafeMutablePointer<ibv_context>, _ port: UInt8, _ attributes: inout ibv_port_attr) -> Int32
    func queryGID(_ context: UnsafeMutablePointer<ibv_context>, _ port: UInt8, _ index: Int32, _ gid: inout ibv_gid) -> Int32
    func allocateProtectionDomain(_ context: UnsafeMutablePointer<ibv_context>) -> UnsafeMutablePointer<ibv_pd>?
    func deallocateProtectionDomain(_ pd: UnsafeMutablePointer<ibv_pd>) -> Int32
    func registerMemory(_ pd: UnsafeMutablePointer<ibv_pd>, _ base: UnsafeMutableRawPointer, _ lengthBytes: Int,
                        _ access: Int32) -> UnsafeMutablePointer<ibv_mr>?
    func deregisterMemory(_ mr: UnsafeMutablePointer<ibv_mr>) -> Int32
    /// A completion channel (`poll = event`): its file descriptor becomes readable when an armed
    /// completion queue bound to it gets a completion.
    func createCompletionChannel(_ context: UnsafeMutablePointer<ibv_context>) -> UnsafeMutablePointer<ibv_comp_channel>?
    func destroyCompletionChannel(_ channel: UnsafeMutablePointer<ibv_comp_channel>) -> Int32
    /// Takes one event off `channel` and acknowledges it: 0, or -1 with errno (EAGAIN: none there).
    func takeCompletionEvent(_ channel: UnsafeMutablePointer<ibv_comp_channel>) -> Int32
    /// A completion queue, bound to `channel` when there is one.
    func createCompletionQueue(_ context: UnsafeMutablePointer<ibv_context>, _ entries: Int32,
                               _ channel: UnsafeMutablePointer<ibv_comp_channel>?) -> UnsafeMutablePointer<ibv_cq>?
    func destroyCompletionQueue(_ cq: UnsafeMutablePointer<ibv_cq>) -> Int32
    func createQueuePair(_ pd: UnsafeMutablePointer<ibv_pd>, _ attributes: inout ibv_qp_init_attr) -> UnsafeMutablePointer<ibv_qp>?
    func modifyQueuePair(_ qp: UnsafeMutablePointer<ibv_qp>, _ attributes: inout ibv_qp_attr, _ mask: Int32) -> Int32
    func destroyQueuePair(_ qp: UnsafeMutablePointer<ibv_qp>) -> Int32
    /// What `registerMemory` may pin: the process's RLIMIT_MEMLOCK for libibverbs; for a software
    /// device, the limit it was told to enforce.
    func memlockLimit() -> MemlockLimit
}

/// libibverbs. HARDWARE ONLY past `deviceNames()`: without a device, `openDevice` throws first.
struct SystemVerbs: VerbsDriver {
    /// rdma_cm creates queue pairs only on the contexts librdmacm opened itself (`rdma_create_qp`
    /// refuses a PD of any other context with EINVAL), so for rdma_cm the device comes from
    /// `rdma_get_devices` and stays open as long as librdmacm keeps it; otherwise it is opened
    /// with `ibv_open_device` and closed with the fabric.
    var forConnectionManager: Bool

    func deviceNames() throws(VerbsError) -> [String] {
        errno = 0
        var count: Int32 = 0
        guard let list = ibv_get_device_list(&count) else { throw .noDevice(errno) }
        defer { ibv_free_device_list(list) }
        guard count > 0 else { throw .noDevice(0) }
        return (0..<Int(count)).compactMap { i in list[i].flatMap { ibv_get_device_name($0) }.map { String(cString: $0) } }
    }

    func openDevice(named wanted: String?) throws(VerbsError) -> (name: String, context: UnsafeMutablePointer<ibv_context>) {
        let names = try deviceNames()
        func missing() -> VerbsError {
            VerbsError(operation: "ibv_get_device_list", code: ENODEV,
                       message: "no RDMA device named \(wanted ?? "?"); present: \(names.joined(separator: ", "))")
        }
        if forConnectionManager {
            var count: Int32 = 0
            let list = try Verbs.check(rdma_get_devices(&count), "rdma_get_devices")
            defer { rdma_free_devices(list) }
            let contexts = (0..<Int(count)).compactMap { list[$0] }
                .map { (name: String(cString: ibv_get_device_name($0.pointee.device)), context: $0) }
            guard let pick = wanted.map({ w in contexts.first { $0.name == w } }) ?? contexts.first else { throw missing() }
            return pick
        }
        var count: Int32 = 0
        let list = try Verbs.check(ibv_get_device_list(&count), "ibv_get_device_list")
        defer { ibv_free_device_list(list) }
        let index = wanted.flatMap { names.firstIndex(of: $0) } ?? 0
        guard wanted == nil || names.indices.contains(index), index < Int(count), let device = list[index] else { throw missing() }
        return (names[index], try Verbs.check(ibv_open_device(device), "ibv_open_device \(names[index])"))
    }

    func closeDevice(_ context: UnsafeMutablePointer<ibv_context>) -> Int32 {
        forConnectionManager ? 0 : ibv_close_device(context)
    }

    func queryPort(_ context: UnsafeMutablePointer<ibv_context>, _ port: UInt8, _ attributes: inout ibv_port_attr) -> Int32 {
        ___ibv_query_port(context, port, &attributes)  // what the header's `ibv_query_port` macro calls
    }

    func queryGID(_ context: UnsafeMutablePointer<ibv_context>, _ port: UInt8, _ index: Int32, _ gid: inout ibv_gid) -> Int32 {
        ibv_query_gid(context, port, index, &gid)
    }

    func allocateProtectionDomain(_ context: UnsafeMutablePointer<ibv_context>) -> UnsafeMutablePointer<ibv_pd>? {
        ibv_alloc_pd(context)
    }

    func deallocateProtectionDomain(_ pd: UnsafeMutablePointer<ibv_pd>) -> Int32 { ibv_dealloc_pd(pd) }

    func registerMemory(_ pd: UnsafeMutablePointer<ibv_pd>, _ base: UnsafeMutableRawPointer, _ lengthBytes: Int,
                        _ access: Int32) -> UnsafeMutablePointer<ibv_mr>? {
        ibv_reg_mr(pd, base, lengthBytes, access)
    }

    func deregisterMemory(_ mr: UnsafeMutablePointer<ibv_mr>) -> Int32 { ibv_dereg_mr(mr) }

    func createCompletionChannel(_ context: UnsafeMutablePointer<ibv_context>) -> UnsafeMutablePointer<ibv_comp_channel>? {
        ibv_create_comp_channel(context)
    }

    func destroyCompletionChannel(_ channel: UnsafeMutablePointer<ibv_comp_channel>) -> Int32 { ibv_destroy_comp_channel(channel) }

    func takeCompletionEvent(_ channel: UnsafeMutablePointer<ibv_comp_channel>) -> Int32 {
        var cq: UnsafeMutablePointer<ibv_cq>?
        var context: UnsafeMutableRawPointer?
        guard ibv_get_cq_event(channel, &cq, &context) == 0, let cq else { return -1 }
        ibv_ack_cq_events(cq, 1)  // one at a time: destroying the CQ waits for every event's ack
        return 0
    }

    func createCompletionQueue(_ context: UnsafeMutablePointer<ibv_context>, _ entries: Int32,
                               _ channel: UnsafeMutablePointer<ibv_comp_channel>?) -> UnsafeMutablePointer<ibv_cq>? {
        ibv_create_cq(context, entries, nil, channel, 0)
    }

    func destroyCompletionQueue(_ cq: UnsafeMutablePointer<ibv_cq>) -> Int32 { ibv_destroy_cq(cq) }

    func createQueuePair(_ pd: UnsafeMutablePointer<ibv_pd>, _ attributes: inout ibv_qp_init_attr) -> UnsafeMutablePointer<ibv_qp>? {
        ibv_create_qp(pd, &attributes)
    }

    func modifyQueuePair(_ qp: UnsafeMutablePointer<ibv_qp>, _ attributes: inout ibv_qp_attr, _ mask: Int32) -> Int32 {
        ibv_modify_qp(qp, &attributes, mask)
    }

    func destroyQueuePair(_ qp: UnsafeMutablePointer<ibv_qp>) -> Int32 { ibv_destroy_qp(qp) }

    func memlockLimit() -> MemlockLimit { .current() }
}
