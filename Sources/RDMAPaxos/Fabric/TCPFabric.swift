#if canImport(Glibc)
import Glibc
#endif
import Crypto
import Logging
import NIOCore
import NIOPosix
import Synchronization

/// `Fabric` in software over TCP (SwiftNIO), for machines without RDMA hardware.
///
/// A queue pair is one TCP connection, authenticated both ways with the cluster key. A WRITE
/// travels as a frame; the target's fabric lands the bytes in the registered region on its I/O
/// thread (the target's consensus loop takes no part). The writer asks for an acknowledgement of
/// each signaled write and of every `acknowledgeEveryWrites`-th one (bounding what is
/// outstanding); one acknowledgement answers every earlier write as well, and a write that does
/// not land is always answered. The writer's completion follows the acknowledgement, so success
/// means the bytes landed. TCP keeps each connection's
/// frames in order, which gives per-queue-pair order. Writes carry the region key; a wrong key or
/// range is acknowledged as a remote access error and the writer's queue pair enters the error
/// state, as in verbs.
public final class TCPFabric: Fabric {
    /// Cluster key, membership, limits and timeouts of a TCP fabric.
    public struct Configuration: Sendable {
        /// Shared secret of the cluster (at least 16 bytes); peers prove they hold it at connect.
        public var clusterKey: [UInt8]
        /// Node ids allowed to connect (and to be connected to).
        public var members: Set<NodeID>
        /// Most writes in flight on one queue pair; more are refused with
        /// `.tooManyOutstandingWrites`.
        public var outstandingWritesMax: Int
        /// Largest frame accepted from an authenticated peer (a write's data plus 34 bytes).
        public var frameBytesMax: Int
        /// Time a new connection has to complete the handshake before it is closed.
        public var handshakeTimeout: Duration
        /// Time allowed to establish the TCP connection in `connect`.
        public var connectTimeout: Duration
        /// Capacity of the completion queue.
        public var completionQueueEntries: Int

        /// A configuration with the defaults shown (16 MiB frames, 5 s handshake, 2 s connect).
        public init(clusterKey: [UInt8], members: Set<NodeID>, outstandingWritesMax: Int = 1024,
                    frameBytesMax: Int = (16 << 20) + 64, handshakeTimeout: Duration = .seconds(5),
                    connectTimeout: Duration = .seconds(2), completionQueueEntries: Int = 1 << 16) {
            self.clusterKey = clusterKey
            self.members = members
            self.outstandingWritesMax = outstandingWritesMax
            self.frameBytesMax = frameBytesMax
            self.handshakeTimeout = handshakeTimeout
            self.connectTimeout = connectTimeout
            self.completionQueueEntries = completionQueueEntries
        }
    }

    /// Counters of the fabric's connection handling.
    public struct Statistics: Hashable, Sendable {
        /// Incoming connections whose handshake succeeded.
        public var handshakesAccepted = 0
        /// Handshakes refused (bad version, wrong or unknown node, failed authentication, replayed
        /// nonce), by either side.
        public var handshakesRejected = 0
        /// Connections closed because a frame was malformed or out of place.
        public var badFrames = 0
    }

    public let localNode: NodeID
    public let completions: CompletionQueue
    /// The configuration the fabric was created with.
    public let configuration: Configuration
    let group: any EventLoopGroup
    /// Built per handshake from the configured bytes (`SymmetricKey` is not `Sendable`).
    var key: SymmetricKey { SymmetricKey(data: configuration.clusterKey) }
    let logger: Logger

    private struct Inbound {
        var peer: NodeID
        var channel: any Channel
        var revoked = false
        /// Writes from this connection being copied into a region right now.
        var landing = 0
    }
    private struct State {
        var regions: [UInt64: MemoryRegion] = [:]
        var exported: MemoryRegion?
        var server: (any Channel)?
        var inbound: [UInt64: Inbound] = [:]
        var nextInboundID: UInt64 = 1
        var queuePairs: [ObjectIdentifier: TCPQueuePair] = [:]
        var closed = false
        /// Connector nonces seen recently: a replayed hello is refused before any MAC work.
        var nonces: Set<[UInt8]> = []
        var nonceOrder: [[UInt8]] = []
        var stats = Statistics()
    }
    private let state = Mutex(State())
    static let noncesRemembered = 4096

    /// A fabric for `node` on `group`; throws `.badConfiguration` for a short key, a node that is 0
    /// or not a member, or limits that leave no room for one write.
    ///
    /// By default the connections spread over NIO's shared group (one loop per core). Putting
    /// all of them on one loop saves a wake-up per commit at one client but costs 15–35 % of
    /// the throughput at 64 clients with 4 KiB values, where one thread then copies every
    /// follower's bytes (docs/design/runtime.md, "Where a commit's time goes").
    public init(node: NodeID, configuration: Configuration,
                group: any EventLoopGroup = MultiThreadedEventLoopGroup.singleton) throws(FabricError) {
        guard configuration.clusterKey.count >= 16 else { throw .badConfiguration("the cluster key must be at least 16 bytes") }
        guard node != 0, configuration.members.contains(node) else {
            throw .badConfiguration("node \(node) is not among the members \(configuration.members.sorted())")
        }
        guard configuration.outstandingWritesMax > 0, configuration.frameBytesMax > Frames.writeHeaderBytes + 1 else {
            throw .badConfiguration("outstandingWritesMax and frameBytesMax must leave room for one write")
        }
        self.localNode = node
        self.configuration = configuration
        self.group = group
        self.completions = CompletionQueue(capacityEntries: configuration.completionQueueEntries)
        var logger = Logger(label: "plover.tcp-fabric")
        logger[metadataKey: "node"] = "\(node)"
        self.logger = logger
    }

    /// A snapshot of the counters.
    public var statistics: Statistics { state.withLock { $0.stats } }

    /// Binds a TCP listener at `host` (port 0) and closes it again: can this machine serve the
    /// TCP fabric there? Returns the port it got. Blocks; not for use on an event loop.
    public static func probeListening(host: String = "127.0.0.1") throws -> Int {
        let channel = try ServerBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .bind(host: host, port: 0).wait()
        defer { try? channel.close().wait() }
        return channel.localAddress?.port ?? 0
    }

    public func registerRegion(lengthBytes: Int) throws(FabricError) -> MemoryRegion {
        let r = try MemoryRegion(owner: localNode, lengthBytes: lengthBytes, key: UInt32.random(in: 1...UInt32.max))
        state.withLock { $0.regions[r.remote.base] = r }
        return r
    }

    public func registerRegion(wrapping bytes: UnsafeMutableRawBufferPointer, retaining owner: AnyObject?) throws(FabricError) -> MemoryRegion {
        let r = try MemoryRegion(owner: localNode, wrapping: bytes, retaining: owner, key: UInt32.random(in: 1...UInt32.max))
        state.withLock { $0.regions[r.remote.base] = r }
        return r
    }

    public func listen(at address: PeerAddress, exporting region: MemoryRegion) async throws(FabricError) -> PeerAddress {
        guard address.node == localNode else { throw .badConfiguration("listening as node \(address.node) on the fabric of node \(localNode)") }
        try state.withLock { s throws(FabricError) in
            guard !s.closed else { throw FabricError.notRunning }
            guard s.regions[region.remote.base] === region else {
                throw FabricError.invalidRequest("exported region was not registered with this fabric")
            }
            s.exported = region
        }
        let frameBytesMax = configuration.frameBytesMax
        let server: any Channel
        do {
            server = try await ServerBootstrap(group: group)
                .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
                .childChannelOption(.socketOption(.tcp_nodelay), value: 1)
                .childChannelInitializer { [self] channel in
                    channel.eventLoop.makeCompletedFuture {
                        let limit = FrameLimit(FrameLimit.handshakeBytesMax)
                        let ops = channel.pipeline.syncOperations
                        try ops.addHandler(ByteToMessageHandler(FrameDecoder(limit: limit)))
                        try ops.addHandler(AcceptorHandler(fabric: self, limit: limit, frameBytesMax: frameBytesMax))
                    }
                }
                .bind(host: address.host, port: address.port).get()
        } catch {
            throw .badConfiguration("cannot listen at \(address.host):\(address.port): \(error)")
        }
        let closedMeanwhile = state.withLock { s in
            if !s.closed { s.server = server }
            return s.closed
        }
        if closedMeanwhile { server.close(promise: nil); throw .notRunning }
        logger.info("listening at \(address.host):\(server.localAddress?.port ?? address.port)")
        return PeerAddress(node: localNode, host: address.host, port: server.localAddress?.port ?? address.port)
    }

    public func connect(to peer: PeerAddress, exporting region: MemoryRegion) async throws(FabricError) -> any QueuePair {
        guard configuration.members.contains(peer.node), peer.node != localNode else {
            throw .badConfiguration("node \(peer.node) is not a cluster member")
        }
        guard !state.withLock({ $0.closed }) else { throw .notRunning }
        let loop = group.next()
        let promise = loop.makePromise(of: TCPQueuePair.self)
        let local = region.remote
        let frameBytesMax = configuration.frameBytesMax
        do {
            _ = try await ClientBootstrap(group: loop)
                .connectTimeout(configuration.connectTimeout.timeAmount)
                .channelOption(.socketOption(.tcp_nodelay), value: 1)
                .channelInitializer { [self] channel in
                    channel.eventLoop.makeCompletedFuture {
                        let limit = FrameLimit(FrameLimit.handshakeBytesMax)
                        let ops = channel.pipeline.syncOperations
                        try ops.addHandler(ByteToMessageHandler(FrameDecoder(limit: limit)))
                        try ops.addHandler(ConnectorHandler(fabric: self, peer: peer.node, exported: local, limit: limit,
                                                            frameBytesMax: frameBytesMax, promise: promise))
                    }
                }
                .connect(host: peer.host, port: peer.port).get()
        } catch {
            promise.fail(error)
            throw .connectFailed(peer: peer.node, reason: "\(peer.host):\(peer.port): \(error)")
        }
        do {
            return try await promise.futureResult.get()
        } catch {
            throw .connectFailed(peer: peer.node, reason: "\(error)")
        }
    }

    @discardableResult
    public func rotateKey(of region: MemoryRegion) throws(FabricError) -> RemoteRegion {
        guard state.withLock({ $0.regions[region.remote.base] === region }) else {
            throw .invalidRequest("region was not registered with this fabric")
        }
        let old = region.key
        var k = old
        while k == old || k == 0 { k = UInt32.random(in: 1...UInt32.max) }
        region.setKey(k)
        return region.remote
    }

    public func revokeAccess(from peer: NodeID) {
        let channels = state.withLock { s -> [any Channel] in
            var out: [any Channel] = []
            for (id, c) in s.inbound where c.peer == peer {
                s.inbound[id]?.revoked = true
                out.append(c.channel)
            }
            return out
        }
        if !channels.isEmpty { logger.notice("revoked write access of node \(peer)") }
        for c in channels { c.close(promise: nil) }
        // A write that passed the access check before the fence may still be copying: wait for it,
        // so nothing of the peer's lands after this returns (as with a queue pair in ERROR).
        while state.withLock({ s in s.inbound.values.contains { $0.peer == peer && $0.landing > 0 } }) { usleep(50) }
    }

    public func close() {
        let (server, inbound, qps) = state.withLock { s -> ((any Channel)?, [any Channel], [TCPQueuePair]) in
            s.closed = true
            defer { s.server = nil; s.inbound = [:]; s.queuePairs = [:] }
            return (s.server, s.inbound.values.map(\.channel), Array(s.queuePairs.values))
        }
        if let server {
            // Wait for the listening socket to close (so the port is free when close returns),
            // unless called on an event loop, where waiting would deadlock.
            if server.eventLoop.inEventLoop { server.close(promise: nil) } else { try? server.close().wait() }
        }
        for c in inbound { c.close(promise: nil) }
        for qp in qps { qp.moveToError() }
        completions.interrupt()
    }

    // MARK: used by the connection handlers (on event loops)

    func isMember(_ n: NodeID) -> Bool { n != localNode && configuration.members.contains(n) }

    /// Records a connector nonce; false if it was seen recently (a replay).
    func rememberNonce(_ n: [UInt8]) -> Bool {
        state.withLock { s in
            guard s.nonces.insert(n).inserted else { return false }
            s.nonceOrder.append(n)
            if s.nonceOrder.count > Self.noncesRemembered { s.nonces.remove(s.nonceOrder.removeFirst()) }
            return true
        }
    }

    func exportedRegion() -> RemoteRegion? { state.withLock { $0.closed ? nil : $0.exported?.remote } }

    func registerInbound(peer: NodeID, channel: any Channel) -> UInt64? {
        state.withLock { s in
            guard !s.closed else { return nil }
            let id = s.nextInboundID
            s.nextInboundID += 1
            s.inbound[id] = Inbound(peer: peer, channel: channel)
            s.stats.handshakesAccepted += 1
            return id
        }
    }

    func unregisterInbound(_ id: UInt64) { state.withLock { _ = $0.inbound.removeValue(forKey: id) } }

    func track(_ qp: TCPQueuePair) -> Bool {
        state.withLock { s in
            guard !s.closed else { return false }
            s.queuePairs[ObjectIdentifier(qp)] = qp
            return true
        }
    }

    func untrack(_ qp: TCPQueuePair) { state.withLock { _ = $0.queuePairs.removeValue(forKey: ObjectIdentifier(qp)) } }

    func noteRejected() { state.withLock { $0.stats.handshakesRejected += 1 } }
    func noteBadFrame() { state.withLock { $0.stats.badFrames += 1 } }

    /// Lands a peer's write the way a responder NIC does; false is a remote access error.
    func land(_ w: Frames.Write, from peer: NodeID, inbound id: UInt64) -> Bool? {
        let region: MemoryRegion?? = state.withLock { s in
            guard let c = s.inbound[id], !c.revoked else { return .none }
            let r = s.regions[w.base]
            if r != nil { s.inbound[id]?.landing += 1 }
            return .some(r)
        }
        guard let region else { return nil }  // revoked: the caller closes the connection
        guard let region else { return false }
        defer { state.withLock { s in s.inbound[id]?.landing -= 1 } }
        guard let offset = Int(exactly: w.offset) else { return false }
        let ok = w.data.withUnsafeReadableBytes { region.land($0, at: offset, key: w.key) }
        if ok, let imm = w.immediate {
            completions.push(Completion(kind: .writeImmediateReceived, status: .success, peer: peer,
                                        workRequestID: 0, immediate: imm))
        }
        return ok
    }
}

/// The writing end of a TCP fabric connection.
final class TCPQueuePair: QueuePair {
    let peer: NodeID
    let remote: RemoteRegion
    let channel: any Channel
    private let fabric: TCPFabric
    private struct State {
        var inError = false
        var outstanding = OutstandingWrites()
        /// Writes posted since the last one that asked for an acknowledgement.
        var unasked = 0
    }
    /// Unsignaled writes in a row after which one asks for an acknowledgement anyway, so the
    /// outstanding ones are released well before `outstandingWritesMax`.
    static let acknowledgeEveryWrites = 32
    private let state = Mutex(State())

    init(fabric: TCPFabric, peer: NodeID, remote: RemoteRegion, channel: any Channel) {
        self.fabric = fabric
        self.peer = peer
        self.remote = remote
        self.channel = channel
    }

    var isUsable: Bool { !state.withLock { $0.inError } }

    func postWrite(_ bytes: [UInt8], remoteOffset: Int, key: UInt32, immediate: UInt32?,
                   workRequestID: UInt64, signaled: Bool) throws(FabricError) {
        guard bytes.count + Frames.writeHeaderBytes + 1 <= fabric.configuration.frameBytesMax else {
            throw .invalidRequest("a write of \(bytes.count) bytes exceeds the frame limit")
        }
        let limit = fabric.configuration.outstandingWritesMax
        let channel = self.channel
        try state.withLock { s throws(FabricError) in
            guard !s.inError else { throw FabricError.queuePairInError(peer: peer) }
            try s.outstanding.checkRoom(limit: limit, peer: peer)
            let seq = s.outstanding.append(workRequestID: workRequestID, signaled: signaled)
            s.unasked += 1
            let ask = signaled || s.unasked >= Self.acknowledgeEveryWrites || s.outstanding.count * 2 >= limit
            if ask { s.unasked = 0 }
            let flags = (immediate == nil ? 0 : Frames.WriteFlag.immediate) | (ask ? Frames.WriteFlag.acknowledge : 0)
            let frame = Frames.frame(.write, channel.allocator, capacity: Frames.writeHeaderBytes + bytes.count) { b in
                b.writeInteger(seq); b.writeInteger(remote.base); b.writeInteger(key)
                b.writeInteger(UInt64(bitPattern: Int64(remoteOffset)))
                b.writeInteger(flags); b.writeInteger(immediate ?? 0)
                b.writeBytes(bytes)
            }
            // Always through the loop's task queue, under the lock: posting order is wire order.
            channel.eventLoop.execute { channel.writeAndFlush(frame, promise: nil) }
        }
    }

    /// The target answered write `sequence`, and with it every earlier outstanding write (they
    /// landed). False for an answer that matches no outstanding write.
    func acknowledged(sequence: UInt64, landed: Bool) -> Bool {
        let fail = state.withLock { s -> Bool? in
            if s.inError { return false }
            guard s.outstanding.contains(sequence) else { return nil }
            s.outstanding.complete(through: sequence, status: landed ? .success : .remoteAccessError, push)
            if landed { return false }
            errorLocked(&s, firstStatus: .flushed)
            return true
        }
        guard let fail else { return false }
        if fail { channel.close(promise: nil) }
        return true
    }

    func connectionLost() {
        state.withLock { errorLocked(&$0, firstStatus: .transportError) }
        fabric.untrack(self)
    }

    func moveToError() {
        state.withLock { errorLocked(&$0, firstStatus: .flushed) }
        channel.close(promise: nil)
    }

    private func errorLocked(_ s: inout State, firstStatus: CompletionStatus) {
        guard !s.inError else { return }
        s.inError = true
        s.outstanding.flush(firstStatus: firstStatus, push)
    }

    private func push(_ p: OutstandingWrites.Write, _ status: CompletionStatus) {
        fabric.completions.push(Completion(kind: .write, status: status, peer: peer,
                                           workRequestID: p.workRequestID, immediate: nil))
    }
}

extension Duration {
    /// The same span as NIO's `TimeAmount`.
    var timeAmount: TimeAmount { .nanoseconds(wholeNanoseconds) }
}
