/// The leader's view of one follower's log.
struct Progress: Sendable, Hashable {
    enum State: Sendable, Hashable {
        /// Unknown match: send one accept at a time and wait for its answer.
        case probe
        /// Known match: stream accepts, up to the in-flight limit.
        case replicate
        /// The follower needs a snapshot; waiting for it to acknowledge `index`.
        case snapshot(index: LogIndex)
    }

    var match: LogIndex = 0
    var next: LogIndex
    var state: State = .probe
    /// In probe state: an accept is outstanding.
    var probeSent = false
    /// Last indexes of accepts in flight, oldest first (replicate state).
    var inflight: [LogIndex] = []
    /// Heard from since the last check-quorum round.
    var recentActive = false
    /// Highest read round this follower acknowledged.
    var readAck: UInt64 = 0
    /// Snapshot state: bytes the follower last said it holds, and the end of the last chunk sent.
    var snapshotAcked = 0
    var snapshotNext = 0
    /// Ticks since `match` last advanced while the follower lagged.
    var stalledTicks = 0
    /// Whether the follower is recovering lost state (`Message.Body.recovering`).
    var recovery: Recovery = .none
    /// Check-quorum periods in a row the follower was not heard from.
    var silentPeriods = 0
    /// `Event.witnessCompactionHeldBack` was reported for this absence.
    var warnedHoldingBack = false

    /// A follower's recovery from lost state, as the leader sees it.
    enum Recovery: Sendable, Hashable {
        /// Not recovering (or its recovery finished under an earlier leader).
        case none
        /// Recovering since it started with `nonce`; counts in no quorum until `barrier` commits.
        case waiting(nonce: UInt64, barrier: LogIndex)
        /// `barrier` committed without it and it holds it: counts again; `recovered` is (re)sent.
        case done(nonce: UInt64, barrier: LogIndex)
    }

    /// Whether the follower's acknowledgements count in quorums (commit, reads, check-quorum).
    var counts: Bool {
        if case .waiting = recovery { return false }
        return true
    }

    init(next: LogIndex) { self.next = next }

    mutating func becomeProbe() {
        state = .probe
        next = match + 1
        probeSent = false
        inflight = []
        stalledTicks = 0
    }

    mutating func becomeReplicate() {
        state = .replicate
        next = match + 1
        probeSent = false
        inflight = []
    }

    func isPaused(inflightMax: Int) -> Bool {
        switch state {
        case .probe: probeSent
        case .replicate: inflight.count >= inflightMax
        case .snapshot: true
        }
    }
}
