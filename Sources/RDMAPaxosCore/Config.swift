/// Fixed limits and timings of one replica. All times are in ticks of the caller's clock.
public struct ReplicaConfig: Sendable, Hashable {
    /// This replica's node id.
    public var id: NodeID
    /// Followers campaign after a randomized timeout in [base, 2·base) without a leader,
    /// plus one base per priority level below the highest in the configuration.
    public var electionTimeoutTicks: Int = 10
    /// A leader sends heartbeats this often (must be well below the election timeout).
    public var heartbeatTicks: Int = 1
    /// Ask peers "would you vote?" before disrupting the cluster with a real election.
    public var preVote: Bool = true
    /// A leader that has not heard from a quorum within an election timeout steps down,
    /// and followers that heard from a leader within it refuse to promise others.
    public var checkQuorum: Bool = true
    /// A leader whose own stable log has not completed a write for this long steps down once a
    /// follower has also had entries durable that the leader has not for a further
    /// `electionTimeoutTicks` (a disk stall every replica shares is no reason to change leaders).
    public var diskStallTicks: Int = 10
    /// Most bytes of entries (payload plus per-entry framing) in one accept message. Keep it
    /// below what the transport carries in one message: the leader resends a dropped batch forever.
    public var batchBytesMax: Int = 256 << 10
    /// Most snapshot bytes in one install-snapshot message. Like `batchBytesMax`, keep it below
    /// what the transport carries in one message; larger snapshots go in several chunks.
    public var snapshotChunkBytes: Int = 128 << 10
    /// Most accept messages in flight to one follower.
    public var inflightMessagesMax: Int = 64
    /// Most bytes of entries (as `batchBytesMax` counts them) in accepts in flight to one
    /// follower; a batch is cut to what is left of it (it still holds one entry, so the window may
    /// be passed by one entry), and one accept always goes. Keep it below
    /// the transport's buffer towards one peer (a ring's bytes): beyond that the transport drops
    /// messages, which the leader only resends after a stall (etcd-raft's MaxInflightBytes).
    public var inflightBytesMax: Int = 768 << 10
    /// Most bytes of proposed-but-uncommitted payload the leader holds; beyond, proposals are refused.
    public var uncommittedBytesMax: Int = 64 << 20
    /// Most linearizable reads waiting for confirmation; beyond, reads are refused.
    public var pendingReadsMax: Int = 4096
    /// Least ticks between two automatic transfers to a higher-priority voter started by this
    /// replica. A transfer that does not complete (the preferred replica cannot take over in
    /// time: a slow disk, say) refuses proposals while it lasts; retried at every heartbeat, it
    /// would keep the cluster refusing and leadership moving. 6,000 ticks is a minute at 10 ms.
    public var priorityTransferIntervalTicks: Int = 6_000
    /// A deliberately broken leader for checking the simulator's checkers, never for use: it
    /// counts itself toward the commit quorum for entries its own stable log has not made durable
    /// yet, so a crash of the leader can lose an entry that committed and was acknowledged.
    package var brokenLeaderCountsUndurableEntries = false
    /// A deliberately broken leader for checking the simulator's checkers, never for use: a new
    /// leader appends no no-op of its own ballot and commits the suffix it recovered by counting
    /// copies of earlier ballots, which a later leader may still overwrite.
    package var brokenLeaderSkipsNoop = false
    /// A deliberately broken replica for checking the simulator's checkers, never for use: at a
    /// restart it ignores the promised ballot its stable log restored (treats it as lost) and
    /// may then promise or accept a ballot below one it promised before the crash.
    package var brokenForgetsPromiseOnRestart = false
    /// A deliberately broken replica for checking the simulator's checkers, never for use: it
    /// applies every entry its log holds, beyond its commit index.
    package var brokenAppliesPastCommit = false
    /// A deliberately broken leader for checking the simulator's checkers, never for use: it
    /// answers linearizable reads without the heartbeat round a quorum must confirm.
    package var brokenReadsWithoutQuorum = false
    /// A deliberately broken follower for checking the simulator's checkers, never for use: it
    /// acknowledges accepted entries as soon as it appends them, before its stable log has made
    /// them durable, so a crash can lose an entry the leader counted toward a commit.
    package var brokenAcksBeforePersist = false
    /// A deliberately broken leader for checking the simulator's checkers, never for use: it
    /// still appends its no-op, but commits an entry of an earlier ballot as soon as a quorum
    /// holds copies of it, which a later leader whose log ends in a higher ballot may overwrite.
    package var brokenCommitsOlderBallotByCounting = false

    /// The defaults above for the replica `id`.
    public init(id: NodeID) { self.id = id }
}

/// A deterministic random source (SplitMix64) the caller seeds; the core never reads entropy.
public struct SeededRandom: RandomNumberGenerator, Sendable, Hashable {
    private var state: UInt64
    /// A generator whose sequence is fully determined by `seed`.
    public init(seed: UInt64) { state = seed }

    public mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }

    /// Uniform in 0..<bound (bound > 0).
    public mutating func below(_ bound: Int) -> Int {
        precondition(bound > 0)
        return Int(next() % UInt64(bound))
    }
}
