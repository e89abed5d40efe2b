import CVerbs
import Foundation
import Logging
import Synchronization

/// `Fabric` over RDMA verbs: memory regions, RC queue pairs, one-sided RDMA WRITE (WITH_IMM) with
/// selective signalling, one completion queue read by one thread, which waits for the device's
/// completion events (`poll = .event`, the default) or polls in a loop (`.busy`).
///
/// Two seams keep everything but the device itself under test (docs/design/fabric.md, "Verbs
/// under test"): the device's control path goes through a `VerbsDriver` (libibverbs here; the
/// tests' software RDMA device there), and connecting goes through a `VerbsConnector` — rdma_cm
/// (`connection = .connectionManager`), or an out-of-band exchange over TCP (`.outOfBand`) after
/// which the fabric moves its queue pairs INIT → RTR → RTS itself. The data path
/// (`ibv_post_send`, `ibv_post_recv`, `ibv_poll_cq`) is the same under every driver. Only these run
/// on hardware alone: `SystemVerbs` and `ConnectionManager` (rdma_cm).
///
/// Peers prove the cluster key on both connect paths before either side's queue pair reaches RTR
/// on the acceptor (docs/design/fabric.md, "Verbs connect exchanges"): out of band, an HMAC
/// challenge both ways as on the TCP fabric; over rdma_cm, a request signed with a nonce and the
/// time, accepted once and within a time window. Refusals are logged with the peer's address and
/// the node it claimed, and counted (`statistics`).
///
/// On a machine without an RDMA device `init(node:configuration:)` throws a `VerbsError` that says
/// so ("no RDMA device: ibv_get_device_list found none (errno ENOSYS: …) — use fabric = tcp").
///
/// Not yet done: IPv6 / host-name addresses (IPv4 literals only).
public final class VerbsFabric: Fabric {
    /// Device, connection and sizing choices of one verbs fabric.
    public struct Configuration: Sendable {
        /// How queue pairs are connected.
        public enum Connection: String, Sendable, CaseIterable {
            /// librdmacm: peers are addressed by an IP address of their RDMA interface (IPoIB or the
            /// RoCE netdev), and rdma_cm moves the queue pairs to RTS. HARDWARE ONLY: the software
            /// device of the tests has no rdma_cm, so this path runs only on an RDMA machine
            /// (`make test-rdma` with `PLOVER_RDMA_ADDRESS`).
            case connectionManager = "rdma_cm"
            /// A TCP side channel carries QP number, PSN, LID/GID and region descriptor; the fabric
            /// moves the queue pairs itself. Peers are addressed by any IPv4 address. The default,
            /// and the path every verbs test runs.
            case outOfBand = "tcp"
        }

        /// How the fabric's thread learns of completions (WRITE_WITH_IMM arrivals, finished and
        /// failed WRITEs).
        public enum Poll: String, Sendable, CaseIterable {
            /// Waits in poll(2) on the completion queue's channel until the device raises an
            /// event, then reads every completion and re-arms: no CPU while idle, one wake-up per
            /// burst. The default: several processes sharing a few cores cannot give each a core
            /// to spin on.
            case event
            /// Polls the completion queue in a loop, as APUS does: no interrupt or wake-up on the
            /// path of a message, at the price of a core (after 1,000 empty polls it sleeps 50 µs
            /// between polls).
            case busy
        }

        /// Shared secret of the cluster (at least 16 bytes): peers prove they hold it when they connect.
        public var clusterKey: [UInt8]
        /// Device to open (`ibv_devices` names); the first one when nil.
        public var deviceName: String?
        /// Physical port of the device (1-based, as verbs counts).
        public var port: UInt8
        /// GID table index for RoCE addressing (out-of-band connections on an Ethernet link layer).
        public var gidIndex: Int
        /// How queue pairs are connected: the out-of-band TCP exchange (the default) or rdma_cm.
        public var connection: Connection
        /// The cluster members allowed to connect.
        public var members: Set<NodeID>
        /// Most WRITEs in flight per queue pair (each holds a staging slot).
        public var outstandingWritesMax: Int
        /// Largest single WRITE: each is staged in a registered slot of this size.
        public var slotBytesMax: Int
        /// Size of the completion queue.
        public var completionQueueEntries: Int
        /// Receive requests kept posted per queue pair (each WRITE_WITH_IMM consumes one).
        public var receiveDepth: Int
        /// How long one connection attempt may take.
        public var connectTimeout: Duration
        /// How completions are waited for: device events (the default) or busy polling.
        public var poll: Poll

        /// A configuration; unset parameters take the defaults shown.
        public init(clusterKey: [UInt8], deviceName: String? = nil, port: UInt8 = 1, gidIndex: Int = 0,
                    connection: Connection = .outOfBand, members: Set<NodeID>, outstandingWritesMax: Int = 512,
                    slotBytesMax: Int = 64 << 10, completionQueueEntries: Int = 8192, receiveDepth: Int = 512,
                    connectTimeout: Duration = .seconds(2), poll: Poll = .event) {
            self.clusterKey = clusterKey
            self.deviceName = deviceName
            self.port = port
            self.gidIndex = gidIndex
            self.connection = connection
            self.members = members
            self.outstandingWritesMax = outstandingWritesMax
            self.slotBytesMax = slotBytesMax
            self.completionQueueEntries = completionQueueEntries
            self.receiveDepth = receiveDepth
            self.connectTimeout = connectTimeout
            self.poll = poll
        }
    }

    /// Counters of the fabric's connection handling.
    public struct Statistics: Hashable, Sendable {
        /// Connections refused by either side: a wrong key, an unknown or wrong node, a replayed or
        /// expired nonce, a malformed message, or an acceptor not ready yet.
        public var connectionsRefused = 0
        /// Completion events the device raised and the completion thread took (`poll = .event`;
        /// always 0 with `.busy`).
        public var completionEvents = 0
    }

    public let localNode: NodeID
    public let completions: CompletionQueue
    /// The configuration this fabric was opened with.
    public let configuration: Configuration
    let device: VerbsDevice
    let connector: any VerbsConnector
    let logger: Logger
    /// Nonces of out-of-band hellos, and of rdma_cm requests, accepted recently.
    let replays = VerbsReplayMemory()
    let connectRequestReplays = VerbsReplayMemory(capacity: 65_536)
    private let counters = Mutex(Statistics())
    /// Rung by `close()` to end the completion thread's wait for an event.
    private let stopWaiting: WakePipe
    private let completionThread = Mutex<Int32?>(nil)

    /// The kernel's id of the thread that reads the completion queue, once it runs (for tests
    /// that look at it in /proc).
    package var completionThreadID: Int32? { completionThread.withLock { $0 } }

    /// A snapshot of the counters.
    public var statistics: Statistics { counters.withLock { $0 } }

    func noteRefused() { counters.withLock { $0.connectionsRefused += 1 } }

    struct State {
        var regions: [UInt64: (region: MemoryRegion, registration: VerbsRegistration)] = [:]
        var exported: MemoryRegion?
        /// Queue pairs by QP number, for routing completions. The ones this node connected are held
        /// weakly — as long as their user holds them, so even the completions flushed after they
        /// broke reach them; inbound ones (for immediates) are held here until they break.
        var queuePairs: [UInt32: WeakQueuePair] = [:]
        var inbound: [UInt32: (peer: NodeID, qp: VerbsQueuePair)] = [:]
        var closed = false
    }

    struct WeakQueuePair { weak var qp: VerbsQueuePair? }
    let state = Mutex(State())

    /// Opens the device with libibverbs. Throws at once, with the reason, when the machine has no
    /// RDMA device.
    public convenience init(node: NodeID, configuration: Configuration) throws(VerbsError) {
        try self.init(node: node, configuration: configuration,
                      driver: SystemVerbs(forConnectionManager: configuration.connection == .connectionManager))
    }

    /// Opens a device through `driver` (the tests pass a software RDMA device), logging to `logger`
    /// (the tests read what it says).
    package init(node: NodeID, configuration: Configuration, driver: any VerbsDriver, logger: Logger? = nil) throws(VerbsError) {
        guard configuration.clusterKey.count >= ClusterKey.bytesMin else {
            throw VerbsError(operation: "configuration", code: EINVAL,
                             message: "the cluster key must be at least \(ClusterKey.bytesMin) bytes (got \(configuration.clusterKey.count))")
        }
        guard configuration.members.contains(node) else {
            throw VerbsError(operation: "configuration", code: EINVAL,
                             message: "node \(node) is not among the members \(configuration.members.sorted())")
        }
        guard configuration.outstandingWritesMax > 0, configuration.slotBytesMax > 0, configuration.receiveDepth > 0,
              configuration.completionQueueEntries > 0, (0...255).contains(configuration.gidIndex) else {
            throw VerbsError(operation: "configuration", code: EINVAL,
                             message: "verbs limits must be positive and gidIndex in 0...255 (outstandingWritesMax \(configuration.outstandingWritesMax), slotBytesMax \(configuration.slotBytesMax), receiveDepth \(configuration.receiveDepth), completionQueueEntries \(configuration.completionQueueEntries), gidIndex \(configuration.gidIndex))")
        }
        self.localNode = node
        self.configuration = configuration
        self.device = try VerbsDevice(driver: driver, name: configuration.deviceName, port: configuration.port,
                                      gidIndex: Int32(configuration.gidIndex),
                                      completionQueueEntries: Int32(configuration.completionQueueEntries),
                                      completionEvents: configuration.poll == .event)
        do { self.stopWaiting = try WakePipe() } catch {
            throw VerbsError(operation: "pipe", code: error.errno, message: "the verbs fabric cannot open its wake-up pipe: \(error)")
        }
        switch configuration.connection {
        case .connectionManager: self.connector = try ConnectionManager()
        case .outOfBand: self.connector = try OutOfBandConnector()
        }
        self.completions = CompletionQueue(capacityEntries: configuration.completionQueueEntries)
        var logger = logger ?? Logger(label: "plover.verbs-fabric")
        logger[metadataKey: "node"] = "\(node)"
        self.logger = logger
        let poller = Thread(named: "plover-verbs-cq") { [self] in pollCompletions() }
        poller.start()
        let events = Thread(named: "verbs-connect") { [self] in connector.run(fabric: self) }
        events.start()
    }

    /// What this fabric's device may pin (RLIMIT_MEMLOCK, unless CAP_IPC_LOCK lifts it).
    public var memlockLimit: MemlockLimit { device.driver.memlockLimit() }

    /// Throws, with the numbers and how to raise the limit, when `budget` (what the caller is
    /// about to register) does not fit under `memlockLimit`: a node checks before it starts
    /// rather than failing one queue pair at a time.
    public func checkMemlock(_ budget: VerbsMemoryBudget) throws(VerbsError) {
        let (ok, line) = budget.check(against: memlockLimit)
        guard ok else { throw VerbsError(operation: "ibv_reg_mr", code: ENOMEM, message: "the verbs fabric of node \(localNode) \(line)") }
    }

    public func registerRegion(lengthBytes: Int) throws(FabricError) -> MemoryRegion {
        try register(try MemoryRegion(owner: localNode, lengthBytes: lengthBytes, key: 0))
    }

    /// `ibv_reg_mr` on the caller's memory (REMOTE_WRITE): the NIC writes it directly.
    public func registerRegion(wrapping bytes: UnsafeMutableRawBufferPointer, retaining owner: AnyObject?) throws(FabricError) -> MemoryRegion {
        try register(try MemoryRegion(owner: localNode, wrapping: bytes, retaining: owner, key: 0))
    }

    private func register(_ region: MemoryRegion) throws(FabricError) -> MemoryRegion {
        guard !state.withLock({ $0.closed }) else { throw .notRunning }
        do {
            let reg = try device.register(region.base, lengthBytes: region.lengthBytes)
            region.setKey(reg.remoteKey)
            state.withLock { $0.regions[region.remote.base] = (region, reg) }
            return region
        } catch { throw .device(error) }
    }

    public func listen(at address: PeerAddress, exporting region: MemoryRegion) async throws(FabricError) -> PeerAddress {
        guard address.node == localNode else { throw .badConfiguration("listening as node \(address.node) on the fabric of node \(localNode)") }
        state.withLock { $0.exported = region }
        do {
            let port = try connector.listen(fabric: self, host: address.host, port: address.port)
            return PeerAddress(node: localNode, host: address.host, port: port)
        } catch { throw .device(error) }
    }

    public func connect(to peer: PeerAddress, exporting region: MemoryRegion) async throws(FabricError) -> any QueuePair {
        guard configuration.members.contains(peer.node), peer.node != localNode else {
            throw .badConfiguration("node \(peer.node) is not a cluster member")
        }
        guard !state.withLock({ $0.closed }) else { throw .notRunning }
        let descriptor = Self.privateData(node: localNode, region: region.remote)
        do {
            return try await withCheckedThrowingContinuation { (k: CheckedContinuation<VerbsQueuePair, any Error>) in
                connector.connect(fabric: self, to: peer, descriptor: descriptor, timeout: configuration.connectTimeout) { k.resume(with: $0) }
            }
        } catch let e as FabricError {
            throw e
        } catch {
            throw .connectFailed(peer: peer.node, reason: "\(error)")
        }
    }

    @discardableResult
    public func rotateKey(of region: MemoryRegion) throws(FabricError) -> RemoteRegion {
        // Re-registering gives a new rkey; dropping the old registration invalidates the old one.
        guard state.withLock({ $0.regions[region.remote.base] != nil }) else {
            throw .invalidRequest("region was not registered with this fabric")
        }
        do {
            let reg = try device.register(region.base, lengthBytes: region.lengthBytes)
            state.withLock { $0.regions[region.remote.base] = (region, reg) }
            region.setKey(reg.remoteKey)
            return region.remote
        } catch { throw .device(error) }
    }

    public func revokeAccess(from peer: NodeID) {
        let qps = state.withLock { s in s.inbound.values.filter { $0.peer == peer }.map(\.qp) }
        for qp in qps { qp.moveToError() }
    }

    /// Moves every queue pair to ERROR, stops connecting, and lets go of every verbs object: the
    /// registrations now, queue pairs when their last user drops them, the device after them.
    public func close() {
        let (qps, registrations) = state.withLock { s -> ([VerbsQueuePair], [VerbsRegistration]) in
            s.closed = true
            defer { s.queuePairs = [:]; s.inbound = [:]; s.regions = [:]; s.exported = nil }
            return (s.queuePairs.values.compactMap(\.qp) + s.inbound.values.map(\.qp), s.regions.values.map(\.registration))
        }
        for qp in qps { qp.moveToError() }
        connector.stop()
        stopWaiting.ring()
        completions.interrupt()
        _ = registrations  // deregistered here, after the fence: nothing lands in the regions any more
    }

    // MARK: private data exchanged at connect: u32 node, u64 base, u32 rkey, u64 length (24 of 56 bytes)

    static func privateData(node: NodeID, region: RemoteRegion) -> [UInt8] {
        var w = ByteWriter(capacity: 24)
        w.u32(node); w.u64(region.base); w.u32(region.key); w.u64(UInt64(region.lengthBytes))
        return w.bytes
    }

    static func parsePrivateData(_ bytes: [UInt8]) -> (NodeID, RemoteRegion)? {
        var r = ByteReader(bytes, what: "rdma_cm private data")
        guard let node = try? r.u32(), let base = try? r.u64(), let key = try? r.u32(), let len = try? r.u64(),
              len <= UInt64(MemoryRegion.wrappedLengthBytesMax) else { return nil }
        return (node, RemoteRegion(node: node, base: base, key: key, lengthBytes: Int(len)))
    }

    // MARK: queue pairs

    private var queuePairLimits: VerbsQueuePair.Limits {
        VerbsQueuePair.Limits(outstandingWritesMax: configuration.outstandingWritesMax, slotBytesMax: configuration.slotBytesMax)
    }

    private var queuePairAttributes: ibv_qp_init_attr {
        var attr = ibv_qp_init_attr()
        attr.send_cq = device.completionQueue
        attr.recv_cq = device.completionQueue
        attr.qp_type = IBV_QPT_RC
        attr.sq_sig_all = 0  // selective signalling
        attr.cap.max_send_wr = UInt32(configuration.outstandingWritesMax)
        attr.cap.max_recv_wr = UInt32(configuration.receiveDepth)
        attr.cap.max_send_sge = 1
        attr.cap.max_recv_sge = 1
        return attr
    }

    /// A queue pair on an rdma_cm id (in INIT, receives posted); rdma_cm connects it. HARDWARE ONLY.
    func makeQueuePair(id: UnsafeMutablePointer<rdma_cm_id>, peer: NodeID, sends: Bool) throws(VerbsError) -> VerbsQueuePair {
        guard id.pointee.verbs == device.context else {
            let routed = id.pointee.verbs.map { String(cString: ibv_get_device_name($0.pointee.device)) } ?? "no device"
            throw VerbsError(operation: "rdma_create_qp", code: EXDEV,
                             message: "rdma_cm routed node \(peer) through \(routed), but this fabric opened \(device.name); set the device name or the address")
        }
        var attr = queuePairAttributes
        try Verbs.check(rdma_create_qp(id, device.protectionDomain, &attr), "rdma_create_qp")
        guard let raw = id.pointee.qp else {
            rdma_destroy_qp(id)
            throw VerbsError(operation: "rdma_create_qp", code: EINVAL, message: "rdma_cm id has no queue pair")
        }
        let qp = try VerbsQueuePair(device: device, qp: raw, origin: .connectionManager(id), peer: peer, limits: sends ? queuePairLimits : nil,
                                    completions: completions, logger: logger)
        try qp.createdByConnectionManager()
        for _ in 0..<configuration.receiveDepth { try qp.postReceive() }
        return qp
    }

    /// A queue pair created and moved to INIT here (receives posted, known to the poller), for the
    /// out-of-band exchange to connect. An inbound one (`inboundFrom`) gets no staging buffer:
    /// nothing is sent on it.
    func makeQueuePair(peer: NodeID, inboundFrom: NodeID?, limits: VerbsQueuePair.Limits? = nil) throws(VerbsError) -> VerbsQueuePair {
        var attr = queuePairAttributes
        let raw = try Verbs.check(device.driver.createQueuePair(device.protectionDomain, &attr), "ibv_create_qp")
        let qp = try VerbsQueuePair(device: device, qp: raw, origin: .driver, peer: peer,
                                    limits: limits ?? (inboundFrom == nil ? queuePairLimits : nil),
                                    completions: completions, logger: logger)
        try qp.initialize()
        for _ in 0..<configuration.receiveDepth { try qp.postReceive() }
        adopt(qp, inboundFrom: inboundFrom)
        return qp
    }

    func exportedRegion() -> RemoteRegion? {
        state.withLock { $0.exported?.remote }
    }

    func exportedDescriptor() -> [UInt8]? {
        state.withLock { s in s.exported.map { Self.privateData(node: localNode, region: $0.remote) } }
    }

    func adopt(_ qp: VerbsQueuePair, inboundFrom peer: NodeID?) {
        state.withLock { s in
            if let peer {
                s.inbound[qp.number] = (peer, qp)
            } else {
                s.queuePairs = s.queuePairs.filter { $0.value.qp != nil }  // users let go of these
                s.queuePairs[qp.number] = WeakQueuePair(qp: qp)
            }
        }
    }

    /// Lets go of a broken inbound queue pair (its connection ended or it was fenced). Queue pairs
    /// this node connected need no forgetting: they go with their users.
    func forget(_ qp: VerbsQueuePair) {
        state.withLock { s in
            if s.inbound[qp.number]?.qp === qp { s.inbound[qp.number] = nil }
        }
    }

    /// Reads the CQ until the fabric closes, waiting for the device's events (the device has a
    /// completion channel when `Configuration.poll` is `.event`) or busy polling.
    private func pollCompletions() {
        // "/proc/thread-self" links to "<pid>/task/<tid>".
        let tid = (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/thread-self"))
            .flatMap { $0.split(separator: "/").last }.flatMap { Int32($0) }
        completionThread.withLock { $0 = tid }
        var wcs = [ibv_wc](repeating: ibv_wc(), count: 64)
        if let channel = device.completionChannel { waitForCompletions(&wcs, channel) } else { spinForCompletions(&wcs) }
    }

    /// `.busy`: polls without waiting (APUS polls; an event costs a system call and a wake-up
    /// per burst), backing off to short sleeps when idle.
    private func spinForCompletions(_ wcs: inout [ibv_wc]) {
        var idle = 0
        while !state.withLock({ $0.closed }) {
            let n = device.poll(into: &wcs)
            if n == 0 {
                idle += 1
                if idle > 1000 { usleep(50) }
                continue
            }
            idle = 0
            for wc in wcs[..<n] { dispatch(wc) }
        }
    }

    /// `.event`: reads every completion, arms the CQ, reads once more (a completion between the
    /// last read and the arming raises no event), then sleeps in poll(2) on the channel until the
    /// device raises one or `close()` rings.
    private func waitForCompletions(_ wcs: inout [ibv_wc], _ channel: UnsafeMutablePointer<ibv_comp_channel>) {
        let events = SocketDescriptor(rawValue: channel.pointee.fd, peer: "the completion channel of \(device.name)")
        while !state.withLock({ $0.closed }) {
            var n = device.poll(into: &wcs)
            if n == 0 {
                do { try device.armCompletionEvent() } catch {
                    logger.error("cannot arm the completion queue of \(device.name) (\(error)); polling it instead")
                    return spinForCompletions(&wcs)
                }
                n = device.poll(into: &wcs)
            }
            if n > 0 {
                for wc in wcs[..<n] { dispatch(wc) }
                continue
            }
            // The bound only re-checks `closed` should a ring be lost; an event or the ring ends it.
            let (readable, rung) = events.waitReadable(.seconds(1), orRung: stopWaiting)
            if rung { stopWaiting.drain() }
            if readable {
                let taken = device.takeCompletionEvents()
                counters.withLock { $0.completionEvents += taken }
            }
        }
    }

    private func dispatch(_ wc: ibv_wc) {
        let (own, inbound) = state.withLock { s in (s.queuePairs[wc.qp_num]?.qp, s.inbound[wc.qp_num]) }
        if VerbsQueuePair.isSend(wrID: wc.wr_id) {
            (own ?? inbound?.qp)?.completed(wrID: wc.wr_id, status: CompletionStatus(wc.status))
            return
        }
        // A receive: only WRITE_WITH_IMM consumes one. Flushed receives (on close) are ignored.
        guard wc.status == IBV_WC_SUCCESS, let qp = own ?? inbound?.qp else { return }
        if wc.opcode == IBV_WC_RECV_RDMA_WITH_IMM, (wc.wc_flags & IBV_WC_WITH_IMM.rawValue) != 0 {
            completions.push(Completion(kind: .writeImmediateReceived, status: .success, peer: qp.peer,
                                        workRequestID: 0, immediate: UInt32(bigEndian: wc.imm_data)))
        }
        do { try qp.postReceive() } catch { logger.error("cannot re-post a receive on the queue pair to node \(qp.peer): \(error)") }
    }
}
