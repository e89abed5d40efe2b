import Foundation
import Logging
import Synchronization

/// `MessageTransport` over any `Fabric`: the APUS hot path (docs/design/fabric.md, "Fabric and rings").
///
/// Each node registers one receive region holding one ring per peer (`RingLayout`). Each ring is
/// a credit ring: a sender writes checksummed, sequenced records into its ring in the receiver's
/// region with one-sided WRITE_WITH_IMM (the immediate only wakes the receiver) as its
/// `CreditRingWriter` plans them; the receiver polls its rings, takes valid records in order
/// with a `CreditRingReader`, and returns credit by writing its consumed position into a cell of
/// the sender's region. No send/recv, and the receiver's CPU takes no part in landing bytes.
///
/// Sessions: every (re)connected queue pair starts a new random epoch, announced in the ring's
/// control cell; the receiver resets that ring and answers with credit for the new epoch, and
/// only then does the sender write records. Records of an older epoch or lap are never delivered.
/// A full ring, a missing connection or an oversized message drops the message and counts it:
/// consensus retransmits.
public final class RingTransport: PolledMessageTransport {
    /// Addresses, ring size, limits and timings of a transport.
    public struct Configuration: Sendable {
        /// Where this node listens; `node` is its id.
        public var listenAddress: PeerAddress
        /// Every node that may ever exchange messages with this one (fixes the region layout).
        public var cluster: [NodeID]
        /// Where to reach the other members (may be filled in later with `setAddress`).
        public var peerAddresses: [PeerAddress]
        /// Data bytes of each ring (one per peer); a message may use at most half.
        public var ringBytes: Int
        /// Largest message accepted, among the decoder's other bounds.
        public var limits: WireCodec.Limits
        /// How long the transport's thread sleeps when no completion wakes it; after each wait it
        /// rescans the rings for a record no immediate announced and looks for failed queue pairs
        /// to reconnect. Every record, session and credit request carries an immediate, so the
        /// rescan is only a safety net.
        public var pollInterval: Duration
        /// First wait before reconnecting to a peer; doubles after each failure.
        public var reconnectDelayMin: Duration
        /// Longest wait between reconnection attempts.
        public var reconnectDelayMax: Duration
        /// Request a writer completion every this many records (selective signalling).
        public var signalEveryWrites: Int

        /// The default `ringBytes`: 1 MiB.
        public static let defaultRingBytes = 1 << 20

        /// A configuration with 1 MiB rings, a 10 ms poll interval, reconnect backoff from 10 ms to
        /// 1 s and a signalled write every 32 records by default.
        public init(listenAddress: PeerAddress, cluster: [NodeID], peerAddresses: [PeerAddress] = [],
                    ringBytes: Int = defaultRingBytes, limits: WireCodec.Limits = .standard,
                    pollInterval: Duration = .milliseconds(10), reconnectDelayMin: Duration = .milliseconds(10),
                    reconnectDelayMax: Duration = .seconds(1), signalEveryWrites: Int = 32) {
            self.listenAddress = listenAddress
            self.cluster = cluster
            self.peerAddresses = peerAddresses
            self.ringBytes = ringBytes
            self.limits = limits
            self.pollInterval = pollInterval
            self.reconnectDelayMin = reconnectDelayMin
            self.reconnectDelayMax = reconnectDelayMax
            self.signalEveryWrites = signalEveryWrites
        }
    }

    /// Counters since `open`.
    public struct Statistics: Hashable, Sendable {
        /// Messages written into a peer's ring.
        public var sent = 0
        /// Messages received and handed to `onReceive`.
        public var delivered = 0
        /// Messages dropped because the peer's ring had no room.
        public var droppedRingFull = 0
        /// Messages dropped because no usable queue pair (or no credit for the current epoch)
        /// existed yet.
        public var droppedNotConnected = 0
        /// Messages dropped for exceeding `layout.payloadBytesMax` or `limits.messageBytesMax`.
        public var droppedTooLarge = 0
        /// Messages dropped because the destination is not in `cluster`.
        public var droppedUnknownPeer = 0
        /// Posting failed (too many outstanding writes, or the queue pair broke).
        public var droppedPostFailed = 0
        /// Records whose header matched but whose checksum did not (torn or corrupt), counted once per position.
        public var tornRecords = 0
        /// Valid records whose payload is not a decodable message.
        public var undecodable = 0
        /// Queue pairs connected (first connections and reconnections).
        public var connects = 0
        /// Credit cells written back to peers (the reader returns credit lazily: for a new
        /// session, a record that asks, or a request in the control cell).
        public var creditReturns = 0
        /// Requests for credit written to peers' control cells, each after a message found no room.
        public var creditRequests = 0
    }

    /// The configuration the transport was opened with.
    public let configuration: Configuration
    /// Where the credit cells, control cells and rings sit in this node's region.
    public let layout: RingLayout
    /// The fabric the rings are written over.
    public let fabric: any Fabric
    /// The address peers connect to (the bound port when the configuration asked for port 0).
    public let listeningAddress: PeerAddress
    let region: MemoryRegion
    private let links: [NodeID: PeerLink]
    private let stats = Mutex(Statistics())
    private let run = Mutex(RunState())
    /// Test hook: while true the receiver leaves its rings alone (so they fill up).
    private let receivingPaused = Mutex(false)
    private let logger: Logger

    private struct RunState {
        var started = false
        var stopped = false
        var tasks: [Task<Void, Never>] = []
        var exited: DispatchSemaphore?
    }

    /// Registers the receive region and starts listening. Call `start` to connect and deliver.
    public static func open(fabric: any Fabric, configuration: Configuration) async throws -> RingTransport {
        guard configuration.listenAddress.node == fabric.localNode else {
            throw FabricError.badConfiguration("listen address names node \(configuration.listenAddress.node), fabric is node \(fabric.localNode)")
        }
        guard configuration.signalEveryWrites > 0 else { throw FabricError.badConfiguration("signalEveryWrites must be positive") }
        let layout = try RingLayout(owner: fabric.localNode, cluster: configuration.cluster, ringBytes: configuration.ringBytes)
        let region = try fabric.registerRegion(lengthBytes: layout.regionBytes)
        region.store(layout.headerCell(), at: 0)
        let address = try await fabric.listen(at: configuration.listenAddress, exporting: region)
        return try RingTransport(fabric: fabric, configuration: configuration, layout: layout, region: region, address: address)
    }

    private init(fabric: any Fabric, configuration: Configuration, layout: RingLayout, region: MemoryRegion,
                 address: PeerAddress) throws {
        self.fabric = fabric
        self.configuration = configuration
        self.layout = layout
        self.region = region
        self.listeningAddress = address
        var logger = Logger(label: "plover.ring")
        logger[metadataKey: "node"] = "\(fabric.localNode)"
        self.logger = logger
        var links: [NodeID: PeerLink] = [:]
        for (i, peer) in layout.peers.enumerated() {
            let remote = try RingLayout(owner: peer, cluster: configuration.cluster, ringBytes: configuration.ringBytes)
            guard let out = remote.index(of: fabric.localNode) else { preconditionFailure("a member is missing from its peer's layout") }
            let link = PeerLink(peer: peer, inIndex: i, outIndex: out, remoteLayout: remote)
            link.out.withLock { $0.address = configuration.peerAddresses.first { $0.node == peer } }
            links[peer] = link
        }
        self.links = links
    }

    /// A snapshot of the counters.
    public var statistics: Statistics { stats.withLock { $0 } }

    /// Bytes written into each peer's ring that the peer has not yet reported consumed in its
    /// credit cell (at most `layout.ringBytes`; a ring that fills drops messages). Reads the
    /// credit cells without changing the senders' state.
    public func outgoingOccupancy() -> [NodeID: Int] {
        links.mapValues { link in
            link.out.withLock { s in
                guard var writer = s.writer else { return 0 }
                region.withBytes(offset: layout.creditOffset(link.inIndex), count: CreditRing.cellBytes) { _ = writer.takeCredit(cell: $0) }
                return writer.uncreditedBytes
            }
        }
    }

    /// Sets or changes where `address.node` is reached; the next (re)connect uses it.
    public func setAddress(_ address: PeerAddress) {
        guard let link = links[address.node] else { return }
        link.out.withLock { $0.address = address }
        link.check.signal()
    }

    /// Sets the addresses of `connect` (the next reconnect uses a changed one) and forgets those
    /// of `disconnect`, closing their queue pairs. Nodes without a ring here are skipped.
    public func updatePeers(connect: [PeerAddress], disconnect: [NodeID]) {
        for a in connect where a.node != fabric.localNode {
            guard let link = links[a.node] else { continue }
            link.out.withLock { s in
                if s.address != a { s.address = a; s.qp?.moveToError() }
            }
            link.check.signal()
        }
        for n in disconnect {
            links[n]?.out.withLock { s in
                s.address = nil
                s.qp?.moveToError()
            }
        }
    }

    // MARK: MessageTransport

    public func start(onReceive: @escaping @Sendable (Message) -> Void) throws {
        try begin(.deliver(onReceive))
    }

    /// Polled mode (`PolledMessageTransport`): a record landing in a ring (its WRITE_WITH_IMM
    /// completion, pushed by the fabric's thread) calls `wake` at once; the caller reads the rings
    /// on its own thread with `receiveWaiting`. The transport's thread only consumes completions
    /// and, every `pollInterval`, calls `wake` if a ring holds a record that no immediate
    /// announced (a lost wake-up costs at most one poll interval, never a message).
    public func startPolled(wake: @escaping @Sendable () -> Void) throws {
        // Before the sessions start: their announcements ring it too.
        fabric.completions.setDoorbell(wake)
        do { try begin(.polled(wake)) } catch {
            fabric.completions.setDoorbell(nil)
            throw error
        }
        // Peers may have announced sessions (or written records) before the doorbell was there.
        wake()
    }

    public func receiveWaiting(_ deliver: (Message) -> Void) -> Int {
        guard !receivingPaused.withLock({ $0 }) else { return 0 }
        var inbox: [Message] = []
        var total = 0
        for link in links.values {
            poll(link, into: &inbox)
            // Counted before they are handed over, so the statistics never lag what a
            // handler has already seen.
            if !inbox.isEmpty { count(\.delivered, by: inbox.count) }
            for m in inbox { deliver(m) }
            total += inbox.count
            inbox.removeAll(keepingCapacity: true)
            returnCredit(link)
        }
        return total
    }

    private enum Receiving {
        case deliver(@Sendable (Message) -> Void)
        case polled(@Sendable () -> Void)
    }

    private func begin(_ receiving: Receiving) throws {
        let exited = DispatchSemaphore(value: 0)
        try run.withLock { r throws(FabricError) in
            guard !r.stopped else { throw FabricError.notRunning }
            guard !r.started else { throw FabricError.invalidRequest("transport already started") }
            r.started = true
            r.exited = exited
            for link in links.values {
                r.tasks.append(Task { [self] in await maintain(link) })
            }
        }
        let thread = Thread(named: "plover-ring-\(fabric.localNode)") { [self] in
            switch receiving {
            case let .deliver(onReceive): receiveLoop(onReceive)
            case let .polled(wake): watchLoop(wake)
            }
            exited.signal()
        }
        thread.start()
    }

    public func send(_ message: Message) {
        guard let link = links[message.to] else { return count(\.droppedUnknownPeer) }
        let payload = WireCodec.encode(message)
        guard payload.count <= layout.payloadBytesMax, payload.count <= configuration.limits.messageBytesMax else {
            return count(\.droppedTooLarge)
        }
        let (outcome, broken) = link.out.withLock { s in (send(payload, on: link, &s), s.needsConnect) }
        // No usable queue pair: reconnect now rather than at the transport thread's next look.
        if broken { link.check.signal() }
        count(outcome)
    }

    public func fence(_ peer: NodeID) {
        fabric.revokeAccess(from: peer)
    }

    public func stop() {
        let (tasks, exited) = run.withLock { r -> ([Task<Void, Never>], DispatchSemaphore?) in
            guard !r.stopped else { return ([], nil) }
            r.stopped = true
            defer { r.tasks = []; r.exited = nil }
            return (r.tasks, r.exited)
        }
        for t in tasks { t.cancel() }
        fabric.completions.setDoorbell(nil)
        fabric.completions.interrupt()
        exited?.wait()
        for link in links.values { link.out.withLock { $0.qp?.moveToError() } }
        fabric.close()
    }

    /// True when the session to `peer` is established (the peer acknowledged its epoch).
    public func isConnected(to peer: NodeID) -> Bool {
        guard let link = links[peer] else { return false }
        return link.out.withLock { s in refreshCredit(link, &s); return s.ready && s.qp?.isUsable == true }
    }

    /// True when this node's queue pair to `peer` failed (a reset or closed connection: the
    /// peer's process is gone, or the link broke) and no new one is up yet. A peer never
    /// connected, a full ring or a session still starting is not a broken link.
    public func isLinkDown(to peer: NodeID) -> Bool {
        guard let link = links[peer] else { return false }
        return link.out.withLock { s in s.qp.map { !$0.isUsable } ?? false }
    }

    /// Waits until every peer with a known address is connected, or `timeout` passes.
    public func waitUntilConnected(timeout: Duration = .seconds(10)) async -> Bool {
        let deadline = ContinuousClock.now + timeout
        while ContinuousClock.now < deadline {
            if links.keys.allSatisfy({ isConnected(to: $0) }) { return true }
            try? await Task.sleep(for: .milliseconds(2))
        }
        return false
    }

    private var stopped: Bool { run.withLock { $0.stopped } }

    /// Whether the reader took up a session `peer` announced; for tests of the connect order.
    func hasTakenUpSession(from peer: NodeID) -> Bool {
        links[peer]?.inbound.withLock { $0.reader != nil } ?? false
    }

    /// Stops (or resumes) consuming the rings, as a slow receiver would; for tests of full rings.
    func pauseReceiving(_ paused: Bool) { receivingPaused.withLock { $0 = paused } }

    private func count(_ k: WritableKeyPath<Statistics, Int>, by n: Int = 1) {
        stats.withLock { $0[keyPath: k] += n }
    }

    // MARK: sending

    /// Immediate values: what the receiver should look at (it rescans anyway).
    enum Immediate: UInt32 { case record = 1, session = 2 }

    private func send(_ payload: [UInt8], on link: PeerLink, _ s: inout Sender) -> WritableKeyPath<Statistics, Int> {
        guard let qp = s.qp, qp.isUsable else { return \.droppedNotConnected }
        // The credit cell is read when the ring looks a quarter full: the credit-wanted flag depends on it.
        if !s.ready || s.writer.map({ $0.uncreditedBytes + $0.bytesNeeded(payloadBytes: payload.count) > layout.ringBytes / 4 }) == true {
            refreshCredit(link, &s)
        }
        guard s.ready, var writer = s.writer else { return \.droppedNotConnected }
        defer { s.writer = writer }
        // The reader returns credit lazily: only for a record that asks (the writer decides), a
        // new session, or a request in the control cell.
        guard let append = writer.append(kind: RingLayout.messageKind, payload: payload) else {
            requestCredit(on: link, qp, writer, &s)
            return \.droppedRingFull
        }
        let ringOffset = link.remoteLayout.ringOffset(link.outIndex)
        do {
            if let marker = append.wrapMarker {
                // Records never straddle the end: a wrap marker sends the reader back to the start.
                try qp.postWrite(marker.bytes, remoteOffset: ringOffset + marker.offset, immediate: nil, signaled: false)
                writer.posted(marker)
            }
            s.posted += 1
            try qp.postWrite(append.record.bytes, remoteOffset: ringOffset + append.record.offset, immediate: Immediate.record.rawValue,
                             workRequestID: s.posted, signaled: s.posted % UInt64(configuration.signalEveryWrites) == 0)
            writer.posted(append.record)
            return \.sent
        } catch .queuePairInError {
            return \.droppedNotConnected
        } catch {
            logger.debug("write to node \(link.peer) not posted: \(error)")
            return \.droppedPostFailed
        }
    }

    /// The ring has no room for a message while the reader may hold back credit for what it
    /// read: ask for it through the control cell (once per credit position), so the next
    /// attempt finds the room.
    private func requestCredit(on link: PeerLink, _ qp: any QueuePair, _ writer: CreditRingWriter, _ s: inout Sender) {
        guard s.requestedAt != writer.creditPosition else { return }
        s.requestedAt = writer.creditPosition
        s.creditRequests += 1
        count(\.creditRequests)
        try? qp.postWrite(RingLayout.controlCell(epoch: writer.session, creditRequests: s.creditRequests),
                          remoteOffset: link.remoteLayout.controlOffset(link.outIndex), immediate: Immediate.session.rawValue,
                          signaled: false)
    }

    /// Reads the credit cell the peer writes into this node's region; the first that names the
    /// session makes the sender ready.
    private func refreshCredit(_ link: PeerLink, _ s: inout Sender) {
        guard var writer = s.writer else { return }
        let taken = region.withBytes(offset: layout.creditOffset(link.inIndex), count: CreditRing.cellBytes) { writer.takeCredit(cell: $0) }
        s.writer = writer
        if taken { s.ready = true }
    }

    /// (epoch, credit requests) from the control cell the peer writes in front of its ring here.
    private func controlCell(_ link: PeerLink) -> (epoch: UInt64, creditRequests: UInt64)? {
        region.withBytes(offset: layout.controlOffset(link.inIndex), count: CreditRing.cellBytes) { RingLayout.controlCell($0) }
    }

    /// Keeps one peer's queue pair connected, reconnecting with capped exponential backoff.
    private func maintain(_ link: PeerLink) async {
        var delay = configuration.reconnectDelayMin
        while !Task.isCancelled {
            let (needed, address) = link.out.withLock { s in (s.needsConnect, s.address) }
            guard needed, let address else {
                // Waiting for an address or for the queue pair to fail: `setAddress`, a send that
                // found no usable queue pair, a failed write or the transport thread's look at
                // every link after each wait (`signalBrokenLinks`) wakes it; no timer runs.
                await link.check.wait()
                continue
            }
            do {
                let qp = try await fabric.connect(to: address, exporting: region)
                guard qp.remote.lengthBytes == link.remoteLayout.regionBytes else {
                    qp.moveToError()
                    throw FabricError.badConfiguration(
                        "node \(link.peer) exports \(qp.remote.lengthBytes) bytes, expected \(link.remoteLayout.regionBytes): cluster or ringBytes differ")
                }
                let epoch = UInt64.random(in: 1...UInt64.max)
                try link.out.withLock { s throws(FabricError) in
                    s.reset(qp: qp, writer: CreditRingWriter(ring: link.remoteLayout.ring, session: epoch))
                    try qp.postWrite(RingLayout.controlCell(epoch: epoch), remoteOffset: link.remoteLayout.controlOffset(link.outIndex),
                                     immediate: Immediate.session.rawValue, signaled: false)
                }
                // The peer may be waiting for credit on its own ring; it travels on this queue pair.
                // Whoever reads the rings must return it now, not at its next poll: the peer's
                // session may have been taken up before this queue pair existed, and its sender
                // is not ready until this credit arrives.
                link.inbound.withLock { $0.reader?.requestCredit() }
                fabric.completions.interrupt()
                count(\.connects)
                logger.debug("connected to node \(link.peer), epoch \(epoch)")
                delay = configuration.reconnectDelayMin
                // At most one connect per `reconnectDelayMin` to a peer that accepts and then
                // drops each connection (sends find the queue pair broken and signal at once).
                try? await Task.sleep(for: configuration.reconnectDelayMin)
            } catch {
                logger.debug("connecting to \(address) failed: \(error); retrying in \(delay)")
                try? await Task.sleep(for: delay)
                delay = min(delay * 2, configuration.reconnectDelayMax)
            }
        }
    }

    // MARK: receiving

    private func receiveLoop(_ onReceive: @Sendable (Message) -> Void) {
        var inbox: [Message] = []
        while !stopped {
            for c in fabric.completions.wait(max: 1024, timeout: configuration.pollInterval)
            where c.kind == .write && c.status != .success {
                // The queue pair is in error now; `maintain` reconnects it.
                logger.debug("write to node \(c.peer) completed \(c.status)")
            }
            signalBrokenLinks()
            if receivingPaused.withLock({ $0 }) { continue }
            for link in links.values {
                poll(link, into: &inbox)
                if !inbox.isEmpty { count(\.delivered, by: inbox.count) }
                for m in inbox { onReceive(m) }
                inbox.removeAll(keepingCapacity: true)
                returnCredit(link)
            }
        }
    }

    /// Polled mode's thread: consumes completions (a failed write means the queue pair is in
    /// error; `maintain` reconnects it) and, after each wait, wakes the reader if a ring holds a
    /// record, a new session or credit to return (whether or not an immediate announced it).
    private func watchLoop(_ wake: @Sendable () -> Void) {
        while !stopped {
            let cs = fabric.completions.wait(max: 1024, timeout: configuration.pollInterval)
            for c in cs where c.kind == .write && c.status != .success {
                logger.debug("write to node \(c.peer) completed \(c.status)")
            }
            signalBrokenLinks()
            if !receivingPaused.withLock({ $0 }), links.values.contains(where: hasWaitingRecord) { wake() }
        }
    }

    /// Wakes the `maintain` task of every link with a known address and no usable queue pair
    /// (a connection lost with no write outstanding reports no completion).
    private func signalBrokenLinks() {
        for link in links.values where link.out.withLock({ $0.needsConnect }) {
            link.check.signal()
        }
    }

    /// Whether the ring `link.peer` writes holds a record at the read position (cheap: one header).
    private func hasWaitingRecord(_ link: PeerLink) -> Bool {
        link.inbound.withLock { st in
            // A new session announced and not yet taken up (its credit answer is due), or credit
            // not yet returned.
            if let c = controlCell(link), c.epoch != 0, c.epoch != st.reader?.session || c.creditRequests != st.creditRequests { return true }
            guard let reader = st.reader else { return false }
            return reader.creditDue || reader.hasRecord(in: region, at: layout.ringOffset(link.inIndex))
        }
    }

    /// Delivers every valid record waiting in the ring `link.peer` writes, in sequence order.
    private func poll(_ link: PeerLink, into inbox: inout [Message]) {
        let ringOffset = layout.ringOffset(link.inIndex)
        link.inbound.withLock { st in
            let control = controlCell(link)
            if let c = control, c.epoch != 0, c.epoch != st.reader?.session {
                st = Receiver(reader: CreditRingReader(ring: layout.ring, session: c.epoch), creditRequests: c.creditRequests)
                st.reader?.requestCredit()
            } else if let c = control, c.epoch == st.reader?.session, c.creditRequests != st.creditRequests {
                st.creditRequests = c.creditRequests
                st.reader?.requestCredit()
            }
            guard var reader = st.reader else { return }
            defer { st.reader = reader }
            for _ in 0..<4096 {
                switch reader.next(in: region, at: ringOffset) {
                case .empty, .malformed:
                    return
                case .landing:
                    // Not landed completely yet, or torn: look again next scan, count it once.
                    if st.tornAt != reader.readPosition { st.tornAt = reader.readPosition; count(\.tornRecords) }
                    return
                case .record(let record) where record.kind != RingLayout.messageKind:
                    count(\.undecodable)
                    logger.warning("record \(record.sequence) from node \(link.peer) has unknown flags \(record.kind)")
                case .record(let record):
                    do {
                        inbox.append(try WireCodec.decode(record.payload, limits: configuration.limits))
                    } catch {
                        count(\.undecodable)
                        logger.warning("undecodable record from node \(link.peer): \(error)")
                    }
                }
            }
        }
    }

    /// Tells the peer how far its ring here was consumed, by a write into its credit cell.
    private func returnCredit(_ link: PeerLink) {
        link.inbound.withLock { st in
            guard let reader = st.reader, reader.creditDue else { return }
            let cell = reader.creditCell()
            let posted = link.out.withLock { s -> Bool in
                guard let qp = s.qp, qp.isUsable else { return false }
                do {
                    try qp.postWrite(cell, remoteOffset: link.remoteLayout.creditOffset(link.outIndex), immediate: nil, signaled: false)
                    return true
                } catch { return false }
            }
            if posted {
                st.reader?.returnedCredit(at: reader.readPosition)
                count(\.creditReturns)
            }
        }
    }
}
