// The replica machine's events from outside the log: scheduler windows (VMScheduler.decide is
// its pure rule book), the syncvm link and leadership changing, the failure detector's probe,
// and a checkpoint's phases, abort and end. docs/design/vmreplica.md, "Checkpoint" and "Failover".

import RDMAPaxos

extension VMReplicaMachine {
    /// What a scheduler window observed outside the machine.
    struct Observation: Equatable {
        /// This replica leads the consensus cluster and has a running VM.
        var leading: Bool
        var linkUp: Bool
        /// Age of the oldest answer held (nil: none held).
        var oldestHeldAge: Duration?
        /// The VM's QEMU used less than `idle_cpu_percent` of a core over the last window.
        var guestIdle = false
        /// The output guard's first mismatch since the last completed checkpoint.
        var outputMismatch: String? = nil
        /// Output went out by a match since the last completed checkpoint.
        var releasedByMatchSinceCheckpoint = false
    }

    // MARK: Scheduler window

    /// One scheduler window at `now`: the role rules of `VMScheduler.decide`, and the state its
    /// decision changes (the checkpoint slot and epoch, a pending `unprotected`, retry clocks).
    mutating func tick(_ o: Observation, now: Instant) -> [Action] {
        var out = observe(leading: o.leading, linkUp: o.linkUp, now: now)
        guard !stopping else { return out }
        let view = SchedulerView(
            role: role, leading: o.leading, notACopy: notACopy, protected: protected, linkUp: o.linkUp,
            linkDownFor: linkDownSince.map { now - $0 }, checkpointInFlight: checkpointSlotTaken,
            unprotectedRequested: unprotectedRequested, failedCheckpointsInARow: failedCheckpointsInARow,
            sinceLastCheckpointEnd: now - lastCheckpointEnd, lastCheckpointFailed: lastCheckpointFailed,
            leadingFor: leadingSince.map { now - $0 } ?? .zero, sinceHandOff: lastHandOff.map { now - $0 },
            sinceTakeOverProposal: lastTakeOverProposal.map { now - $0 }, oldestHeldAge: o.oldestHeldAge,
            guestIdle: o.guestIdle, outputMismatch: o.outputMismatch, releasedByMatchSinceCheckpoint: o.releasedByMatchSinceCheckpoint)
        switch VMScheduler.decide(view, rules) {
        case .nothing:
            break
        case .demote:
            out.append(.requestDemotion)
        case let .handLeadership(because):
            lastHandOff = now
            out += [.warning("vm: node \(me) hands leadership to node \(peer): \(because)"), .handLeadership(because: because)]
        case let .proposeTakeOver(because):
            lastTakeOverProposal = now
            // A checkpoint of the old primary's still in flight here cannot finish: the driver
            // must be free to apply the take-over.
            out += abortCheckpoint("this backup takes the VM over")
            out += [.notice("vm: backup \(me) leads and takes over: \(because)"), .propose(.takeOver(by: me))]
        case let .proposeUnprotected(because):
            unprotectedRequested = true
            out += [.warning("vm: primary \(me) lost its backup (\(because)); going on without it"), .propose(.unprotected(by: me))]
        case .proposeCheckpoint:
            if let epoch = claimCheckpoint() { out.append(.propose(.checkpoint(epoch: epoch, proposer: me))) }
        }
        return out
    }

    /// Records the consensus role and the link as a scheduler window saw them at `now`.
    mutating func observe(leading nowLeading: Bool, linkUp nowUp: Bool, now: Instant) -> [Action] {
        if nowLeading { leadingSince = leadingSince ?? now } else { leadingSince = nil }
        if nowUp { linkDownSince = nil } else if linkDownSince == nil { linkDownSince = now }
        leading = nowLeading
        linkUp = nowUp
        return []
    }

    /// What the checkpoint in flight saw while it waited on its syncvm link: one that can no
    /// longer finish is aborted at once (the link went down, or a primary no longer leads).
    mutating func checkpointObserved(linkUp: Bool, leading: Bool) -> [Action] {
        guard let c = checkpoint else { return [] }
        if !linkUp { return abortCheckpoint("the syncvm link to node \(peer) went down") }
        if c.side == .primary, !leading { return abortCheckpoint("this replica no longer leads") }
        return []
    }

    // MARK: Failure detection

    /// The syncvm link to the primary just went down. A backup whose VM is a copy and which
    /// follows that primary asks whether the primary's process still listens: a connection reset
    /// with nothing listening any more means the process is gone (kill -9, a crash), which is
    /// known at once, long before the election timeout would tell.
    mutating func linkWentDown(leader: NodeID?) -> [Action] {
        guard role == .backup, !stopping, leader == peer else { return [] }
        if let why = notACopy { return [.info("vm: the syncvm link to primary \(peer) went down; this VM is no copy (\(why)), so it forces no election")] }
        return [.probePeer]
    }

    /// The answer to `probePeer` at `now`: `listening` false means the primary's process is gone.
    /// Only then, and only while this backup is still fit and follows that primary, does it start
    /// a forced election (at most once per retry period): a link that dropped for any other
    /// reason (a checkpoint's abort, a primary reopening its endpoint) leaves leadership alone.
    mutating func peerProbed(listening: Bool, leader: NodeID?, now: Instant) -> [Action] {
        guard role == .backup, notACopy == nil, !stopping, leader == peer else { return [] }
        guard !listening else { return [.info("vm: node \(peer) still listens at its syncvm address: the election timeout decides whether it is gone")] }
        if let last = lastCampaign, now - last < rules.retryEvery { return [] }
        lastCampaign = now
        // A checkpoint waiting on that primary cannot finish: it rolls back now, so the driver
        // is free to apply the take-over once this replica leads.
        return abortCheckpoint("primary \(peer)'s process is gone")
            + [.campaignNow(because: "the syncvm link to primary \(peer) was reset and nothing listens at its address: its process is gone")]
    }

    // MARK: Checkpoint phases

    /// The driver's checkpoint reached `phase`. A primary that reached the handshake has paused
    /// (or is about to): from here the backup may end up holding this VM, so output waits.
    mutating func reached(_ phase: CheckpointPhase) {
        guard checkpoint != nil else { preconditionFailure("a checkpoint phase \(phase) with no checkpoint in flight") }
        checkpoint!.phase = phase
        if checkpoint!.side == .primary, phase == .handshake { protected = true }
    }

    /// Why the checkpoint in flight must stop now (nil: it may go on).
    var checkpointAbort: String? { checkpoint?.abort }

    /// Stops the checkpoint in flight for `why` (the first reason wins): the effects close the
    /// syncvm link, which fails whatever the checkpoint waits for.
    mutating func abortCheckpoint(_ why: String) -> [Action] {
        guard checkpoint != nil, checkpoint!.abort == nil else { return [] }
        checkpoint!.abort = why
        return [.abortCheckpoint(reason: why)]
    }

    /// How a checkpoint ended on the driver.
    enum CheckpointOutcome: Equatable {
        /// Primary: the device state arrived and the VM resumed. Backup: the standby left
        /// `inmigrate` with the device state and is the current VM now.
        case completed
        /// It stopped before that; `pagesMayHaveLanded`: the backup's RAM may hold pages of it
        /// (always false on the primary).
        case failed(reason: String, pagesMayHaveLanded: Bool)
        /// Backup: the primary had given this checkpoint up before the backup was ready.
        case skipped
    }

    /// The checkpoint in flight ended at `now`.
    mutating func checkpointEnded(_ outcome: CheckpointOutcome, now: Instant) -> [Action] {
        guard let c = checkpoint else { preconditionFailure("a checkpoint ended with none in flight") }
        checkpoint = nil
        if c.side == .primary {
            checkpointSlotTaken = false
            lastCheckpointEnd = now
            let ok = outcome == .completed
            lastCheckpointFailed = !ok
            failedCheckpointsInARow = ok ? 0 : failedCheckpointsInARow + 1
            if ok, let since = unprotectedSince, c.index > since { unprotectedSince = nil }
            // A checkpoint that failed after the pause collected this side's dirty pages and
            // moved the baseline: forget it, so the next sync compares every page.
            return ok || c.phase == nil ? [] : [.dropBaseline]
        }
        switch outcome {
        case .completed:
            // The end of "inconsistent" comes with the swap to the new VM, and only for the
            // reason the checkpoint started with: a reason that arrived meanwhile (a snapshot
            // restore, the old QEMU's death) may not be covered, so it stays.
            guard let why = c.startedInconsistent, inconsistent == why else { return [] }
            inconsistent = nil
            return [.notice("vm: protected: checkpoint \(c.epoch) made this VM a copy of the primary's (before it: \(why)); it may take over now")]
        case .skipped:
            return [.dropBaseline]
        case let .failed(reason, landed):
            guard landed else { return [.dropBaseline] }
            guard c.startedInconsistent == nil else {
                // The old VM was no copy to begin with and its RAM is half-written now.
                return [.dropBaseline, .abandonVM] + markInconsistent("checkpoint \(c.epoch) was cut off after pages were written (\(reason))")
            }
            // A VM that was a copy kept its way back: it is again the VM that ran every input
            // before the checkpoint, fit to take over.
            return [.dropBaseline, .rollBack(reason: reason)]
        }
    }
}
