import RDMAPaxosCore

// Network, disks, client traffic and the checkers that run after every step.
extension Simulation {
    mutating func handle(_ id: NodeID, _ a: Actions) throws(SimulationFailure) {
        for e in a.events {
            log("\(id): \(e)")
            if case .becameLeader = e { report.elections += 1 }
            if case .recovered = e { report.recoveries += 1 }
            if case let .readRefused(rid, _) = e { reads[rid] = nil }
        }
        if let p = a.persist {
            var n = nodes[id]!
            let due = UInt64(now + rng.below(options.diskDelayTicksMax + 1))
            let acks = a.sendAfterPersist.map { ($0, vouched(id, $0)) }
            n.disk.pending.append((p, acks, max(due, n.disk.stalledUntil)))
            nodes[id] = n
        } else {
            // Acks waiting on no persist vouch for what is durable already: they go now, through
            // the same durability check as every other ack.
            for m in a.sendAfterPersist { try transmit(m, vouching: vouched(id, m)) }
        }
        for m in a.send { try transmit(m, vouching: vouched(id, m)) }
        if let s = a.restore {
            nodes[id]!.state = try restoredState(s, at: id)
            nodes[id]!.stateIndex = s.index
            report.snapshotsInstalled += 1
            log("\(id): restored snapshot \(s.index)")
        }
        for e in a.apply { try applyEntry(id, e) }
        for r in a.reads { try confirmRead(id, r) }
        if !reads.isEmpty, nodes[id]!.replica != nil { try serveReads(id) }
        if a.events.contains(where: { if case .removedFromCluster = $0 { true } else { false } }) { leaveCluster(id) }
    }

    /// The ballot of the entry an acceptance vouches for, as the sender's log held it when it
    /// produced the message (nil when that entry is already compacted into a snapshot).
    func vouched(_ id: NodeID, _ m: Message) -> Ballot? {
        switch m.body {
        case let .accepted(true, index): return nodes[id]!.replica?.entry(at: index)?.ballot
        case let .recovering(_, index) where index > 0: return nodes[id]!.replica?.entry(at: index)?.ballot
        default:
            return nil
        }
    }

    /// Puts a message on the wire after checking the durability rule for acks.
    mutating func transmit(_ m: Message, vouching: Ballot?) throws(SimulationFailure) {
        try checkTransportLimits(m)
        let disk = nodes[m.from]!.disk
        switch options.onlyFinalChecks ? .timeoutNow : m.body {
        case let .accepted(true, index), let .recovering(_, index):
            guard disk.lastIndex >= index, vouching == nil || disk.ballot(at: index) == vouching else {
                throw fail("node \(m.from) acknowledged \(index)@\(vouching.map(String.init(describing:)) ?? "?") before it was durable"
                           + " (disk holds \(disk.lastIndex)@\(disk.ballot(at: disk.lastIndex).map(String.init(describing:)) ?? "-"))")
            }
        case .promise(true, _, _, _):
            guard disk.hardState.promised >= m.ballot
            else { throw fail("node \(m.from) promised \(m.ballot) before the promise was durable (disk: \(disk.hardState.promised))") }
        default: break
        }
        guard faultsOn else {
            network.append((now + 1 + rng.below(2), m))
            return
        }
        if chance(options.dropRate) {
            report.messagesDropped += 1
            return
        }
        network.append((now + 1 + rng.below(options.delayTicksMax), m))
        if chance(options.duplicateRate) {
            network.append((now + 1 + rng.below(options.delayTicksMax * 2), m))
            report.messagesDuplicated += 1
        }
    }

    mutating func deliverMessages() throws(SimulationFailure) {
        var due: [Message] = []
        network.removeAll { item in
            if item.at <= now { due.append(item.message); return true }
            return false
        }
        // Messages due together arrive in any order.
        for i in due.indices.reversed() where i > 0 { due.swapAt(i, rng.below(i + 1)) }
        for m in due {
            guard !cut.contains([m.from, m.to]), nodes[m.to]?.replica != nil else {
                report.messagesDropped += 1
                continue
            }
            report.messagesDelivered += 1
            let a = nodes[m.to]!.replica!.receive(m)
            try handle(m.to, a)
        }
    }

    mutating func completeDisks() throws(SimulationFailure) {
        for id in ids where nodes[id]!.replica != nil {
            while let first = nodes[id]!.disk.pending.first, first.dueAt <= UInt64(now), nodes[id]!.disk.stalledUntil <= UInt64(now) {
                nodes[id]!.disk.pending.removeFirst()
                nodes[id]!.disk.apply(first.persist)
                for (m, v) in first.acks { try transmit(m, vouching: v) }
                let a = nodes[id]!.replica!.persisted(first.persist.sequence)
                try handle(id, a)
            }
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

    /// Proposes a fresh unique command; returns it if the leader took it.
    mutating func proposeCommand(at l: NodeID) throws(SimulationFailure) -> [UInt8]? {
        nextCommand += 1
        let cmd = command(nextCommand)
        // Only the core's refusal is caught: a checker's violation in `handle` propagates.
        guard let (index, a) = try? nodes[l]!.replica!.propose([cmd]) else { return nil }
        proposals[cmd] = (l, nodes[l]!.incarnation, index)
        try handle(l, a)
        return cmd
    }

    // MARK: Checkers

    mutating func applyEntry(_ id: NodeID, _ e: LogEntry) throws(SimulationFailure) {
        var n = nodes[id]!
        guard e.index == n.stateIndex + 1 else {
            throw fail("node \(id) applied index \(e.index) after \(n.stateIndex): applies must be contiguous")
        }
        if !options.onlyFinalChecks {
            let c = committed[e.index] ?? recordCommitted(e)
            guard c == e else {
                throw fail("node \(id) applied \(describe(e)) but \(describe(committed[e.index]!)) was committed there")
            }
        }
        n.stateIndex = e.index
        if e.kind == .command { n.state.append(StateEntry(index: e.index, payload: e.payload)) }
        nodes[id] = n
        if let p = proposals[e.payload], p.node == id, p.incarnation == n.incarnation, p.index == e.index, e.kind == .command {
            acknowledged[e.payload] = e.index
            highestAcked = max(highestAcked, e.index)
            acknowledgedCommand[e.index] = e.payload
            report.acknowledged += 1
            proposals[e.payload] = nil
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
        let durable = nodes[id]!.disk.hardState.promised
        guard !options.onlyFinalChecks, let r = nodes[id]!.replica, r.promised < durable else { return }
        throw fail("node \(id) restarted at promise \(r.promised) though its disk holds the promise \(durable)")
    }

    /// After healing: a leader, every running replica caught up, every acknowledged write there.
    func converged() -> Bool {
        guard let l = liveLeader(), let lr = nodes[l]!.replica, lr.commitIndex == lr.lastIndex else { return false }
        return ids.filter { $0 != permanentlyDown }.allSatisfy { id in
            // A removed node counts once the leader has added it back and it caught up.
            guard let r = nodes[id]!.replica else { return false }
            return r.commitIndex == lr.commitIndex && (r.isWitness || nodes[id]!.stateIndex == lr.commitIndex) && !r.isRecovering
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
            for i in 1...max(1, n.stateIndex) where n.stateIndex > 0 {
                guard let c = committed[i] else { continue }
                if c.kind == .command { expected.append(StateEntry(index: i, payload: c.payload)) }
            }
            guard n.state == expected else {
                let diverged = zip(n.state, expected).enumerated().first { $0.element.0 != $0.element.1 }?.offset ?? min(n.state.count, expected.count)
                throw fail("node \(id)'s state machine (\(n.state.count) commands through \(n.stateIndex)) differs from the committed log"
                           + " (\(expected.count) commands) from its command \(diverged) on")
            }
        }
    }

    /// The state machine a snapshot restores, refusing one that does not decode byte for byte.
    func restoredState(_ s: Snapshot, at id: NodeID) throws(SimulationFailure) -> [StateEntry] {
        guard let state = decodeState(s.data, filler: options.stateFillerBytes) else {
            throw fail("node \(id) restored snapshot \(s.index) (\(s.data.count) bytes) that is not the state machine's snapshot")
        }
        return state
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
