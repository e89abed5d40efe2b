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
    public var persist: Persist?
    public var send: [Message] = []
    public var sendAfterPersist: [Message] = []
    public var restore: Snapshot?
    public var apply: [LogEntry] = []
    public var reads: [ReadState] = []
    /// Role or leader changes, for logs and metrics.
    public var events: [Event] = []

    public init() {}

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
    public var entries: [LogEntry] = []
    public var hardState: HardState?
}

/// A linearizable read that may be served once the state machine has applied `index`.
public struct ReadState: Sendable, Hashable {
    public var id: UInt64
    public var index: LogIndex
}

public enum Role: String, Sendable, Hashable {
    case follower, preCandidate, candidate, leader
}

public enum Event: Sendable, Hashable, CustomStringConvertible {
    case becameLeader(Ballot)
    case becameFollower(Ballot, leader: NodeID?)
    case startedElection(Ballot, pre: Bool)
    case steppedDown(reason: String)
    case membershipChanged(Membership)
    case readRefused(id: UInt64, reason: String)

    public var description: String {
        switch self {
        case let .becameLeader(b): "became leader at \(b)"
        case let .becameFollower(b, l): "follower at \(b), leader \(l.map(String.init) ?? "unknown")"
        case let .startedElection(b, pre): "\(pre ? "pre-" : "")election at \(b)"
        case let .steppedDown(r): "stepped down: \(r)"
        case let .membershipChanged(m): "membership \(m.members.map { "\($0.id):\($0.role)" }.joined(separator: ","))"
        case let .readRefused(id, r): "read \(id) refused: \(r)"
        }
    }
}

/// Why a proposal was not taken.
public enum ProposalRefusal: Error, Sendable, Hashable, CustomStringConvertible {
    case notLeader(leader: NodeID?)
    case tooManyUncommittedBytes(limit: Int)
    case membershipChangeInProgress
    case leadershipTransferInProgress(to: NodeID)
    case emptyProposal
    case commandTooLarge(bytes: Int, limit: Int)
    case tooManyPendingReads(limit: Int)
    case invalidTransferTarget(NodeID)
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
