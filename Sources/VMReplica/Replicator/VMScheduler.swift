// What a VM replica's scheduler decides in one window, as a pure function of what it sees: the
// loop in VMReplicator+Roles.swift gathers a `SchedulerView`, asks `VMScheduler.decide`, and
// carries the action out. Tests drive every rule without QEMU (VMSchedulerTests).

/// Everything one scheduling window looks at.
struct SchedulerView: Equatable {
    var role: VMReplicator.Role
    /// This replica leads the consensus cluster and has a running VM.
    var leading: Bool
    /// Why this replica's VM is not the replicated one (inconsistent or unusable), if it is not.
    var notACopy: String?
    /// Output waits for checkpoints (false: a primary without a protected backup).
    var protected: Bool
    var linkUp: Bool
    /// How long the syncvm link has been down (nil while up).
    var linkDownFor: Duration?
    var checkpointInFlight: Bool
    /// Going on without the backup was proposed and is not committed yet.
    var unprotectedRequested: Bool
    var failedCheckpointsInARow: Int
    var sinceLastCheckpointEnd: Duration
    var lastCheckpointFailed: Bool
    /// How long this replica has been leading.
    var leadingFor: Duration
    /// Since it last asked for leadership to move, and since it last proposed a take-over (nil: never).
    var sinceHandOff: Duration?
    var sinceTakeOverProposal: Duration?
    /// Age of the oldest answer held (nil: none held).
    var oldestHeldAge: Duration?
    /// The VM's QEMU used less than `idle_cpu_percent` of a core over the last window.
    var guestIdle: Bool
    /// Release on match: the first output mismatch since the last completed checkpoint.
    var outputMismatch: String? = nil
    /// Release on match: some output went out by a match since the last completed checkpoint.
    var releasedByMatchSinceCheckpoint = false
}

/// The fixed parameters of the rules.
struct SchedulerRules: Equatable {
    var handBackLimit = Duration.seconds(6)
    var backupLostAfter = Duration.seconds(1)
    var checkpointMinGap = Duration.zero
    var failedCheckpointBackoff = Duration.seconds(1)
    var checkpointMaxAge = Duration.seconds(1)
    /// Release on match (`release_on_match`): held output waits for the backup's matching output
    /// instead of the guest going idle, at most `outputHoldMax` (`output_hold_max_ms`).
    var releaseOnMatch = false
    var outputHoldMax = Duration.milliseconds(100)
    /// At most one leadership hand-off, and one take-over proposal, per this long.
    var retryEvery = Duration.seconds(2)
    /// Checkpoint failures in a row (link up) after which a primary goes on without its backup.
    var failuresBeforeLost = 3
}

extension VMScheduler {
    /// With release on match, held output forces a checkpoint only once this many
    /// `output_hold_max_ms` have passed since the last checkpoint ended (the backup's new QEMU
    /// warms up); after that, as soon as it waited `output_hold_max_ms`.
    static let backupWarmUpHolds = 3
}

/// One window's decision.
enum SchedulerAction: Equatable {
    case nothing
    /// A primary whose VM is not a copy becomes a backup (the driver carries it out).
    case demote
    /// Ask the consensus cluster to move leadership to the other VM replica.
    case handLeadership(because: String)
    /// A leading backup proposes `takeOver(by: me)`.
    case proposeTakeOver(because: String)
    /// A leading primary whose backup is gone proposes `unprotected(by: me)`.
    case proposeUnprotected(because: String)
    /// A leading primary proposes a checkpoint.
    case proposeCheckpoint
}

enum VMScheduler {
    /// The rules of docs/design/vmreplica.md, "Roles" and "Checkpoint", in one place.
    static func decide(_ v: SchedulerView, _ r: SchedulerRules) -> SchedulerAction {
        // A primary whose VM is no copy of the one clients saw steps down to backup first; as a
        // leading backup it then hands leadership on (next window).
        if v.role == .primary, v.notACopy != nil { return .demote }
        guard v.leading else { return .nothing }
        let mayRetryHandOff = v.sinceHandOff.map { $0 > r.retryEvery } ?? true
        if let why = v.notACopy {
            return mayRetryHandOff ? .handLeadership(because: "it leads with a VM that is not the replicated one (\(why))") : .nothing
        }
        if v.role == .backup {
            if !v.linkUp || v.leadingFor >= r.handBackLimit {
                guard v.sinceTakeOverProposal.map({ $0 > r.retryEvery }) ?? true else { return .nothing }
                return .proposeTakeOver(because: v.linkUp ? "the primary did not take leadership back within \(r.handBackLimit)" : "the syncvm link to the primary is down")
            }
            // An election while the primary lives (its link is up): give leadership back.
            return mayRetryHandOff ? .handLeadership(because: "a backup leads while the primary is up") : .nothing
        }
        // Primary. A backup that is gone must not hold every answer until it returns.
        if v.protected, !v.unprotectedRequested, !v.checkpointInFlight {
            if let down = v.linkDownFor, down >= r.backupLostAfter {
                return .proposeUnprotected(because: "its syncvm link has been down for \(down)")
            }
            if v.failedCheckpointsInARow >= r.failuresBeforeLost {
                return .proposeUnprotected(because: "\(v.failedCheckpointsInARow) checkpoints in a row failed")
            }
        }
        let gap = v.lastCheckpointFailed ? max(r.checkpointMinGap, r.failedCheckpointBackoff) : r.checkpointMinGap
        guard !v.checkpointInFlight, v.sinceLastCheckpointEnd >= gap else { return .nothing }
        if v.protected, r.releaseOnMatch {
            // Output goes out when the backup produced the same; a checkpoint is for a mismatch,
            // for output the backup has not matched in time, and — at most every
            // `checkpointMaxAge` while output went out by matching — to refresh the backup's copy.
            if v.outputMismatch != nil { return .proposeCheckpoint }
            // Right after a checkpoint the backup runs a new QEMU whose translation cache is cold:
            // its first answers come 100-150 ms late under TCG. Holding it to `outputHoldMax` then
            // would start another checkpoint (and another cold QEMU) after every one, so held output
            // forces one only `backupWarmUpHolds` × `outputHoldMax` after the last one ended.
            if let age = v.oldestHeldAge, age >= r.outputHoldMax,
               v.sinceLastCheckpointEnd >= r.outputHoldMax * VMScheduler.backupWarmUpHolds {
                return .proposeCheckpoint
            }
            return v.releasedByMatchSinceCheckpoint && v.sinceLastCheckpointEnd >= r.checkpointMaxAge ? .proposeCheckpoint : .nothing
        }
        if v.protected {
            // PLOVER's trigger: output is waiting and the guest went idle, or the oldest held
            // answer reached the maximum age.
            guard let age = v.oldestHeldAge, v.guestIdle || age >= r.checkpointMaxAge else { return .nothing }
            return .proposeCheckpoint
        }
        // Unprotected: re-protect a backup as soon as its link is up.
        return v.linkUp ? .proposeCheckpoint : .nothing
    }
}
