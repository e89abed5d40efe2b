/// A state machine snapshot: the state after applying every entry through `index`.
public struct Snapshot: Hashable, Sendable {
    /// The last log index the snapshot covers.
    public var index: LogIndex
    /// Ballot of the entry at `index`.
    public var ballot: Ballot
    /// The configuration in force at `index`.
    public var membership: Membership
    /// The state machine's bytes (empty for a witness, which keeps no state).
    public var data: [UInt8]

    /// A snapshot with every field given.
    public init(index: LogIndex, ballot: Ballot, membership: Membership, data: [UInt8]) {
        self.index = index
        self.ballot = ballot
        self.membership = membership
        self.data = data
    }
}

/// One piece of a snapshot on its way to a follower. Snapshots travel in chunks so that a state
/// machine of any size fits through transports with a bounded message size: every chunk carries
/// the snapshot's identity and configuration, and `data` holds bytes `offset ..< offset + data.count`
/// of the snapshot's `totalBytes`.
public struct SnapshotChunk: Hashable, Sendable {
    /// The last log index the whole snapshot covers.
    public var index: LogIndex
    /// Ballot of the entry at `index`.
    public var ballot: Ballot
    /// The configuration in force at `index`.
    public var membership: Membership
    /// Size in bytes of the whole snapshot's data.
    public var totalBytes: Int
    /// Byte offset of `data` within the snapshot's data.
    public var offset: Int
    /// This chunk's bytes.
    public var data: [UInt8]

    /// A chunk with every field given.
    public init(index: LogIndex, ballot: Ballot, membership: Membership, totalBytes: Int, offset: Int, data: [UInt8]) {
        self.index = index
        self.ballot = ballot
        self.membership = membership
        self.totalBytes = totalBytes
        self.offset = offset
        self.data = data
    }

    /// The chunk carrying a whole (small) snapshot.
    public init(whole s: Snapshot) {
        self.init(index: s.index, ballot: s.ballot, membership: s.membership, totalBytes: s.data.count, offset: 0, data: s.data)
    }
}

/// What one replica says to another. Every message carries the sender's current ballot:
/// a leader's own ballot, or the highest ballot a follower has promised.
public struct Message: Hashable, Sendable {
    /// The sending replica.
    public var from: NodeID
    /// The receiving replica.
    public var to: NodeID
    /// The sender's current ballot (its own when leading, else the highest it promised).
    public var ballot: Ballot
    /// What the message says.
    public var body: Body

    /// A message with every field given.
    public init(from: NodeID, to: NodeID, ballot: Ballot, body: Body) {
        self.from = from
        self.to = to
        self.ballot = ballot
        self.body = body
    }

    /// The kinds of message and what each carries.
    public enum Body: Hashable, Sendable {
        /// Would you promise `ballot` if I asked? Changes no state on the receiver.
        case preVote(lastIndex: LogIndex, lastBallot: Ballot)
        /// Answer to `preVote`: whether the receiver would promise.
        case preVoteReply(granted: Bool)
        /// Phase 1a. `force` (leader transfer) overrides the receiver's leader lease.
        case prepare(lastIndex: LogIndex, lastBallot: Ballot, commit: LogIndex, force: Bool)
        /// Phase 1b. Sent only after the promise is durable. A witness whose log is ahead of the
        /// candidate's grants anyway and hands over its entries, since a witness can never lead to
        /// commit them itself: from the candidate's last entry on if it holds that entry, else
        /// from the candidate's commit index on (or from its own first entry if it compacted
        /// further), with the ballot of the entry before them (`suffixPrevBallot`), at most
        /// `ReplicaConfig.batchBytesMax` bytes of them. `more`: the witness holds entries after
        /// `suffix`; the candidate asks again (a `prepare` from the end of what it received) and
        /// counts the vote only once it holds everything the witness has.
        case promise(granted: Bool, suffixPrevBallot: Ballot, suffix: [LogEntry], more: Bool = false)
        /// Phase 2a: entries following (prevIndex, prevBallot), and the leader's commit index.
        case accept(prevIndex: LogIndex, prevBallot: Ballot, entries: [LogEntry], commit: LogIndex)
        /// Phase 2b. On success `index` is the highest index now matching the leader (durable);
        /// on failure it is a hint: the receiver's last index.
        case accepted(success: Bool, index: LogIndex)
        /// Keeps followers from campaigning, carries the commit index and read-index rounds. To a
        /// witness, `votersDurable` is the highest index every voter holds durably (and committed):
        /// the witness may compact its log through it. 0 to other members.
        case heartbeat(commit: LogIndex, readRound: UInt64, votersDurable: LogIndex = 0)
        /// Answer to `heartbeat`, echoing its read-index round.
        case heartbeatReply(readRound: UInt64)
        /// A new commit index, told at once to a follower that holds it. Unlike `heartbeat` it
        /// asks for no answer: the leader learns that a follower is alive from its
        /// acknowledgements and from the answers to the periodic heartbeats, and a commit at every
        /// put would otherwise cost each follower a reply and the leader a wake-up per put. A
        /// witness gets a heartbeat instead (`votersDurable`).
        case commitNotice(commit: LogIndex)
        /// Replaces the receiver's prefix when the leader no longer holds the entries it needs;
        /// sent in chunks of at most `ReplicaConfig.snapshotChunkBytes`, one at a time.
        case installSnapshot(SnapshotChunk)
        /// The follower holds the first `bytes` bytes of snapshot `index`: send what follows.
        case snapshotReceived(index: LogIndex, bytes: Int)
        /// Leader transfer: campaign now, ignoring the election timer.
        case timeoutNow
        /// From a replica recovering state it may have lost (started with `RestoredState.intact`
        /// false), in place of `accepted(success: true)` (after persist; `index` as there) and of
        /// `heartbeatReply` (`index` 0). The leader uses it for flow control but counts it in no
        /// quorum until it has sent `recovered`. `nonce` names this start of the replica.
        case recovering(nonce: UInt64, index: LogIndex)
        /// Leader to a recovering replica: `barrier`, an entry of the leader's ballot appended after
        /// it learned of the recovery (`nonce`), is committed without counting the replica, and the
        /// replica holds the leader's log through it. The replica votes and counts again.
        case recovered(nonce: UInt64, barrier: LogIndex)
        /// Leader to a node that a committed configuration (the one at `configIndex`) no longer
        /// holds: it is out of the cluster and should stop. Sent in answer to anything it sends and
        /// with the leader's heartbeats for a while after the removal commits.
        case removed(configIndex: LogIndex)
    }
}

extension Message: CustomStringConvertible {
    public var description: String {
        let body: String
        switch self.body {
        case let .preVote(i, b): body = "PreVote last=\(i)@\(b)"
        case let .preVoteReply(g): body = "PreVoteReply \(g ? "granted" : "rejected")"
        case let .prepare(i, b, c, f): body = "Prepare last=\(i)@\(b) commit=\(c)\(f ? " force" : "")"
        case let .promise(g, _, s, more):
            body = "Promise \(g ? "granted" : "rejected")" + (s.isEmpty ? "" : " suffix=\(s.first!.index)...\(s.last!.index)@\(s.last!.ballot)")
                + (more ? " more" : "")
        case let .accept(pi, pb, es, c):
            let list = es.map { "\($0.index)@\($0.ballot)" + ($0.kind == .command ? ":\(String(decoding: $0.payload, as: UTF8.self))" : ":\($0.kind)") }
            body = "Accept prev=\(pi)@\(pb) commit=\(c) [\(list.joined(separator: " "))]"
        case let .accepted(s, i): body = "Accepted \(s ? "ok" : "reject") \(i)"
        case let .heartbeat(c, r, v): body = "Heartbeat commit=\(c)" + (r > 0 ? " read=\(r)" : "") + (v > 0 ? " voters-durable=\(v)" : "")
        case let .heartbeatReply(r): body = "HeartbeatReply" + (r > 0 ? " read=\(r)" : "")
        case let .commitNotice(c): body = "CommitNotice commit=\(c)"
        case let .installSnapshot(c):
            body = "InstallSnapshot \(c.index)@\(c.ballot)" + (c.totalBytes > c.data.count ? " bytes=\(c.offset)+\(c.data.count)/\(c.totalBytes)" : "")
        case let .snapshotReceived(i, n): body = "SnapshotReceived \(i) bytes=\(n)"
        case .timeoutNow: body = "TimeoutNow"
        case let .recovering(_, i): body = "Recovering" + (i > 0 ? " \(i)" : "")
        case let .recovered(_, b): body = "Recovered barrier=\(b)"
        case let .removed(i): body = "Removed config=\(i)"
        }
        return "\(from)->\(to) b=\(ballot) \(body)"
    }
}
