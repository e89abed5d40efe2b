import RDMAPaxosCore

/// Runs one seeded simulation: faults first, then a healed cluster that must converge.
/// Throws the first checker violation, with the seed that replays it.
public func simulate(_ options: SimulationOptions, trace: Bool = false) throws(SimulationFailure) -> SimulationReport {
    var sim = Simulation(options, tracing: trace)
    try sim.run()
    return sim.report
}

struct SimNode {
    var replica: Replica?
    var disk = SimulatedDisk()
    /// Incremented at each restart, so an ack is only credited to the incarnation that was asked.
    var incarnation = 0
    /// The state machine: commands applied, in order, and the index applied through.
    var state: [StateEntry] = []
    var stateIndex: LogIndex = 0
    var restartAt: Int?
    var checkedCommit: LogIndex = 0
    /// The disk as of the last async flush (what an async node keeps when the host goes down).
    var flushed = SimulatedDisk()
    /// The node crashed losing durable state; it restarts told so.
    var lostState = false
    /// Ticks this node's clock advances per simulated tick (clock-rate skew), and the fraction
    /// of a tick it has accumulated.
    var clockRate = 1.0
    var clockDebt = 0.0
    /// Told it was removed from the cluster, the node stopped and its data was deleted, as
    /// `plover node` does; it starts afresh when the leader adds it back.
    var removed = false
}

struct Simulation {
    let options: SimulationOptions
    var rng: SeededRandom
    var report: SimulationReport
    var now = 0
    var faultsOn = true
    var tracing: Bool
    var traceLines: [String] = []

    var members: Membership
    var nodes: [NodeID: SimNode] = [:]
    var ids: [NodeID]
    var network: [(at: Int, message: Message)] = []
    /// Directed links currently cut, and when the cut heals.
    var cut: Set<[NodeID]> = []
    var healCutAt = 0

    // Checker state.
    var committed: [LogIndex: LogEntry] = [:]
    var commandIndex: [[UInt8]: LogIndex] = [:]
    var proposals: [[UInt8]: (node: NodeID, incarnation: Int, index: LogIndex)] = [:]
    var acknowledged: [[UInt8]: LogIndex] = [:]
    var highestAcked: LogIndex = 0
    /// The command acknowledged at each index.
    var acknowledgedCommand: [LogIndex: [UInt8]] = [:]
    var reads: [UInt64: IssuedRead] = [:]
    /// The newest state (applied index) a read has returned so far.
    var newestReadState: LogIndex = 0
    /// The leader cut off by the current `isolateLeader` episode.
    var staleLeader: NodeID?
    var nextCommand = 0
    var nextRead: UInt64 = 1
    var duplicateCommand: ([UInt8], LogIndex, LogIndex)?
    /// A voter that stays down through the heal phase (witness topologies only).
    var permanentlyDown: NodeID?
    /// The leader whose power is to fail (`leaderPowerLoss`): its incarnation and the tick its
    /// slow disk catches up.
    var powerLoss: (leader: NodeID, incarnation: Int, until: Int)?
    /// Draws for the leader power losses, apart from `rng` so that seeds where none fires keep
    /// the schedule they had without them.
    var lossRandom: SeededRandom
    /// Draws for which followers notice a crashed leader's connection close (`tellLinkDown`).
    var linkRandom: SeededRandom
    /// Crashed leaders whose followers are told at the next step (`tellLinkDown`).
    var linksDown: [NodeID] = []

    init(_ options: SimulationOptions, tracing: Bool) {
        self.options = options
        self.tracing = tracing
        rng = SeededRandom(seed: options.seed)
        lossRandom = SeededRandom(seed: options.seed ^ 0x1EAD_E2D0_5EC0_0002)
        linkRandom = SeededRandom(seed: options.seed ^ 0x11_4BD0_3E00_0003)
        report = SimulationReport(seed: options.seed)
        var ms: [Member] = []
        for i in 1...options.voters {
            let witness = options.witness && i == options.voters
            let priority = witness ? 0 : options.unequalPriorities ? UInt8(1 + rng.below(3)) : 1
            ms.append(Member(id: NodeID(i), role: witness ? .witness : .voter, priority: priority))
        }
        if options.learner { ms.append(Member(id: NodeID(options.voters + 1), role: .learner, priority: 0)) }
        members = Membership(ms)
        ids = ms.map(\.id)
        for id in ids {
            nodes[id] = SimNode()
            if options.clockRateSpread > 0 {
                nodes[id]!.clockRate = 1 + options.clockRateSpread * (Double(rng.below(2001)) / 1000 - 1)
            }
            start(id)
        }
    }

    func replicaConfig(_ id: NodeID) -> ReplicaConfig {
        var c = ReplicaConfig(id: id)
        c.brokenLeaderCountsUndurableEntries = options.leaderCountsUndurableEntries
        c.brokenLeaderSkipsNoop = options.leaderSkipsNoop
        c.brokenForgetsPromiseOnRestart = options.forgetPromiseOnRestart
        c.brokenAppliesPastCommit = options.applyPastCommit
        c.brokenReadsWithoutQuorum = options.readWithoutQuorum
        c.brokenAcksBeforePersist = options.ackBeforePersist
        c.brokenCommitsOlderBallotByCounting = options.commitOlderBallotByCounting
        c.checkQuorum = options.checkQuorum
        c.preVote = options.preVote
        // Short enough that priority hand-overs recur within a run.
        c.priorityTransferIntervalTicks = 50
        c.electionTimeoutTicks = 10
        c.heartbeatTicks = 2
        c.diskStallTicks = 8
        c.batchBytesMax = 64
        // Small chunks: most snapshots the simulator sends travel in several pieces (one round trip each).
        c.snapshotChunkBytes = options.stateFillerBytes > 0 ? 512 : 64
        c.inflightMessagesMax = 4
        return c
    }

    mutating func start(_ id: NodeID) {
        var n = nodes[id]!
        n.incarnation += 1
        if n.lostState && !options.trustLostState {
            // As the runtime does before starting a replica that may have lost state: recorded
            // durably, so that a crash before it recovered does not make the next start trust it.
            n.disk.hardState.recovering = true
        }
        var restored = n.disk.restored
        restored.intact = !n.lostState || options.trustLostState
        n.lostState = false
        n.replica = Replica(config: replicaConfig(id), restoring: restored, bootstrap: members, seed: rng.next())
        n.state = []
        n.stateIndex = 0
        if let s = n.disk.snapshot, !n.replica!.isWitness {
            guard let state = decodeState(s.data, filler: options.stateFillerBytes) else {
                preconditionFailure("seed \(options.seed): node \(id)'s durable snapshot \(s.index) does not decode")
            }
            n.state = state
            n.stateIndex = s.index
        }
        n.checkedCommit = n.disk.snapshot?.index ?? 0
        n.restartAt = nil
        nodes[id] = n
        // Reads the previous incarnation had not answered are lost with it (their clients time out).
        reads = reads.filter { $0.value.node != id }
    }

    /// Keeps the recent history for failure reports; prints everything when tracing.
    mutating func log(_ s: String) {
        let line = "[\(now)] \(s)"
        traceLines.append(line)
        if traceLines.count > 600 { traceLines.removeFirst(300) }
        if tracing { print(line) }
    }

    /// One line per node, for failure reports.
    func clusterState() -> String {
        ids.map { id in
            guard let r = nodes[id]!.replica else { return "  \(id): down" }
            return "  \(id): \(r.role)\(r.isRecovering ? " (recovering)" : "") at \(r.promised) leader \(r.leader.map(String.init) ?? "-") log \(r.firstIndex)...\(r.lastIndex)@\(r.lastBallot)"
                + " commit \(r.commitIndex) applied \(r.appliedIndex) durable \(r.durableIndex) state \(nodes[id]!.stateIndex)"
                + " disk \(nodes[id]!.disk.lastIndex) pending \(nodes[id]!.disk.pending.count)"
                + (nodes[id]!.disk.pending.first.map { " (first due \($0.dueAt), stalled until \(nodes[id]!.disk.stalledUntil))" } ?? "")
                + (r.role == .leader ? " match \(r.followerMatch.sorted { $0.key < $1.key })" : "")
        }.joined(separator: "\n")
    }

    func fail(_ message: String) -> SimulationFailure {
        SimulationFailure(seed: options.seed, tick: now, message: message, trace: traceLines)
    }

    mutating func chance(_ p: Double) -> Bool { Double(rng.next() % 1_000_000) < p * 1_000_000 }

    // MARK: Main loop

    mutating func run() throws(SimulationFailure) {
        for _ in 0..<options.faultTicks { try step() }
        try heal()
        let before = nodes.values.map(\.stateIndex).max() ?? 0
        var probe: [UInt8]?
        var probeAt = 0
        // Timers run on each member's own clock: the slowest clock stretches the budget.
        let slowest = nodes.values.map(\.clockRate).min() ?? 1
        let healTicksMax = Int((Double(options.healTicksMax) / slowest).rounded(.up))
        for _ in 0..<healTicksMax {
            try step()
            // A probe write proves the healed cluster commits; retry it if its leader lost office.
            if probe == nil || (acknowledged[probe!] == nil && now - probeAt > 40), let l = liveLeader() {
                probe = try proposeCommand(at: l)
                probeAt = now
            }
            if let p = probe, acknowledged[p] != nil, converged() {
                try finalCheck(after: before)
                report.ticks = now
                return
            }
        }
        throw fail("liveness: no convergence within \(healTicksMax) ticks after faults healed"
                   + " (leader: \(liveLeader().map(String.init) ?? "none"), probe acked: \(probe.map { acknowledged[$0] != nil } ?? false))\n"
                   + clusterState())
    }

    mutating func heal() throws(SimulationFailure) {
        faultsOn = false
        cut = []
        staleLeader = nil
        powerLoss = nil
        // With a witness, every other seed leaves one voter down for good: the survivors (one
        // voter short) must still elect a leader, even when the witness holds entries they lack.
        let voters = ids.filter { members.member($0)?.role == .voter }
        // Not while a member lost state: with one voter gone for good, the rest of a three-member
        // cluster would not be a majority of members whose state survived.
        let lossPending = ids.contains { id in
            let n = nodes[id]!
            return n.lostState || (n.replica.map(\.isRecovering) ?? n.disk.hardState.recovering)
        }
        if options.witness && options.seed % 8 < 4, !lossPending, let lost = voters.randomElement(using: &rng) {
            permanentlyDown = lost
        }
        for id in ids where id != permanentlyDown && !nodes[id]!.removed {
            nodes[id]!.disk.stalledUntil = 0
            // Writes queued behind a stalled or full disk complete soon once it is healed.
            for i in nodes[id]!.disk.pending.indices {
                nodes[id]!.disk.pending[i].dueAt = min(nodes[id]!.disk.pending[i].dueAt, UInt64(now + options.diskDelayTicksMax))
            }
            if nodes[id]!.replica == nil {
                start(id)
                try checkRestored(id)
            }
        }
        if let lost = permanentlyDown {
            nodes[lost]!.replica = nil
            nodes[lost]!.disk.pending = []
            nodes[lost]!.restartAt = nil
        }
        log("heal: all links up, all nodes running" + (permanentlyDown.map { " but \($0), lost for good" } ?? ""))
    }

    mutating func step() throws(SimulationFailure) {
        now += 1
        if faultsOn { try injectFaults() }
        if now >= healCutAt {
            cut = []
            staleLeader = nil
        }
        for id in ids where nodes[id]!.replica == nil && id != permanentlyDown {
            if let at = nodes[id]!.restartAt, at <= now {
                let lost = nodes[id]!.lostState
                start(id)
                log("restart \(id)" + (lost ? " with lost state" + (options.trustLostState ? ", told it is intact" : "") : ""))
                try checkRestored(id)
            }
        }
        if now % max(1, options.flushEveryTicks) == 0 {
            for id in ids where nodes[id]!.replica != nil {
                nodes[id]!.flushed = nodes[id]!.disk
                nodes[id]!.flushed.pending = []
            }
        }
        try deliverMessages()
        try completeDisks()
        if !linksDown.isEmpty { try tellLinkDown() }
        for id in ids where nodes[id]!.replica != nil {
            // Clock-rate skew: a fast clock ticks twice in some steps, a slow one skips some.
            nodes[id]!.clockDebt += nodes[id]!.clockRate
            while nodes[id]!.clockDebt >= 1, nodes[id]!.replica != nil {
                nodes[id]!.clockDebt -= 1
                let a = nodes[id]!.replica!.tick()
                try handle(id, a)
            }
        }
        if faultsOn || rng.below(4) == 0 { try clientTraffic() }
        if options.membershipRate > 0, !faultsOn || chance(options.membershipRate) { try changeMembership() }
        if faultsOn, options.transferRate > 0, chance(options.transferRate) { try transferLeadership() }
        try checkCommitted()
    }

    mutating func injectFaults() throws(SimulationFailure) {
        if chance(options.crashRate), let victim = pickCrashVictim() {
            // Losing state only while the voting members down or recovering stay a minority
            // once this one joins them.
            // Voting members by every configuration a running node holds (membership changes
            // promote the learner), counted against the smallest of them.
            let configs = [members.voting] + ids.compactMap { nodes[$0]!.replica.map { Array($0.membership.voting) } }
            let voting = Set(configs.joined())
            let smallest = configs.map(\.count).min() ?? 0
            let impaired = voting.filter { $0 != victim && (nodes[$0]!.replica == nil || nodes[$0]!.replica!.isRecovering) }.count
            let loses = chance(options.lostStateRate) && impaired < (smallest - 1) / 2
            nodes[victim]!.replica = nil
            nodes[victim]!.disk.pending = []
            nodes[victim]!.restartAt = now + 5 + rng.below(40)
            linksDown.append(victim)
            report.crashes += 1
            var how = ""
            if loses {
                let everything = rng.below(2) == 0
                nodes[victim]!.disk = everything ? SimulatedDisk() : nodes[victim]!.flushed
                nodes[victim]!.lostState = true
                report.lostStateCrashes += 1
                how = everything ? ", losing everything (memory mode)" : ", losing what was written since tick \(now / options.flushEveryTicks * options.flushEveryTicks) (async mode)"
            }
            log("crash \(victim)" + how)
        }
        if cut.isEmpty && chance(options.partitionRate) {
            let kind = rng.below(3)
            let target = kind == 2 ? (liveLeader() ?? ids[rng.below(ids.count)]) : ids[rng.below(ids.count)]
            for other in ids where other != target {
                cut.insert([other, target])
                if kind != 1 { cut.insert([target, other]) } // kind 1: asymmetric, target still sends
            }
            healCutAt = now + 10 + rng.below(60)
            // Clients of a leader cut off both ways do not learn of it (see `clientReads`).
            if kind == 2, nodes[target]!.replica?.role == .leader { staleLeader = target }
            report.partitions += 1
            log("partition \(["isolate", "one-way into", "isolate leader"][kind]) \(target) until \(healCutAt)")
        }
        if options.staleLeaderRate > 0, chance(options.staleLeaderRate) { isolateLeader() }
        leaderPowerLoss()
        try maybeCompact()
        if chance(options.diskStallRate) {
            let id = ids[rng.below(ids.count)]
            nodes[id]!.disk.stalledUntil = UInt64(now + 5 + rng.below(30))
            report.diskStalls += 1
            log("disk stall \(id) until \(nodes[id]!.disk.stalledUntil)")
        }
        if options.diskFullRate > 0, chance(options.diskFullRate) {
            let id = ids[rng.below(ids.count)]
            let until = UInt64(now + 40 + rng.below(81))
            nodes[id]!.disk.stalledUntil = max(nodes[id]!.disk.stalledUntil, until)
            report.diskFulls += 1
            log("disk full \(id) until \(until)")
        }
    }

    /// Compaction while faults are on. Not after the heal: with the simulator's 64-byte chunks a
    /// snapshot travels slower than the entries it replaces, and each compaction while a transfer
    /// is under way means another snapshot to send once it is installed.
    mutating func maybeCompact() throws(SimulationFailure) {
        if chance(options.compactRate) {
            let id = ids[rng.below(ids.count)]
            // A witness only through what every voter holds (as the runtime, ReplicaNode.maybeCompact).
            // As the runtime's entry trigger, only once the log is at least as big as the last
            // snapshot.
            if var r = nodes[id]!.replica, r.compactableIndex >= r.firstIndex, logBytes(r) >= nodes[id]!.disk.snapshot?.data.count ?? 0 {
                // The state machine has applied exactly through appliedIndex: snapshot it there.
                let through = r.compactableIndex
                let a = r.compact(through: through, snapshot: r.isWitness ? [] : encodeState(nodes[id]!.state, filler: options.stateFillerBytes))
                nodes[id]!.replica = r
                report.compactions += 1
                log("compact \(id) through \(through)")
                try handle(id, a)
            }
        }
    }

    /// Bytes the replica's log holds, as the core's batching counts them.
    func logBytes(_ r: Replica) -> Int {
        guard r.lastIndex >= r.firstIndex else { return 0 }
        return (r.firstIndex...r.lastIndex).reduce(0) { $0 + (r.entry(at: $1).map { $0.payload.count + Self.entryOverheadBytes } ?? 0) }
    }

    /// Crash anyone, but keep the crashed count below a majority so the run makes progress.
    mutating func pickCrashVictim() -> NodeID? {
        let down = ids.filter { nodes[$0]!.replica == nil }.count
        guard down < (members.voting.count - 1) / 2 else { return nil }
        let up = ids.filter { nodes[$0]!.replica != nil }
        return up.isEmpty ? nil : up[rng.below(up.count)]
    }
}
