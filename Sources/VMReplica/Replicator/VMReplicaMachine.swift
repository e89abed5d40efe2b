// The role and checkpoint state of one VM replica as a value: one mutating method per event
// (a committed log entry, a scheduler window, the link or leadership changing, a checkpoint
// phase reached or ended, a probe's answer), each returning the actions the effects around it
// (VMReplicator and its extensions: QEMU, the input driver, the syncvm link, the consensus node)
// carry out. Time is an input (`now`); nothing here does I/O. docs/design/vmreplica.md, "Roles"
// and "Checkpoint"; the tests drive it without QEMU (VMReplicaMachineTests).

import RDMAPaxos

/// What a VM replica is and what it has in flight. Its fields are read by the effects and
/// changed only by its own methods (this file and VMReplicaMachine+Events.swift).
struct VMReplicaMachine {
    typealias Instant = ContinuousClock.Instant

    /// This replica and the other VM replica.
    let me: NodeID
    let peer: NodeID
    let rules: SchedulerRules

    /// Primary (owns the VM clients see) or backup.
    var role: VMReplicator.Role
    /// Why this VM is not a copy of the replicated one (nil: it is).
    var inconsistent: String?
    /// Why this VM can never take over (a standby that cannot start, an endpoint that cannot open).
    var unusable: String?
    /// Primary: output waits for checkpoints (a backup holds a copy of the VM).
    var protected = true
    /// Primary: the log index from which it went on without a backup, until a checkpoint after it
    /// completes (a take-over by the backup before that is void on both sides).
    var unprotectedSince: LogIndex?
    /// Primary: `unprotected(by: me)` was proposed and is not applied yet.
    var unprotectedRequested = false
    /// Primary: a checkpoint of its own was proposed and has not ended (one at a time).
    var checkpointSlotTaken = false
    /// The next epoch this replica proposes: above every epoch of its own in the log.
    var nextEpoch: UInt64 = 1
    var lastCheckpointEnd: Instant
    var lastCheckpointFailed = false
    var failedCheckpointsInARow = 0
    /// The checkpoint the driver is running now, on either side.
    var checkpoint: Checkpoint?
    /// Entries up to this index were in the log before this process started: replays its new VM
    /// must not run (nil until the replica started).
    var historyThrough: LogIndex?
    var stopping = false
    /// What the scheduler saw last: the consensus role and the syncvm link.
    var leading = false
    var linkUp = false
    var leadingSince: Instant?
    var linkDownSince: Instant?
    var lastHandOff: Instant?
    var lastTakeOverProposal: Instant?
    /// Backup: when it last asked for an election because its primary's process was gone.
    var lastCampaign: Instant?

    /// One checkpoint in progress on the driver thread.
    struct Checkpoint: Equatable {
        var epoch: UInt64
        var index: LogIndex
        var side: VMReplicator.Role
        /// The last phase reached (nil: before the handshake).
        var phase: CheckpointPhase?
        /// Why it must stop now (the first reason wins).
        var abort: String?
        /// Backup: why its VM was no copy when the checkpoint began (nil: a copy, with a way back).
        var startedInconsistent: String?
    }

    /// What the effects do, in order.
    enum Action: Equatable {
        /// Driver: write this frame into the current VM's NIC.
        case writeInput(frame: [UInt8])
        /// Driver, primary: its own `connectionOffset` entry is applied; release what waited for it.
        case offsetApplied(generation: UInt64, ticket: UInt64)
        /// Driver, backup: rewrite a connection of its VM (if that VM is still the entry's generation).
        case learnOffset(LearntOffset)
        /// Driver: run checkpoint `epoch` (log position `index`) as `side`.
        case runCheckpoint(epoch: UInt64, index: LogIndex, side: VMReplicator.Role)
        /// Driver: this backup owns the VM now (drop the standby, open a primary's syncvm endpoint).
        case becomePrimary(index: LogIndex)
        /// Driver: this primary is a backup now (drop held output, map RAM writable, a backup's
        /// endpoint and a standby QEMU).
        case becomeBackup(because: String)
        /// Release every answer held (the primary went on without a backup).
        case releaseHeld
        /// Close the syncvm link now: every wait of the checkpoint fails at once.
        case abortCheckpoint(reason: String)
        /// Backup, cut off after pages may have landed on a VM that was a copy: fence the primary,
        /// put the saved pages back and resume the old VM.
        case rollBack(reason: String)
        /// Backup, cut off after pages landed on a VM that was no copy: leave it stopped; the
        /// next checkpoint (every page compared) replaces it.
        case abandonVM
        /// Forget the hash-diff baseline: the next sync compares every page.
        case dropBaseline
        /// Propose this entry to the log.
        case propose(VMLogEntry)
        /// Ask the consensus cluster to move leadership to the other VM replica.
        case handLeadership(because: String)
        /// Backup: find out whether the primary's process still listens (its link just dropped).
        case probePeer
        /// Backup: start a forced election now (the primary's process is gone).
        case campaignNow(because: String)
        /// Scheduler: ask the driver to turn this primary, whose VM is no copy, into a backup.
        case requestDemotion
        /// The clients' attachment (a tap): this replica's VM is the one clients reach from here
        /// on, so frames read from its tap are proposed as inputs; with `announce`, tell the
        /// segment where the guest is now (a gratuitous ARP for its MAC and IP).
        case takeAttachment(announce: Bool)
        /// The clients' attachment: frames read from this replica's tap are no longer its to
        /// propose (the other replica's tap sees the same flood); they are discarded.
        case leaveAttachment
        case info(String)
        case notice(String)
        case warning(String)
        case error(String)
    }

    /// A replica starting as `role`; a backup's VM boots on its own, so it is no copy yet.
    init(role: VMReplicator.Role, me: NodeID, peer: NodeID, rules: SchedulerRules, now: Instant) {
        self.me = me
        self.peer = peer
        self.rules = rules
        self.role = role
        self.lastCheckpointEnd = now
        if role == .backup { inconsistent = "no checkpoint has copied the primary's VM into it yet" }
    }

    // MARK: Start and stop

    /// The replica opened its log, which held `recoveredThrough` entries: above 0 the process
    /// restarted, its VM is new (no copy), the entries up to there are replays it skips, and a
    /// primary comes back as the backup of whoever holds the VM now.
    mutating func started(recoveredThrough: LogIndex) -> [Action] {
        historyThrough = recoveredThrough
        // A fresh primary owns the VM clients see from its first input on.
        guard recoveredThrough > 0 else { return role == .primary ? [.takeAttachment(announce: true)] : [] }
        var out = markInconsistent("this replica restarted: its log holds \(recoveredThrough) entries its new VM never ran")
        if role == .primary {
            role = .backup
            out.append(.notice("vm: primary \(me) restarted; it joins as the backup of node \(peer) and is re-protected by its checkpoints"))
        }
        return out
    }

    /// The replica is stopping: a checkpoint in flight gives up.
    mutating func stop() -> [Action] {
        stopping = true
        return abortCheckpoint("this replica is stopping") + [.leaveAttachment]
    }

    // MARK: Being a copy

    /// The VM stopped being a copy of the replicated one (its QEMU exited, the log was restored
    /// from a snapshot, a checkpoint was cut off after writing its RAM). The first reason stays.
    mutating func markInconsistent(_ why: String) -> [Action] {
        guard !stopping else { return [] }
        if let already = inconsistent {
            return [.warning("vm: \(why); this VM was already no copy of the replicated VM (\(already))")]
        }
        inconsistent = why
        let next = role == .backup ? "the next complete checkpoint re-protects it" : "it hands leadership to the other VM replica"
        return [.warning("vm: this replica's VM is not a copy of the replicated VM and answers no client: \(why); \(next)")]
    }

    /// The VM can never take over again.
    mutating func markUnusable(_ why: String) -> [Action] {
        if unusable == nil { unusable = why }
        return [.error("vm: this replica's VM can no longer take over: \(why)")]
    }

    /// Why the VM is not the replicated one, if it is not.
    var notACopy: String? { unusable ?? inconsistent }

    /// Whether this replica's output may reach clients when it leads (a primary whose VM is a copy).
    var answersClients: Bool { role == .primary && notACopy == nil }

    // MARK: Committed entries

    /// The driver applies `entry` at `index`, in log order. `superseded`: a later checkpoint by
    /// the same proposer is already in the same batch (this replica is catching up on its log).
    mutating func apply(_ entry: VMLogEntry, at index: LogIndex, superseded: Bool = false) -> [Action] {
        if case let .checkpoint(epoch, proposer, _) = entry, proposer == me { nextEpoch = max(nextEpoch, epoch + 1) }
        if index <= (historyThrough ?? 0) { return [] }
        switch entry {
        case let .input(frame):
            // A VM that is no copy yet gets no inputs: the checkpoint that re-protects it overwrites it.
            return inconsistent == nil ? [.writeInput(frame: frame)] : []
        case let .checkpoint(epoch, proposer, _) where superseded:
            if proposer == me { checkpointSlotTaken = false }
            return [.info("vm: skipping checkpoint \(epoch) at \(index): node \(proposer) already asked for a later one")]
        case let .checkpoint(epoch, proposer, _):
            if role == .primary && proposer == me {
                checkpoint = Checkpoint(epoch: epoch, index: index, side: .primary)
                return [.runCheckpoint(epoch: epoch, index: index, side: .primary)]
            }
            if proposer == me { checkpointSlotTaken = false }
            guard role == .backup, proposer == peer else { return [] }
            checkpoint = Checkpoint(epoch: epoch, index: index, side: .backup, startedInconsistent: inconsistent)
            return [.runCheckpoint(epoch: epoch, index: index, side: .backup)]
        case let .takeOver(node) where node == me:
            return becomePrimary(at: index)
        case let .takeOver(node):
            guard node == peer else { return [] }
            if role == .primary, let since = unprotectedSince {
                // The backup was not re-protected after this primary went on without it (and
                // released output): its VM cannot hold this one. It refuses the take-over too.
                return [.warning("vm: the take-over by node \(node) at log index \(index) is void: its VM was not re-protected since this primary went on without a backup at \(since); node \(me) keeps the VM")]
            }
            return becomeBackup(because: "node \(node) took the VM over at log index \(index)")
        case let .unprotected(node) where node == me:
            unprotectedRequested = false
            guard role == .primary, !stopping else { return [] }
            protected = false
            unprotectedSince = index
            return [.releaseHeld, .warning("vm: primary \(me) goes on without a backup from log index \(index); node \(peer) must be re-protected before it may take over")]
        case let .unprotected(node):
            guard node == peer, role == .backup else { return [] }
            return markInconsistent("primary \(node) went on without a backup at log index \(index)")
        case let .connectionOffset(e):
            // Only the primary that learnt it releases by it, and only while it still is the
            // primary at this log position; only its backup rewrites by it. After a take-over
            // either side ignores the old primary's entries (nothing waiting for them was released).
            if role == .primary, e.proposer == me { return [.offsetApplied(generation: e.generation, ticket: e.ticket)] }
            if role == .backup, e.proposer == peer, inconsistent == nil { return [.learnOffset(e)] }
            return []
        }
    }

    /// `takeOver(by: me)`: a backup whose VM ran every input before the entry owns the VM now.
    private mutating func becomePrimary(at index: LogIndex) -> [Action] {
        guard role == .backup, notACopy == nil, !stopping else {
            guard let why = notACopy else { return [] }
            return [.error("vm: the take-over at log index \(index) found this VM unfit (\(why)); no replica holds the VM now")]
        }
        role = .primary
        // It answers without a backup from here: the old primary's VM is no copy until a
        // checkpoint re-protects it, and a take-over by it before that is void.
        protected = false
        checkpointSlotTaken = false
        unprotectedSince = index
        failedCheckpointsInARow = 0
        linkDownSince = nil
        // Clients first: their frames are taken in, and the guest announced on this replica's
        // port, before the slower part of becoming the primary (a new syncvm endpoint).
        return [.takeAttachment(announce: true), .becomePrimary(index: index),
                .notice("vm: node \(me) is the primary now (take-over at log index \(index)): its VM is the one clients see; output goes out unprotected until a backup is re-protected")]
    }

    /// A primary stops owning the VM (the other's take-over committed, or its own VM is no copy).
    private mutating func becomeBackup(because why: String) -> [Action] {
        guard role == .primary, !stopping else { return [] }
        role = .backup
        protected = true
        checkpointSlotTaken = false
        unprotectedSince = nil
        unprotectedRequested = false
        failedCheckpointsInARow = 0
        return [.leaveAttachment] + markInconsistent(why) + [.becomeBackup(because: why)]
    }

    /// Driver: the scheduler asked an inconsistent primary to step aside.
    mutating func demote() -> [Action] {
        guard let why = inconsistent else { return [] }
        return becomeBackup(because: why)
    }

    // MARK: Proposals

    /// A proposal the scheduler asked for did not commit.
    mutating func proposalFailed(_ entry: VMLogEntry) -> [Action] {
        switch entry {
        case let .checkpoint(epoch, _, _):
            checkpointSlotTaken = false
            return [.warning("vm: checkpoint \(epoch) not committed")]
        case .unprotected:
            unprotectedRequested = false
            return [.warning("vm: going on without a backup not committed")]
        case .takeOver:
            return [.warning("vm: take-over by node \(me) not committed")]
        case .input, .connectionOffset:
            return []
        }
    }

    /// Switchover: takes the checkpoint slot for a checkpoint of its own; the epoch, or nil while
    /// another checkpoint is in flight.
    mutating func claimCheckpoint() -> UInt64? {
        guard !checkpointSlotTaken else { return nil }
        checkpointSlotTaken = true
        defer { nextEpoch += 1 }
        return nextEpoch
    }
}
