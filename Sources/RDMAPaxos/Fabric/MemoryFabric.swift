#if canImport(Glibc)
import Glibc
#endif
import Synchronization

/// The in-process "wire" that `MemoryFabric` endpoints attach to: several simulated hosts in one
/// process, for tests of code built on `Fabric` (including users' own state machines).
///
/// Writes land synchronously on the posting thread unless the network is `pause()`d, in which
/// case they stay outstanding (in order) until `resume()` — which is how tests observe fencing
/// flush outstanding work.
public final class MemoryNetwork: Sendable {
    private struct State {
        var endpoints: [NodeID: MemoryFabric] = [:]
        /// Fabrics that connected queue pairs (listening or not): whose writes `resume` lands.
        var writers: [ObjectIdentifier: MemoryFabric] = [:]
        var paused = false
    }
    private let state = Mutex(State())

    /// A network with no endpoints that delivers writes at once.
    public init() {}

    /// Holds every write posted from now on until `resume()`.
    public func pause() { state.withLock { $0.paused = true } }

    /// Lands every held write, per queue pair in posting order.
    public func resume() {
        let fabrics = state.withLock { s -> [MemoryFabric] in
            s.paused = false
            return Array(s.writers.values)
        }
        for f in fabrics { f.drainQueuePairs() }
    }

    var isPaused: Bool { state.withLock { $0.paused } }

    func attach(_ f: MemoryFabric) throws(FabricError) {
        try state.withLock { s throws(FabricError) in
            if let other = s.endpoints[f.localNode], other !== f {
                throw FabricError.badConfiguration("node \(f.localNode) is already listening on this network")
            }
            s.endpoints[f.localNode] = f
        }
    }

    func detach(_ f: MemoryFabric) {
        state.withLock { s in
            if s.endpoints[f.localNode] === f { s.endpoints[f.localNode] = nil }
            s.writers[ObjectIdentifier(f)] = nil
        }
    }

    func noteWriter(_ f: MemoryFabric) { state.withLock { $0.writers[ObjectIdentifier(f)] = f } }

    func endpoint(_ node: NodeID) -> MemoryFabric? { state.withLock { $0.endpoints[node] } }
}

/// `Fabric` between `MemoryFabric` endpoints of one `MemoryNetwork`. Same semantics as the real
/// fabrics: key and bounds checks, per-queue-pair order, completion after landing, immediates,
/// fencing by key rotation or revocation, and a bound on outstanding writes.
public final class MemoryFabric: Fabric {
    public let localNode: NodeID
    public let completions: CompletionQueue
    /// The network this fabric is attached to.
    public let network: MemoryNetwork
    /// Most writes one queue pair may have outstanding (only reachable while the network is paused).
    public let outstandingWritesMax: Int

    private struct State {
        var regions: [UInt64: MemoryRegion] = [:]
        var exported: MemoryRegion?
        var closed = false
        /// Queue pairs this node connected (to flush on close, drain on resume).
        var queuePairs: [MemoryQueuePair] = []
        /// Inbound queue pair ids per writer, and those revoked.
        var inbound: [UInt64: NodeID] = [:]
        var revoked: Set<UInt64> = []
        /// Writes per inbound queue pair being copied into a region right now.
        var landing: [UInt64: Int] = [:]
        var keyCounter: UInt32
    }
    private let state: Mutex<State>

    /// An endpoint for `node` (nonzero) on `network`, with a completion queue of
    /// `completionQueueEntries`.
    public init(node: NodeID, network: MemoryNetwork, outstandingWritesMax: Int = 1024,
                completionQueueEntries: Int = 1 << 16) {
        precondition(node != 0, "node id 0 is reserved")
        precondition(outstandingWritesMax > 0, "a queue pair needs room for one write")
        self.localNode = node
        self.network = network
        self.outstandingWritesMax = outstandingWritesMax
        self.completions = CompletionQueue(capacityEntries: completionQueueEntries)
        // Keys differ per node so a key meant for one node never works on another by accident.
        self.state = Mutex(State(keyCounter: node &* 0x9E37_79B1))
    }

    public func registerRegion(lengthBytes: Int) throws(FabricError) -> MemoryRegion {
        let key = state.withLock { s in s.keyCounter &+= 0x10001; return s.keyCounter }
        let r = try MemoryRegion(owner: localNode, lengthBytes: lengthBytes, key: key)
        state.withLock { $0.regions[r.remote.base] = r }
        return r
    }

    public func registerRegion(wrapping bytes: UnsafeMutableRawBufferPointer, retaining owner: AnyObject?) throws(FabricError) -> MemoryRegion {
        let key = state.withLock { s in s.keyCounter &+= 0x10001; return s.keyCounter }
        let r = try MemoryRegion(owner: localNode, wrapping: bytes, retaining: owner, key: key)
        state.withLock { $0.regions[r.remote.base] = r }
        return r
    }

    public func listen(at address: PeerAddress, exporting region: MemoryRegion) async throws(FabricError) -> PeerAddress {
        guard address.node == localNode else {
            throw .badConfiguration("listening as node \(address.node) on the fabric of node \(localNode)")
        }
        try state.withLock { s throws(FabricError) in
            guard !s.closed else { throw FabricError.notRunning }
            guard s.regions[region.remote.base] === region else {
                throw FabricError.invalidRequest("exported region was not registered with this fabric")
            }
            s.exported = region
        }
        try network.attach(self)
        return address
    }

    public func connect(to peer: PeerAddress, exporting region: MemoryRegion) async throws(FabricError) -> any QueuePair {
        guard !state.withLock({ $0.closed }) else { throw .notRunning }
        guard let target = network.endpoint(peer.node), let id = target.acceptInbound(from: localNode) else {
            throw .connectFailed(peer: peer.node, reason: "no node \(peer.node) listening on this memory network")
        }
        let qp = MemoryQueuePair(fabric: self, target: target, remote: id.remote, inboundID: id.inboundID)
        state.withLock { $0.queuePairs.append(qp) }
        network.noteWriter(self)
        return qp
    }

    @discardableResult
    public func rotateKey(of region: MemoryRegion) throws(FabricError) -> RemoteRegion {
        try state.withLock { s throws(FabricError) in
            guard s.regions[region.remote.base] === region else {
                throw FabricError.invalidRequest("region was not registered with this fabric")
            }
            s.keyCounter &+= 0x10001
            region.setKey(s.keyCounter)
        }
        return region.remote
    }

    public func revokeAccess(from peer: NodeID) {
        let ids = state.withLock { s in
            let ids = s.inbound.filter { $0.value == peer }.map(\.key)
            s.revoked.formUnion(ids)
            return ids
        }
        // A write that passed the access check before the fence may still be copying.
        while state.withLock({ s in ids.contains { s.landing[$0, default: 0] > 0 } }) { usleep(50) }
    }

    public func close() {
        let qps = state.withLock { s -> [MemoryQueuePair] in
            s.closed = true
            defer { s.queuePairs = [] }
            return s.queuePairs
        }
        network.detach(self)
        for qp in qps { qp.moveToError() }
        completions.interrupt()
    }

    // MARK: target side

    private static let inboundIDs = Atomic<UInt64>(0)

    /// Accepts a connection: returns the exported region and the id the writer names itself by.
    fileprivate func acceptInbound(from writer: NodeID) -> (remote: RemoteRegion, inboundID: UInt64)? {
        state.withLock { s in
            guard !s.closed, let r = s.exported else { return nil }
            let id = Self.inboundIDs.add(1, ordering: .relaxed).newValue
            s.inbound[id] = writer
            return (r.remote, id)
        }
    }

    /// Lands a write for an inbound queue pair the way a responder NIC would.
    fileprivate func execute(_ w: MemoryQueuePair.Request, inboundID: UInt64, writer: NodeID, base: UInt64) -> CompletionStatus {
        let region: MemoryRegion? = state.withLock { s in
            guard !s.closed, !s.revoked.contains(inboundID), let r = s.regions[base] else { return nil }
            s.landing[inboundID, default: 0] += 1
            return r
        }
        guard let region else { return .transportError }
        defer { state.withLock { s in s.landing[inboundID, default: 0] -= 1 } }
        let ok = w.bytes.withUnsafeBytes { region.land($0, at: w.remoteOffset, key: w.key) }
        guard ok else { return .remoteAccessError }
        if let imm = w.immediate {
            completions.push(Completion(kind: .writeImmediateReceived, status: .success, peer: writer,
                                        workRequestID: 0, immediate: imm))
        }
        return .success
    }

    fileprivate func drainQueuePairs() {
        for qp in state.withLock({ $0.queuePairs }) { qp.drain() }
    }
}

/// The writing end of a `MemoryFabric` connection.
final class MemoryQueuePair: QueuePair {
    struct Request {
        var bytes: [UInt8]
        var remoteOffset: Int
        var key: UInt32
        var immediate: UInt32?
        var workRequestID: UInt64
        var signaled: Bool
    }

    let peer: NodeID
    let remote: RemoteRegion
    private let inboundID: UInt64
    // Strong: the fabric drops its queue pairs on close, which breaks the cycle.
    private let fabric: MemoryFabric
    private let target: MemoryFabric
    private struct State {
        var inError = false
        var pending: [Request] = []
    }
    private let state = Mutex(State())

    init(fabric: MemoryFabric, target: MemoryFabric, remote: RemoteRegion, inboundID: UInt64) {
        self.fabric = fabric
        self.target = target
        self.peer = target.localNode
        self.remote = remote
        self.inboundID = inboundID
    }

    var isUsable: Bool { !state.withLock { $0.inError } }

    func postWrite(_ bytes: [UInt8], remoteOffset: Int, key: UInt32, immediate: UInt32?,
                   workRequestID: UInt64, signaled: Bool) throws(FabricError) {
        let r = Request(bytes: bytes, remoteOffset: remoteOffset, key: key, immediate: immediate,
                        workRequestID: workRequestID, signaled: signaled)
        // The lock is held while landing so concurrent posters cannot reorder one queue pair.
        try state.withLock { s throws(FabricError) in
            guard !s.inError else { throw FabricError.queuePairInError(peer: peer) }
            guard s.pending.count < fabric.outstandingWritesMax else {
                throw FabricError.tooManyOutstandingWrites(peer: peer, limit: fabric.outstandingWritesMax)
            }
            s.pending.append(r)
            if !fabric.network.isPaused { drainLocked(&s) }
        }
    }

    func drain() { state.withLock { drainLocked(&$0) } }

    private func drainLocked(_ s: inout State) {
        while !s.inError, !s.pending.isEmpty {
            let r = s.pending.removeFirst()
            let status = target.execute(r, inboundID: inboundID, writer: fabric.localNode, base: remote.base)
            if status != .success || r.signaled {
                fabric.completions.push(Completion(kind: .write, status: status, peer: peer,
                                                   workRequestID: r.workRequestID, immediate: nil))
            }
            if status != .success { errorLocked(&s) }
        }
    }

    func moveToError() { state.withLock { errorLocked(&$0) } }

    private func errorLocked(_ s: inout State) {
        s.inError = true
        for r in s.pending {
            fabric.completions.push(Completion(kind: .write, status: .flushed, peer: peer,
                                               workRequestID: r.workRequestID, immediate: nil))
        }
        s.pending = []
    }
}
