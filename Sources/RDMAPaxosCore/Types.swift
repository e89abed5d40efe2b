// Value types shared by the consensus core, the stable log and the runtime.
// Pure Swift: no Foundation, no I/O (see docs/design/consensus.md, "The core is a value").

/// A replica's identity inside one cluster. Zero is reserved for "nobody".
public typealias NodeID = UInt32

/// A position in the replicated log. Index 0 is the empty prefix; the first entry is 1.
public typealias LogIndex = UInt64

/// A Paxos ballot: a term plus the id of the node that owns it, ordered by term then node.
/// Each node only ever proposes with ballots carrying its own id, so two leaders can never
/// share a ballot.
public struct Ballot: Hashable, Comparable, Sendable, CustomStringConvertible {
    /// The election term; higher terms win.
    public var term: UInt64
    /// The node that owns the ballot; breaks ties between equal terms.
    public var node: NodeID

    /// The ballot of `node` in `term`.
    public init(term: UInt64, node: NodeID) {
        self.term = term
        self.node = node
    }

    /// The ballot below every ballot any node can own.
    public static let zero = Ballot(term: 0, node: 0)

    public static func < (a: Ballot, b: Ballot) -> Bool {
        (a.term, a.node) < (b.term, b.node)
    }

    public var description: String { "\(term).\(node)" }
}

/// What a log entry carries.
public enum EntryKind: UInt8, Sendable, CaseIterable {
    /// The first entry of each new leader's ballot: committing it commits everything before it.
    /// Applies as nothing.
    case noop = 0
    /// An opaque command for the state machine.
    case command = 1
    /// A membership change; the payload is an encoded `Membership`.
    case membership = 2
}

/// One slot of the replicated log: which ballot accepted it, what kind it is, and its bytes.
public struct LogEntry: Hashable, Sendable {
    /// Position of the entry in the log (1-based).
    public var index: LogIndex
    /// The ballot under which the entry was accepted.
    public var ballot: Ballot
    /// What the payload holds.
    public var kind: EntryKind
    /// The command or encoded membership; empty for a no-op.
    public var payload: [UInt8]

    /// An entry with every field given.
    public init(index: LogIndex, ballot: Ballot, kind: EntryKind, payload: [UInt8]) {
        self.index = index
        self.ballot = ballot
        self.kind = kind
        self.payload = payload
    }
}

/// How a member takes part in consensus.
public enum MemberRole: UInt8, Sendable, CaseIterable, CustomStringConvertible {
    /// Votes, persists, applies, may lead.
    case voter = 0
    /// Votes and persists but never applies and never leads (PLOVER's third replica).
    case witness = 1
    /// Receives and applies the log but does not vote; may be promoted to voter.
    case learner = 2

    public var description: String {
        switch self {
        case .voter: "voter"
        case .witness: "witness"
        case .learner: "learner"
        }
    }
}

/// One member of the cluster configuration.
public struct Member: Hashable, Sendable {
    /// The member's node id (never zero).
    public var id: NodeID
    /// Whether the member votes, witnesses or learns.
    public var role: MemberRole
    /// Leader preference: among healthy candidates, higher priority campaigns first.
    /// A witness never campaigns whatever its priority.
    public var priority: UInt8
    /// host:port of the member's fabric (peer-to-peer) endpoint; empty when unknown (a
    /// configuration written by a build that did not record addresses).
    public var peerAddress: String
    /// host:port where the member answers clients; empty when unknown.
    public var clientAddress: String

    /// A member with the default priority 1 and, unless given, no addresses.
    public init(id: NodeID, role: MemberRole, priority: UInt8 = 1, peerAddress: String = "", clientAddress: String = "") {
        self.id = id
        self.role = role
        self.priority = priority
        self.peerAddress = peerAddress
        self.clientAddress = clientAddress
    }
}

/// The cluster configuration: who votes, who witnesses, who learns.
public struct Membership: Hashable, Sendable {
    /// Members sorted by id.
    public private(set) var members: [Member]

    /// A configuration of `members`, in any order (they are sorted by id).
    public init(_ members: [Member]) {
        self.members = members.sorted { $0.id < $1.id }
    }

    /// No members: the configuration before the first one is committed.
    public static let empty = Membership([])

    /// The member with this id, if any.
    public func member(_ id: NodeID) -> Member? { members.first { $0.id == id } }

    /// Members whose acceptance counts toward a quorum: voters and witnesses.
    public var voting: [NodeID] { members.filter { $0.role != .learner }.map(\.id) }

    /// Smallest number of voting members that forms a majority.
    public var quorum: Int { Quorum(voting).size }

    /// Whether `id` is a member in any role.
    public func contains(_ id: NodeID) -> Bool { member(id) != nil }
}

/// State that must survive a restart besides the entries themselves.
public struct HardState: Hashable, Sendable {
    /// Highest ballot this node has promised (voted for). It never accepts anything lower.
    /// The ballot's `node` is the candidate this node voted for in that term.
    public var promised: Ballot
    /// Highest index known committed when this was saved (may lag; never ahead of the truth).
    public var commitIndex: LogIndex
    /// The configuration in force as of the last saved membership entry or snapshot.
    public var membership: Membership
    /// The replica started with state it may have lost and has not recovered yet: it must not
    /// vote after a restart either, even one that lost nothing (see `RestoredState.intact`).
    public var recovering: Bool

    /// The hard state of a fresh replica by default: nothing promised, nothing committed, no
    /// members, not recovering.
    public init(promised: Ballot = .zero, commitIndex: LogIndex = 0, membership: Membership = .empty, recovering: Bool = false) {
        self.promised = promised
        self.commitIndex = commitIndex
        self.membership = membership
        self.recovering = recovering
    }
}

/// Where a log's prefix was compacted to.
public struct SnapshotPoint: Hashable, Sendable {
    /// Index of the last entry removed by compaction; 0 when none.
    public var index: LogIndex
    /// Ballot of the entry at `index`.
    public var ballot: Ballot
    /// The point after compacting through `index`, whose entry had `ballot`.
    public init(index: LogIndex, ballot: Ballot) {
        self.index = index
        self.ballot = ballot
    }
    /// Nothing compacted.
    public static let none = SnapshotPoint(index: 0, ballot: .zero)
}
