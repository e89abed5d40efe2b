import RDMAPaxosCore

/// Runs one seeded simulation: faults first, then a healed cluster that must converge.
/// Throws the first checker violation, with the seed that replays it.
public func simulate(_ options: SimulationOptions, trace: Bool = false) throws(SimulationFailure) -> SimulationReport {
    var sim = Simulation(options, tracing: trace)
    try sim.run()
    return sim.report
}

struct SimNode {
    /// The replica's running process; nil while it is down.
    var process: SimulatedProcess<SimulatedStateMachine>?
    /// The disk, which outlives the process.
    var storage: SimulatedStorage
    /// Incremented at each restart, so an ack is only credited to the incarnation that was asked.
    var incarnation = 0
    var restartAt: Int?
    var checkedCommit: LogIndex = 0
    /// The highest index this incarnation's state machine applied.
    var checkedApply: LogIndex = 0
    /// The node crashed losing durable state; it restarts told so.
    var lostState = false
    /// Ticks this node's clock advances per simulated tick (clock-rate skew), and the fraction
    /// of a tick it has accumulated.
    var clockRate = 1.0
    var clockDebt = 0.0
    /// Its connections are being made again until this tick (after a restart): messages from or
    /// to it are dropped meanwhile.
    var reconnectedAt = 0
    /// Told it was removed from the cluster, the node stopped and its data was deleted, as
    /// `plover node` does; it starts afresh when the leader adds it back.
    var removed = false

    /// The running node's consensus core (read between steps only).
    var replica: Replica? { process?.node.core }
    /// The running node's state machine: the commands it applied, in order.
    var state: [StateEntry] { process?.machine.state ?? [] }
}

/// A request a simulated client made of a node.
enum ClientRequest {
    case propose([UInt8], node: NodeID, incarnation: Int)
    case read(UInt64)
    /// An operator's request (membership change, leader transfer): its answer is logged.
    case other(String)
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
    /// Bytes on the wire per directed link, not yet read by the receiver (its ring for the sender).
    var ringHeld: [[NodeID]: Int] = [:]
    /// Directed links currently cut, and when the cut heals.
    var cut: Set<[NodeID]> = []
    var healCutAt = 0

    // Checker state.
    var committed: [LogIndex: LogEntry] = [:]
    var commandIndex: [[UInt8]: LogIndex] = [:]
    /// Client requests a node has not answered yet, by sequence number.
    var requests: [Int: ClientRequest] = [:]
    var requestCount = 0
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
            nodes[id] = SimNode(storage: SimulatedStorage(delayTicksMax: options.diskDelayTicksMax, seed: rng.next()))
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
        // A node that lost state starts told so (`NodeOptions.stateIntact`), as the runtime does
        // after such a restart; the node records it durably before it takes part.
        let intact = !n.lostState || options.trustLostState
        n.lostState = false
        let p = SimulatedProcess<SimulatedStateMachine>(config: replicaConfig(id), bootstrap: members, seed: rng.next(), intact: intact,
                                                        storage: n.storage, options: options)
        do {
            try p.node.start()
        } catch {
            preconditionFailure("seed \(options.seed): node \(id) does not start from its simulated disk: \(error)")
        }
        n.process = p
        n.checkedCommit = p.node.core.firstIndex - 1
        n.checkedApply = p.machine.stateIndex
        n.restartAt = nil
        n.reconnectedAt = now + 1 + rng.below(3)
        nodes[id] = n
        // Its peers' transports see it connect again.
        for other in ids { nodes[other]?.process?.transport.linksDown.remove(id) }
        // Reads the previous incarnation had not answered are lost with it (their clients time out).
        reads = reads.filter { $0.value.node != id }
    }

    /// The node's process dies: what it held in memory and the writes it had in flight are lost
    /// (a few of those may have reached the disk without it hearing so).
    mutating func crash(_ id: NodeID) {
        let s = nodes[id]!.storage
        let reached = s.pending.isEmpty ? 0 : rng.below(s.pending.count + 1)
        report.writesLandedAtCrash += reached
        s.crash(reached: reached)
        nodes[id]!.process = nil
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
                + " commit \(r.commitIndex) applied \(r.appliedIndex) durable \(r.durableIndex) state \(nodes[id]!.process!.machine.stateIndex)"
                + " disk \(nodes[id]!.storage.lastIndex) pending \(nodes[id]!.storage.pending.count)"
                + (nodes[id]!.storage.pending.first.map { " (first due \($0.dueAt), stalled until \(nodes[id]!.storage.stalledUntil))" } ?? "")
                + (r.role == .leader ? " match \(r.followerMatch.sorted { $0.key < $1.key })" : "")
                + " members \(r.membership.members.map { "\($0.id):\($0.role)" }.joined(separator: ","))"
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
        let before = nodes.values.compactMap { $0.replica?.appliedIndex }.max() ?? 0
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
            return n.lostState || (n.replica.map(\.isRecovering) ?? n.storage.durable.hardState.recovering)
        }
        if options.witness && options.seed % 8 < 4, !lossPending, let lost = voters.randomElement(using: &rng) {
            permanentlyDown = lost
        }
        for id in ids where id != permanentlyDown && !nodes[id]!.removed {
            let s = nodes[id]!.storage
            s.stalledUntil = 0
            s.fullUntil = 0
            // Writes queued behind a stalled disk complete soon once it is healed.
            for i in s.pending.indices {
                s.pending[i].dueAt = min(s.pending[i].dueAt, UInt64(now + options.diskDelayTicksMax))
            }
            if nodes[id]!.replica == nil {
                start(id)
                try checkRestored(id)
            }
        }
        if let lost = permanentlyDown {
            if nodes[lost]!.process != nil { crash(lost) }
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
                nodes[id]!.storage.flushed = nodes[id]!.storage.durable
            }
        }
        for id in ids { nodes[id]!.storage.now = UInt64(now) }
        try deliverMessages()
        try completeDisks()
        try runOffLoopWork()
        if !linksDown.isEmpty { tellLinkDown() }
        for id in ids where nodes[id]!.replica != nil {
            // Clock-rate skew: a fast clock ticks twice in some steps, a slow one skips some.
            nodes[id]!.clockDebt += nodes[id]!.clockRate
            while nodes[id]!.clockDebt >= 1, nodes[id]!.replica != nil {
                nodes[id]!.clockDebt -= 1
                nodes[id]!.process!.ticks.fire()
                try run(id)
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
            crash(victim)
            nodes[victim]!.restartAt = now + 5 + rng.below(40)
            linksDown.append(victim)
            report.crashes += 1
            var how = ""
            if loses {
                let everything = rng.below(2) == 0
                let s = nodes[victim]!.storage
                s.durable = everything ? SimulatedStorage.Durable() : s.flushed
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
            nodes[id]!.storage.stalledUntil = UInt64(now + 5 + rng.below(30))
            report.diskStalls += 1
            log("disk stall \(id) until \(nodes[id]!.storage.stalledUntil)")
        }
        if options.diskFullRate > 0, chance(options.diskFullRate) {
            let id = ids[rng.below(ids.count)]
            let until = UInt64(now + 40 + rng.below(81))
            nodes[id]!.storage.fullUntil = max(nodes[id]!.storage.fullUntil, until)
            report.diskFulls += 1
            log("disk full \(id) until \(until)")
        }
    }

    /// Compaction while faults are on, asked of the node as an application that snapshots its
    /// own state does (`ReplicaNode.compact(through:snapshot:)`), besides the node's own trigger.
    /// Not after the heal: with the simulator's 64-byte chunks a snapshot travels slower than the
    /// entries it replaces, and each compaction while a transfer is under way means another
    /// snapshot to send once it is installed.
    mutating func maybeCompact() throws(SimulationFailure) {
        if chance(options.compactRate) {
            let id = ids[rng.below(ids.count)]
            // As the runtime's entry trigger, only once the log is at least as big as the last
            // snapshot, and (a witness) only through what every voter holds.
            if let p = nodes[id]!.process, case let r = p.node.core, r.compactableIndex >= r.firstIndex,
               logBytes(r) >= nodes[id]!.storage.durable.snapshot?.data.count ?? 0 {
                let through = r.compactableIndex
                p.node.compact(through: through, snapshot: r.isWitness ? [] : p.machine.snapshot())
                report.compactions += 1
                log("compact \(id) through \(through)")
                try run(id)
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
