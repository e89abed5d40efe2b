import Foundation
import Metrics
import Synchronization

/// A running replica: drives the pure consensus core with a stable log, a message transport
/// and a clock, and applies committed commands to a `StateMachine`.
///
/// One thread owns the core and the state machine; everything else (network, disk
/// completions, ticks, client calls) reaches it as events on one queue.
public final class ReplicaNode: @unchecked Sendable {
    // @unchecked Sendable: every mutable field below is either owned by the node thread
    // (`replica`, `machine`, the pending maps) or guarded by `cond` (`events`, `published`, `state`).
    /// The options the node was created with.
    public let options: NodeOptions
    let log: any StableLog
    let snapshots: any SnapshotStore
    let transport: any MessageTransport
    /// `transport` when it is polled (cast once: a cast per event shows in a profile).
    let polledTransport: (any PolledMessageTransport)?
    let ticks: any TickSource
    let machine: any StateMachine
    let metrics: NodeMetrics

    let cond = NSCondition()
    /// A `messagesWaiting` event is queued and not yet taken (set by any thread, cleared by the
    /// node thread before it reads the rings, so a landing during the read queues another).
    let wakePending = Atomic<Bool>(false)
    var events: [NodeEvent] = []
    var state: RunState = .created
    var published: NodeStatus?

    // Owned by the node thread.
    var replica: Replica!
    var tickCount = 0
    /// When the node last warned that its ticks ran late (uptime ns; owned by the node thread).
    var lastLateTickWarning: UInt64?
    /// The current batch delivered a message from the leader this node knows (node thread).
    var heardFromLeader = false
    /// Pass times and the last word from the leader, for the warnings that explain an election.
    var loopWatch = LoopWatch()
    var proposals: [LogIndex: PendingProposal] = [:]
    /// Proposals from an earlier term of this replica whose index a proposal of a later term took
    /// (it was deposed before they committed, then elected again). Still pending: another replica
    /// may hold their entries and commit them yet, so only the entry applied at their index says
    /// whether they took effect. Almost always empty.
    var displaced: [LogIndex: [PendingProposal]] = [:]
    var reads: [UInt64: PendingRead] = [:]
    var nextReadID: UInt64 = 1
    var acksAwaitingPersist: [(sequence: UInt64, messages: [Message])] = []
    var persistsDone: Set<UInt64> = []
    var releasedThrough: UInt64 = 0
    var failure: String?
    /// The last leader this replica followed (or itself), for fencing.
    var knownLeader: NodeID?
    /// Answers to clients, delivered after the batch's status is published.
    var completions: [() -> Void] = []
    /// The client connections the pass's answers went to, flushed as the pass answers (on the node's loop).
    let passFlushes = PassFlushes()
    // Metrics state, owned by the node thread.
    var ringMetrics: RingMetrics?
    var metricsRole: Role?
    var metricsLeader: NodeID?
    /// Bytes of the latest snapshot saved (owned by the node thread).
    var snapshotBytes = 0
    /// Persist units held, in order, while the log's disk has no room for them (owned by the node
    /// thread); with the first one's reason, reported in status and once as a warning.
    var persistBacklog: [Persist] = []
    var storageWarning: String?
    /// Proposals that arrived during a leader transfer, held until it ends (owned by the node thread).
    var parked: [QueuedProposal] = []
    /// A compaction is being serialized or saved off the node thread; no second one starts.
    var compacting = false
    /// Compacted prefixes the core let go of, freed a bounded number of entries per loop pass
    /// (`freeReleasedEntries`; owned by the node thread).
    var releasing: [ReleasedEntries] = []
    /// Compactions handed to `snapshotQueue` to save, ever (tells `compact` whether one started).
    var compactionsSaving = 0
    /// The highest index handed to `log.append` (owned by the node thread): a compaction at or
    /// below it only drops entries the log already has or will have, so it can run off the thread.
    var appendedThrough: LogIndex = 0
    /// Serializes and saves snapshots, one at a time, off the node thread.
    let snapshotQueue: any OffLoopQueue
    /// Warnings given and not yet re-armed (owned by the node thread).
    var warnedLogFull = false, warnedSnapshotLarge = false
    /// Membership requests waiting on a hand-over, removed peers, removal (owned by the node
    /// thread; ReplicaNode+Membership.swift).
    var membershipWork = MembershipWork()

    enum RunState { case created, running, stopping, stopped }

    enum NodeEvent {
        /// One tick of the node's clock, queued at this `DispatchTime` uptime (nanoseconds).
        case tick(queuedAt: UInt64)
        case message(Message)
        /// A polled transport has messages waiting: the node thread reads them itself.
        case messagesWaiting
        case persisted(UInt64)
        case storageFailed(String)
        case propose(QueuedProposal)
        case read([UInt8], ProposalReply)
        case localRead([UInt8], ProposalReply)
        case transferLeadership(NodeID, NodeReply<Void>)
        /// An operator's membership change (ReplicaNode+Membership.swift).
        case changeMembership(MembershipChange, NodeReply<MembershipAnswer>)
        /// A graceful stop's leadership hand-over (ReplicaNode+HandOver.swift).
        case handOver(CheckedContinuation<NodeID?, Never>)
        /// A copy of the state machine and configuration for a backup (ReplicaNode+Backup.swift).
        case backup(CheckedContinuation<Snapshot, any Error>)
        /// A snapshot serialized off the node thread (`SnapshotCapturing`), taken at this index,
        /// and the capture it came from, for the loop to hand to `CapturedSnapshot.releaseQueue`.
        case snapshotTaken(LogIndex, [UInt8], CapturedSnapshot?)
        /// A compaction's snapshot was saved and the log compacted off the node thread, or the
        /// save failed (the error came first, as `storageFailed`): the next compaction may start.
        case snapshotSaved
    }

    /// Where a request's answer goes: an async caller's continuation or a completion closure
    /// (the client server's, which writes the answer to its connection at once; the simulator's).
    struct NodeReply<Value: Sendable>: Sendable {
        let deliver: @Sendable (Result<Value, any Error>) -> Void
        func resume(returning value: Value) { deliver(.success(value)) }
        func resume(throwing error: any Error) { deliver(.failure(error)) }
    }

    /// A proposal's or read's answer: the state machine's result.
    typealias ProposalReply = NodeReply<[UInt8]>

    struct QueuedProposal {
        var command: [UInt8]
        var continuation: ProposalReply
        /// `DispatchTime` uptime nanoseconds when it was queued (for the commit latency metric).
        var queuedAt: UInt64
    }

    struct PendingProposal {
        var ballot: Ballot
        var deadline: Int
        var continuation: ProposalReply
        var queuedAt: UInt64
    }

    struct PendingRead {
        var query: [UInt8]
        var index: LogIndex?
        var deadline: Int
        var continuation: ProposalReply
    }

    /// A node over the given parts; nothing runs until `start()`. Metrics go to
    /// `options.metricsFactory`, else the global `MetricsSystem.factory`.
    public init(options: NodeOptions, stateMachine: any StateMachine, log: any StableLog,
                snapshots: any SnapshotStore, transport: any MessageTransport, ticks: any TickSource) {
        self.options = options
        self.machine = stateMachine
        self.log = log
        self.snapshots = snapshots
        self.transport = transport
        self.polledTransport = transport as? any PolledMessageTransport
        self.ticks = ticks
        self.metrics = NodeMetrics(node: options.replica.id, factory: options.metricsFactory ?? MetricsSystem.factory)
        self.snapshotQueue = options.offLoop ?? DispatchOffLoopQueue(label: "plover.snapshot")
        if let ring = transport as? RingTransport { ringMetrics = RingMetrics(ring: ring, metrics: metrics) }
    }

    /// Loads the durable state, restores the state machine and starts serving.
    public func start() throws {
        var restored = try loadRestoredState()
        restored.intact = options.stateIntact || options.assumeIntact
        if options.assumeIntact && restored.hardState.recovering {
            restored.hardState.recovering = false
            try log.saveHardState(restored.hardState)
        } else if !restored.intact && !restored.hardState.recovering {
            // Recorded before the replica takes part (and before `ReplicaServer` records this
            // run), so that a crash before it recovered cannot make the next start trust this log.
            restored.hardState.recovering = true
            try log.saveHardState(restored.hardState)
        }
        if let s = restored.snapshot, !s.data.isEmpty { try machine.restore(s.data, index: s.index) }
        snapshotBytes = restored.snapshot?.data.count ?? 0
        appendedThrough = log.lastIndex
        if let cap = log.capacityBytes {
            Gauge(label: PloverMetrics.logCapacity, dimensions: metrics.node, factory: metrics.factory).record(cap)
        }
        replica = Replica(config: options.replica, restoring: restored, bootstrap: options.bootstrap, seed: options.seed)
        followConfiguration(replica.membership)
        publishStatus()
        if let polled = polledTransport {
            // The fabric's thread that lands a record wakes this node's thread, which reads the
            // rings itself: no transport thread between them on the path of a commit.
            try polled.startPolled { [weak self] in self?.messagesLanded() }
        } else {
            try transport.start { [weak self] m in self?.enqueue(.message(m)) }
        }
        // Running only once the transport is: had it thrown, there would be no loop for `stop` to wait for.
        cond.withLock { state = .running }
        // Records that landed while the node was not running yet rang no queued wake-up.
        if polledTransport != nil { messagesLanded() }
        ticks.start { [weak self] in self?.enqueue(.tick(queuedAt: DispatchTime.now().uptimeNanoseconds)) }
        guard options.eventLoop == nil, !options.steppedByCaller else { return }
        let t = Thread(named: "plover-node-\(options.replica.id)") { [self] in runLoop() }
        t.start()
    }

    /// Stops serving and closes the stable log: pending requests fail with `NodeError.stopped`.
    /// Idempotent.
    public func stop() {
        let wasRunning = cond.withLock {
            guard state == .running else { return false }
            state = .stopping
            cond.broadcast()
            return true
        }
        guard wasRunning else { return }
        ticks.stop()
        if options.steppedByCaller {
            runQueued()
        } else if let loop = options.eventLoop {
            precondition(!loop.inEventLoop, "ReplicaNode.stop() called on the node's own event loop")
            loop.execute { [self] in runQueued() }
        }
        // The node thread reads a polled transport's rings: it must be done before they go.
        cond.withLock { while state != .stopped { cond.wait() } }
        transport.stop()
    }

    /// A polled transport's wake-up: one `messagesWaiting` event until the node thread takes it.
    func messagesLanded() {
        guard !wakePending.exchange(true, ordering: .acquiringAndReleasing) else { return }
        // Not running yet (a wake-up during `start`) or any more: the next wake-up must queue.
        if !enqueue(.messagesWaiting) { wakePending.store(false, ordering: .releasing) }
    }

    /// Proposes `command`; returns the state machine's result once it committed and applied here.
    /// Throws `NodeError.notLeader` on followers.
    public func propose(_ command: [UInt8]) async throws -> [UInt8] {
        try await withCheckedThrowingContinuation { c in
            propose(command) { c.resume(with: $0) }
        }
    }

    /// Proposes `command` and calls `completion` on the node's thread with the state machine's
    /// result once it committed and applied here, or with the error (`NodeError`). Proposals
    /// made one after another from one thread enter the log in that order while the leader
    /// stays in office. `completion` must not block: it runs on the thread that drives the node.
    public func propose(_ command: [UInt8], completion: @escaping @Sendable (Result<[UInt8], any Error>) -> Void) {
        let queued = QueuedProposal(command: command, continuation: ProposalReply(deliver: completion),
                                    queuedAt: DispatchTime.now().uptimeNanoseconds)
        if !enqueue(.propose(queued)) { completion(.failure(NodeError.stopped)) }
    }

    /// Compacts the log through `index`, with `snapshot` as the state machine's state right
    /// after applying it: for a state machine whose state can be captured only at points of its
    /// own choosing, later than it applied them (the interpose runtime's server snapshots, taken
    /// at a log entry every replica replays; docs/design/interpose.md, "Snapshots"). `index` must
    /// have been applied here; one at or below the latest snapshot's is ignored.
    public func compact(through index: LogIndex, snapshot: [UInt8]) {
        _ = enqueue(.snapshotTaken(index, snapshot, nil))
    }

    /// A linearizable read: answered from this replica's state machine after the leader
    /// confirmed its leadership with a quorum (read-index). Leader only.
    public func read(_ query: [UInt8]) async throws -> [UInt8] {
        try await withCheckedThrowingContinuation { c in
            read(query) { c.resume(with: $0) }
        }
    }

    /// A linearizable read whose answer (or `NodeError`) goes to `completion`, on the node's
    /// thread: it must not block.
    public func read(_ query: [UInt8], completion: @escaping @Sendable (Result<[UInt8], any Error>) -> Void) {
        if !enqueue(.read(query, ProposalReply(deliver: completion))) { completion(.failure(NodeError.stopped)) }
    }

    /// Answers `query` from this replica's state machine as it is now, on any role: possibly
    /// stale (etcd's "serializable" read). For inspection and for checking replicas agree.
    public func localRead(_ query: [UInt8]) async throws -> [UInt8] {
        try await withCheckedThrowingContinuation { c in
            localRead(query) { c.resume(with: $0) }
        }
    }

    /// A local read whose answer (or `NodeError`) goes to `completion`, on the node's thread: it
    /// must not block.
    public func localRead(_ query: [UInt8], completion: @escaping @Sendable (Result<[UInt8], any Error>) -> Void) {
        if !enqueue(.localRead(query, ProposalReply(deliver: completion))) { completion(.failure(NodeError.stopped)) }
    }

    /// Hands leadership to voter `target` (etcd's move-leader): the leader stops taking proposals,
    /// brings `target`'s log up to date and tells it to campaign at once. Returns when the
    /// hand-over started; `status` shows when it is done. Throws `NodeError.notLeader` on a
    /// follower and `NodeError.refused(.invalidTransferTarget)` for a target that is not another voter.
    public func transferLeadership(to target: NodeID) async throws {
        try await withCheckedThrowingContinuation { (c: CheckedContinuation<Void, any Error>) in
            transferLeadership(to: target) { c.resume(with: $0) }
        }
    }

    /// `transferLeadership(to:)` whose outcome goes to `completion`, on the node's thread.
    package func transferLeadership(to target: NodeID, completion: @escaping @Sendable (Result<Void, any Error>) -> Void) {
        if !enqueue(.transferLeadership(target, NodeReply(deliver: completion))) { completion(.failure(NodeError.stopped)) }
    }

    /// A node with `NodeOptions.steppedByCaller`: runs the events queued so far as one pass of
    /// its loop, on the caller's thread. Returns whether there were any.
    @discardableResult
    package func step() -> Bool {
        guard cond.withLock({ !events.isEmpty || state == .stopping }) else { return false }
        runQueued()
        return true
    }

    /// The consensus core, for a caller that steps the node (read it between steps only).
    package var core: Replica { replica }

    /// Entries of compacted prefixes not freed yet (`freeReleasedEntries`), for a caller that
    /// steps the node (read it between steps only).
    package var releasedEntriesHeld: Int { releasing.reduce(0) { $0 + $1.count } }

    /// A node with `NodeOptions.steppedByCaller`: makes one call into the core, as the node's
    /// loop makes its own, and carries out the actions it returns with the node's executor
    /// (`perform`), then answers what that completed. The scenario scripts drive the core's
    /// calls by hand this way (between steps only).
    package func performOnCore(_ call: (inout Replica) throws -> Actions) rethrows {
        precondition(options.steppedByCaller, "performOnCore is for a node stepped by its caller")
        perform(try call(&replica!))
        publishAndAnswer()
        freeReleasedEntries()
    }

    /// The node's latest status (updated after every batch of events).
    public var status: NodeStatus { cond.withLock { published! } }

    @discardableResult
    func enqueue(_ e: NodeEvent) -> Bool {
        let queued = cond.withLock { () -> Bool? in
            guard state == .running else { return nil }
            events.append(e)
            guard events.count == 1 else { return false }
            if options.eventLoop == nil && !options.steppedByCaller { cond.signal() }
            return true
        }
        guard let queued else { return false }
        // On an event loop: one task per batch (from the loop itself, a task queued without a
        // wake-up, run after the current one).
        if queued, let loop = options.eventLoop { loop.execute { [self] in runQueued() } }
        return true
    }

    func loadRestoredState() throws -> RestoredState {
        let hard = try log.loadHardState()
        let point = log.snapshot
        var snapshot = try snapshots.load()
        if point.index > 0 {
            guard let s = snapshot, s.index >= point.index else {
                throw NodeError.storage("the log is compacted through \(point.index) but no snapshot at or past it was found; rebuild this replica from its peers")
            }
        }
        if let s = snapshot, s.index == 0 { snapshot = nil }
        if let s = snapshot { try alignLog(with: s) }
        let from = max(log.firstIndex, (snapshot?.index ?? 0) + 1)
        let entries = from <= log.lastIndex ? try log.entries(from...log.lastIndex) : []
        return RestoredState(hardState: hard, snapshot: snapshot, entries: entries)
    }

    /// Makes the stable log start right after `s`, as the persist unit that saved `s` would have
    /// (`startPersist`: save the snapshot, then `compactPrefix`). A crash between the two, or
    /// before the entries a follower applied were durable, leaves a log that still holds entries
    /// at or below `s.index`, or that ends below it (always so after installing a leader's
    /// snapshot: the conflicting suffix was truncated first). The core restores from the snapshot
    /// and appends at `s.index + 1`, which such a log would refuse (its contiguity precondition
    /// traps, on every restart). Entries above `s.index` are kept. Only entries that cannot follow
    /// the snapshot (the log holds `s.index` with another ballot, and more after it; no crash
    /// leaves that) stop the start instead: the node will not guess which history is right.
    func alignLog(with s: Snapshot) throws {
        guard s.index > log.snapshot.index else { return }
        if log.lastIndex > s.index, let held = try log.entries(s.index...s.index).first, held.ballot != s.ballot {
            throw NodeError.storage("the log holds entry \(s.index) at ballot \(held.ballot) and entries after it, but the snapshot at \(s.index) has ballot \(s.ballot); rebuild this replica from its peers")
        }
        try log.compactPrefix(through: s.index, ballot: s.ballot)
    }
}
