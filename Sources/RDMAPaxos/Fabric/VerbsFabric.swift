import CVerbs
import Foundation
import Logging
import Synchronization

/// `Fabric` over real RDMA hardware: libibverbs for memory, queue pairs and completions,
/// librdmacm for connecting (the region descriptor travels in the CM private data).
///
/// HARDWARE ONLY. On a machine without an RDMA device `init` throws a `VerbsError` that says so
/// (e.g. "no RDMA device: ibv_get_device_list found none (errno ENOSYS: …) — use fabric = tcp");
/// without hardware, tests reach only that path and the pure state machines. Everything past
/// device discovery — PD, MR with REMOTE_WRITE, CQ, RC QP through INIT→RTR→RTS (done by rdma_cm
/// on connect/accept), RDMA_WRITE / WRITE_WITH_IMM with selective signalling, ibv_poll_cq — is
/// written to the verbs API and runs only on RDMA hardware.
///
/// Not yet done on this path: authenticating peers (the TCP fabric's HMAC handshake would ride in
/// the 56-byte CM private data) and IPv6 / host-name addresses (IPv4 literals only).
public final class VerbsFabric: Fabric {
    public struct Configuration: Sendable {
        /// Device to open (`ibv_devices` names); the first one when nil.
        public var deviceName: String?
        public var port: UInt8
        public var members: Set<NodeID>
        public var outstandingWritesMax: Int
        /// Largest single WRITE: each is staged in a registered slot of this size.
        public var slotBytesMax: Int
        public var completionQueueEntries: Int
        /// Receive requests kept posted per queue pair (each WRITE_WITH_IMM consumes one).
        public var receiveDepth: Int
        public var connectTimeout: Duration

        public init(deviceName: String? = nil, port: UInt8 = 1, members: Set<NodeID>, outstandingWritesMax: Int = 512,
                    slotBytesMax: Int = 64 << 10, completionQueueEntries: Int = 8192, receiveDepth: Int = 512,
                    connectTimeout: Duration = .seconds(2)) {
            self.deviceName = deviceName
            self.port = port
            self.members = members
            self.outstandingWritesMax = outstandingWritesMax
            self.slotBytesMax = slotBytesMax
            self.completionQueueEntries = completionQueueEntries
            self.receiveDepth = receiveDepth
            self.connectTimeout = connectTimeout
        }
    }

    public let localNode: NodeID
    public let completions: CompletionQueue
    public let configuration: Configuration
    let device: VerbsDevice
    let cm: ConnectionManager
    let logger: Logger

    struct State {
        var regions: [UInt64: (region: MemoryRegion, registration: VerbsRegistration)] = [:]
        var exported: MemoryRegion?
        /// Queue pairs by QP number: the ones this node connected, and inbound ones (for immediates).
        var queuePairs: [UInt32: VerbsQueuePair] = [:]
        var inbound: [UInt32: (peer: NodeID, qp: VerbsQueuePair)] = [:]
        var closed = false
    }
    let state = Mutex(State())

    /// Opens the device. Throws at once, with the reason, when the machine has no RDMA device.
    public init(node: NodeID, configuration: Configuration) throws(VerbsError) {
        self.localNode = node
        self.configuration = configuration
        self.device = try VerbsDevice(name: configuration.deviceName, port: configuration.port,
                                      completionQueueEntries: Int32(configuration.completionQueueEntries))
        self.cm = try ConnectionManager()
        self.completions = CompletionQueue(capacityEntries: configuration.completionQueueEntries)
        var logger = Logger(label: "plover.verbs-fabric")
        logger[metadataKey: "node"] = "\(node)"
        self.logger = logger
        let poller = Thread { [self] in pollCompletions() }
        poller.name = "plover-verbs-cq"
        poller.start()
        let events = Thread { [self] in cm.run(fabric: self) }
        events.name = "plover-rdma-cm"
        events.start()
    }

    public func registerRegion(lengthBytes: Int) throws(FabricError) -> MemoryRegion {
        let region = try MemoryRegion(owner: localNode, lengthBytes: lengthBytes, key: 0)
        do {
            let reg = try device.register(region.base, lengthBytes: lengthBytes)
            region.setKey(reg.remoteKey)
            state.withLock { $0.regions[region.remote.base] = (region, reg) }
            return region
        } catch { throw .device(error) }
    }

    /// `ibv_reg_mr` on the caller's memory (REMOTE_WRITE): the NIC writes it directly.
    public func registerRegion(wrapping bytes: UnsafeMutableRawBufferPointer, retaining owner: AnyObject?) throws(FabricError) -> MemoryRegion {
        let region = try MemoryRegion(owner: localNode, wrapping: bytes, retaining: owner, key: 0)
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
            let port = try cm.listen(host: address.host, port: address.port)
            return PeerAddress(node: localNode, host: address.host, port: port)
        } catch { throw .device(error) }
    }

    public func connect(to peer: PeerAddress, exporting region: MemoryRegion) async throws(FabricError) -> any QueuePair {
        guard configuration.members.contains(peer.node), peer.node != localNode else {
            throw .badConfiguration("node \(peer.node) is not a cluster member")
        }
        let descriptor = Self.privateData(node: localNode, region: region.remote)
        do {
            return try await withCheckedThrowingContinuation { (k: CheckedContinuation<VerbsQueuePair, any Error>) in
                cm.connect(fabric: self, to: peer, privateData: descriptor, timeout: configuration.connectTimeout) { k.resume(with: $0) }
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

    public func close() {
        let qps = state.withLock { s -> [VerbsQueuePair] in
            s.closed = true
            return Array(s.queuePairs.values) + s.inbound.values.map(\.qp)
        }
        for qp in qps { qp.moveToError() }
        cm.stop()
        completions.interrupt()
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

    // MARK: queue pairs created by the connection manager

    func makeQueuePair(id: UnsafeMutablePointer<rdma_cm_id>, peer: NodeID, remote: RemoteRegion?) throws(VerbsError) -> VerbsQueuePair {
        var attr = ibv_qp_init_attr()
        attr.send_cq = device.completionQueue
        attr.recv_cq = device.completionQueue
        attr.qp_type = IBV_QPT_RC
        attr.sq_sig_all = 0  // selective signalling
        attr.cap.max_send_wr = UInt32(configuration.outstandingWritesMax)
        attr.cap.max_recv_wr = UInt32(configuration.receiveDepth)
        attr.cap.max_send_sge = 1
        attr.cap.max_recv_sge = 1
        try Verbs.check(rdma_create_qp(id, device.protectionDomain, &attr), "rdma_create_qp")
        let qp = try VerbsQueuePair(fabric: self, id: id, peer: peer, remote: remote)
        for _ in 0..<configuration.receiveDepth { try qp.postReceive() }
        return qp
    }

    func exportedDescriptor() -> [UInt8]? {
        state.withLock { s in s.exported.map { Self.privateData(node: localNode, region: $0.remote) } }
    }

    func adopt(_ qp: VerbsQueuePair, inboundFrom peer: NodeID?) {
        state.withLock { s in
            if let peer { s.inbound[qp.number] = (peer, qp) } else { s.queuePairs[qp.number] = qp }
        }
    }

    func forget(_ qp: VerbsQueuePair) {
        state.withLock { s in
            s.queuePairs[qp.number] = nil
            s.inbound[qp.number] = nil
        }
    }

    /// Busy-polls the CQ (APUS polls; a completion channel would add a syscall and a wake-up to
    /// every completion on the hot path), backing off to short sleeps when idle.
    private func pollCompletions() {
        var wcs = [ibv_wc](repeating: ibv_wc(), count: 64)
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

    private func dispatch(_ wc: ibv_wc) {
        let (own, inbound) = state.withLock { s in (s.queuePairs[wc.qp_num], s.inbound[wc.qp_num]) }
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
