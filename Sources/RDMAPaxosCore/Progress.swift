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
    /// One accept in flight: its last index and the bytes of its entries.
    struct InFlight: Sendable, Hashable {
        var last: LogIndex
        var bytes: Int
    }

    /// Accepts in flight, oldest first (replicate state).
    var inflight: [InFlight] = []
    /// Entry bytes of the accepts in flight.
    var inflightBytes: Int { inflight.reduce(0) { $0 + $1.bytes } }
    /// Heard from since the last check-quorum round.
    var recentActive = false
    /// Highest read round this follower acknowledged.
    var readAck: UInt64 = 0
    /// Snapshot state: bytes the follower last said it holds, and the end of the last chunk sent.
    var snapshotAcked = 0
    var snapshotNext = 0
    /// Snapshot state: the snapshot being sent. Kept when the leader compacts again meanwhile, so
    /// that the transfer finishes instead of starting over with each newer snapshot (a state
    /// that takes longer to send than the leader takes between compactions would never arrive);
    /// the follower gets the newer one after installing this one.
    var sending: Snapshot?
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
        sending = nil
    }

    mutating func becomeReplicate() {
        state = .replicate
        next = match + 1
        probeSent = false
        inflight = []
        sending = nil
    }

    /// Whether nothing more may be sent: a probe outstanding, a snapshot under way, or the
    /// window full — `inflightMax` accepts, or `inflightBytesMax` bytes of entries (the window
    /// always admits one accept, however large).
    func isPaused(inflightMax: Int, inflightBytesMax: Int) -> Bool {
        switch state {
        case .probe: probeSent
        case .replicate: inflight.count >= inflightMax || (!inflight.isEmpty && inflightBytes >= inflightBytesMax)
        case .snapshot: true
        }
    }

    /// Drops the accepts in flight through `index` (acknowledged).
    mutating func acknowledge(through index: LogIndex) {
        inflight.removeAll { $0.last <= index }
    }
}
