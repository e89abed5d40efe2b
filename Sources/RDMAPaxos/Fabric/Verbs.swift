import CVerbs

#if canImport(Glibc)
import Glibc
#endif

/// A libibverbs or librdmacm call failed: which call, its C error code, and what it means for
/// the user.
public struct VerbsError: Error, Hashable, Sendable, CustomStringConvertible {
    public var operation: String
    /// The errno (or the negative/positive return code when the call reports one directly).
    public var code: Int32
    public var message: String

    public init(operation: String, code: Int32, message: String) {
        self.operation = operation
        self.code = code
        self.message = message
    }

    public var description: String { message }

    /// `ENOSYS`-style name plus what it means on a machine trying to use RDMA.
    static func explain(_ code: Int32) -> String {
        switch code {
        case ENOSYS: "errno ENOSYS: the kernel has no InfiniBand/RDMA support"
        case ENODEV: "errno ENODEV: no RDMA device is present"
        case ENOENT: "errno ENOENT: no RDMA device or provider library found"
        case EPERM, EACCES: "errno \(code == EPERM ? "EPERM" : "EACCES"): not allowed to use the device (check memlock limits and permissions)"
        case ENOMEM: "errno ENOMEM: out of memory or memlock limit too low"
        case 0: "no error code"
        default: "errno \(code): \(String(cString: strerror(code)))"
        }
    }

    static func noDevice(_ code: Int32) -> VerbsError {
        VerbsError(operation: "ibv_get_device_list", code: code,
                   message: "no RDMA device: ibv_get_device_list found none (\(explain(code))) — use fabric = tcp")
    }
}

/// The verbs library's view of this machine, without opening anything.
public enum VerbsProbe {
    /// Names of the RDMA devices present; throws a `VerbsError` explaining why there are none.
    public static func deviceNames() throws(VerbsError) -> [String] {
        errno = 0
        var count: Int32 = 0
        guard let list = ibv_get_device_list(&count) else { throw .noDevice(errno) }
        defer { ibv_free_device_list(list) }
        guard count > 0 else { throw .noDevice(0) }
        return (0..<Int(count)).compactMap { i in list[i].flatMap { ibv_get_device_name($0) }.map { String(cString: $0) } }
    }

    /// Whether the RDMA connection manager can open an event channel (it needs a device too).
    public static func connectionManager() throws(VerbsError) {
        errno = 0
        guard let channel = rdma_create_event_channel() else {
            let e = errno
            throw VerbsError(operation: "rdma_create_event_channel", code: e,
                             message: "no RDMA connection manager: rdma_create_event_channel failed (\(VerbsError.explain(e)))")
        }
        rdma_destroy_event_channel(channel)
    }
}

/// Return-code checks for every verbs call: one place that turns C failures into `VerbsError`.
enum Verbs {
    /// Verbs calls return 0 or an errno (some return -1 and set errno).
    static func check(_ rc: Int32, _ operation: String) throws(VerbsError) {
        guard rc != 0 else { return }
        let code = rc > 0 ? rc : errno
        throw VerbsError(operation: operation, code: code, message: "\(operation) failed (\(VerbsError.explain(code)))")
    }

    static func check<T>(_ p: T?, _ operation: String) throws(VerbsError) -> T {
        guard let p else {
            let code = errno
            throw VerbsError(operation: operation, code: code, message: "\(operation) failed (\(VerbsError.explain(code)))")
        }
        return p
    }
}

/// The only owner of one device's verbs objects: context, protection domain, completion queue.
/// HARDWARE ONLY: never constructed on a machine without an RDMA device (the initializer throws
/// first), so without hardware only `deviceNames()` runs.
///
/// `@unchecked Sendable`: the pointers are written only in `init`/`deinit`; libibverbs objects are
/// thread-safe for posting and polling, and `VerbsFabric` serializes modifications per QP.
final class VerbsDevice: @unchecked Sendable {
    let name: String
    let context: UnsafeMutablePointer<ibv_context>
    let protectionDomain: UnsafeMutablePointer<ibv_pd>
    let completionQueue: UnsafeMutablePointer<ibv_cq>
    let port: UInt8

    init(name wanted: String?, port: UInt8, completionQueueEntries: Int32) throws(VerbsError) {
        let names = try VerbsProbe.deviceNames()
        var count: Int32 = 0
        let list = try Verbs.check(ibv_get_device_list(&count), "ibv_get_device_list")
        defer { ibv_free_device_list(list) }
        let index = wanted.flatMap { names.firstIndex(of: $0) } ?? 0
        guard wanted == nil || names.indices.contains(index), let device = list[index] else {
            throw VerbsError(operation: "ibv_get_device_list", code: ENODEV,
                             message: "no RDMA device named \(wanted ?? "?"); present: \(names.joined(separator: ", "))")
        }
        name = names[index]
        self.port = port
        context = try Verbs.check(ibv_open_device(device), "ibv_open_device \(names[index])")
        guard let pd = ibv_alloc_pd(context) else {
            ibv_close_device(context)
            throw VerbsError(operation: "ibv_alloc_pd", code: errno, message: "ibv_alloc_pd failed (\(VerbsError.explain(errno)))")
        }
        protectionDomain = pd
        guard let cq = ibv_create_cq(context, completionQueueEntries, nil, nil, 0) else {
            ibv_dealloc_pd(pd)
            ibv_close_device(context)
            throw VerbsError(operation: "ibv_create_cq", code: errno, message: "ibv_create_cq failed (\(VerbsError.explain(errno)))")
        }
        completionQueue = cq
    }

    deinit {
        ibv_destroy_cq(completionQueue)
        ibv_dealloc_pd(protectionDomain)
        ibv_close_device(context)
    }

    /// Registers `bytes` at `base` for local writes and remote WRITEs.
    func register(_ base: UnsafeMutableRawPointer, lengthBytes: Int) throws(VerbsError) -> VerbsRegistration {
        let access = Int32(IBV_ACCESS_LOCAL_WRITE.rawValue | IBV_ACCESS_REMOTE_WRITE.rawValue)
        let mr = try Verbs.check(ibv_reg_mr(protectionDomain, base, lengthBytes, access), "ibv_reg_mr")
        return VerbsRegistration(mr)
    }

    /// Polls up to `max` work completions (`ibv_poll_cq` is inline in the header: no syscall).
    func poll(into wcs: inout [ibv_wc]) -> Int {
        let n = wcs.withUnsafeMutableBufferPointer { ibv_poll_cq(completionQueue, Int32($0.count), $0.baseAddress) }
        return Int(max(0, n))
    }
}

/// One `ibv_mr`; deregistered when released (which revokes its rkey).
final class VerbsRegistration: @unchecked Sendable {
    // `@unchecked Sendable`: written once; ibv_dereg_mr runs only in deinit.
    let mr: UnsafeMutablePointer<ibv_mr>
    init(_ mr: UnsafeMutablePointer<ibv_mr>) { self.mr = mr }
    deinit { ibv_dereg_mr(mr) }
    var remoteKey: UInt32 { mr.pointee.rkey }
    var localKey: UInt32 { mr.pointee.lkey }
}

extension CompletionStatus {
    init(_ s: ibv_wc_status) {
        switch s {
        case IBV_WC_SUCCESS: self = .success
        case IBV_WC_REM_ACCESS_ERR, IBV_WC_LOC_PROT_ERR, IBV_WC_REM_INV_REQ_ERR: self = .remoteAccessError
        case IBV_WC_WR_FLUSH_ERR: self = .flushed
        default: self = .transportError
        }
    }
}
