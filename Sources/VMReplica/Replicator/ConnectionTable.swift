// A VM replica's connection offsets (ConnectionRewriter.swift) as part of its state: what the
// VM clients see was given as its table (`base`), and, on a backup, what the primary's release
// on match learnt about this backup's guest since the checkpoint that installed it (`learnt`,
// from committed `connectionOffset` entries). The rules, and why they keep clients' view
// consistent across a failover: docs/design/vmreplica.md, "Connection offsets".

import RDMAPaxos

/// One connection's offset as a log entry carries it: learnt by primary `proposer` from its
/// backup's VM of checkpoint `generation`; `ticket` orders a primary's entries.
public struct LearntOffset: Equatable, Sendable {
    /// The checkpoint epoch that installed the backup VM whose output showed the offset.
    public var generation: UInt64
    /// The primary that learnt it.
    public var proposer: NodeID
    /// Increases with every entry the primary proposes (across generations).
    public var ticket: UInt64
    /// The connection.
    public var key: TCPConnectionKey
    /// The backup guest's numbers plus this (on top of the table the checkpoint installed)
    /// are the numbers clients see.
    public var offset: ConnectionOffset

    /// An entry from its fields.
    public init(generation: UInt64, proposer: NodeID, ticket: UInt64, key: TCPConnectionKey, offset: ConnectionOffset) {
        self.generation = generation
        self.proposer = proposer
        self.ticket = ticket
        self.key = key
        self.offset = offset
    }
}

/// The table of one replica's current VM. Mutated by the driver thread in log order (checkpoint
/// install, learnt offsets, role changes), read by the NIC reader under the replicator's lock.
struct ConnectionTable: Equatable {
    /// The table that came with the VM: the primary's own (empty until a failover with
    /// offsets); on a backup, the primary's table at the checkpoint that installed this VM.
    private(set) var base = ConnectionRewriter()
    /// Backup: offsets learnt in this VM's generation, and the ticket of each.
    private(set) var learnt = ConnectionRewriter()
    private var learntTicket: [TCPConnectionKey: UInt64] = [:]
    /// Most connections with an offset; the primary stops learning new ones past it (their
    /// differences are mismatches again, resolved by a checkpoint).
    static let connectionsMax = 1024

    /// Rewrites this VM's frames to and from the wire: `base` and `learnt` together.
    var full: ConnectionRewriter { base.composed(with: learnt) }

    /// A checkpoint installed a copy of the primary's VM, whose table is `primaryTable`: what
    /// was learnt about the old VM is void.
    mutating func installCheckpoint(primaryTable: ConnectionRewriter) {
        base = primaryTable
        learnt = ConnectionRewriter()
        learntTicket = [:]
    }

    /// A committed offset for this VM (the caller checked its generation and proposer). An
    /// entry older than one already applied for the connection changes nothing.
    mutating func learn(_ e: LearntOffset) {
        if let t = learntTicket[e.key], t >= e.ticket { return }
        learntTicket[e.key] = e.ticket
        learnt[e.key] = e.offset
    }

    /// This VM became the one clients see: its whole table is now its own.
    mutating func becomePrimary() {
        base = full
        learnt = ConnectionRewriter()
        learntTicket = [:]
    }

    /// This VM is no copy of anything any more (the replica became a backup that waits for a
    /// checkpoint): the next install replaces everything.
    mutating func reset() { self = ConnectionTable() }
}
