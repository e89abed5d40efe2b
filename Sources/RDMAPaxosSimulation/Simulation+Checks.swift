import RDMAPaxosCore

// Network, disks, client traffic and the checkers that run after every step.
extension Simulation {
    /// Runs node `id`'s loop until it is idle, then checks and carries out what it did: its
    /// events, the messages it sent, the entries it applied and its answers to clients.
    mutating func run(_ id: NodeID) throws(SimulationFailure) {
        guard let p = nodes[id]!.process else { return }
        guard p.run() else { throw fail("node \(id)'s loop never went idle") }
        if let v = p.transport.violations.first { throw fail(v) }
        if let v = p.machine.violations.first { throw fail("node \(id) \(v)") }
        for e in p.inbox.events {
            log("\(id): \(e)")
            if case .becameLeader = e { report.elections += 1 }
            if case .recovered = e { report.recoveries += 1 }
        }
        p.inbox.events = []
        for w in p.inbox.warnings {
            log("\(id) warns: \(w)")
            if let held = Self.heldUnitsWritten(w) { report.writesHeldForSpace += held }
        }
        p.inbox.warnings = []
        let sent = p.transport.outbox
        p.transport.outbox = []
        for m in sent { try transmit(m) }
        if p.machine.restores > 0 {
            report.snapshotsInstalled += p.machine.restores
            log("\(id): restored snapshot \(p.machine.stateIndex)")
            p.machine.restores = 0
        }
        let applied = p.machine.applied
        p.machine.applied = []
        for e in applied { try applyEntry(id, e) }
        let answers = p.inbox.answers.sorted { $0.request < $1.request }
        p.inbox.answers = []
        for a in answers { try answered(a.request, a.result, at: id) }
        if p.inbox.removed { leaveCluster(id) }
    }

    /// The number of held persist units the node's "room again" warning reports (see
    /// `ReplicaNode.lacksSpace`), nil for any other warning.
    static func heldUnitsWritten(_ warning: String) -> Int? {
        let prefix = "the log's disk has room again: writing the "
        guard warning.hasPrefix(prefix) else { return nil }
        return Int(warning.dropFirst(prefix.count).prefix { $0.isNumber })
    }

    /// Puts a message on the wire (its durability was checked when the node sent it), as the
    /// real transport would: not while either end's connection is being made again after a
    /// restart, and not into a ring that is full (both drop the message, as `RingTransport`
    /// does); then, while faults are on, with loss, duplication and delay.
    mutating func transmit(_ m: Message) throws(SimulationFailure) {
        try checkTransportLimits(m)
        if reconnecting(m.from) || reconnecting(m.to) {
            report.droppedReconnecting += 1
            return
        }
        guard faultsOn else {
            try enqueue(m, at: now + 1 + rng.below(2))
            return
        }
        if chance(options.dropRate) {
            report.messagesDropped += 1
            return
        }
        try enqueue(m, at: now + 1 + rng.below(options.delayTicksMax))
        if chance(options.duplicateRate) {
            try enqueue(m, at: now + 1 + rng.below(options.delayTicksMax * 2))
            report.messagesDuplicated += 1
        }
    }

    func reconnecting(_ id: NodeID) -> Bool { (nodes[id]?.reconnectedAt ?? 0) > now }

    /// Into the receiver's ring for the sender: dropped when the bytes not yet read there would
    /// pass `ringBytes`.
    mutating func enqueue(_ m: Message, at tick: Int) throws(SimulationFailure) {
        let bytes = Self.ringBytes(of: m)
        let held = ringHeld[[m.from, m.to], default: 0]
        guard held + bytes <= options.ringBytes else {
            report.droppedRingFull += 1
            return
        }
        ringHeld[[m.from, m.to]] = held + bytes
        network.append((tick, m))
    }

    /// What a message takes in a ring: a fixed header and its entries or snapshot data.
    static func ringBytes(of m: Message) -> Int {
        switch m.body {
        case let .accept(_, _, entries, _), let .promise(_, _, entries, _):
            64 + entries.reduce(0) { $0 + $1.payload.count + entryOverheadBytes }
        case let .installSnapshot(c): 64 + c.data.count
        default: 64
        }
    }

    /// Hands each message due now to its receiver's transport, then runs the receivers.
    mutating func deliverMessages() throws(SimulationFailure) {
        var due: [Message] = []
        network.removeAll { item in
            if item.at <= now { due.append(item.message); return true }
            return false
        }
        // Read from the ring (or lost with it): its bytes are free again.
        for m in due { ringHeld[[m.from, m.to], default: 0] -= Self.ringBytes(of: m) }
        // Messages due together arrive in any order.
        for i in due.indices.reversed() where i > 0 { due.swapAt(i, rng.below(i + 1)) }
        var receivers: Set<NodeID> = []
        for m in due {
            guard !cut.contains([m.from, m.to]), let p = nodes[m.to]?.process else {
                report.messagesDropped += 1
                continue
            }
            report.messagesDelivered += 1
            p.transport.onReceive?(m)
            receivers.insert(m.to)
        }
        for id in ids where receivers.contains(id) { try run(id) }
    }

    /// Completes the disk writes due now; the nodes hear of them on their next pass.
    mutating func completeDisks() throws(SimulationFailure) {
        for id in ids where nodes[id]!.process != nil {
            if nodes[id]!.storage.completeDue() { try run(id) }
        }
    }

    /// Runs the nodes' off-loop work (snapshot saves), each item a tick or a few after it was queued.
    mutating func runOffLoopWork() throws(SimulationFailure) {
        for id in ids {
            // Not on a stalled disk: a save would complete the writes the stall holds back.
            guard let p = nodes[id]!.process, !p.offLoop.queued.isEmpty, nodes[id]!.storage.stalledUntil <= UInt64(now),
                  rng.below(3) == 0 else { continue }
            p.offLoop.runOne()
            report.offLoopSaves += 1
            try run(id)
        }
    }

    // MARK: Clients

    func liveLeader() -> NodeID? {
        let leaders = ids.filter { nodes[$0]!.replica?.role == .leader }
        return leaders.max { nodes[$0]!.replica!.promised < nodes[$1]!.replica!.promised }
    }

    mutating func clientTraffic() throws(SimulationFailure) {
        guard let l = liveLeader() else { return }
        if chance(options.proposeRate) { _ = try proposeCommand(at: l) }
        try clientReads(leader: l)
    }

    /// Proposes a fresh unique command at node `l`; returns it.
    mutating func proposeCommand(at l: NodeID) throws(SimulationFailure) -> [UInt8] {
        nextCommand += 1
        let cmd = command(nextCommand)
        let p = nodes[l]!.process!
        let request = nextRequest()
        requests[request] = .propose(cmd, node: l, incarnation: nodes[l]!.incarnation)
        let inbox = p.inbox
        p.node.propose(cmd) { inbox.answers.append((request, $0)) }
        try run(l)
        return cmd
    }

    mutating func nextRequest() -> Int {
        requestCount += 1
        return requestCount
    }

    /// A node answered request `request`: an acknowledged write, or a read to check.
    mutating func answered(_ request: Int, _ result: Result<[UInt8], any Error>, at id: NodeID) throws(SimulationFailure) {
        guard let r = requests.removeValue(forKey: request) else { throw fail("request \(request) answered twice or never made") }
        switch r {
        case let .propose(cmd, node, incarnation):
            guard case let .success(bytes) = result else { return }
            var reader = ByteReader(bytes, what: "simulated result")
            guard node == id, incarnation == nodes[id]!.incarnation, let index = try? reader.u64(),
                  nodes[id]!.process?.machine.state.command(at: index) == cmd else {
                throw fail("command \(String(decoding: cmd, as: UTF8.self)) answered by node \(id) with a result that is not the index its state machine applied it at, or not by the incarnation it was proposed at")
            }
            acknowledged[cmd] = index
            highestAcked = max(highestAcked, index)
            acknowledgedCommand[index] = cmd
            report.acknowledged += 1
        case let .read(rid):
            guard let issued = reads.removeValue(forKey: rid) else { return }
            switch result {
            case let .success(bytes): try checkRead(rid, issued, answer: bytes, at: id)
            case let .failure(e): if staleLeader == id { log("read \(rid) at cut-off leader \(id) refused: \(e)") }
            }
        case let .other(what):
            log("\(id): \(what): \(result.map { _ in "done" })")
        }
    }

    // MARK: Checkers

    /// A command the node's state machine applied, with the entry its log holds there.
    mutating func applyEntry(_ id: NodeID, _ e: LogEntry) throws(SimulationFailure) {
        guard e.index > nodes[id]!.checkedApply else {
            throw fail("node \(id) applied index \(e.index) after \(nodes[id]!.checkedApply): applies must go forward")
        }
        nodes[id]!.checkedApply = e.index
        guard !options.onlyFinalChecks else { return }
        let c = committed[e.index] ?? recordCommitted(e)
        guard c == e else {
            throw fail("node \(id) applied \(describe(e)) but \(describe(committed[e.index]!)) was committed there")
        }
    }

    mutating func recordCommitted(_ e: LogEntry) -> LogEntry {
        committed[e.index] = e
        report.committed += 1
        if e.kind == .command {
            if let other = commandIndex[e.payload], other != e.index {
                // Reported by checkCommitted through the duplicate check below.
                duplicateCommand = (e.payload, other, e.index)
            }
            commandIndex[e.payload] = e.index
        }
        return e
    }

    /// Never two different entries committed at one index; no command committed twice.
    mutating func checkCommitted() throws(SimulationFailure) {
        for id in ids {
            guard let r = nodes[id]!.replica else { continue }
            var from = max(nodes[id]!.checkedCommit + 1, r.firstIndex)
            while from <= r.commitIndex {
                guard let e = r.entry(at: from) else { throw fail("node \(id) committed index \(from) it does not hold") }
                let c = committed[from] ?? recordCommitted(e)
                guard c == e || options.onlyFinalChecks else { throw fail("index \(from) committed as \(describe(c)) and as \(describe(e)) on node \(id)") }
                from += 1
            }
            nodes[id]!.checkedCommit = max(nodes[id]!.checkedCommit, r.commitIndex)
        }
        if let (cmd, a, b) = duplicateCommand, !options.onlyFinalChecks {
            throw fail("command \(String(decoding: cmd, as: UTF8.self)) committed twice, at \(a) and \(b)")
        }
    }

    /// A restarted replica resumes from at least the promise its disk holds durably: a promise
    /// made before a crash binds the replica after it.
    func checkRestored(_ id: NodeID) throws(SimulationFailure) {
        let durable = nodes[id]!.storage.durable.hardState.promised
        guard !options.onlyFinalChecks, let r = nodes[id]!.replica, r.promised < durable else { return }
        throw fail("node \(id) restarted at promise \(r.promised) though its disk holds the promise \(durable)")
    }

    /// After healing: a leader, every running replica caught up, every acknowledged write there.
    func converged() -> Bool {
        guard let l = liveLeader(), let lr = nodes[l]!.replica, lr.commitIndex == lr.lastIndex else { return false }
        return ids.filter { $0 != permanentlyDown }.allSatisfy { id in
            // A removed node counts once the leader has added it back and it caught up.
            guard let r = nodes[id]!.replica else { return false }
            return r.commitIndex == lr.commitIndex && (r.isWitness || r.appliedIndex == lr.commitIndex) && !r.isRecovering
        }
    }

    /// After convergence, on the replicas' real state machines (not the checkers' ledger): every
    /// state machine holds every acknowledged write at the index it was acknowledged at, and each
    /// holds exactly the commands the ledger recorded as committed through the index it applied,
    /// whether it applied them one by one or restored them from a snapshot.
    func finalCheck(after before: LogIndex) throws(SimulationFailure) {
        let running = ids.filter { $0 != permanentlyDown && !(nodes[$0]!.replica?.isWitness ?? true) }
        for id in running {
            let n = nodes[id]!
            let held = Dictionary(n.state.map { ($0.index, $0.payload) }, uniquingKeysWith: { a, _ in a })
            for (cmd, index) in acknowledged.sorted(by: { $0.value < $1.value }) where held[index] != cmd {
                throw fail("acknowledged command \(String(decoding: cmd, as: UTF8.self)) at \(index) is missing from node \(id)'s state machine"
                           + " (it holds \(held[index].map { String(decoding: $0, as: UTF8.self) } ?? "nothing") there)")
            }
            var expected: [StateEntry] = []
            let applied = n.replica!.appliedIndex
            for i in 1...max(1, applied) where applied > 0 {
                guard let c = committed[i] else { continue }
                if c.kind == .command { expected.append(StateEntry(index: i, payload: c.payload)) }
            }
            guard n.state == expected else {
                let diverged = zip(n.state, expected).enumerated().first { $0.element.0 != $0.element.1 }?.offset ?? min(n.state.count, expected.count)
                throw fail("node \(id)'s state machine (\(n.state.count) commands through \(applied)) differs from the committed log"
                           + " (\(expected.count) commands) from its command \(diverged) on")
            }
        }
    }

    func describe(_ e: LogEntry) -> String {
        "\(e.index)@\(e.ballot) \(e.kind) \(String(decoding: e.payload.prefix(16), as: UTF8.self))"
    }
}

/// One command in a simulated state machine, with the log index it was applied from.
struct StateEntry: Equatable {
    var index: LogIndex
    var payload: [UInt8]
}
