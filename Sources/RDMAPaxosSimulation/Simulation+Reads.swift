import RDMAPaxosCore

// Linearizable reads: issued by clients (some at a leader cut off from the cluster that has not
// noticed it was replaced), answered by the node from its state machine once it has applied
// through the index the core confirmed, and checked against what clients had seen complete
// before the read was invoked.

/// One read a simulated client issued, with what it must observe.
struct IssuedRead {
    var node: NodeID
    var incarnation: Int
    /// The highest-indexed write acknowledged before the read was invoked (index 0: none), and
    /// its command: the state the read returns must hold it there.
    var mustSeeIndex: LogIndex
    var mustSeeCommand: [UInt8]
    /// The newest state (applied index) any read returned before this one was invoked: reads
    /// never go back in time.
    var mustReach: LogIndex
}

extension Simulation {
    mutating func startRead(at l: NodeID) throws(SimulationFailure) {
        let id = nextRead
        nextRead += 1
        let mustSee = acknowledgedCommand[highestAcked] ?? []
        reads[id] = IssuedRead(node: l, incarnation: nodes[l]!.incarnation, mustSeeIndex: highestAcked,
                               mustSeeCommand: mustSee, mustReach: newestReadState)
        if staleLeader == l { log("read \(id) at cut-off leader \(l)") }
        // The query names the index whose command the answer must carry (`SimulatedStateMachine.query`).
        var q = ByteWriter()
        q.u64(highestAcked)
        let request = nextRequest()
        requests[request] = .read(id)
        let p = nodes[l]!.process!
        let inbox = p.inbox
        p.node.read(q.bytes) { inbox.answers.append((request, $0)) }
        try run(l)
    }

    /// Linearizability of one read against the operations that completed before it was invoked:
    /// the state it returns holds the newest write acknowledged by then (at the index it was
    /// acknowledged at), and is no older than the state any earlier completed read returned.
    mutating func checkRead(_ rid: UInt64, _ r: IssuedRead, answer: [UInt8], at id: NodeID) throws(SimulationFailure) {
        var reader = ByteReader(answer, what: "simulated read answer")
        guard let stateIndex = try? reader.u64(), let has = try? reader.u8(), let held = try? reader.blob(max: 1 << 20) else {
            throw fail("read \(rid) answered by node \(id) with bytes that are not the state machine's answer")
        }
        report.readsConfirmed += 1
        if staleLeader == id { report.staleLeaderReadsServed += 1 }
        defer { newestReadState = max(newestReadState, stateIndex) }
        guard !options.onlyFinalChecks else { return }
        if r.mustSeeIndex > 0 {
            guard has == 1, held == r.mustSeeCommand else {
                throw fail("read \(rid) served by node \(id) from its state through \(stateIndex)"
                           + " misses the write \(String(decoding: r.mustSeeCommand, as: UTF8.self)) acknowledged at \(r.mustSeeIndex) before the read was invoked"
                           + " (it holds \(has == 1 ? String(decoding: held, as: UTF8.self) : "nothing") there)")
            }
        }
        guard stateIndex >= r.mustReach else {
            throw fail("read \(rid) served by node \(id) returns its state through \(stateIndex), older than the state through \(r.mustReach) an earlier read returned before it was invoked")
        }
    }

    /// Client reads for this tick: most at the leader of the highest ballot, some at any node that
    /// believes it leads, and, while a cut-off leader has not noticed it was replaced, many at it
    /// (its clients have not heard of the new leader).
    mutating func clientReads(leader l: NodeID) throws(SimulationFailure) {
        if let s = staleLeader, now < healCutAt, nodes[s]!.replica?.role == .leader, chance(options.staleLeaderReadRate) {
            report.staleLeaderReads += 1
            try startRead(at: s)
        }
        guard chance(options.readRate) else { return }
        // A client that has not heard of the new leader asks whichever node it last knew as
        // leader: any node that still believes it leads, deposed or not.
        let leaders = ids.filter { nodes[$0]!.replica?.role == .leader }
        let at = chance(options.staleLeaderReadShare) ? leaders[rng.below(leaders.count)] : l
        if at != l { report.staleLeaderReads += 1 }
        try startRead(at: at)
    }

    /// Cuts the leader off both ways for longer than an election takes. With check-quorum off (or
    /// its clock slow) it goes on believing it leads while the others elect a new leader that
    /// commits and acknowledges writes: a read it answers without a quorum round is stale.
    mutating func isolateLeader() {
        guard cut.isEmpty, let l = liveLeader() else { return }
        for other in ids where other != l {
            cut.insert([other, l])
            cut.insert([l, other])
        }
        healCutAt = now + 60 + rng.below(61)
        staleLeader = l
        report.partitions += 1
        report.leaderIsolations += 1
        log("partition isolate leader \(l), its clients unaware, until \(healCutAt)")
    }
}

extension [StateEntry] {
    /// The command applied from `index`, by binary search (entries are in index order).
    func command(at index: LogIndex) -> [UInt8]? {
        var lo = startIndex, hi = endIndex
        while lo < hi {
            let mid = (lo + hi) / 2
            if self[mid].index < index { lo = mid + 1 } else { hi = mid }
        }
        return lo < endIndex && self[lo].index == index ? self[lo].payload : nil
    }
}
