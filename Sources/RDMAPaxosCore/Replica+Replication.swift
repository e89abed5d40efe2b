// Phase 2: accept / accepted, commit, heartbeats, snapshots to lagging followers.

extension Replica {
    /// Routes one message after the ballot rules every message obeys.
    mutating func step(_ m: Message) {
        if role == .leader, !membership.contains(m.from), membershipIndex <= commitIndex, m.from != id {
            // Out of the committed configuration: its messages change nothing here; it learns why.
            send(m.from, .removed(configIndex: membershipIndex))
            return
        }
        switch m.body {
        case let .preVote(i, b): return handlePreVote(m, lastIndex: i, lastBallot: b)
        case let .prepare(i, b, c, force): return handlePrepare(m, lastIndex: i, lastBallot: b, commit: c, force: force)
        default: break
        }
        let fromLeader: Bool
        switch m.body {
        case .accept, .heartbeat, .commitNotice, .installSnapshot, .timeoutNow, .recovered, .removed: fromLeader = true
        default: fromLeader = false
        }
        if m.ballot > promised, role == .leader, case let .accepted(false, index) = m.body, index < commitIndex,
           promotable, !diskStalled {
            // A follower whose log ends before our commit index rejects us for a ballot of its own
            // failed campaigns (with pre-vote off, or a member whose stale log still makes it a
            // voter). It cannot win an election, and waiting out a timeout would let it campaign
            // again first, every time: take a higher ballot at once. Forced, since the members
            // that follow us would otherwise refuse to unseat their own leader.
            becomeFollower(m.ballot, leader: nil)
            becomeCandidate(force: true)
            return
        }
        if m.ballot > promised {
            // A leader at a higher ballot exists (or a peer promised one): follow it. A granted
            // pre-vote reply carries no news; a rejection from a peer at a higher ballot tells us
            // our next campaign must start above it.
            if case let .preVoteReply(granted) = m.body {
                if !granted { becomeFollower(m.ballot, leader: nil) }
            } else {
                becomeFollower(m.ballot, leader: fromLeader ? m.from : nil)
            }
        } else if m.ballot < promised {
            // A deposed leader: tell it about our ballot so it steps down. Stale replies are dropped.
            if fromLeader { send(m.from, .accepted(success: false, index: log.lastIndex)) }
            if case .preVoteReply = m.body {} else { return }
        }
        switch m.body {
        case let .preVoteReply(granted):
            guard role == .preCandidate else { return }
            votes[m.from] = granted
            tallyVotes()
        case let .promise(granted, prevBallot, suffix, more):
            guard role == .candidate else { return }
            if granted && !suffix.isEmpty {
                // A witness ahead of us: its vote counts once we hold everything it has. Pieces
                // arriving after that (duplicates, reordered) change nothing.
                if votes[m.from] == true { return }
                switch takeHandOver(from: m.from, prevBallot: prevBallot, suffix, more: more) {
                case .pending: return
                case .complete: votes[m.from] = true
                case .rejected: votes[m.from] = false
                }
            } else {
                votes[m.from] = granted
            }
            tallyVotes()
        case let .accept(prevIndex, prevBallot, entries, commit):
            followLeader(m.from)
            handleAccept(from: m.from, prevIndex: prevIndex, prevBallot: prevBallot, entries: entries, commit: commit)
        case let .accepted(success, index):
            guard role == .leader else { return }
            handleAccepted(from: m.from, success: success, index: index)
        case let .heartbeat(commit, round, held):
            followLeader(m.from)
            learnCommit(commit)
            votersDurable = max(votersDurable, held)
            // A recovering replica's answer confirms no read: it may have forgotten a higher promise.
            if let r = recovery {
                send(m.from, .recovering(nonce: r.nonce, index: 0))
            } else {
                send(m.from, .heartbeatReply(readRound: round))
            }
        case let .commitNotice(commit):
            followLeader(m.from)
            learnCommit(commit)
        case let .heartbeatReply(round):
            guard role == .leader, var pr = progress[m.from] else { return }
            pr.recentActive = true
            if pr.counts { pr.readAck = max(pr.readAck, round) }
            if case .probe = pr.state { pr.probeSent = false }
            progress[m.from] = pr
            confirmReads()
            // Resend only what helps: a fresh probe, or entries not yet sent (in-flight ones will arrive).
            if pr.match < log.lastIndex, pr.state == .probe || pr.next <= log.lastIndex { sendAppend(to: m.from) }
        case let .installSnapshot(c):
            followLeader(m.from)
            handleSnapshotChunk(from: m.from, c)
        case let .snapshotReceived(index, bytes):
            handleSnapshotReceived(from: m.from, index: index, bytes: bytes)
        case let .removed(index):
            // Stale if our own configuration is at least as recent and still holds us.
            if membership.contains(id) && membershipIndex >= index { return }
            if !removalReported {
                removalReported = true
                out.events.append(.removedFromCluster(leader: m.from, index: index))
            }
        case .timeoutNow:
            followLeader(m.from)
            if promotable && !diskStalled { becomeCandidate(force: true) }
        case let .recovering(nonce, index):
            guard role == .leader, progress[m.from] != nil else { return }
            handleRecovering(from: m.from, nonce: nonce, index: index)
        case let .recovered(nonce, barrier):
            followLeader(m.from)
            // We hold the barrier (an entry of the leader's ballot), hence its log through it.
            guard let r = recovery, r.nonce == nonce,
                  barrier <= log.snapshot.index || log.ballot(at: barrier) == m.ballot else { return }
            recovery = nil
            hardStateDirty = true
            leaderMatch = max(leaderMatch, barrier)
            commitIndex = max(commitIndex, barrier)
            out.events.append(.recovered(leader: m.from, index: barrier))
        case .preVote, .prepare:
            preconditionFailure("handled above")
        }
    }

    /// A message from the leader of our ballot: be its follower and reset the election timer.
    mutating func followLeader(_ from: NodeID) {
        precondition(role != .leader || from == id, "two leaders share ballot \(promised)")
        if role != .follower || leader != from { becomeFollower(promised, leader: from) }
        electionElapsed = 0
        if recovery != nil {
            recovery!.ticksWithoutLeader = 0
            recovery!.stallReported = false
        }
    }

    /// The leader's commit index from a heartbeat or commit notice: committed here only as far
    /// as this replica's log is known to match the leader's (`leaderMatch`).
    mutating func learnCommit(_ commit: LogIndex) {
        if leaderMatch > commitIndex { commitIndex = max(commitIndex, min(commit, leaderMatch)) }
    }

    mutating func handleAccept(from: NodeID, prevIndex: LogIndex, prevBallot: Ballot, entries: [LogEntry], commit: LogIndex) {
        var prevIndex = prevIndex
        var prevBallot = prevBallot
        var entries = entries
        // Entries at or below our commit index are already ours, identically.
        if prevIndex < commitIndex {
            let skip = Int(min(LogIndex(entries.count), commitIndex - prevIndex))
            entries.removeFirst(skip)
            prevIndex += LogIndex(skip)
            prevBallot = log.ballot(at: prevIndex) ?? prevBallot
            if prevIndex < commitIndex {
                acknowledge(from, commitIndex)
                return
            }
        }
        guard log.ballot(at: prevIndex) == prevBallot else {
            let hint = log.lastIndex < prevIndex ? log.lastIndex : prevIndex - 1
            send(from, .accepted(success: false, index: max(hint, commitIndex)))
            return
        }
        for e in entries {
            if let b = log.ballot(at: e.index) {
                if b == e.ballot { continue }
                truncateLocal(from: e.index)
            }
            appendLocal(e)
        }
        let lastNew = prevIndex + LogIndex(entries.count)
        leaderMatch = max(leaderMatch, lastNew)
        commitIndex = max(commitIndex, min(commit, lastNew))
        acknowledge(from, lastNew)
    }

    /// Collects a snapshot's chunks in order; installs it when the last byte arrives. A chunk that
    /// does not continue what we hold (lost, reordered, or from a newer snapshot) is answered with
    /// what we hold, and the leader resends from there.
    mutating func handleSnapshotChunk(from: NodeID, _ c: SnapshotChunk) {
        guard c.index > commitIndex else {
            snapshotInbox = nil
            acknowledge(from, commitIndex)
            return
        }
        if log.ballot(at: c.index) == c.ballot {
            // We hold the snapshot's last entry, so (log matching) every entry it covers: they are
            // committed, and ours to apply. Keep them: a witness's copies may be the only ones left
            // besides the leader's snapshot.
            snapshotInbox = nil
            leaderMatch = max(leaderMatch, c.index)
            commitIndex = max(commitIndex, c.index)
            acknowledge(from, c.index)
            return
        }
        if c.offset == 0 {
            snapshotInbox = SnapshotChunk(index: c.index, ballot: c.ballot, membership: c.membership,
                                          totalBytes: c.totalBytes, offset: 0, data: [])
        }
        guard var inbox = snapshotInbox, inbox.index == c.index, inbox.ballot == c.ballot, inbox.totalBytes == c.totalBytes,
              c.offset >= 0, c.offset <= inbox.data.count, c.offset + c.data.count <= c.totalBytes
        else {
            let held = snapshotInbox.map { $0.index == c.index && $0.ballot == c.ballot ? $0.data.count : 0 } ?? 0
            send(from, .snapshotReceived(index: c.index, bytes: held))
            return
        }
        // Overlapping resends add only their new tail.
        let fresh = inbox.data.count - c.offset
        if fresh < c.data.count { inbox.data.append(contentsOf: c.data[fresh...]) }
        guard inbox.data.count == inbox.totalBytes else {
            snapshotInbox = inbox
            send(from, .snapshotReceived(index: c.index, bytes: inbox.data.count))
            return
        }
        snapshotInbox = nil
        handleInstallSnapshot(from: from, Snapshot(index: inbox.index, ballot: inbox.ballot, membership: inbox.membership, data: inbox.data))
    }

    /// Compacts the in-memory log through `point`, handing the dropped storage to the caller
    /// (`Actions.released`) to free off its loop.
    mutating func compactLog(to point: SnapshotPoint) {
        if let dropped = log.compact(to: point) { out.released.append(dropped) }
    }

    mutating func handleInstallSnapshot(from: NodeID, _ s: Snapshot) {
        let point = SnapshotPoint(index: s.index, ballot: s.ballot)
        if log.ballot(at: s.index) != s.ballot, log.lastIndex > commitIndex {
            // Our suffix does not follow the snapshot: none of it can be kept.
            truncateLocal(from: commitIndex + 1)
        }
        compactLog(to: point)
        snapshotMembership = s.membership
        snapshotData = s.data
        commitIndex = s.index
        appliedIndex = s.index
        leaderMatch = s.index
        durableIndex = min(durableIndex, s.index)
        stepSnapshot = s
        refreshMembership()
        if isWitness {
            witnessSkipped = WitnessSkipped(restore: s, from: s.index + 1)
        } else {
            witnessSkipped = nil
            out.restore = s
        }
        acknowledge(from, s.index)
    }

    // MARK: Leader side

    mutating func appendAsLeader(kind: EntryKind, payload: [UInt8]) {
        let e = LogEntry(index: log.lastIndex + 1, ballot: promised, kind: kind, payload: payload)
        uncommittedBytes += payload.count
        appendLocal(e)
    }

    mutating func broadcastAppend() {
        for peer in progress.keys.sorted() { sendAppend(to: peer) }
        maybeCommit()
    }

    mutating func broadcastHeartbeat() {
        for peer in progress.keys.sorted() {
            send(peer, heartbeat(to: peer, commit: min(commitIndex, progress[peer]!.match)))
        }
        // Members a committed configuration removed hear it for a while (a learner never asks).
        for peer in departed.keys.sorted() where departed[peer]!.index <= commitIndex {
            send(peer, .removed(configIndex: departed[peer]!.index))
            departed[peer]!.heartbeatsLeft -= 1
            if departed[peer]!.heartbeatsLeft <= 0 { departed[peer] = nil }
        }
    }

    /// A heartbeat; a witness's carries how far it may compact.
    func heartbeat(to peer: NodeID, commit: LogIndex) -> Message.Body {
        let held = membership.member(peer)?.role == .witness ? votersDurableIndex() : 0
        return .heartbeat(commit: commit, readRound: readRound, votersDurable: held)
    }

    /// How a new commit index is told between heartbeats: a `commitNotice`, which asks for no
    /// answer; a witness gets a heartbeat, which tells it how far it may compact. (A read sends
    /// heartbeats of its own.)
    func commitNotice(to peer: NodeID, commit: LogIndex) -> Message.Body {
        if membership.member(peer)?.role == .witness { return heartbeat(to: peer, commit: commit) }
        return .commitNotice(commit: commit)
    }

    /// Sends the next accept (or the snapshot) to one follower, within its flow-control window.
    mutating func sendAppend(to peer: NodeID) {
        guard var pr = progress[peer], !pr.isPaused(inflightMax: config.inflightMessagesMax, inflightBytesMax: config.inflightBytesMax) else { return }
        guard pr.next > log.snapshot.index else {
            // The entries it needs were compacted away.
            sendSnapshot(to: peer, &pr)
            progress[peer] = pr
            return
        }
        let prevIndex = pr.next - 1
        guard let prevBallot = log.ballot(at: prevIndex) else {
            preconditionFailure("follower \(peer) next index \(pr.next) is past our log end \(log.lastIndex)")
        }
        // A batch fills what is left of the byte window (at least one entry goes).
        let window = max(1, config.inflightBytesMax - (pr.state == .replicate ? pr.inflightBytes : 0))
        let entries = log.slice(from: pr.next, bytesMax: min(config.batchBytesMax, window))
        // Streaming with nothing new to send: commit notices and heartbeats carry the commit index.
        if pr.state == .replicate && entries.isEmpty { return }
        send(peer, .accept(prevIndex: prevIndex, prevBallot: prevBallot, entries: entries, commit: commitIndex))
        switch pr.state {
        case .replicate:
            if let last = entries.last {
                pr.next = last.index + 1
                pr.inflight.append(.init(last: last.index, bytes: InMemoryLog.wireBytes(entries)))
            }
        case .probe: pr.probeSent = true
        case .snapshot: break
        }
        progress[peer] = pr
    }

    /// Sends the chunk that starts at `offset` of the snapshot on its way to `peer` (of the
    /// current snapshot when none is: a new transfer) and waits for the follower's answer before
    /// sending the next. A witness gets the metadata only.
    mutating func sendSnapshot(to peer: NodeID, _ pr: inout Progress, offset: Int = 0) {
        let snapshot: Snapshot
        if case let .snapshot(i) = pr.state, let held = pr.sending, held.index == i {
            snapshot = held
        } else {
            snapshot = Snapshot(index: log.snapshot.index, ballot: log.snapshot.ballot, membership: snapshotMembership, data: snapshotData)
            pr.snapshotAcked = 0
        }
        let total = snapshotBytes(for: peer, snapshot)
        let start = min(offset, total)
        let end = min(total, start + max(1, config.snapshotChunkBytes))
        let chunk = SnapshotChunk(index: snapshot.index, ballot: snapshot.ballot, membership: snapshot.membership,
                                  totalBytes: total, offset: start, data: Array(snapshot.data[start..<end]))
        send(peer, .installSnapshot(chunk))
        pr.state = .snapshot(index: chunk.index)
        pr.sending = snapshot
        pr.snapshotNext = end
        pr.stalledTicks = 0
    }

    /// The bytes of `snapshot` that `peer` gets: none for a witness, which keeps no state.
    func snapshotBytes(for peer: NodeID, _ snapshot: Snapshot) -> Int {
        membership.member(peer)?.role == .witness ? 0 : snapshot.data.count
    }

    /// A follower reports how much of a snapshot it holds: send the next chunk once it holds
    /// everything sent so far (one chunk in flight); a lower count waits for the stall timer.
    /// The snapshot on its way stays the one sent even if the leader compacted again since.
    mutating func handleSnapshotReceived(from: NodeID, index: LogIndex, bytes: Int) {
        guard role == .leader, var pr = progress[from], case let .snapshot(sending) = pr.state, let snapshot = pr.sending else { return }
        pr.recentActive = true
        if index == sending {
            if bytes > pr.snapshotAcked { pr.stalledTicks = 0 }
            pr.snapshotAcked = bytes
            if bytes >= pr.snapshotNext, bytes < snapshotBytes(for: from, snapshot) { sendSnapshot(to: from, &pr, offset: bytes) }
        }
        progress[from] = pr
    }

    mutating func handleAccepted(from: NodeID, success: Bool, index: LogIndex) {
        guard var pr = progress[from] else { return }
        pr.recentActive = true
        if success {
            let oldMatch = pr.match
            if index > pr.match {
                pr.match = index
                pr.stalledTicks = 0
            }
            pr.next = max(pr.next, index + 1)
            pr.acknowledge(through: index)
            switch pr.state {
            case .probe: pr.becomeReplicate()
            case let .snapshot(i) where pr.match >= i: pr.becomeReplicate()
            default: break
            }
            progress[from] = pr
            let commitBefore = commitIndex
            maybeCommit()
            tellCommitted(to: from, after: oldMatch, notified: commitIndex > commitBefore)
            if transferTarget == from && pr.match == log.lastIndex && pr.counts { send(from, .timeoutNow) }
        } else {
            if case .snapshot = pr.state { progress[from] = pr; return }
            // A hint below the match we recorded is either a reordered old rejection or a
            // follower that lost its log (rebuilt from scratch): believe it; the cost of a stale
            // one is only a resend, while ignoring a rebuilt follower would strand it.
            if index < pr.match { pr.match = index }
            // Back up to just past the follower's hint.
            let next = max(pr.match + 1, min(index + 1, pr.next - 1))
            pr.becomeProbe()
            pr.next = next
            progress[from] = pr
        }
        while let p = progress[from], !p.isPaused(inflightMax: config.inflightMessagesMax, inflightBytesMax: config.inflightBytesMax), p.next <= log.lastIndex {
            sendAppend(to: from)
        }
    }

    /// A follower that acknowledged entries a quorum had already committed without it (a slower
    /// member: the other follower's answer, or a witness's, came first) learns so at once when
    /// it holds everything: no accept follows that would carry the commit index. Under load more
    /// entries are in flight and the next accept carries it; a replica that applies what it
    /// holds (a VM backup replaying inputs) would otherwise wait for the next heartbeat.
    mutating func tellCommitted(to peer: NodeID, after oldMatch: LogIndex, notified: Bool) {
        guard role == .leader, let pr = progress[peer], pr.match > oldMatch, oldMatch < commitIndex,
              pr.match == log.lastIndex else { return }
        // `maybeCommit` just told every follower holding the new commit index.
        if notified && pr.match >= commitIndex { return }
        send(peer, commitNotice(to: peer, commit: min(commitIndex, pr.match)))
    }

    /// Commits the highest index a quorum holds durably, if it is of our own ballot.
    mutating func maybeCommit() {
        guard role == .leader else { return }
        // The leader counts for what its own log made durable (its accepts went out in parallel
        // with its write); a follower for what it acknowledged, which it does only once durable. A
        // recovering follower's copies count for nothing until its barrier commits without it.
        let own = config.brokenLeaderCountsUndurableEntries ? log.lastIndex : durableIndex
        let n = Quorum(membership.voting).committedIndex { $0 == id ? own : progress[$0].map { $0.counts ? $0.match : 0 } }
        guard n > commitIndex, log.ballot(at: n) == promised || config.brokenLeaderSkipsNoop
                || config.brokenCommitsOlderBallotByCounting else { return }
        let newlyCommitted = log.entries(commitIndex + 1, through: n)
        uncommittedBytes = max(0, uncommittedBytes - newlyCommitted.reduce(0) { $0 + ($1.ballot == promised ? $1.payload.count : 0) })
        let firstInBallot = log.ballot(at: commitIndex) != promised
        commitIndex = n
        if firstInBallot { startWaitingReads() }
        if !membership.contains(id) || membership.member(id)?.role != .voter, membershipIndex <= commitIndex {
            out.events.append(.steppedDown(reason: "no longer a voter of the committed configuration"))
            becomeFollower(promised, leader: nil)
            return
        }
        // Let followers learn the new commit index promptly.
        for peer in progress.keys.sorted() where progress[peer]!.match >= n && progress[peer]!.match > 0 {
            send(peer, commitNotice(to: peer, commit: n))
        }
        // Recovering followers whose barrier just committed hear so now.
        for peer in progress.keys.sorted() { finishRecovery(of: peer) }
    }

    /// A follower recovering lost state (`nonce` names its start). A new recovery gets a barrier:
    /// a no-op appended now, after every promise the follower may have forgotten. Once the
    /// barrier commits without the follower, no candidate that counted a forgotten promise can
    /// win any more (every quorum of the others meets the barrier's, which holds an entry such a
    /// candidate lacks), so the follower counts again.
    mutating func handleRecovering(from peer: NodeID, nonce: UInt64, index: LogIndex) {
        guard var pr = progress[peer] else { return }
        switch pr.recovery {
        case let .waiting(n, _) where n == nonce: break
        case let .done(n, barrier) where n == nonce:
            // It has not heard yet (or the answer was lost).
            send(peer, .recovered(nonce: n, barrier: barrier))
        default:
            appendAsLeader(kind: .noop, payload: [])
            pr.recovery = .waiting(nonce: nonce, barrier: log.lastIndex)
            progress[peer] = pr
            out.events.append(.memberRecovering(member: peer, barrier: log.lastIndex))
            broadcastAppend()
            guard role == .leader, progress[peer] != nil else { return }
        }
        if index > 0 {
            // An acknowledgement for flow control; it counts in no quorum while waiting.
            handleAccepted(from: peer, success: true, index: index)
            guard role == .leader, progress[peer] != nil else { return }
        } else {
            // In place of a heartbeat reply.
            pr = progress[peer]!
            pr.recentActive = true
            if case .probe = pr.state { pr.probeSent = false }
            progress[peer] = pr
            if pr.match < log.lastIndex, pr.state == .probe || pr.next <= log.lastIndex { sendAppend(to: peer) }
        }
        finishRecovery(of: peer)
    }

    /// A recovering follower holding its barrier, committed without it, counts again: tell it.
    mutating func finishRecovery(of peer: NodeID) {
        guard var pr = progress[peer], case let .waiting(n, barrier) = pr.recovery, commitIndex >= barrier, pr.match >= barrier else { return }
        pr.recovery = .done(nonce: n, barrier: barrier)
        progress[peer] = pr
        send(peer, .recovered(nonce: n, barrier: barrier))
    }

    /// Followers whose match has not moved for a while get their window reset and a fresh probe:
    /// accepts may have been lost.
    mutating func retransmitStalled() {
        for peer in progress.keys.sorted() {
            guard var pr = progress[peer] else { continue }
            if pr.match >= log.lastIndex { pr.stalledTicks = 0; progress[peer] = pr; continue }
            // A snapshot is big: give it longer before sending it again.
            var limit = max(2, config.electionTimeoutTicks / 3)
            if case .snapshot = pr.state { limit = config.electionTimeoutTicks * 2 }
            pr.stalledTicks += 1
            if pr.stalledTicks >= limit, case let .snapshot(i) = pr.state, let held = pr.sending, i == held.index,
               pr.snapshotAcked < snapshotBytes(for: peer, held) {
                // A chunk or its answer was lost: resend from what the follower last said it holds.
                sendSnapshot(to: peer, &pr, offset: pr.snapshotAcked)
                progress[peer] = pr
            } else if pr.stalledTicks >= limit {
                pr.becomeProbe()
                progress[peer] = pr
                sendAppend(to: peer)
            } else {
                progress[peer] = pr
            }
        }
    }
}
