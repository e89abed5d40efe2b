import RDMAPaxosCore

/// One simulated cluster run: topology, fault mix and durations. Everything random derives
/// from `seed`, so a seed replays exactly.
public struct SimulationOptions: Sendable, Hashable {
    /// Seeds every random choice of the run.
    public var seed: UInt64
    /// Members that vote (including the witness, if any).
    public var voters: Int = 3
    /// Make the last voting member a witness (persists and votes, never applies or leads).
    public var witness: Bool = false
    /// Add one non-voting learner.
    public var learner: Bool = false
    /// Ticks with faults injected, then ticks allowed for the healed cluster to converge.
    public var faultTicks: Int = 300
    /// Ticks the healed cluster gets to converge before the run fails for liveness, divided by
    /// the slowest member's clock rate (see `clockRateSpread`).
    public var healTicksMax: Int = 600

    // Per-message faults while faults are on.
    /// Probability that a message is dropped.
    public var dropRate: Double = 0.05
    /// Probability that a message is delivered twice.
    public var duplicateRate: Double = 0.02
    /// A message arrives 1 to this many ticks after it was sent (at least 1).
    public var delayTicksMax: Int = 3
    // Per-tick faults while faults are on.
    /// Probability per tick that a node crashes (losing writes not yet durable) and restarts later.
    public var crashRate: Double = 0.01
    /// Probability that a crash also loses durable state, as memory mode (everything) or async
    /// mode (what was written since the last flush) can: half each. The node restarts told its
    /// state may be lost (`RestoredState.intact` false) and must recover before it votes. Such a
    /// crash is injected only while fewer than (voting − 1) / 2 voting members are down or
    /// recovering, since a majority that lost state cannot recover by itself.
    public var lostStateRate: Double = 0.3
    /// Async mode's flush interval: a crash that loses state keeps the disk as of the last
    /// multiple of this many ticks.
    public var flushEveryTicks: Int = 10
    /// A broken variant for checking the checkers: a node that lost state is told it is intact,
    /// as before recovery existed. Runs with it must fail.
    public var trustLostState: Bool = false
    /// A broken variant for checking the checkers: leaders count themselves toward the commit
    /// quorum for entries their own disk has not made durable yet, and clients are answered on
    /// such commits. Runs with it must fail (a crashed leader loses an acknowledged write).
    public var leaderCountsUndurableEntries: Bool = false
    /// A broken variant for checking the checkers: a new leader appends no no-op of its own
    /// ballot and commits the suffix it recovered by counting copies of earlier ballots.
    public var leaderSkipsNoop: Bool = false
    /// A broken variant for checking the checkers: a restarted replica treats the promised
    /// ballot its stable log restored as lost.
    public var forgetPromiseOnRestart: Bool = false
    /// A broken variant for checking the checkers: replicas apply entries beyond their commit
    /// index (the simulated clients are answered on those applies).
    public var applyPastCommit: Bool = false
    /// A broken variant for checking the checkers: the leader answers linearizable reads without
    /// a quorum confirming its heartbeat round.
    public var readWithoutQuorum: Bool = false
    /// A broken variant for checking the checkers: followers acknowledge entries before their
    /// stable log has made them durable.
    public var ackBeforePersist: Bool = false
    /// A broken variant for checking the checkers: a new leader appends its no-op but commits an
    /// earlier ballot's entry as soon as a quorum holds copies of it.
    public var commitOlderBallotByCounting: Bool = false
    /// Turns off the checkers that run at every step (agreement on commit and apply, reads, the
    /// durability of acks and promises, restarts), leaving only the final checks after
    /// convergence. Only for showing that the final checks can fail on their own.
    public var onlyFinalChecks: Bool = false

    // Configuration and operator faults.
    /// The replicas' check-quorum setting (`ReplicaConfig.checkQuorum`). Off, a leader cut off
    /// from its quorum keeps believing it leads while another is elected.
    public var checkQuorum: Bool = true
    /// The replicas' pre-vote setting (`ReplicaConfig.preVote`).
    public var preVote: Bool = true
    /// Clock-rate skew: each member's clock runs at a rate drawn from [1 − spread, 1 + spread]
    /// ticks per simulated tick, for the whole run. 0: every clock runs at the same rate.
    public var clockRateSpread: Double = 0
    /// Voters get random priorities from 1 to 3 (the witness and learner keep 0), so leaders
    /// hand over to caught-up voters of higher priority on their own.
    public var unequalPriorities: Bool = false
    /// Probability per tick that the leader is asked to transfer leadership to another voter.
    public var transferRate: Double = 0
    /// Probability per tick that one node's disk fills up for 40 to 120 ticks: its log reports no
    /// room (`StableLog.spaceShortfall`), so the node holds its writes, acknowledging and leading
    /// nothing, until space is freed.
    public var diskFullRate: Double = 0
    /// Probability that a linearizable read is sent to a node chosen among all that believe they
    /// lead (a deposed leader that has not noticed yet) instead of the leader of the highest ballot.
    public var staleLeaderReadShare: Double = 0.5
    /// Probability per tick that the leader is cut off both ways for 60 to 120 ticks (longer than
    /// an election and a commit take) while its clients, unaware, keep sending it reads.
    public var staleLeaderRate: Double = 0
    /// Probability per tick that a client unaware of the cut sends a linearizable read to the
    /// leader `staleLeaderRate` cut off, while it still believes it leads.
    public var staleLeaderReadRate: Double = 0.3
    /// Share of client commands two to five times the replicas' batch limit (64 bytes in the
    /// simulator): each travels alone in its accept and in a witness's hand-over.
    public var largeCommandShare: Double = 0
    /// Bytes of filler in every state machine snapshot, standing for a large state: with it,
    /// snapshots go in 512-byte chunks instead of 64-byte ones, and a restored snapshot must
    /// reproduce the filler byte for byte. 0: snapshots hold only the commands.
    public var stateFillerBytes: Int = 0
    /// The transport's limit on the entries or snapshot bytes one message carries (the real
    /// transport drops a larger message): a message over it is a violation.
    public var messageBytesMax: Int = 1024
    /// Bytes of the ring each replica keeps per sender: a message that would take the bytes on
    /// the wire to it from one sender, not yet read, past this is dropped (`RingTransport`'s
    /// `droppedRingFull`). Messages count a 64-byte header besides their entries or snapshot data.
    public var ringBytes: Int = 4096
    /// Probability per tick that the leader's disk turns slow for a few ticks and the leader then
    /// loses power right after it commits (or when its disk would have caught up), restarting
    /// soon, while the voting followers holding entries its disk lacks are cut off for 40 to 80
    /// ticks: the rest elect a leader with the restarted one. Not while another member is down.
    public var leaderPowerLossRate: Double = 0
    /// Probability per tick that one node is cut off, both ways or one way, for a while.
    public var partitionRate: Double = 0.01
    /// Probability per tick that one node's disk stalls for a while.
    public var diskStallRate: Double = 0.005
    /// Probability per tick that one node snapshots its state and compacts its log.
    public var compactRate: Double = 0.02
    /// The runtime's own compaction trigger (`NodeOptions.compactEveryEntries`): each node
    /// compacts once it holds this many applied entries, besides the compactions `compactRate` asks for.
    public var runtimeCompactEveryEntries: Int = 120
    /// Probability per tick that the leader changes the membership of the learner topology's last
    /// node, through the operators' guards (`MembershipChange.plan(in:)`): promote it, demote it,
    /// remove it, add it back (as a learner; see `witnessMembership`). The heal phase adds it
    /// back as a learner if it is out. 0: never.
    public var membershipRate: Double = 0
    /// With `membershipRate`, a third of the re-additions while faults are on add the node as a
    /// second witness, removed again later, so that the ID comes back as a learner after being a
    /// witness (the standard mix turns it on for half of the seeds that change the membership).
    public var witnessMembership: Bool = false
    /// Probability per tick that the leader is given a command to propose.
    public var proposeRate: Double = 0.5
    /// Probability per tick that the leader is asked for a linearizable read.
    public var readRate: Double = 0.1
    /// Slowest a disk write takes, in ticks.
    public var diskDelayTicksMax: Int = 2

    /// The default topology and fault mix for `seed`.
    public init(seed: UInt64) { self.seed = seed }

    /// The fault mixes the test suite and `plover simulate` rotate through, by seed.
    public static func standard(seed: UInt64) -> SimulationOptions {
        var o = SimulationOptions(seed: seed)
        switch seed % 4 {
        case 0: o.voters = 3
        case 1: o.voters = 5
        case 2: o.voters = 3; o.witness = true
        default: o.voters = 5; o.witness = true; o.learner = true; o.membershipRate = 0.02
        }
        // The configuration and operator faults vary independently of the topology, drawn from
        // a generator of their own so the run's own sequence stays seeded by `seed` alone.
        var mix = SeededRandom(seed: seed ^ 0x5EED_F00D_CAFE_0001)
        if mix.below(3) == 0 { o.checkQuorum = false }
        if mix.below(3) == 0 { o.preVote = false }
        if mix.below(2) == 0 { o.clockRateSpread = 0.5 }
        if mix.below(3) == 0 { o.unequalPriorities = true }
        if mix.below(2) == 0 { o.transferRate = 0.01 }
        if mix.below(4) == 0 { o.delayTicksMax = 12 }
        o.diskFullRate = 0.002
        o.staleLeaderRate = 0.004
        o.leaderPowerLossRate = 0.01
        if mix.below(4) == 0 { o.largeCommandShare = 0.1 }
        if mix.below(4) == 0 { o.stateFillerBytes = 2048 }
        if o.membershipRate > 0 && mix.below(2) == 0 { o.witnessMembership = true }
        return o
    }
}

/// What a passing run did.
public struct SimulationReport: Sendable, Hashable, CustomStringConvertible {
    /// The seed the run used.
    public var seed: UInt64
    /// Ticks simulated, faults and healing together.
    public var ticks = 0
    /// Log entries committed (commands, no-ops and membership changes).
    public var committed = 0
    /// Proposed commands that the proposing node applied at the index it was given.
    public var acknowledged = 0
    /// Linearizable reads confirmed and checked.
    public var readsConfirmed = 0
    /// Messages that reached their receiver.
    public var messagesDelivered = 0
    /// Messages lost to `dropRate`, partitions or crashed receivers.
    public var messagesDropped = 0
    /// Messages delivered a second time.
    public var messagesDuplicated = 0
    /// Node crashes injected.
    public var crashes = 0
    /// Crashes that also lost durable state (memory or async mode).
    public var lostStateCrashes = 0
    /// Recoveries completed by nodes that lost state (`recovered` events).
    public var recoveries = 0
    /// Partitions injected.
    public var partitions = 0
    /// Disk stalls injected.
    public var diskStalls = 0
    /// Log compactions performed.
    public var compactions = 0
    /// Snapshots installed on lagging replicas.
    public var snapshotsInstalled = 0
    /// Elections won (`becameLeader` events).
    public var elections = 0
    /// Membership changes proposed (`SimulationOptions.membershipRate`).
    public var membershipChanges = 0
    /// Leader transfers requested (`SimulationOptions.transferRate`).
    public var transfers = 0
    /// Full disks injected (`SimulationOptions.diskFullRate`).
    public var diskFulls = 0
    /// Reads issued at a leader other than the one of the highest ballot, or at a leader cut off
    /// by `SimulationOptions.staleLeaderRate`.
    public var staleLeaderReads = 0
    /// Leaders cut off by `SimulationOptions.staleLeaderRate` (also counted in `partitions`).
    public var leaderIsolations = 0
    /// Leaders crashed by `SimulationOptions.leaderPowerLossRate` (also counted in `crashes`).
    public var leaderPowerLosses = 0
    /// Followers told that a crashed leader's connection closed (`Replica.leaderUnreachable`).
    public var linkDownNotices = 0
    /// Reads served by a cut-off leader (`SimulationOptions.staleLeaderRate`) during its cut.
    public var staleLeaderReadsServed = 0
    /// Snapshot saves the nodes ran off their loop (their own compactions).
    public var offLoopSaves = 0
    /// Messages dropped because the receiver's ring for the sender was full (`ringBytes`).
    public var droppedRingFull = 0
    /// Messages dropped because one end was connecting again after a restart (1 to 3 ticks).
    public var droppedReconnecting = 0
    /// Writes in flight at a crash that reached the disk without the process hearing so.
    public var writesLandedAtCrash = 0
    /// Writes the nodes held while their disk was full, written once it had room again.
    public var writesHeldForSpace = 0

    public var description: String {
        "seed \(seed): \(ticks) ticks, \(committed) committed, \(acknowledged) acked, \(readsConfirmed) reads, "
            + "\(elections) leaders, \(crashes) crashes (\(lostStateCrashes) losing state, \(recoveries) recoveries), "
            + "\(partitions) partitions, \(diskStalls) disk stalls, "
            + "\(compactions) compactions, \(snapshotsInstalled) snapshot installs, \(membershipChanges) membership changes, "
            + "\(transfers) transfers, \(diskFulls) full disks, \(leaderPowerLosses) leader power losses, \(staleLeaderReads) reads at deposed leaders (\(staleLeaderReadsServed) served by a cut-off one), "
            + "\(messagesDelivered) delivered / \(messagesDropped) dropped / \(messagesDuplicated) duplicated, "
            + "\(droppedRingFull) dropped by a full ring, \(droppedReconnecting) while reconnecting; "
            + "\(offLoopSaves) off-loop snapshot saves, \(writesHeldForSpace) writes held for space, \(writesLandedAtCrash) landed at a crash"
    }
}

/// A checker found a violation. `seed` replays it.
public struct SimulationFailure: Error, Sendable, CustomStringConvertible {
    /// The seed that reproduces the failure.
    public var seed: UInt64
    /// The tick at which the violation was found.
    public var tick: Int
    /// What was violated.
    public var message: String
    /// The run's recent event log, oldest first.
    public var trace: [String]

    public var description: String {
        "simulation seed \(seed) failed at tick \(tick): \(message)\n"
            + "replay: swift run plover simulate --seed \(seed) --trace\n"
            + trace.suffix(40).joined(separator: "\n")
    }
}
