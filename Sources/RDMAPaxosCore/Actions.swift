import Synchronization

/// What the caller must do after one call into the core, in this order:
///
/// 1. Start `persist` (if any): truncate the suffix, install the snapshot (compacting the prefix),
///    append the entries and save the hard state in the stable log, in that order.
/// 2. Send `send` at once: these messages promise nothing about this replica's disk.
/// 3. When `persist` is durable, send `sendAfterPersist` and call `persisted(_:)` with its
///    `sequence`. **Durability rule:** a promise or an acknowledgement never leaves a replica
///    before the state it vouches for is durable.
/// 4. Restore `restore` into the state machine (if any), then apply `apply` in order.
/// 5. Answer each read in `reads` once the state machine has applied through its index.
///
/// Persists complete in sequence order; the caller must not reorder them.
public struct Actions: Sendable {
    /// Stable-log work to start first (step 1); nil when nothing needs persisting.
    public var persist: Persist?
    /// Messages to send at once (step 2).
    public var send: [Message] = []
    /// Messages to send only once `persist` is durable (step 3).
    public var sendAfterPersist: [Message] = []
    /// A snapshot to load into the state machine before applying `apply` (step 4).
    public var restore: Snapshot?
    /// Committed entries to apply to the state machine, in index order (step 4).
    public var apply: [LogEntry] = []
    /// Reads that may be answered once the state machine has applied through their index (step 5).
    public var reads: [ReadState] = []
    /// Role or leader changes, for logs and metrics.
    public var events: [Event] = []
    /// Log entries the core let go of (a compacted prefix), for the caller to free where it
    /// suits it (`ReleasedEntries.free()`); ignored, they are freed with the last copy of these
    /// actions. Not part of `isEmpty`: there is nothing the caller must do with them.
    public var released: [ReleasedEntries] = []

    /// Nothing to do.
    public init() {}

    /// Whether there is nothing at all to do (no persist, message, snapshot, entry, read or event).
    public var isEmpty: Bool {
        persist == nil && send.isEmpty && sendAfterPersist.isEmpty && restore == nil
            && apply.isEmpty && reads.isEmpty && events.isEmpty
    }
}

/// One durable unit of work for the stable log.
public struct Persist: Sendable, Hashable {
    /// Identifies this unit in `persisted(_:)`. Increases by one per unit.
    public var sequence: UInt64
    /// Remove entries at this index and above, first.
    public var truncateFrom: LogIndex?
    /// Then store this snapshot and compact the log through its index (dropping every entry
    /// if the log does not hold the snapshot's index with the snapshot's ballot).
    public var snapshot: Snapshot?
    /// Then append these entries, contiguous from the end of the log.
    public var entries: [LogEntry] = []
    /// Finally save this hard state; nil when it did not change.
    public var hardState: HardState?
}

/// A linearizable read that may be served once the state machine has applied `index`.
public struct ReadState: Sendable, Hashable {
    /// The id the caller gave to `read(id:)`.
    public var id: UInt64
    /// The commit index confirmed by a quorum; answer once the state machine has applied it.
    public var index: LogIndex
}

/// The part a replica currently plays in the election protocol.
public enum Role: String, Sendable, Hashable {
    /// Following a leader (or waiting for one); probing with pre-votes; campaigning with a real
    /// ballot; leading.
    case follower, preCandidate, candidate, leader
}

/// A change worth logging or counting, reported in `Actions.events`.
public enum Event: Sendable, Hashable, CustomStringConvertible {
    /// This replica won the election for the ballot.
    case becameLeader(Ballot)
    /// This replica follows at the ballot; the leader when known.
    case becameFollower(Ballot, leader: NodeID?)
    /// This replica started an election (`pre`: a pre-vote round) for the ballot.
    case startedElection(Ballot, pre: Bool)
    /// This leader gave up leadership, for the reason given.
    case steppedDown(reason: String)
    /// The configuration in force changed to this one.
    case membershipChanged(Membership)
    /// A pending linearizable read with this id will not be answered; the client should retry.
    case readRefused(id: UInt64, reason: String)
    /// This replica started with state it may have lost (`RestoredState.intact` false): it votes
    /// in nothing until a leader has brought it back (`recovered`).
    case recovering(reason: String)
    /// This recovering replica has heard from no leader for a long while: a leader needs a quorum
    /// of members whose state survived (a warning for the operator; docs/operations.md).
    case recoveryStalled(reason: String)
    /// This replica holds the leader's log through `index`, committed without it after it started:
    /// it votes and counts in quorums again.
    case recovered(leader: NodeID, index: LogIndex)
    /// Leader: member `member` restarted with lost state; it counts in no quorum until `barrier`
    /// (a no-op appended for it) commits without it.
    case memberRecovering(member: NodeID, barrier: LogIndex)
    /// Leader: the witness cannot compact its log past `index`, the last entry voter `voter` is
    /// known to hold; `voter` has not answered for `ticks` ticks (a warning for the operator: the
    /// witness's log grows until the voter returns or is removed).
    case witnessCompactionHeldBack(voter: NodeID, index: LogIndex, ticks: Int)
    /// This replica is not a member of the configuration committed at `index`, as leader `leader`
    /// says: it was removed and should stop (the runtime logs it and stops serving).
    case removedFromCluster(leader: NodeID, index: LogIndex)

    public var description: String {
        switch self {
        case let .becameLeader(b): "became leader at \(b)"
        case let .becameFollower(b, l): "follower at \(b), leader \(l.map(String.init) ?? "unknown")"
        case let .startedElection(b, pre): "\(pre ? "pre-" : "")election at \(b)"
        case let .steppedDown(r): "stepped down: \(r)"
        case let .membershipChanged(m): "membership \(m.members.map { "\($0.id):\($0.role)" }.joined(separator: ","))"
        case let .readRefused(id, r): "read \(id) refused: \(r)"
        case let .recovering(r): "recovering: \(r)"
        case let .recoveryStalled(r): "recovery stalled: \(r)"
        case let .recovered(l, i): "recovered from leader \(l) through \(i)"
        case let .memberRecovering(m, b): "member \(m) is recovering lost state; it counts again once \(b) commits"
        case let .witnessCompactionHeldBack(v, i, t): "witness compaction held back at \(i) by voter \(v), not heard from in \(t) ticks"
        case let .removedFromCluster(l, i): "removed from the cluster by the configuration at index \(i) (leader \(l))"
        }
    }
}

/// Why a proposal was not taken.
public enum ProposalRefusal: Error, Sendable, Hashable, CustomStringConvertible {
    /// This replica does not lead; `leader` is the one it knows of, if any.
    case notLeader(leader: NodeID?)
    /// The leader already holds `limit` bytes of uncommitted payload.
    case tooManyUncommittedBytes(limit: Int)
    /// An earlier membership change is not committed yet.
    case membershipChangeInProgress
    /// Leadership is being handed to the given node; propose there.
    case leadershipTransferInProgress(to: NodeID)
    /// The proposal carried no command.
    case emptyProposal
    /// One command of `bytes` bytes does not fit in one accept message (`limit` bytes).
    case commandTooLarge(bytes: Int, limit: Int)
    /// `limit` linearizable reads already wait for confirmation.
    case tooManyPendingReads(limit: Int)
    /// The node is not another voter of the configuration.
    case invalidTransferTarget(NodeID)
    /// The requested configuration is not allowed, for the reason given.
    case invalidMembershipChange(String)

    public var description: String {
        switch self {
        case let .notLeader(l): "not the leader (leader: \(l.map(String.init) ?? "unknown"))"
        case let .tooManyUncommittedBytes(l): "more than \(l) uncommitted bytes; retry later"
        case .membershipChangeInProgress: "another membership change is not yet committed"
        case let .leadershipTransferInProgress(t): "leadership is moving to \(t); retry there"
        case .emptyProposal: "a proposal must carry at least one command"
        case let .commandTooLarge(b, l): "a command of \(b) bytes exceeds the limit of \(l) bytes (one accept message)"
        case let .tooManyPendingReads(l): "more than \(l) reads waiting for confirmation; retry later"
        case let .invalidTransferTarget(t): "leadership can only move to another voter of the configuration, not \(t)"
        case let .invalidMembershipChange(r): "invalid membership change: \(r)"
        }
    }
}

/// Entries the core no longer holds. Freeing a compacted prefix of hundreds of thousands of
/// entries at once takes tens of milliseconds; a runtime frees them where and when it suits it:
/// a few thousand per pass of the loop that steps the core (`free(atMost:)`), or all at once on
/// another thread (`free()`). Freed on the thread that calls.
public final class ReleasedEntries: Sendable {
    private let storage: Mutex<[LogEntry]>

    init(_ entries: [LogEntry]) { storage = Mutex(entries) }

    /// How many entries are still held.
    public var count: Int { storage.withLock { $0.count } }

    /// Frees the entries now, on this thread.
    public func free() { storage.withLock { $0 = [] } }

    /// Frees at most `n` of the entries still held (the last ones), on this thread, and the
    /// storage once none is left; returns how many are still held.
    @discardableResult
    public func free(atMost n: Int) -> Int {
        storage.withLock { entries in
            entries.removeLast(min(max(0, n), entries.count))
            if entries.isEmpty { entries = [] }
            return entries.count
        }
    }
}
