import Metrics

/// One replica's metrics handles, all labelled `node="ID"`. The handles are thread-safe; only
/// the node writes them (from its thread once it runs).
struct NodeMetrics: Sendable {
    let commitLatency: CoreMetrics.Timer
    let proposalsPerBatch: Recorder
    let entriesApplied: Counter
    let electionsStarted: Counter
    let preElectionsStarted: Counter
    let electionsWon: Counter
    let leaderChanges: Counter
    /// One gauge per role, 1 for the current role and 0 for the others.
    let roles: [Role: Gauge]
    let commitIndex: Gauge
    let appliedIndex: Gauge
    let lastIndex: Gauge
    let durableIndex: Gauge
    let pendingProposals: Gauge
    let pendingReads: Gauge
    let logBytes: Gauge
    let snapshotBytes: Gauge
    let storageFailures: Counter
    let lateTicks: Counter
    let tickDelay: CoreMetrics.Timer
    let node: [(String, String)]
    let factory: any MetricsFactory

    init(node id: NodeID, factory: any MetricsFactory) {
        let node = [("node", "\(id)")]
        self.node = node
        self.factory = factory
        typealias N = PloverMetrics
        commitLatency = CoreMetrics.Timer(label: N.commitLatency, dimensions: node, factory: factory)
        proposalsPerBatch = Recorder(label: N.proposalsPerBatch, dimensions: node, aggregate: true, factory: factory)
        entriesApplied = Counter(label: N.entriesApplied, dimensions: node, factory: factory)
        electionsStarted = Counter(label: N.electionsStarted, dimensions: node + [("kind", "election")], factory: factory)
        preElectionsStarted = Counter(label: N.electionsStarted, dimensions: node + [("kind", "pre_vote")], factory: factory)
        electionsWon = Counter(label: N.electionsWon, dimensions: node, factory: factory)
        leaderChanges = Counter(label: N.leaderChanges, dimensions: node, factory: factory)
        var roles: [Role: Gauge] = [:]
        for r in [Role.follower, .preCandidate, .candidate, .leader] {
            roles[r] = Gauge(label: N.role, dimensions: node + [("role", r.rawValue)], factory: factory)
        }
        self.roles = roles
        commitIndex = Gauge(label: N.commitIndex, dimensions: node, factory: factory)
        appliedIndex = Gauge(label: N.appliedIndex, dimensions: node, factory: factory)
        lastIndex = Gauge(label: N.lastIndex, dimensions: node, factory: factory)
        durableIndex = Gauge(label: N.durableIndex, dimensions: node, factory: factory)
        pendingProposals = Gauge(label: N.pendingProposals, dimensions: node, factory: factory)
        pendingReads = Gauge(label: N.pendingReads, dimensions: node, factory: factory)
        logBytes = Gauge(label: N.logBytes, dimensions: node, factory: factory)
        snapshotBytes = Gauge(label: N.snapshotBytes, dimensions: node, factory: factory)
        storageFailures = Counter(label: N.storageFailures, dimensions: node, factory: factory)
        lateTicks = Counter(label: N.lateTicks, dimensions: node, factory: factory)
        tickDelay = CoreMetrics.Timer(label: N.tickDelay, dimensions: node, factory: factory)
    }

    func setRole(_ role: Role) {
        for (r, g) in roles { g.record(r == role ? 1 : 0) }
    }
}

/// Exports `RingTransport.statistics` (cumulative counters) as swift-metrics counters by adding
/// the difference since the last sample, and the rings' occupancy as gauges. Owned by the node thread.
struct RingMetrics {
    let ring: RingTransport
    private var last = RingTransport.Statistics()
    private let sent, delivered, torn, undecodable, connects: Counter
    private let dropped: [(reason: String, counter: Counter)]
    private let occupancy: [NodeID: Gauge]

    init(ring: RingTransport, metrics m: NodeMetrics) {
        self.ring = ring
        typealias N = PloverMetrics
        let f = m.factory
        sent = Counter(label: N.ringMessagesSent, dimensions: m.node, factory: f)
        delivered = Counter(label: N.ringMessagesDelivered, dimensions: m.node, factory: f)
        torn = Counter(label: N.ringTornRecords, dimensions: m.node, factory: f)
        undecodable = Counter(label: N.ringUndecodable, dimensions: m.node, factory: f)
        connects = Counter(label: N.ringConnects, dimensions: m.node, factory: f)
        dropped = RingTransport.Statistics.dropReasons.map { reason, _ in
            (reason, Counter(label: N.ringMessagesDropped, dimensions: m.node + [("reason", reason)], factory: f))
        }
        var occupancy: [NodeID: Gauge] = [:]
        for peer in ring.layout.peers {
            occupancy[peer] = Gauge(label: N.ringOccupancy, dimensions: m.node + [("peer", "\(peer)")], factory: f)
        }
        self.occupancy = occupancy
        Gauge(label: N.ringCapacity, dimensions: m.node, factory: f).record(ring.layout.ringBytes)
    }

    /// Reads the transport's counters and rings once (a lock per peer: call it about once a second).
    mutating func sample() {
        let s = ring.statistics
        Self.add(s.sent - last.sent, to: sent)
        Self.add(s.delivered - last.delivered, to: delivered)
        Self.add(s.tornRecords - last.tornRecords, to: torn)
        Self.add(s.undecodable - last.undecodable, to: undecodable)
        Self.add(s.connects - last.connects, to: connects)
        for (i, (_, count)) in RingTransport.Statistics.dropReasons.enumerated() {
            Self.add(count(s) - count(last), to: dropped[i].counter)
        }
        last = s
        for (peer, bytes) in ring.outgoingOccupancy() { occupancy[peer]?.record(bytes) }
    }

    private static func add(_ n: Int, to c: Counter) {
        if n > 0 { c.increment(by: n) }
    }
}

extension RingTransport.Statistics {
    /// The `reason` label of `plover_ring_messages_dropped_total` and the counter it exports.
    static let dropReasons: [(String, @Sendable (Self) -> Int)] = [
        ("ring_full", { $0.droppedRingFull }),
        ("not_connected", { $0.droppedNotConnected }),
        ("too_large", { $0.droppedTooLarge }),
        ("unknown_peer", { $0.droppedUnknownPeer }),
        ("post_failed", { $0.droppedPostFailed }),
    ]
}
