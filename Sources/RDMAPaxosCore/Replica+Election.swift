// Phase 1 and leadership: pre-vote, prepare/promise, check-quorum, step-down.
//
// A promise is also a vote: an acceptor promises only a candidate whose log is at least as
// up to date as its own (last ballot, then last index). The winner therefore already holds the
// highest accepted suffix of a quorum, so it needs no merge; it re-commits that suffix by
// appending a no-op in its own ballot (see docs/design/consensus.md, "Election and phase 1").

extension Replica {
    mutating func tickFollower() {
        // Time since we last heard from a leader keeps growing on members that never campaign
        // (witnesses, learners, stalled disks): their leader lease must run out too.
        electionElapsed += 1
        if var r = recovery {
            r.ticksWithoutLeader += 1
            // Long enough for a healthy cluster to elect someone several times over.
            if r.ticksWithoutLeader >= 5 * config.electionTimeoutTicks && !r.stallReported {
                r.stallReported = true
                out.events.append(.recoveryStalled(reason: "no leader heard from in \(r.ticksWithoutLeader) ticks; recovering members do not vote, so a quorum of members whose state survived must elect one. If a majority of members restarted with lost state, the cluster cannot recover by itself (docs/operations.md, \"Recovering from lost state\")"))
            }
            recovery = r
        }
        guard electionElapsed >= randomizedElectionTimeout, promotable, !diskStalled else { return }
        resetElectionTimer()
        campaign(force: false)
    }

    /// The stable log has had a write outstanding for longer than `diskStallTicks`.
    var diskStalled: Bool {
        guard let oldest = inFlightPersists.first else { return false }
        return ticks - oldest.issuedAt >= UInt64(config.diskStallTicks)
    }

    /// A voter other than this leader has made durable entries this leader's own disk has not
    /// (followers acknowledge only what they persisted): its disk works while ours is stuck, so
    /// another member would lead better. When every disk stalls at once (replicas sharing one
    /// disk, a host-wide I/O stall), stepping down would only add an election and change nothing
    /// (docs/design/consensus.md, "Disk stall").
    var votersOutpaceOwnDisk: Bool {
        membership.voting.contains { v in v != id && progress[v].map { $0.counts && $0.match > durableIndex } == true }
    }

    mutating func campaign(force: Bool) {
        if config.preVote && !force {
            role = .preCandidate
            leader = nil
            votes = [id: true]
            let prospective = Ballot(term: promised.term + 1, node: id)
            out.events.append(.startedElection(prospective, pre: true))
            for v in membership.voting where v != id {
                out.send.append(Message(from: id, to: v, ballot: prospective,
                                        body: .preVote(lastIndex: log.lastIndex, lastBallot: log.lastBallot)))
            }
            tallyVotes()
        } else {
            becomeCandidate(force: force)
        }
    }

    mutating func becomeCandidate(force: Bool) {
        let ballot = Ballot(term: promised.term + 1, node: id)
        setPromised(ballot)
        role = .candidate
        leader = nil
        votes = [:]
        handedOver = [:]
        candidacyForce = force
        snapshotInbox = nil
        resetElectionTimer()
        // Our own vote counts once our promise to ourselves is durable (see `persisted`).
        stepSelfVote = ballot
        out.events.append(.startedElection(ballot, pre: false))
        for v in membership.voting where v != id {
            send(v, .prepare(lastIndex: log.lastIndex, lastBallot: log.lastBallot, commit: commitIndex, force: force), afterPersist: true)
        }
    }

    mutating func tallyVotes() {
        switch Quorum(membership.voting).result(votes) {
        case .won:
            if role == .preCandidate { becomeCandidate(force: false); return }
            // Hand-overs are adopted as they arrive; a witness's vote counts only once we hold
            // everything it has. Adopting can change the configuration: counted in the new one.
            handedOver = [:]
            if membership.member(id)?.role == .voter { becomeLeader() }
        case .lost:
            becomeFollower(promised, leader: nil)
        case .pending:
            break
        }
    }

    mutating func becomeFollower(_ ballot: Ballot, leader newLeader: NodeID?) {
        let wasLeader = role == .leader
        let changed = role != .follower || leader != newLeader || ballot != promised
        // What we knew to match the old leader's log says nothing about a new one's.
        if leader != newLeader || ballot != promised { leaderMatch = 0 }
        setPromised(ballot)
        if changed { out.events.append(.becameFollower(ballot, leader: newLeader)) }
        role = .follower
        leader = newLeader
        if wasLeader { abandonLeadership() }
        // Only news of a leader (or our own step-down) restarts the election timer. A higher
        // ballot alone must not: a candidate that cannot win (its log is behind, and without
        // pre-vote nothing stops it campaigning) would otherwise restart every voter's timer at
        // each attempt and, timing out first every time, keep the cluster leaderless for good.
        if wasLeader || newLeader != nil { resetElectionTimer() }
    }

    mutating func abandonLeadership() {
        progress = [:]
        transferTarget = nil
        uncommittedBytes = 0
        for r in pendingReads { out.events.append(.readRefused(id: r.id, reason: "leader stepped down")) }
        pendingReads = []
    }

    mutating func becomeLeader() {
        precondition(role == .candidate && promised.node == id, "only a candidate with its own ballot can lead")
        role = .leader
        leader = id
        votes = [:]
        heartbeatElapsed = 0
        checkQuorumElapsed = 0
        outpacedWhileStalledTicks = 0
        progress = [:]
        syncProgressWithMembership()
        uncommittedBytes = 0
        out.events.append(.becameLeader(promised))
        // The no-op in our ballot commits the recovered suffix (fills the position after it).
        if !config.brokenLeaderSkipsNoop { appendAsLeader(kind: .noop, payload: []) }
        broadcastAppend()
    }

    mutating func syncProgressWithMembership() {
        for m in membership.members where m.id != id && progress[m.id] == nil {
            progress[m.id] = Progress(next: log.lastIndex + 1)
        }
        for peer in progress.keys where !membership.contains(peer) {
            progress[peer] = nil
            departed[peer] = Departed(index: membershipIndex, heartbeatsLeft: Self.departedHeartbeats)
        }
        for peer in departed.keys where membership.contains(peer) { departed[peer] = nil }
    }

    /// True if a log ending at (index, ballot) holds at least everything ours does.
    func isUpToDate(lastIndex: LogIndex, lastBallot: Ballot) -> Bool {
        (lastBallot, lastIndex) >= (log.lastBallot, log.lastIndex)
    }

    /// Whether this replica gives its log to a candidate behind it instead of refusing it: a
    /// witness, which can never lead; and a member that the configuration at the end of its log
    /// makes a learner or leaves out, asked by a candidate whose log lacks that configuration
    /// (it counts this member as voting). Such a member cannot lead either; without the
    /// hand-over, a candidate that needs its vote could never win, and no one else might
    /// (the simulator's seed 68787: two voters recovering lost state, and the only member
    /// holding the entry that made it a learner refusing every candidate behind it).
    var handsOverItsLog: Bool { isWitness || membership.member(id)?.role != .voter }

    /// A follower that heard from a live leader within an election timeout refuses to help
    /// unseat it: it neither votes nor adopts the candidate's ballot (Raft thesis 4.2.3). Without
    /// this, a member removed by a configuration that has not committed yet, never told and
    /// campaigning again and again with pre-vote off, deposed each new leader before it could
    /// commit the removal. The leader itself refuses only with check-quorum, which makes it step
    /// down on its own once it loses its quorum. A transfer's `force` overrides both.
    var inLeaderLease: Bool {
        if role == .leader { return config.checkQuorum }
        return leader != nil && electionElapsed < config.electionTimeoutTicks
    }

    /// Whether a candidate outside this replica's configuration may still get its vote: only one
    /// whose log ends at a higher ballot than this replica's. The configuration that leaves it
    /// out is then at the end of a suffix of an older ballot, which a later leader has replaced
    /// (or will): in that leader's configuration the candidate may well be a voter, and the
    /// voters holding that newer log may need this replica's vote to elect anyone (the
    /// simulator's seed 16691: node 1 held an uncommitted removal of node 6 at ballot 2.1 while
    /// the rest had re-added it at 3.3; two members were recovering lost state, so node 6, the
    /// most up to date, needed node 1's vote, and node 1 refused every candidate). A member a
    /// configuration removed for good cannot end its log at a ballot above the one that
    /// removed it, so it still gets no vote.
    func mayVote(for candidate: NodeID, lastBallot: Ballot) -> Bool {
        membership.contains(candidate) || lastBallot > log.lastBallot
    }

    mutating func handlePreVote(_ m: Message, lastIndex: LogIndex, lastBallot: Ballot) {
        // A node outside the configuration (removed, or never added) gets no vote, unless its log
        // is of a newer ballot than ours (`mayVote`).
        guard mayVote(for: m.from, lastBallot: lastBallot) else { return send(m.from, .preVoteReply(granted: false)) }
        // A member that hands over its log backs a candidate behind it: it will hand its log
        // over in the promise. A recovering replica may have forgotten a higher promise: it
        // backs nobody.
        let granted = recovery == nil && m.ballot > promised && !inLeaderLease
            && (handsOverItsLog || isUpToDate(lastIndex: lastIndex, lastBallot: lastBallot))
        send(m.from, .preVoteReply(granted: granted))
    }

    mutating func handlePrepare(_ m: Message, lastIndex: LogIndex, lastBallot: Ballot, commit: LogIndex, force: Bool) {
        guard mayVote(for: m.from, lastBallot: lastBallot) else { return send(m.from, .promise(granted: false, suffixPrevBallot: .zero, suffix: [])) }
        if inLeaderLease && !force {
            send(m.from, .promise(granted: false, suffixPrevBallot: .zero, suffix: []))
            return
        }
        guard m.ballot >= promised else {
            send(m.from, .promise(granted: false, suffixPrevBallot: .zero, suffix: []))
            return
        }
        if !handsOverItsLog && !isUpToDate(lastIndex: lastIndex, lastBallot: lastBallot) {
            // A candidate behind us never gets our vote, so its ballot is not adopted either
            // (declining a ballot is always safe). Adopting it would depose the leader we
            // follow for nothing: with pre-vote off, a member removed by a configuration we do
            // not hold yet, never told and campaigning again and again, kept that removal from
            // ever committing. A member that hands over its log backs candidates behind it (below).
            send(m.from, .promise(granted: false, suffixPrevBallot: .zero, suffix: []))
            if role == .follower && m.ballot > promised && promotable && !diskStalled {
                // No leader holds us (we are out of its lease) and a candidate that cannot win
                // is campaigning: stand above it now. Waiting out our timeout, we would find it
                // campaigning again first, every time, since it wins ties of a term by node ID.
                becomeFollower(m.ballot, leader: nil)
                becomeCandidate(force: false)
            }
            return
        }
        if m.ballot > promised { becomeFollower(m.ballot, leader: nil) }
        if recovery != nil {
            // Adopting the higher ballot is always safe; promising is not (we may have forgotten
            // a promise or an acceptance the candidate's rivals counted on).
            send(m.from, .promise(granted: false, suffixPrevBallot: .zero, suffix: []))
            return
        }
        var granted = isUpToDate(lastIndex: lastIndex, lastBallot: lastBallot)
        var suffix: [LogEntry] = []
        var prevBallot = Ballot.zero
        var more = false
        if !granted && handsOverItsLog {
            // The witness may hold entries (perhaps committed) that no voter alive has; it can
            // never lead, so it gives them to the candidate (so does a member that the end of its
            // log makes a learner or leaves out, which the candidate still counts as voting), at most one accept's worth at a
            // time: the candidate asks again from the end of what it received. Log matching:
            // if we hold the candidate's last entry, everything before it is the same here.
            let from = log.ballot(at: lastIndex) == lastBallot ? lastIndex + 1 : max(commit + 1, log.firstIndex)
            suffix = log.slice(from: from, bytesMax: config.batchBytesMax)
            prevBallot = log.ballot(at: from - 1) ?? .zero
            more = (suffix.last?.index ?? log.lastIndex) < log.lastIndex
            granted = !suffix.isEmpty
        }
        if granted { resetElectionTimer() }
        send(m.from, .promise(granted: granted, suffixPrevBallot: prevBallot, suffix: suffix, more: more), afterPersist: true)
    }

    /// What a piece of a witness's hand-over means for its vote.
    enum HandOverOutcome { case rejected, pending, complete }

    /// A promise from a witness ahead of us, carrying a piece of its log. `rejected`: the piece does
    /// not fit our log (we would stay behind this promiser); `pending`: more follows and we asked
    /// for it; `complete`: we hold everything the witness has (or its log is behind ours).
    mutating func takeHandOver(from w: NodeID, prevBallot: Ballot, _ chunk: [LogEntry], more: Bool) -> HandOverOutcome {
        // A witness, or a member our configuration counts as voting that its own log no longer
        // makes a voter (`handsOverItsLog`). Adopting its entries may change our configuration.
        guard membership.voting.contains(w), let first = chunk.first else { return .rejected }
        var h: HandOver
        if let held = handedOver[w], first.index == held.end.index + 1, prevBallot == held.end.ballot {
            h = held
            h.entries.append(contentsOf: chunk)
        } else if first.index > commitIndex, log.ballot(at: first.index - 1) == prevBallot {
            h = HandOver(prevIndex: first.index - 1, prevBallot: prevBallot, entries: chunk)
        } else {
            // A hand-over we cannot take would leave us behind this promiser: not a vote.
            handedOver[w] = nil
            return .rejected
        }
        // Leading entries we hold with the same ballot are common ground (log matching).
        let common = h.entries.prefix { log.ballot(at: $0.index) == $0.ballot }.count
        if common > 0 {
            h.prevIndex = h.entries[common - 1].index
            h.prevBallot = h.entries[common - 1].ballot
            h.entries.removeFirst(common)
        }
        if let end = h.entries.last, (end.ballot, end.index) > (log.lastBallot, log.lastIndex) {
            // Adopt it only now that it makes our log more up to date: until then the entries wait
            // aside, since votes already counted rely on our log never becoming less up to date.
            guard h.prevIndex >= commitIndex, log.ballot(at: h.prevIndex) == h.prevBallot else {
                handedOver[w] = nil
                return .rejected
            }
            for e in h.entries {
                if let b = log.ballot(at: e.index) {
                    if b == e.ballot { continue }
                    truncateLocal(from: e.index)
                }
                appendLocal(e)
            }
            h = HandOver(prevIndex: end.index, prevBallot: end.ballot, entries: [])
        }
        guard more else {
            // We hold everything the witness has, or its whole log is behind ours.
            handedOver[w] = nil
            return .complete
        }
        handedOver[w] = h
        send(w, .prepare(lastIndex: h.end.index, lastBallot: h.end.ballot, commit: commitIndex, force: candidacyForce))
        // The candidacy is making progress: a long hand-over must not time it out (the pieces
        // kept aside would be asked for again).
        resetElectionTimer()
        return .pending
    }

    mutating func tickLeader() {
        heartbeatElapsed += 1
        checkQuorumElapsed += 1
        // A follower must stay ahead of the stalled disk for a further election timeout: when
        // replicas share one disk, a stall ends for all of them within milliseconds, and the
        // followers' writes finishing first is no sign that their disks work better.
        outpacedWhileStalledTicks = diskStalled && votersOutpaceOwnDisk ? outpacedWhileStalledTicks + 1 : 0
        if outpacedWhileStalledTicks >= config.electionTimeoutTicks {
            out.events.append(.steppedDown(reason: "stable log stalled past \(config.diskStallTicks) ticks while a follower's disk stayed ahead of it for \(config.electionTimeoutTicks)"))
            becomeFollower(promised, leader: nil)
            return
        }
        if checkQuorumElapsed >= config.electionTimeoutTicks {
            checkQuorumElapsed = 0
            if config.checkQuorum {
                let active = membership.voting.filter { $0 == id || progress[$0].map { $0.recentActive && $0.counts } == true }
                if !Quorum(membership.voting).isMajority(active) {
                    out.events.append(.steppedDown(reason: "no quorum heard from in \(config.electionTimeoutTicks) ticks"))
                    becomeFollower(promised, leader: nil)
                    return
                }
            }
            warnIfWitnessCompactionHeldBack()
            for k in progress.keys { progress[k]!.recentActive = false }
        }
        if transferTarget != nil {
            transferElapsed += 1
            if transferElapsed >= config.electionTimeoutTicks { transferTarget = nil }
        }
        if heartbeatElapsed >= config.heartbeatTicks {
            heartbeatElapsed = 0
            broadcastHeartbeat()
            preferHigherPriority()
        }
        retransmitStalled()
    }

    /// Hands leadership to a caught-up voter with a higher priority (the VM primary, say).
    mutating func preferHigherPriority() {
        guard transferTarget == nil, let me = membership.member(id) else { return }
        if let last = lastPriorityTransferAt, ticks - last < UInt64(config.priorityTransferIntervalTicks) { return }
        let better = membership.members
            .filter { $0.role == .voter && $0.priority > me.priority && progress[$0.id]?.match == log.lastIndex
                && progress[$0.id]?.recentActive == true && progress[$0.id]?.counts == true }
            .max { $0.priority < $1.priority }
        if let b = better, commitIndex == log.lastIndex {
            lastPriorityTransferAt = ticks
            _ = startTransfer(to: b.id)
        }
    }

    /// The highest committed index every voter holds durably (the leader's own durable index for
    /// itself): a witness may compact its log through it.
    func votersDurableIndex() -> LogIndex {
        let held = membership.members.filter { $0.role == .voter }.map { $0.id == id ? durableIndex : (progress[$0.id]?.match ?? 0) }
        return min(held.min() ?? 0, commitIndex)
    }

    /// Once per check-quorum period: a voter silent for three periods in a row whose match sets
    /// the witness's compaction bound gets one warning per absence.
    mutating func warnIfWitnessCompactionHeldBack() {
        let hasWitness = membership.members.contains { $0.role == .witness }
        let bound = votersDurableIndex()
        for peer in progress.keys.sorted() {
            var pr = progress[peer]!
            if pr.recentActive {
                pr.silentPeriods = 0
                pr.warnedHoldingBack = false
            } else {
                pr.silentPeriods += 1
                if hasWitness, pr.silentPeriods >= 3, !pr.warnedHoldingBack, membership.member(peer)?.role == .voter,
                   pr.match == bound, bound < commitIndex {
                    pr.warnedHoldingBack = true
                    out.events.append(.witnessCompactionHeldBack(voter: peer, index: bound, ticks: pr.silentPeriods * config.electionTimeoutTicks))
                }
            }
            progress[peer] = pr
        }
    }
}
