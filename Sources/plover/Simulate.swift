import ArgumentParser
import RDMAPaxosSimulation

/// `plover simulate`: runs the seeded fault simulator over the real replica loop and its core.
struct Simulate: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Run the deterministic fault simulator over the replica loop and its consensus core.",
        discussion: """
            Each seed builds a cluster (3 or 5 voters, with or without a witness and a learner, \
            rotating by seed), injects message loss, duplication, reordering, partitions, crashes \
            that lose undurable state (some lose durable state too, as memory and async modes \
            can), stalled and full disks, leader transfers, and varies by seed check-quorum, pre-vote, \
            clock rates and priorities, then heals and checks convergence. \
            A failure prints the seed; rerun it with --seed N --trace.
            """)

    @Option(help: "First seed.") var seed: UInt64 = 1
    @Option(help: "How many consecutive seeds to run.") var seeds: Int = 1
    @Flag(help: "Print every event of the run.") var trace = false
    @Option(help: "Ticks with faults before healing.") var faultTicks: Int?
    @Option(help: ArgumentHelp("Run a deliberately broken variant that the checkers must catch: trust-lost-state (a replica that lost state on a crash is told its state is intact, as before recovery existed), leader-counts-undurable (a leader counts itself toward the commit quorum before its own write is durable), skip-leader-noop (a new leader appends no no-op of its ballot and commits earlier ballots' entries by counting copies), forget-promise-on-restart (a restarted replica loses its promised ballot), apply-past-commit (replicas apply entries beyond their commit index), read-without-quorum (the leader answers reads without a quorum confirming its heartbeat round), ack-before-persist (followers acknowledge entries before they are durable) or commit-older-ballot (a new leader commits an earlier ballot's entry once a quorum holds copies of it).",
                               valueName: "variant")) var broken: String?
    @Flag(help: "Run only the final checks after convergence (state machines against the committed log, acknowledged writes present), not those at every step: shows that the final checks can fail on their own.")
    var finalChecksOnly = false
    @Flag(help: "In the learner topology, re-add the changing member as a second witness now and then in every seed (the standard mix does it in half of them).")
    var witnessMembership = false

    static let variants = ["trust-lost-state", "leader-counts-undurable", "skip-leader-noop",
                           "forget-promise-on-restart", "apply-past-commit", "read-without-quorum",
                           "ack-before-persist", "commit-older-ballot"]

    func validate() throws {
        guard seeds > 0 else { throw ValidationError("--seeds must be at least 1 (got \(seeds))") }
        if let t = faultTicks, t < 0 { throw ValidationError("--fault-ticks must not be negative (got \(t))") }
        if let b = broken, !Self.variants.contains(b) {
            throw ValidationError("--broken must be one of \(Self.variants.joined(separator: ", ")) (got \(b))")
        }
    }

    func run() throws {
        var totals = (runs: 0, committed: 0, acked: 0, crashes: 0, lostState: 0, recoveries: 0, partitions: 0, stalls: 0,
                      fulls: 0, transfers: 0, staleReads: 0, elections: 0, reads: 0, isolations: 0,
                      powerLosses: 0, membership: 0, saves: 0, held: 0, landed: 0, ringFull: 0, reconnecting: 0)
        installSeedReporter()
        for s in seed..<(seed + UInt64(seeds)) {
            currentSeed.store(s, ordering: .relaxed)
            var o = SimulationOptions.standard(seed: s)
            if let t = faultTicks { o.faultTicks = t }
            o.trustLostState = broken == "trust-lost-state"
            o.leaderCountsUndurableEntries = broken == "leader-counts-undurable"
            o.leaderSkipsNoop = broken == "skip-leader-noop"
            o.forgetPromiseOnRestart = broken == "forget-promise-on-restart"
            o.applyPastCommit = broken == "apply-past-commit"
            o.readWithoutQuorum = broken == "read-without-quorum"
            o.ackBeforePersist = broken == "ack-before-persist"
            o.commitOlderBallotByCounting = broken == "commit-older-ballot"
            o.onlyFinalChecks = finalChecksOnly
            o.witnessMembership = witnessMembership
            do {
                let r = try simulate(o, trace: trace)
                if trace || seeds == 1 { print(r) }
                totals.runs += 1
                totals.committed += r.committed
                totals.acked += r.acknowledged
                totals.crashes += r.crashes
                totals.lostState += r.lostStateCrashes
                totals.recoveries += r.recoveries
                totals.partitions += r.partitions
                totals.stalls += r.diskStalls
                totals.fulls += r.diskFulls
                totals.transfers += r.transfers
                totals.staleReads += r.staleLeaderReads
                totals.elections += r.elections
                totals.reads += r.readsConfirmed
                totals.isolations += r.leaderIsolations
                totals.powerLosses += r.leaderPowerLosses
                totals.membership += r.membershipChanges
                totals.saves += r.offLoopSaves
                totals.held += r.writesHeldForSpace
                totals.landed += r.writesLandedAtCrash
                totals.ringFull += r.droppedRingFull
                totals.reconnecting += r.droppedReconnecting
            } catch {
                print(error.description)
                throw ExitCode(1)
            }
        }
        print("\(totals.runs) seeds passed (\(seed)...\(seed + UInt64(seeds) - 1)): \(totals.committed) entries committed, "
              + "\(totals.acked) writes acknowledged, \(totals.crashes) crashes (\(totals.lostState) losing state, "
              + "\(totals.recoveries) recoveries), \(totals.partitions) partitions, "
              + "\(totals.stalls) disk stalls, \(totals.fulls) full disks, \(totals.elections) leaders elected, "
              + "\(totals.transfers) transfers, \(totals.reads) reads checked, \(totals.isolations) leaders cut off, "
              + "\(totals.powerLosses) leader power losses, \(totals.membership) membership changes, "
              + "\(totals.staleReads) reads at deposed leaders; runtime: \(totals.saves) off-loop snapshot saves, "
              + "\(totals.held) writes held for space, \(totals.landed) writes landed unannounced at a crash, "
              + "\(totals.ringFull) messages dropped by a full ring, \(totals.reconnecting) while reconnecting; 0 violations")
    }
}
