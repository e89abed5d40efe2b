import Foundation

// The node thread: drains events, feeds the core, carries out its actions in the order
// `Actions` prescribes.
extension ReplicaNode {
    func runLoop() {
        while true {
            let (batch, stopping) = cond.withLock {
                while events.isEmpty && state == .running { cond.wait() }
                let b = events
                events = []
                return (b, state != .running)
            }
            if stopping { break }
            run(batch)
        }
        finishLoop()
    }

    /// On an event loop (`NodeOptions.eventLoop`): the events queued so far, or the end.
    func runQueued() {
        let (batch, stopping, stopped) = cond.withLock {
            let b = events
            events = []
            return (b, state == .stopping, state == .stopped)
        }
        if stopped { return }
        if stopping { finishLoop() } else if !batch.isEmpty { run(batch) }
    }

    /// One batch of events: fed to the core, then its proposals, then the answers.
    func run(_ batch: [NodeEvent]) {
        var commands: [QueuedProposal] = []
        // Ticks run after every other event of the batch (see `runTicks`).
        var dueTicks: [UInt64] = []
        heardFromLeader = false
        loopWatch.startPass(events: batch.count)
        defer { endPass() }
        for e in batch {
            if case .messagesWaiting = e { wakePending.store(false, ordering: .releasing) }
            if failure != nil {
                reject(e, NodeError.storage(failure!))
                continue
            }
            switch e {
            case let .tick(queuedAt): dueTicks.append(queuedAt)
            case let .message(m): receive(m)
            case .messagesWaiting:
                _ = polledTransport?.receiveWaiting { receive($0) }
            case let .persisted(seq): onPersisted(seq)
            case let .storageFailed(reason): failStorage(reason)
            case let .snapshotTaken(index, data, captured):
                loopWatch.compactNanos &+= LoopWatch.timed { compact(through: index, data) }
                // Queued from this thread (nice 0): a dispatch worker the encoder's call
                // started would inherit the encoder's nice 19.
                if let captured { CapturedSnapshot.releaseQueue.async { captured.release() } }
            case .snapshotSaved:
                compacting = false
            case let .propose(p): commands.append(p)
            case let .read(q, c): startRead(q, c)
            case let .localRead(q, c):
                let answer = machine.query(q)
                completions.append { c.resume(returning: answer) }
            case let .changeMembership(change, c): changeMembership(change, c)
            case let .handOver(c): startHandOver(c)
            case let .backup(c): takeBackup(c)
            case let .transferLeadership(target, c):
                do {
                    perform(try replica.transferLeadership(to: target))
                    completions.append { c.resume(returning: ()) }
                } catch {
                    let e: NodeError = if case let .notLeader(l) = error { .notLeader(leader: l) } else { .refused(error) }
                    completions.append { c.resume(throwing: e) }
                }
            }
        }
        if !dueTicks.isEmpty && failure == nil { runTicks(queuedAt: dueTicks) }
        if !parked.isEmpty {
            commands = parked + commands
            parked = []
        }
        if failure == nil { proposeBatch(commands) } else { commands.forEach { $0.continuation.resume(throwing: NodeError.storage(failure!)) } }
        publishAndAnswer()
        freeReleasedEntries()
    }

    /// Entries of compacted prefixes freed per loop pass: a few hundred microseconds of `free`,
    /// and a loop passes often enough, under load and at every tick, to keep well ahead of the
    /// entries the log takes in.
    static let releasedEntriesPerPass = 4096

    /// Frees up to `releasedEntriesPerPass` entries of the compacted prefixes, oldest prefix first, after
    /// the pass's answers left. On this thread, not another: the loop allocated these entries,
    /// and the allocator's arena is locked by every `free` of them; a thread freeing hundreds of
    /// thousands of them held that lock again and again, and whenever it lost its core while
    /// holding it the loop waited in `malloc` — up to 145 ms under load (docs/design/runtime.md,
    /// "Memory freed where the loop can wait for it").
    func freeReleasedEntries() {
        var budget = Self.releasedEntriesPerPass
        while budget > 0, let first = releasing.first {
            let held = first.count
            let left = first.free(atMost: budget)
            budget -= held - left
            if left == 0 { releasing.removeFirst() }
        }
    }

    /// Publishes the status, then runs the answers the pass completed: publish before answering,
    /// so a client that got its answer sees a status that includes it.
    func publishAndAnswer() {
        publishStatus()
        let answers = completions
        completions = []
        passFlushes.collect { answers.forEach { $0() } }
    }

    /// Fails what is pending, closes the log and marks the node stopped.
    func finishLoop() {
        failEverything(NodeError.stopped)
        releasing.forEach { $0.free() }
        releasing = []
        // The node owns its log from start to stop; a close error leaves nothing to do here
        // (the next open recovers).
        try? log.close()
        cond.withLock {
            for e in events { reject(e, NodeError.stopped) }
            events = []
            state = .stopped
            cond.broadcast()
        }
    }

    func reject(_ e: NodeEvent, _ error: NodeError) {
        switch e {
        case let .propose(p): p.continuation.resume(throwing: error)
        case let .read(_, c), let .localRead(_, c): c.resume(throwing: error)
        case let .transferLeadership(_, c): c.resume(throwing: error)
        case let .changeMembership(_, c): c.resume(throwing: error)
        case let .handOver(c): c.resume(returning: nil)
        case let .backup(c): c.resume(throwing: error)
        default: break
        }
    }

    /// Steps the core with one peer message, noting whether it came from the leader.
    func receive(_ m: Message) {
        if m.from == replica.leader {
            heardFromLeader = true
            loopWatch.leaderHeardAt = LoopWatch.now()
        }
        perform(replica.receive(m))
    }

    /// Runs the ticks a batch held, after its other events. When the node thread falls behind
    /// (starved of CPU on a loaded machine), ticks queue up while peers' messages and the log's
    /// completions wait beside them. Stepping them first, in queue order, would age every timer
    /// by the whole delay before the evidence that the leader, the followers and the disk were
    /// alive during it is seen. So:
    /// - Messages that landed meanwhile are read first, then time moves on.
    /// - With a clock of real time (`TickSource.dropsLateTicks`), late ticks count as one on a
    ///   leader: starved, it sent no heartbeats, so no follower had anything to answer, and the
    ///   whole delay would make check-quorum step it down for its own stall (and the disk-stall
    ///   rule blame the disk). On a follower they count as one when the batch brought a message
    ///   from the leader (the ticks are older than that message); otherwise only those queued
    ///   after the leader's last message was handled count (a message that landed before a stall
    ///   of this thread may be handled at its end, in the pass before these ticks), so a dead
    ///   leader is still detected on time by a busy follower.
    /// Safety never depends on timing (docs/design/runtime.md, "Ticks on a starved node").
    func runTicks(queuedAt: [UInt64]) {
        if queuedAt.count > 1 {
            _ = polledTransport?.receiveWaiting { receive($0) }
            noteLateTicks(count: queuedAt.count, oldest: queuedAt[0])
        }
        var count = queuedAt.count
        if ticks.dropsLateTicks && count > 1 {
            count = replica.role == .leader || heardFromLeader ? 1 : max(1, queuedAt.count(where: { $0 > loopWatch.leaderHeardAt }))
        }
        for _ in 0..<count where failure == nil { onTick() }
    }

    func onTick() {
        tickCount += 1
        if !persistBacklog.isEmpty { drainPersistBacklog() }
        if let l = replica.leader, l != options.replica.id, transport.isLinkDown(to: l) {
            // The leader's process is gone (its sockets closed): campaign within a few ticks,
            // not a whole election timeout (docs/design/runtime.md, "A leader whose connection broke").
            perform(replica.leaderUnreachable(l))
        }
        perform(replica.tick())
        tickMembership()
        for (i, p) in proposals where p.deadline <= tickCount {
            proposals[i] = nil
            p.continuation.resume(throwing: NodeError.timedOut)
        }
        for (i, ps) in displaced where ps.contains(where: { $0.deadline <= tickCount }) {
            let waiting = ps.filter { $0.deadline > tickCount }
            displaced[i] = waiting.isEmpty ? nil : waiting
            for p in ps where p.deadline <= tickCount { p.continuation.resume(throwing: NodeError.timedOut) }
        }
        for (id, r) in reads where r.deadline <= tickCount {
            reads[id] = nil
            r.continuation.resume(throwing: NodeError.timedOut)
        }
        if tickCount % max(1, options.metricsSampleEveryTicks) == 0 { ringMetrics?.sample() }
    }

    func proposeBatch(_ commands: [QueuedProposal]) {
        var rest = commands[...]
        while !rest.isEmpty {
            let chunk = rest.prefix(options.proposalsPerBatchMax)
            rest = rest.dropFirst(chunk.count)
            do {
                let (first, actions) = try replica.propose(chunk.map(\.command))
                for (i, c) in chunk.enumerated() {
                    let pending = PendingProposal(
                        ballot: replica.promised, deadline: tickCount + options.requestTimeoutTicks,
                        continuation: c.continuation, queuedAt: c.queuedAt)
                    // A proposal of an earlier term still waiting at this index is not answered
                    // yet, nor dropped: its entry may still commit elsewhere (see `displaced`).
                    if let earlier = proposals.updateValue(pending, forKey: first + LogIndex(i)) {
                        displaced[first + LogIndex(i), default: []].append(earlier)
                    }
                }
                metrics.proposalsPerBatch.record(chunk.count)
                perform(actions)
            } catch {
                if case .leadershipTransferInProgress = error {
                    // Not refused: held until the transfer ends, then proposed here (it timed
                    // out) or answered "not the leader" with the new one, whom clients follow.
                    parked.append(contentsOf: chunk)
                    parked.append(contentsOf: rest)
                    return
                }
                let e: NodeError = if case let .notLeader(l) = error { .notLeader(leader: l) } else { .refused(error) }
                chunk.forEach { $0.continuation.resume(throwing: e) }
            }
        }
    }

    func startRead(_ query: [UInt8], _ c: ProposalReply) {
        let id = nextReadID
        nextReadID += 1
        do {
            let a = try replica.read(id: id)
            reads[id] = PendingRead(query: query, deadline: tickCount + options.requestTimeoutTicks, continuation: c)
            perform(a)
        } catch {
            if case let .notLeader(l) = error { c.resume(throwing: NodeError.notLeader(leader: l)) } else { c.resume(throwing: NodeError.refused(error)) }
        }
    }

    /// Carries out one call's actions: persist, send, (acks after persist), restore, apply, reads.
    func perform(_ a: Actions) {
        // A compacted prefix is freed a slice per pass (`freeReleasedEntries`), not in one go:
        // tens of ms for hundreds of thousands of entries.
        releasing.append(contentsOf: a.released)
        for e in a.events {
            options.onEvent?(e)
            fenceDeposedLeader(after: e)
            switch e {
            case let .readRefused(id, _):
                if let r = reads.removeValue(forKey: id) {
                    r.continuation.resume(throwing: NodeError.notLeader(leader: replica.leader))
                }
            case .becameLeader: metrics.electionsWon.increment()
            case let .startedElection(_, pre):
                (pre ? metrics.preElectionsStarted : metrics.electionsStarted).increment()
                options.onWarning?(loopWatch.campaignNote())
            case .recoveryStalled, .witnessCompactionHeldBack: options.onWarning?("\(e)")
            case let .membershipChanged(m): followConfiguration(m)
            case let .removedFromCluster(leader, index): leaveCluster(leader: leader, index: index)
            default: break
            }
        }
        if let p = a.persist {
            acksAwaitingPersist.append((p.sequence, a.sendAfterPersist))
            options.onHeldAcks?(a.sendAfterPersist, true)
            startPersist(p)
        }
        for m in a.send { transport.send(m) }
        if let s = a.restore {
            do {
                try machine.restore(s.data, index: s.index)
            } catch {
                failStorage("snapshot \(s.index) from the leader does not restore: \(error)")
                return
            }
            for (i, p) in proposals where i <= s.index {
                proposals[i] = nil
                p.continuation.resume(throwing: NodeError.outcomeUnknown)
            }
            for (i, ps) in displaced where i <= s.index {
                displaced[i] = nil
                ps.forEach { $0.continuation.resume(throwing: NodeError.outcomeUnknown) }
            }
        }
        if !a.apply.isEmpty {
            metrics.entriesApplied.increment(by: a.apply.count)
            loopWatch.applyNanos &+= LoopWatch.timed { for e in a.apply { applyEntry(e) } }
            loopWatch.applied += a.apply.count
        }
        for r in a.reads {
            reads[r.id]?.index = r.index
        }
        if !a.reads.isEmpty { options.onReadsReady?(a.reads) }
        answerReads()
        maybeCompact()
    }

    /// When this replica learns of a newer leader, the previous one is deposed: fence it.
    func fenceDeposedLeader(after e: Event) {
        switch e {
        case let .becameFollower(_, leader: l?):
            if let old = knownLeader, old != l, old != options.replica.id { transport.fence(old) }
            knownLeader = l
        case .becameLeader:
            if let old = knownLeader, old != options.replica.id { transport.fence(old) }
            knownLeader = options.replica.id
        default:
            break
        }
    }

    func applyEntry(_ e: LogEntry) {
        let result = e.kind == .command ? machine.apply(e.payload, index: e.index) : []
        if let p = proposals.removeValue(forKey: e.index) { answerProposal(p, applied: e, result: result) }
        if let ps = displaced.removeValue(forKey: e.index) {
            for p in ps { answerProposal(p, applied: e, result: result) }
        }
    }

    /// Answers a proposal made at `e.index`: `e` is its entry (the same ballot) or took its place.
    func answerProposal(_ p: PendingProposal, applied e: LogEntry, result: [UInt8]) {
        let committed = p.ballot == e.ballot
        let latency = metrics.commitLatency
        completions.append {
            if committed {
                latency.recordNanoseconds(Int64(DispatchTime.now().uptimeNanoseconds &- p.queuedAt))
                p.continuation.resume(returning: result)
            } else {
                p.continuation.resume(throwing: NodeError.superseded)
            }
        }
    }

    func answerReads() {
        for (id, r) in reads {
            if let index = r.index, index <= replica.appliedIndex {
                reads[id] = nil
                let answer = machine.query(r.query)
                completions.append { r.continuation.resume(returning: answer) }
            }
        }
    }

    /// Bytes at which the node compacts: `compactEveryBytes`, else half the log's capacity.
    var compactAtBytes: Int? { options.compactEveryBytes ?? log.capacityBytes.map { $0 / 2 } }

    /// What counts against the byte trigger: the log, and the snapshot when the log lives in
    /// memory (memory mode keeps both in RAM in place of a disk).
    var heldBytes: Int { log.heldBytes + (log.capacityBytes == nil ? 0 : snapshotBytes) }

    func maybeCompact() {
        // A witness compacts only what every voter holds durably (`compactableIndex`): after
        // losing a voter it may be the only holder of committed entries the surviving voter
        // lacks, and it hands them over in its promise (docs/design/consensus.md, "Witness
        // hand-over"). Its snapshots carry no state.
        guard failure == nil else { return }
        let through = replica.compactableIndex
        guard through >= replica.firstIndex else { return }
        let appliedHeld = Int(through - replica.firstIndex) + 1
        // By entries, on disk only once the log is at least as big as the last snapshot: a
        // compaction writes the whole state, so with a large state and small entries a fixed
        // entry count would spend most of the disk on rewriting the state.
        let byEntries = appliedHeld >= options.compactEveryEntries
            && (log.capacityBytes != nil || log.heldBytes >= snapshotBytes)
        // By bytes only once the applied prefix is a quarter of the entries or more: entries
        // not yet applied must not make the node snapshot after every entry it applies.
        let byBytes = appliedHeld * 4 >= Int(replica.lastIndex - replica.firstIndex) + 1
            && (compactAtBytes.map { heldBytes >= $0 } ?? false)
        guard byEntries || byBytes, !compacting else { return }
        guard !replica.isWitness, let capturing = machine as? SnapshotCapturing else {
            compact(through: through, replica.isWitness ? [] : machine.snapshot())
            return
        }
        // Point in time here, serialized elsewhere: the node goes on applying and answering
        // (heartbeats, check-quorum) while a large state is encoded.
        compacting = true
        let captured = CapturedSnapshot(capturing.captureSnapshot())
        // On a thread of its own at the lowest CPU priority: encoding a large state takes
        // seconds of CPU, and every replica compacts at about the same index, so on a loaded
        // host the encodings would take the cores from the replicas' loops all at once. The
        // capture is let go of at normal priority (`CapturedSnapshot`), queued by the loop.
        let encoder = Thread(named: "snapshot-encode") { [weak self] in
            lowestCPUPriorityForThisThread()
            let data = captured.encode()
            self?.enqueue(.snapshotTaken(through, data, captured))
        }
        encoder.start()
    }

    func compact(through applied: LogIndex, _ data: [UInt8]) {
        // Only what was applied (a witness: what every voter holds). The node's own
        // compactions always are; this refuses a bad `compact(through:snapshot:)`.
        guard applied <= replica.compactableIndex else { return }
        // Compaction trades log for snapshot; a snapshot that alone reaches the trigger leaves
        // nothing to trade, and the log would fill up next.
        if let trigger = compactAtBytes, let cap = log.capacityBytes, data.count >= trigger {
            compacting = false
            failStorage("the state machine's snapshot is \(data.count) bytes, at least the \(trigger) at which this memory-mode replica compacts (half of memory_log_bytes_max = \(cap)): it cannot fit beside the log; raise memory_log_bytes_max to more than twice the state's size, or use durability = \"async\"")
            return
        }
        let before = compactionsSaving
        perform(replica.compact(through: applied, snapshot: data))
        // Nothing to save (a newer snapshot came from the leader meanwhile): done.
        if compactionsSaving == before { compacting = false }
    }

    // MARK: Persistence

    /// Starts one persist unit, or holds it (and every unit after it, to keep their order) while
    /// the log's disk has no room: failing the write would stop the replica for good, and a
    /// Berkeley DB region page first touched on a full disk would kill it. Held units leave the
    /// core's persist outstanding, so it stops leading and acknowledging (disk stall) while the
    /// node thread goes on answering status, metrics and local reads; `drainPersistBacklog`
    /// carries them out once space is back.
    func startPersist(_ p: Persist) {
        if !persistBacklog.isEmpty || lacksSpace(for: p) {
            persistBacklog.append(p)
            return
        }
        carryOut(p)
    }

    func drainPersistBacklog() {
        while let p = persistBacklog.first, !lacksSpace(for: p) {
            persistBacklog.removeFirst()
            carryOut(p)
        }
    }

    func lacksSpace(for p: Persist) -> Bool {
        let bytes = p.entries.reduce(0) { $0 + $1.payload.count + LogRecord.headerBytes } + (p.snapshot?.data.count ?? 0)
        guard let shortfall = log.spaceShortfall(forBytes: bytes) else {
            if storageWarning != nil {
                storageWarning = nil
                options.onWarning?("the log's disk has room again: writing the \(persistBacklog.count) held persist units")
            }
            return false
        }
        if storageWarning == nil { options.onWarning?(shortfall) }
        storageWarning = shortfall
        return true
    }

    func carryOut(_ p: Persist) {
        let seq = p.sequence
        // A compaction of this replica's own applied prefix (every entry at or below it already
        // handed to the log, no truncation) is saved off the node thread: writing a large state
        // with fsync here would stall heartbeats long enough to lose leadership. The log's writer
        // orders the compaction after every append before it, so the store stays contiguous.
        if let s = p.snapshot, p.truncateFrom == nil, p.entries.isEmpty, s.index <= appendedThrough {
            do {
                if let h = p.hardState { try log.saveHardState(h) }
            } catch {
                failStorage("\(error)")
                return
            }
            compactionsSaving += 1
            snapshotBytes = s.data.count
            snapshotQueue.async { [weak self, snapshots, log] in
                do {
                    try snapshots.save(s)
                    try log.compactPrefix(through: s.index, ballot: s.ballot)
                } catch {
                    self?.enqueue(.storageFailed("saving snapshot \(s.index): \(error)"))
                }
                self?.enqueue(.snapshotSaved)
            }
            // Done for the core at once: nothing after it waits for the snapshot (the log keeps
            // the entries until the compaction is recorded, so a crash meanwhile loses nothing).
            // Left in flight, a save of hundreds of MB held back every later persist's acks and,
            // after `disk_stall_ticks`, looked like a stalled disk: the leader stepped down.
            enqueue(.persisted(seq))
            return
        }
        // A unit that truncates or installs a snapshot saves its hard state in place, after them.
        let savesHardStateInPlace = p.truncateFrom != nil || p.snapshot != nil
        do {
            if let t = p.truncateFrom {
                try log.truncateSuffix(from: t)
                appendedThrough = min(appendedThrough, t - 1)
                dropAcks(before: seq, vouchingFrom: t)
            }
            if let s = p.snapshot {
                // On the snapshot queue, after any compaction still being saved there: two saves
                // at once would race on the store's file (a follower that compacts its own prefix
                // while the leader's snapshot arrives: `snapshot.bin.tmp` renamed away under it).
                try snapshotQueue.sync { [snapshots, log] in
                    try snapshots.save(s)
                    try log.compactPrefix(through: s.index, ballot: s.ballot)
                }
                snapshotBytes = s.data.count
                appendedThrough = max(appendedThrough, s.index)
            }
            if let h = p.hardState, savesHardStateInPlace { try log.saveHardState(h) }
        } catch {
            failStorage("\(error)")
            return
        }
        // A hard state alone or with entries is queued in front of them, not waited for: a
        // stalled disk must not stall the node's loop (it goes on answering status and stepping
        // down), and nothing in `send` depends on it (`Actions`).
        let queuedHardState = p.hardState != nil && !savesHardStateInPlace
        if queuedHardState, let h = p.hardState {
            let last = p.entries.isEmpty
            log.saveHardState(h) { [weak self] result in
                switch result {
                case .success: if last { self?.enqueue(.persisted(seq)) }
                case let .failure(e): self?.enqueue(.storageFailed(e.description))
                }
            }
        }
        if let last = p.entries.last { appendedThrough = last.index }
        if p.entries.isEmpty {
            // Through the queue, not directly: the core's actions must be carried out in call order.
            if !queuedHardState { enqueue(.persisted(seq)) }
        } else if let done = log.appendInline(p.entries) {
            // A log with nothing to sync (memory mode) appends here: no writer thread to wake
            // and no completion to wait for on the path of a commit.
            switch done {
            case .success: enqueue(.persisted(seq))
            case let .failure(e): enqueue(.storageFailed(e.description))
            }
        } else {
            log.append(p.entries) { [weak self] result in
                switch result {
                case .success: self?.enqueue(.persisted(seq))
                case let .failure(e): self?.enqueue(.storageFailed(e.description))
                }
            }
        }
    }

    /// Acknowledgements still waiting on units before `seq` that vouch for an entry at `index`
    /// or later, which a truncation just removed from the log: they never leave. The entries
    /// they vouch for will never be durable here, and a leader of the older ballot would count
    /// them (found by the simulator: the truncation completed the earlier append, whose
    /// completion then released its acknowledgement after the entry was gone).
    func dropAcks(before seq: UInt64, vouchingFrom index: LogIndex) {
        var dropped: [Message] = []
        for i in acksAwaitingPersist.indices where acksAwaitingPersist[i].sequence < seq {
            acksAwaitingPersist[i].messages.removeAll { m in
                let stale = switch m.body {
                case let .accepted(true, at), let .recovering(_, at): at >= index
                default: false
                }
                if stale { dropped.append(m) }
                return stale
            }
        }
        if !dropped.isEmpty { options.onHeldAcks?(dropped, false) }
    }

    /// Persist units may finish out of order (entries complete on the log's thread); acks are
    /// released, and the core told, only up to the highest sequence with everything before it done.
    func onPersisted(_ seq: UInt64) {
        persistsDone.insert(seq)
        var through = releasedThrough
        while persistsDone.remove(through + 1) != nil { through += 1 }
        guard through > releasedThrough else { return }
        releasedThrough = through
        while let first = acksAwaitingPersist.first, first.sequence <= through {
            acksAwaitingPersist.removeFirst()
            for m in first.messages { transport.send(m) }
        }
        perform(replica.persisted(through))
    }

    func failStorage(_ reason: String) {
        guard failure == nil else { return }
        failure = reason
        metrics.storageFailures.increment()
        options.onEvent?(.steppedDown(reason: "storage failed: \(reason)"))
        failEverything(NodeError.storage(reason))
    }

    func failEverything(_ error: NodeError) {
        completions.forEach { $0() }
        completions = []
        for p in proposals.values { p.continuation.resume(throwing: error) }
        for p in parked { p.continuation.resume(throwing: error) }
        parked = []
        for p in displaced.values.joined() { p.continuation.resume(throwing: error) }
        for r in reads.values { r.continuation.resume(throwing: error) }
        proposals = [:]
        displaced = [:]
        reads = [:]
        failMembershipWork(error)
    }

    func publishStatus() {
        let r = replica!
        let s = NodeStatus(
            id: r.id, role: failure == nil ? r.role : .follower, isWitness: r.isWitness, ballot: r.promised, leader: r.leader,
            firstIndex: r.firstIndex, lastIndex: r.lastIndex, durableIndex: r.durableIndex,
            commitIndex: r.commitIndex, appliedIndex: r.appliedIndex, membership: r.membership,
            followerMatch: r.followerMatch, failure: failure, storageWarning: storageWarning, recovery: r.recoveryStatus,
            removed: membershipWork.removed)
        cond.withLock { published = s }
        updateMetrics(s)
    }

    /// Gauges from the published status: a few atomic stores per batch of events.
    func updateMetrics(_ s: NodeStatus) {
        if s.role != metricsRole {
            metricsRole = s.role
            metrics.setRole(s.role)
        }
        if let l = s.leader, l != metricsLeader {
            metricsLeader = l
            metrics.leaderChanges.increment()
        }
        metrics.commitIndex.record(s.commitIndex)
        metrics.appliedIndex.record(s.appliedIndex)
        metrics.lastIndex.record(s.lastIndex)
        metrics.durableIndex.record(s.durableIndex)
        metrics.pendingProposals.record(proposals.count + displaced.values.reduce(0) { $0 + $1.count })
        metrics.pendingReads.record(reads.count)
        watchLogBytes()
    }

    /// Log and snapshot gauges; for a log with a capacity, one warning per crossing of 75 % of it
    /// (compaction is not keeping the log down) and of 75 % of the compaction trigger by the
    /// snapshot alone (the replica stops when the snapshot reaches the trigger).
    func watchLogBytes() {
        let logBytes = log.heldBytes
        metrics.logBytes.record(logBytes)
        metrics.snapshotBytes.record(snapshotBytes)
        guard let cap = log.capacityBytes else { return }
        let held = logBytes + snapshotBytes
        if held >= cap / 4 * 3, !warnedLogFull {
            warnedLogFull = true
            options.onWarning?("the in-memory log and snapshot take \(held) of \(cap) bytes (memory_log_bytes_max): compaction is not keeping up (entries not yet applied, or a witness whose compaction an absent voter holds back); the replica stops when the log is full")
        } else if held < cap / 2 {
            warnedLogFull = false
        }
        guard let trigger = compactAtBytes else { return }
        if snapshotBytes >= trigger / 4 * 3, !warnedSnapshotLarge {
            warnedSnapshotLarge = true
            options.onWarning?("the state machine's snapshot is \(snapshotBytes) bytes, 75 % of the \(trigger) at which this memory-mode replica compacts: the replica stops when it reaches it; raise memory_log_bytes_max")
        } else if snapshotBytes < trigger / 2 {
            warnedSnapshotLarge = false
        }
    }
}
