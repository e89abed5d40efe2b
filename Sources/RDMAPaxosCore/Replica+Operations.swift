// Linearizable reads, membership changes, leader transfer and log compaction.

extension Replica {
    // MARK: Read index

    /// Starts a linearizable read. When `Actions.reads` later carries `id`, the read may be served
    /// from the state machine once it has applied through the returned index: the leader
    /// confirmed with a quorum that it was still the leader after the read arrived.
    public mutating func read(id readID: UInt64) throws(ProposalRefusal) -> Actions {
        guard role == .leader else { throw .notLeader(leader: leader) }
        guard pendingReads.count < config.pendingReadsMax else { throw .tooManyPendingReads(limit: config.pendingReadsMax) }
        if log.ballot(at: commitIndex) == promised {
            readRound += 1
            pendingReads.append(PendingRead(id: readID, index: commitIndex, round: readRound))
            broadcastHeartbeat()
            confirmReads()
        } else {
            // Until an entry of our ballot commits we do not know the true commit index.
            pendingReads.append(PendingRead(id: readID, index: nil, round: 0))
        }
        return finish()
    }

    mutating func startWaitingReads() {
        guard pendingReads.contains(where: { $0.index == nil }) else { return }
        readRound += 1
        for i in pendingReads.indices where pendingReads[i].index == nil {
            pendingReads[i].index = commitIndex
            pendingReads[i].round = readRound
        }
        broadcastHeartbeat()
        confirmReads()
    }

    /// Releases reads whose heartbeat round a quorum (including us) has answered.
    mutating func confirmReads() {
        guard role == .leader, !pendingReads.isEmpty else { return }
        let confirmed = config.brokenReadsWithoutQuorum ? readRound
            : Quorum(membership.voting).confirmedRound { $0 == id ? readRound : progress[$0].map { $0.counts ? $0.readAck : 0 } }
        var keep: [PendingRead] = []
        for r in pendingReads {
            if let index = r.index, r.round <= confirmed {
                out.reads.append(ReadState(id: r.id, index: index))
            } else {
                keep.append(r)
            }
        }
        pendingReads = keep
    }

    // MARK: Membership

    /// Proposes a configuration differing from the current one by a single member: one added,
    /// one removed, or one member's role or priority changed (learner promotion).
    public mutating func proposeMembership(_ next: Membership) throws(ProposalRefusal) -> (index: LogIndex, actions: Actions) {
        guard role == .leader else { throw .notLeader(leader: leader) }
        if let t = transferTarget { throw .leadershipTransferInProgress(to: t) }
        guard membershipIndex <= commitIndex, log.ballot(at: commitIndex) == promised else {
            throw .membershipChangeInProgress
        }
        guard Set(next.members.map(\.id)).count == next.members.count else {
            throw .invalidMembershipChange("a member id appears twice")
        }
        let old = Dictionary(uniqueKeysWithValues: membership.members.map { ($0.id, $0) })
        let new = Dictionary(uniqueKeysWithValues: next.members.map { ($0.id, $0) })
        let added = new.keys.filter { old[$0] == nil }
        let removed = old.keys.filter { new[$0] == nil }
        let changed = new.keys.filter { old[$0] != nil && old[$0] != new[$0] }
        guard added.count + removed.count + changed.count == 1 else {
            throw .invalidMembershipChange("exactly one member may be added, removed or changed at a time")
        }
        // Only learner <-> voter is a single step. A witness keeps no state machine, so it can
        // neither become nor stop being one in place: remove it and add a fresh member instead.
        if let c = changed.first, let o = old[c], let n = new[c], o.role != n.role, o.role == .witness || n.role == .witness {
            throw .invalidMembershipChange("member \(c) cannot move from \(o.role) to \(n.role); remove it and add a fresh member")
        }
        guard next.members.contains(where: { $0.role == .voter }) else {
            throw .invalidMembershipChange("the configuration must keep at least one voter")
        }
        appendAsLeader(kind: .membership, payload: next.encoded())
        broadcastAppend()
        return (log.lastIndex, finish())
    }

    // MARK: Leader transfer

    /// Hands leadership to `target` once it has caught up; proposals are refused meanwhile.
    public mutating func transferLeadership(to target: NodeID) throws(ProposalRefusal) -> Actions {
        guard role == .leader else { throw .notLeader(leader: leader) }
        guard membership.member(target)?.role == .voter, target != id else { throw .invalidTransferTarget(target) }
        _ = startTransfer(to: target)
        return finish()
    }

    mutating func startTransfer(to target: NodeID) -> Bool {
        transferTarget = target
        transferElapsed = 0
        if progress[target]?.match == log.lastIndex && progress[target]?.counts == true {
            send(target, .timeoutNow)
        } else {
            sendAppend(to: target)
        }
        return true
    }

    // MARK: Compaction

    /// Replaces the log prefix through `index` (at most `compactableIndex`: applied, and on a
    /// witness held durably by every voter) with a state machine snapshot (a witness's is empty).
    public mutating func compact(through index: LogIndex, snapshot data: [UInt8]) -> Actions {
        precondition(index <= compactableIndex, "can only compact what was applied (a witness: what every voter holds)")
        guard index > log.snapshot.index, let ballot = log.ballot(at: index) else { return finish() }
        // The last configuration at or below `index`: the one in force when no membership entry
        // follows `index` (the usual case), else read in place. A scan or a copy of the prefix
        // (often hundreds of thousands of entries) cost the node's loop tens of milliseconds.
        let m = membershipIndex <= index ? membership : log.lastMembership(through: index)?.membership ?? snapshotMembership
        compactLog(to: SnapshotPoint(index: index, ballot: ballot))
        snapshotMembership = m
        snapshotData = data
        stepSnapshot = Snapshot(index: index, ballot: ballot, membership: m, data: data)
        if isWitness { witnessSkipped = WitnessSkipped(restore: stepSnapshot, from: index + 1) }
        return finish()
    }
}

extension Replica {
    /// Starts an election now instead of waiting for the election timer (an operator's
    /// "campaign" and the scenario tests' trigger). Ignored by non-voters.
    public mutating func campaign() -> Actions {
        if role != .leader && promotable && !diskStalled {
            resetElectionTimer()
            campaign(force: false)
        }
        return finish()
    }
}

extension Replica {
    /// The runtime found its connection to `peer` broken (a killed process's sockets close at
    /// once). If `peer` is the leader this follower follows, it stops counting on it: it leaves
    /// the leader's lease and its election timer runs out within 1 to 3 ticks (randomized, so
    /// that two followers seldom start together) instead of a whole election timeout. Safe
    /// whatever the cause: with pre-vote, an election needs a quorum that no longer hears from
    /// the leader either, and the members still in its lease refuse (docs/design/consensus.md,
    /// "A leader whose connection broke").
    public mutating func leaderUnreachable(_ peer: NodeID) -> Actions {
        if role == .follower, leader == peer, peer != id {
            leader = nil
            electionElapsed = max(electionElapsed, randomizedElectionTimeout - 1 - rng.below(3))
        }
        return finish()
    }
}
