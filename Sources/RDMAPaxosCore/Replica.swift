/// What a replica loads from its stable log when it starts.
public struct RestoredState: Sendable {
    /// The promised ballot, commit index and configuration last saved.
    public var hardState: HardState
    /// The latest snapshot, if the log's prefix was compacted.
    public var snapshot: Snapshot?
    /// Every entry after the snapshot, in order. All of them are durable.
    public var entries: [LogEntry]
    /// Whether this is everything the replica ever made durable. False when the stable log may
    /// have lost writes it acknowledged: a restart in memory mode, or in async mode after the
    /// host itself may have gone down. The replica then forgot promises and acceptances others
    /// counted on, so it recovers before it votes (docs/design/consensus.md, "Recovery from lost
    /// state"); so does one whose `hardState.recovering` says an earlier start had not finished
    /// recovering. A replica that never ran has lost nothing: true.
    public var intact: Bool

    /// A restored state; the defaults describe a replica that never ran.
    public init(hardState: HardState = HardState(), snapshot: Snapshot? = nil, entries: [LogEntry] = [], intact: Bool = true) {
        self.hardState = hardState
        self.snapshot = snapshot
        self.entries = entries
        self.intact = intact
    }
}

/// One replica of the consensus log as a pure state machine.
///
/// Every input is one `mutating` call returning the `Actions` the caller must carry out
/// (see `Actions` for the ordering rule). No clocks, threads, I/O or entropy: time is `tick()`,
/// randomness comes from the seeded generator in `init`.
public struct Replica: Sendable {
    /// Limits and timings, fixed at creation.
    public let config: ReplicaConfig
    /// This replica's node id.
    public var id: NodeID { config.id }
    var rng: SeededRandom

    /// The part this replica currently plays.
    public internal(set) var role: Role = .follower
    /// The highest ballot promised; when leading, the leader's own ballot.
    public internal(set) var promised: Ballot
    /// The leader this replica knows of (itself when leading); nil when unknown.
    public internal(set) var leader: NodeID?
    var log: InMemoryLog
    /// Highest index known to be committed.
    public internal(set) var commitIndex: LogIndex
    /// Highest index handed out for applying (or covered by the installed snapshot).
    public internal(set) var appliedIndex: LogIndex
    /// Configuration in force: the last membership entry in the log, else the snapshot's.
    public internal(set) var membership: Membership
    /// Index of the entry that holds `membership` (the snapshot's index when it came from there).
    public internal(set) var membershipIndex: LogIndex
    /// Configuration at the snapshot point, and the snapshot's bytes (sent to lagging followers).
    var snapshotMembership: Membership
    var snapshotData: [UInt8]

    // Timers, in ticks.
    var ticks: UInt64 = 0
    var electionElapsed = 0
    var randomizedElectionTimeout = 0
    var heartbeatElapsed = 0
    var checkQuorumElapsed = 0
    /// Consecutive leader ticks with the disk stalled while a follower's disk was ahead of ours
    /// (see `tickLeader`).
    var outpacedWhileStalledTicks = 0

    // Elections.
    var votes: [NodeID: Bool] = [:]
    /// Entries witnesses handed over in this election that are not adopted yet (see
    /// `takeHandOver`), by witness.
    var handedOver: [NodeID: HandOver] = [:]
    /// Index up to which this follower's log is known to equal the current leader's.
    var leaderMatch: LogIndex = 0
    /// A snapshot arriving in chunks: its first chunk's header and the bytes received so far.
    var snapshotInbox: SnapshotChunk?
    /// The candidacy's `force` flag, repeated when asking a witness for more of its log.
    var candidacyForce = false
    /// Set while this replica recovers state it may have lost (see `RestoredState.intact`).
    var recovery: Recovery?
    /// Witness: the highest index every voter holds durably, as the leader last said.
    var votersDurable: LogIndex = 0

    struct Recovery: Sendable {
        /// Names this start of the replica in `recovering` and `recovered` messages.
        var nonce: UInt64
        /// Ticks since a leader was last heard from.
        var ticksWithoutLeader = 0
        /// `Event.recoveryStalled` was reported since a leader was last heard from.
        var stallReported = false
    }

    // Leadership.
    var progress: [NodeID: Progress] = [:]
    /// Members the leader's configuration dropped, told so with its heartbeats once that
    /// configuration commits.
    var departed: [NodeID: Departed] = [:]
    struct Departed: Sendable {
        var index: LogIndex
        var heartbeatsLeft: Int
    }
    /// How many heartbeats tell a removed member it was removed.
    public static let departedHeartbeats = 50
    /// `Event.removedFromCluster` was reported (once per start).
    var removalReported = false
    /// This replica's role in the last configuration that held it.
    var lastOwnRole: MemberRole?
    /// What this replica left unapplied while the configuration at the end of its log made it a
    /// witness: the snapshot it did not restore (if any) and the first entry it did not apply.
    /// A witness keeps it for good; a replica that stops being one (only a new member under a
    /// removed witness's ID, replaying the stretch in which that ID was a witness: a witness's
    /// role never changes in place) restores and applies it first.
    var witnessSkipped: WitnessSkipped?
    var uncommittedBytes = 0
    var transferTarget: NodeID?
    var transferElapsed = 0
    /// When this replica last started an automatic transfer to a higher-priority voter.
    var lastPriorityTransferAt: UInt64?
    var readRound: UInt64 = 0
    var pendingReads: [PendingRead] = []

    // Persistence.
    var nextSequence: UInt64 = 1
    var inFlightPersists: [InFlightPersist] = []
    /// Highest index known durable in this replica's stable log (as reported through
    /// `persisted(_:)`).
    public internal(set) var durableIndex: LogIndex

    // Output of the current call.
    var out = Actions()
    var stepEntries: [LogEntry] = []
    var stepTruncate: LogIndex?
    var stepSnapshot: Snapshot?
    var hardStateDirty = false
    var stepSelfVote: Ballot?

    /// How far a witness's hand-over got: (prevIndex, prevBallot) is common to its log and ours;
    /// `entries` follow it in the witness's log, kept aside until adopting them makes our log
    /// more up to date.
    struct HandOver: Sendable {
        var prevIndex: LogIndex
        var prevBallot: Ballot
        var entries: [LogEntry]
        /// The last position received: the next piece must follow it.
        var end: (index: LogIndex, ballot: Ballot) { entries.last.map { ($0.index, $0.ballot) } ?? (prevIndex, prevBallot) }
    }

    struct InFlightPersist: Sendable {
        var sequence: UInt64
        var lastIndex: LogIndex
        var issuedAt: UInt64
        var selfVote: Ballot?
    }

    struct PendingRead: Sendable {
        var id: UInt64
        /// Nil until the leader has committed an entry of its own ballot.
        var index: LogIndex?
        var round: UInt64
    }

    /// Starts a replica from what its stable log holds. `bootstrap` is the initial configuration,
    /// used only when the log records none (a brand-new cluster).
    public init(config: ReplicaConfig, restoring state: RestoredState = RestoredState(), bootstrap: Membership, seed: UInt64) {
        precondition(config.electionTimeoutTicks > config.heartbeatTicks && config.heartbeatTicks > 0,
                     "election timeout must exceed the heartbeat interval")
        self.config = config
        self.rng = SeededRandom(seed: seed ^ UInt64(config.id) &* 0x9E37_79B9)
        let point = state.snapshot.map { SnapshotPoint(index: $0.index, ballot: $0.ballot) } ?? .none
        log = InMemoryLog(snapshot: point, entries: state.entries)
        promised = config.brokenForgetsPromiseOnRestart ? .zero : state.hardState.promised
        commitIndex = min(max(state.hardState.commitIndex, point.index), log.lastIndex)
        appliedIndex = point.index
        durableIndex = log.lastIndex
        snapshotData = state.snapshot?.data ?? []
        // The configuration before any log entry: the snapshot's, else the bootstrap one. Not the
        // hard state's, which may come from a membership entry that never committed.
        let base = state.snapshot?.membership ?? bootstrap
        snapshotMembership = base
        membership = base
        membershipIndex = point.index
        lastOwnRole = base.member(config.id)?.role ?? bootstrap.member(config.id)?.role
        refreshMembership()
        if isWitness { witnessSkipped = WitnessSkipped(restore: state.snapshot, from: point.index + 1) }
        resetElectionTimer()
        if !state.intact || state.hardState.recovering {
            var nonce: UInt64 = 0
            while nonce == 0 { nonce = rng.next() }
            recovery = Recovery(nonce: nonce)
            // Saved by the first call's persist (the runtime saves it before starting the replica):
            // a restart that loses nothing more must not make this replica vote before it recovered.
            if !state.hardState.recovering { hardStateDirty = true }
            // Reported by the first call's actions.
            out.events.append(.recovering(reason: "started with state that may have been lost; this replica votes in nothing until a leader has brought it back"))
        }
    }

    // MARK: Public inputs

    /// Advances time by one tick.
    public mutating func tick() -> Actions {
        ticks += 1
        if role == .leader { tickLeader() } else { tickFollower() }
        return finish()
    }

    /// Handles one message from a peer.
    public mutating func receive(_ m: Message) -> Actions {
        if m.to == id { step(m) }
        return finish()
    }

    /// Reports that the persist with this sequence number (and all before it) is durable.
    public mutating func persisted(_ sequence: UInt64) -> Actions {
        while let first = inFlightPersists.first, first.sequence <= sequence {
            inFlightPersists.removeFirst()
            durableIndex = max(durableIndex, min(first.lastIndex, log.lastIndex))
            if let b = first.selfVote, role == .candidate, promised == b {
                votes[id] = true
                tallyVotes()
            }
        }
        if role == .leader { maybeCommit() }
        return finish()
    }

    /// Proposes commands. Returns the index of the first one; they commit in order.
    public mutating func propose(_ payloads: [[UInt8]]) throws(ProposalRefusal) -> (firstIndex: LogIndex, actions: Actions) {
        guard role == .leader else { throw .notLeader(leader: leader) }
        if let t = transferTarget { throw .leadershipTransferInProgress(to: t) }
        guard !payloads.isEmpty else { throw .emptyProposal }
        // A command must fit one accept message, or it could never be replicated.
        let limit = config.batchBytesMax - InMemoryLog.entryOverheadBytes
        if let big = payloads.first(where: { $0.count > limit }) { throw .commandTooLarge(bytes: big.count, limit: limit) }
        let bytes = payloads.reduce(0) { $0 + $1.count }
        guard uncommittedBytes + bytes <= config.uncommittedBytesMax || uncommittedBytes == 0 else {
            throw .tooManyUncommittedBytes(limit: config.uncommittedBytesMax)
        }
        let first = log.lastIndex + 1
        for p in payloads { appendAsLeader(kind: .command, payload: p) }
        broadcastAppend()
        return (first, finish())
    }

    // MARK: Status

    /// Index of the last entry in the log; the snapshot's index when empty.
    public var lastIndex: LogIndex { log.lastIndex }
    /// Index of the first entry still held (one past the snapshot).
    public var firstIndex: LogIndex { log.firstIndex }
    /// Ballot of the last entry (or of the snapshot point when empty).
    public var lastBallot: Ballot { log.lastBallot }
    /// Whether this replica is a witness in the configuration in force; when that configuration
    /// does not hold it (a member that joined after the snapshot it was sent), its role in the last
    /// one that did.
    public var isWitness: Bool { (membership.member(id)?.role ?? lastOwnRole) == .witness }

    /// Match index of each follower, as the leader sees it (empty unless leading).
    public var followerMatch: [NodeID: LogIndex] { progress.mapValues(\.match) }

    /// Whether this replica is recovering state it may have lost: it does not campaign, vote or
    /// count in quorums until a leader has brought it back.
    public var isRecovering: Bool { recovery != nil }

    /// Why a recovering replica is not voting yet, for status displays; nil when not recovering.
    public var recoveryStatus: String? {
        guard let r = recovery else { return nil }
        if let l = leader {
            return "catching up with leader \(l); it votes again once an entry the leader appends now commits without it"
        }
        return "no leader heard from in \(r.ticksWithoutLeader) ticks; recovering members do not vote, so a quorum of members whose state survived must elect one"
    }

    /// Highest index the caller may pass to `compact(through:snapshot:)`: the applied index; on a
    /// witness, no further than every voter holds durably (the witness may be the only holder of
    /// entries a surviving voter lacks).
    public var compactableIndex: LogIndex {
        // The broken variant applies past the commit index; compacting there would make the
        // core trip its own preconditions before a checker could look.
        let applied = config.brokenAppliesPastCommit ? min(appliedIndex, commitIndex) : appliedIndex
        return isWitness ? min(applied, votersDurable) : applied
    }

    /// The entry at `index` if the replica still holds it.
    public func entry(at index: LogIndex) -> LogEntry? { log.entry(at: index) }

    // MARK: Internals shared by the extensions

    mutating func resetElectionTimer() {
        electionElapsed = 0
        let base = config.electionTimeoutTicks
        let myPriority = Int(membership.member(id)?.priority ?? 0)
        let top = Int(membership.members.filter { $0.role == .voter }.map(\.priority).max() ?? 0)
        randomizedElectionTimeout = base + rng.below(base) + max(0, top - myPriority) * base
    }

    /// Whether this replica may campaign: a voter of the current configuration, not recovering.
    var promotable: Bool { membership.member(id)?.role == .voter && recovery == nil }

    /// Acknowledges entries through `index` once this call's persist is durable: `recovering`
    /// instead while this replica recovers, so that the leader does not count it.
    mutating func acknowledge(_ to: NodeID, _ index: LogIndex) {
        if let r = recovery {
            send(to, .recovering(nonce: r.nonce, index: index), afterPersist: true)
        } else {
            send(to, .accepted(success: true, index: index), afterPersist: !config.brokenAcksBeforePersist)
        }
    }

    mutating func send(_ to: NodeID, _ body: Message.Body, afterPersist: Bool = false) {
        let m = Message(from: id, to: to, ballot: promised, body: body)
        if afterPersist { out.sendAfterPersist.append(m) } else { out.send.append(m) }
    }

    mutating func setPromised(_ b: Ballot) {
        precondition(b >= promised, "promised ballot never decreases")
        if b != promised {
            promised = b
            hardStateDirty = true
        }
    }

    mutating func appendLocal(_ e: LogEntry) {
        log.append(e)
        stepEntries.append(e)
        if e.kind == .membership { refreshMembership() }
    }

    mutating func truncateLocal(from index: LogIndex) {
        precondition(index > commitIndex, "a committed entry can never be truncated")
        let hadMembership = log.entries(index, through: log.lastIndex).contains { $0.kind == .membership }
        log.truncate(from: index)
        stepEntries.removeAll { $0.index >= index }
        stepTruncate = min(stepTruncate ?? index, index)
        durableIndex = min(durableIndex, index - 1)
        for i in inFlightPersists.indices { inFlightPersists[i].lastIndex = min(inFlightPersists[i].lastIndex, index - 1) }
        if hadMembership { refreshMembership() }
    }

    mutating func refreshMembership() {
        let (index, m) = log.lastMembership() ?? (log.snapshot.index, snapshotMembership)
        if let mine = m.member(id)?.role { lastOwnRole = mine }
        if m != membership || index != membershipIndex {
            let changed = m != membership
            membership = m
            membershipIndex = index
            hardStateDirty = true
            if changed { out.events.append(.membershipChanged(m)) }
            if role == .leader { syncProgressWithMembership() }
        }
    }

    var hardState: HardState { HardState(promised: promised, commitIndex: commitIndex, membership: membership, recovering: recovery != nil) }

    /// Collects this call's output: applies, the persist unit and the ordering of acks.
    mutating func finish() -> Actions {
        let applyThrough = config.brokenAppliesPastCommit ? log.lastIndex : commitIndex
        if !isWitness, let skipped = witnessSkipped {
            // No longer a witness: what was skipped belonged to an earlier member under this ID.
            witnessSkipped = nil
            if let s = skipped.restore { out.restore = s }
            if skipped.from <= appliedIndex {
                precondition(skipped.from >= log.firstIndex, "entries skipped as a witness were compacted away")
                out.apply.append(contentsOf: log.entries(skipped.from, through: appliedIndex))
            }
        }
        if appliedIndex < applyThrough {
            let from = appliedIndex + 1
            precondition(from >= log.firstIndex, "committed entries below the snapshot were not restored")
            if !isWitness {
                out.apply.append(contentsOf: log.entries(from, through: applyThrough))
            } else if witnessSkipped == nil {
                witnessSkipped = WitnessSkipped(restore: nil, from: from)
            }
            appliedIndex = applyThrough
        }
        // The hard state is written only when the promise or the configuration changed; the
        // commit index rides along then. A restart may thus replay from an older commit index,
        // which is safe: the leader tells it the current one.
        let logChanged = !stepEntries.isEmpty || stepTruncate != nil || stepSnapshot != nil
        if hardStateDirty || logChanged || !out.sendAfterPersist.isEmpty && !inFlightPersists.isEmpty {
            let p = Persist(sequence: nextSequence, truncateFrom: stepTruncate, snapshot: stepSnapshot,
                            entries: stepEntries, hardState: hardStateDirty ? hardState : nil)
            inFlightPersists.append(InFlightPersist(sequence: nextSequence, lastIndex: log.lastIndex, issuedAt: ticks, selfVote: stepSelfVote))
            nextSequence += 1
            out.persist = p
        } else if !out.sendAfterPersist.isEmpty {
            // Nothing is waiting for the disk: the acks vouch only for durable state already.
            out.send.append(contentsOf: out.sendAfterPersist)
            out.sendAfterPersist = []
        }
        let result = out
        out = Actions()
        stepEntries = []
        stepTruncate = nil
        stepSnapshot = nil
        hardStateDirty = false
        stepSelfVote = nil
        return result
    }
}

/// See `Replica.witnessSkipped`.
struct WitnessSkipped: Sendable, Hashable {
    var restore: Snapshot?
    var from: LogIndex
}
