import RDMAPaxosCore

// Linearizable reads: issued by clients (some at a leader cut off from the cluster that has not
// noticed it was replaced), served from the replica's state machine once it has applied through
// the index the core confirmed, and checked against what clients had seen complete before the
// read was invoked.

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
    /// The index the core confirmed; nil until then.
    var confirmedAt: LogIndex?
}

extension Simulation {
    mutating func startRead(at l: NodeID) throws(SimulationFailure) {
        let id = nextRead
        nextRead += 1
        let a: Actions
        do {
            a = try nodes[l]!.replica!.read(id: id)
        } catch {
            if staleLeader == l { log("read \(id) at cut-off leader \(l) refused: \(error)") }
            return
        }
        let mustSee = acknowledgedCommand[highestAcked] ?? []
        reads[id] = IssuedRead(node: l, incarnation: nodes[l]!.incarnation, mustSeeIndex: highestAcked,
                               mustSeeCommand: mustSee, mustReach: newestReadState)
        if staleLeader == l { log("read \(id) at cut-off leader \(l)") }
        try handle(l, a)
    }

    /// The core confirmed a read: it is served once the state machine has applied its index.
    mutating func confirmRead(_ id: NodeID, _ r: ReadState) throws(SimulationFailure) {
        guard var issued = reads[r.id], issued.confirmedAt == nil else { throw fail("read \(r.id) confirmed twice or never issued") }
        guard issued.node == id, issued.incarnation == nodes[id]!.incarnation else { throw fail("read \(r.id) confirmed by another node") }
        issued.confirmedAt = r.index
        reads[r.id] = issued
    }

    /// Serves every confirmed read whose node has applied through its index, as the runtime does
    /// (`answerReads`): the answer is the state machine as it is then.
    mutating func serveReads(_ id: NodeID) throws(SimulationFailure) {
        let n = nodes[id]!
        let ready = reads.filter { $0.value.node == id && $0.value.incarnation == n.incarnation && ($0.value.confirmedAt.map { $0 <= n.stateIndex } ?? false) }
        for (rid, r) in ready.sorted(by: { $0.key < $1.key }) {
            reads[rid] = nil
            try checkRead(rid, r, at: id)
        }
    }

    /// Linearizability of one read against the operations that completed before it was invoked:
    /// the state it returns holds the newest write acknowledged by then (at the index it was
    /// acknowledged at), and is no older than the state any earlier completed read returned.
    mutating func checkRead(_ rid: UInt64, _ r: IssuedRead, at id: NodeID) throws(SimulationFailure) {
        let n = nodes[id]!
        report.readsConfirmed += 1
        if r.confirmedAt != nil, staleLeader == id { report.staleLeaderReadsServed += 1 }
        defer { newestReadState = max(newestReadState, n.stateIndex) }
        guard !options.onlyFinalChecks else { return }
        if r.mustSeeIndex > 0 {
            let held = n.state.command(at: r.mustSeeIndex)
            guard held == r.mustSeeCommand else {
                throw fail("read \(rid) served by node \(id) from its state through \(n.stateIndex) (confirmed at \(r.confirmedAt ?? 0))"
                           + " misses the write \(String(decoding: r.mustSeeCommand, as: UTF8.self)) acknowledged at \(r.mustSeeIndex) before the read was invoked"
                           + " (it holds \(held.map { String(decoding: $0, as: UTF8.self) } ?? "nothing") there)")
            }
        }
        guard n.stateIndex >= r.mustReach else {
            throw fail("read \(rid) served by node \(id) returns its state through \(n.stateIndex), older than the state through \(r.mustReach) an earlier read returned before it was invoked")
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
