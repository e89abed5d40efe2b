import CVerbs
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// A libibverbs or librdmacm call failed: which call, its C error code, and what it means for
/// the user.
public struct VerbsError: Error, Hashable, Sendable, CustomStringConvertible {
    /// The C function that failed, e.g. `ibv_reg_mr`.
    public var operation: String
    /// The errno (or the negative/positive return code when the call reports one directly).
    public var code: Int32
    /// What happened and what to do, for the user.
    public var message: String

    /// An error from a failed call.
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
        try SystemVerbs(forConnectionManager: false).deviceNames()
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
package enum Verbs {
    /// Verbs calls return 0 or an errno (some return -1 and set errno).
    package static func check(_ rc: Int32, _ operation: String) throws(VerbsError) {
        guard rc != 0 else { return }
        let code = rc > 0 ? rc : errno
        throw VerbsError(operation: operation, code: code, message: "\(operation) failed (\(VerbsError.explain(code)))")
    }

    /// Runs `body` with a `sockaddr_in` for an IPv4 literal (rdma_cm and the out-of-band exchange
    /// both address peers this way).
    static func withIPv4Address<R>(host: String, port: Int, _ body: (UnsafeMutablePointer<sockaddr>) -> R) throws(VerbsError) -> R {
        var sin = sockaddr_in()
        sin.sin_family = sa_family_t(AF_INET)
        sin.sin_port = in_port_t(UInt16(truncatingIfNeeded: port).bigEndian)
        guard inet_pton(AF_INET, host, &sin.sin_addr) == 1 else {
            throw VerbsError(operation: "inet_pton", code: EINVAL, message: "\(host) is not an IPv4 address")
        }
        return withUnsafeMutablePointer(to: &sin) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { body($0) } }
    }

    package static func check<T>(_ p: T?, _ operation: String) throws(VerbsError) -> T {
        guard let p else {
            let code = errno
            throw VerbsError(operation: operation, code: code, message: "\(operation) failed (\(VerbsError.explain(code)))")
        }
        return p
    }
}

/// How a port is addressed, and what the out-of-band exchange tells a peer about it: the LID on
/// InfiniBand, the GID on RoCE (Ethernet link layer, where the LID is 0).
struct VerbsPortAddress: Hashable, Sendable {
    var lid: UInt16
    /// 16 bytes: the GID at the configured index.
    var gid: [UInt8]
    var ethernet: Bool
    /// `ibv_mtu` raw value of the port's active MTU.
    var mtu: UInt32
}

/// The only owner of one device's verbs objects: context, protection domain, completion queue.
/// Queue pairs and registrations hold it, so it is torn down after them, in the order verbs needs.
///
/// `@unchecked Sendable`: the pointers are written only in `init`/`deinit`; verbs objects are
/// thread-safe for posting and polling, and `VerbsQueuePair` serializes modifications per QP.
final class VerbsDevice: @unchecked Sendable {
    let driver: any VerbsDriver
    let name: String
    let context: UnsafeMutablePointer<ibv_context>
    let protectionDomain: UnsafeMutablePointer<ibv_pd>
    let completionQueue: UnsafeMutablePointer<ibv_cq>
    /// The completion queue's channel when completions are waited for (`poll = event`), nil when
    /// they are busy-polled.
    let completionChannel: UnsafeMutablePointer<ibv_comp_channel>?
    let port: UInt8
    let gidIndex: Int32
    let address: VerbsPortAddress
    /// Bytes of the registrations alive now, in whole pages (what counts against RLIMIT_MEMLOCK).
    let pinnedBytes = Mutex<UInt64>(0)

    init(driver: any VerbsDriver, name wanted: String?, port: UInt8, gidIndex: Int32,
         completionQueueEntries: Int32, completionEvents: Bool) throws(VerbsError) {
        let (name, context) = try driver.openDevice(named: wanted)
        var pd: UnsafeMutablePointer<ibv_pd>?
        var channel: UnsafeMutablePointer<ibv_comp_channel>?
        do throws(VerbsError) {
            var attributes = ibv_port_attr()
            try Verbs.check(driver.queryPort(context, port, &attributes), "ibv_query_port \(name) port \(port)")
            guard attributes.state == IBV_PORT_ACTIVE else {
                throw VerbsError(operation: "ibv_query_port", code: ENETDOWN,
                                 message: "port \(port) of \(name) is not active (state \(attributes.state.rawValue)); check the link and the subnet manager")
            }
            var gid = ibv_gid()
            try Verbs.check(driver.queryGID(context, port, gidIndex, &gid), "ibv_query_gid \(name) port \(port) index \(gidIndex)")
            address = VerbsPortAddress(lid: attributes.lid, gid: withUnsafeBytes(of: gid.raw) { Array($0) },
                                       ethernet: attributes.link_layer == UInt8(IBV_LINK_LAYER_ETHERNET),
                                       mtu: attributes.active_mtu.rawValue)
            pd = try Verbs.check(driver.allocateProtectionDomain(context), "ibv_alloc_pd")
            if completionEvents {
                channel = try Verbs.check(driver.createCompletionChannel(context), "ibv_create_comp_channel")
                // Waited for with poll(2), then read without blocking.
                let fd = channel!.pointee.fd
                guard fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK) == 0 else {
                    let e = errno
                    throw VerbsError(operation: "fcntl", code: e, message: "cannot make the completion channel non-blocking (\(VerbsError.explain(e)))")
                }
            }
            completionQueue = try Verbs.check(driver.createCompletionQueue(context, completionQueueEntries, channel), "ibv_create_cq")
        } catch {
            if let channel { _ = driver.destroyCompletionChannel(channel) }
            if let pd { _ = driver.deallocateProtectionDomain(pd) }
            _ = driver.closeDevice(context)
            throw error
        }
        self.driver = driver
        self.name = name
        self.context = context
        self.protectionDomain = pd!
        self.completionChannel = channel
        self.port = port
        self.gidIndex = gidIndex
    }

    deinit {
        // Queue pairs and registrations hold the device, so they are gone by now; the return codes
        // have no one left to report to.
        _ = driver.destroyCompletionQueue(completionQueue)
        if let completionChannel { _ = driver.destroyCompletionChannel(completionChannel) }
        _ = driver.deallocateProtectionDomain(protectionDomain)
        _ = driver.closeDevice(context)
    }

    /// Registers `bytes` at `base` for local writes and, with `remoteWrite`, for peers' WRITEs.
    /// A registration the memlock limit refuses says so, with the limit, what is pinned already
    /// and how to raise it.
    func register(_ base: UnsafeMutableRawPointer, lengthBytes: Int, remoteWrite: Bool = true) throws(VerbsError) -> VerbsRegistration {
        let access = remoteWrite ? Int32(IBV_ACCESS_LOCAL_WRITE.rawValue | IBV_ACCESS_REMOTE_WRITE.rawValue) : 0
        errno = 0
        let bytes = VerbsMemoryBudget.pages(UInt64(lengthBytes))
        guard let mr = driver.registerMemory(protectionDomain, base, lengthBytes, access) else {
            let code = errno
            let pinned = pinnedBytes.withLock { $0 }
            guard code == ENOMEM || code == EPERM || code == EAGAIN else {
                throw VerbsError(operation: "ibv_reg_mr", code: code, message: "ibv_reg_mr of \(lengthBytes) bytes failed (\(VerbsError.explain(code)))")
            }
            throw VerbsError(operation: "ibv_reg_mr", code: code,
                             message: "cannot register \(MemlockLimit.format(bytes)) with \(name) (ibv_reg_mr: \(VerbsError.explain(code))): this process may pin \(driver.memlockLimit()) and has \(MemlockLimit.format(pinned)) pinned already; \(MemlockLimit.advice) (`plover doctor --config FILE` says how much a node pins)")
        }
        pinnedBytes.withLock { $0 += bytes }
        return VerbsRegistration(mr, bytes: bytes, device: self)
    }

    /// Polls up to `wcs.count` work completions (`ibv_poll_cq` is inline in the header: no syscall).
    func poll(into wcs: inout [ibv_wc]) -> Int {
        let n = wcs.withUnsafeMutableBufferPointer { ibv_poll_cq(completionQueue, Int32($0.count), $0.baseAddress) }
        return Int(max(0, n))
    }

    /// Asks for an event on the channel at the next completion (`ibv_req_notify_cq`, inline: the
    /// context's `ops`). Completions already queued raise none: poll once more after arming.
    func armCompletionEvent() throws(VerbsError) {
        try Verbs.check(ibv_req_notify_cq(completionQueue, 0), "ibv_req_notify_cq")
    }

    /// Takes (and acknowledges) every event waiting on the channel; returns how many.
    func takeCompletionEvents() -> Int {
        guard let completionChannel else { return 0 }
        var taken = 0
        while driver.takeCompletionEvent(completionChannel) == 0 { taken += 1 }
        return taken
    }
}

/// One `ibv_mr`; deregistered when released (which revokes its rkey).
final class VerbsRegistration: @unchecked Sendable {
    // `@unchecked Sendable`: written once; deregistered only in deinit.
    let mr: UnsafeMutablePointer<ibv_mr>
    private let bytes: UInt64
    private let device: VerbsDevice
    init(_ mr: UnsafeMutablePointer<ibv_mr>, bytes: UInt64, device: VerbsDevice) {
        self.mr = mr
        self.bytes = bytes
        self.device = device
    }
    deinit {
        if device.driver.deregisterMemory(mr) == 0 { device.pinnedBytes.withLock { $0 -= bytes } }
    }
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
