// PLOVER's output rule on the VM primary: what the guest sends out is held until a syncvm that
// covers it has completed — or, with release on match, until the backup's guest sent the same
// frame — so no client ever sees an answer the backup could not reproduce. The decisions are
// `OutputMatcher`'s; this class runs it under one lock and delivers what it releases.

import Foundation

/// Guest output held by the primary. The VM driver takes a `cut` while the VM is paused at a
/// checkpoint (everything read so far was produced before the pause) and, once the checkpoint
/// completed, releases exactly the output before the cut; backup digests release earlier.
/// Released frames go to `deliver` under the guard's lock, so they leave in the guest's order
/// whichever thread released them.
public final class OutputGuard: @unchecked Sendable {
    // @unchecked Sendable: `matcher` and `deliver` are guarded by `lock`.
    private let lock = NSLock()
    private var matcher: OutputMatcher
    private var deliver: (([UInt8]) -> Void)?
    private var audit: ((OutputDigest) -> Void)?
    private var trace: ((OutputDigest, Bool) -> Void)?
    private var proposeOffset: ((LearntOffset) -> Void)?
    private let started = ContinuousClock.now
    private var checkpointsCompleted: UInt64 = 0

    /// A guard holding nothing; `releaseOnMatch` lets backup digests release frames.
    public init(releaseOnMatch: Bool = false) { matcher = OutputMatcher(releaseOnMatch: releaseOnMatch) }

    /// Where released frames go (the clients' attachment); until set they are discarded.
    public func setDelivery(_ deliver: @escaping ([UInt8]) -> Void) { lock.withLock { self.deliver = deliver } }

    /// Tells `audit` the digest of every frame a match released (the output failpoint's log).
    func setMatchAudit(_ audit: @escaping (OutputDigest) -> Void) { lock.withLock { self.audit = audit } }

    /// Tells `trace` the digest of every frame released, and whether a match released it.
    func setReleaseTrace(_ trace: @escaping (OutputDigest, Bool) -> Void) { lock.withLock { self.trace = trace } }

    /// Where the matcher's `connectionOffset` entries go (to the log), called under the guard's
    /// lock so they are proposed in the order learnt; until set they are dropped (the frames
    /// that wait for them then wait for a checkpoint).
    func setOffsetProposer(_ propose: @escaping (LearntOffset) -> Void) { lock.withLock { proposeOffset = propose } }

    private func send(_ released: [OutputMatcher.Release]) -> Int {
        for e in matcher.takeProposals() { proposeOffset?(e) }
        for r in released {
            deliver?(r.frame)
            trace?(r.digest, r.byMatch)
            if r.byMatch { audit?(r.digest) }
        }
        return released.count
    }

    /// Holds one output of the guest until a checkpoint or a match releases it.
    public func hold(_ output: [UInt8]) {
        let d = OutputDigest(of: output)
        lock.withLock { _ = send(matcher.hold(output, digest: d, at: .now)) }
    }

    /// The backup's digests of its VM of `generation`; releases what they match.
    public func backupDigests(generation: UInt64, _ digests: [OutputDigest]) {
        lock.withLock { _ = send(matcher.backup(generation: generation, digests: digests)) }
    }

    /// This primary applied its own `connectionOffset` entry: releases what waited for it.
    func offsetApplied(generation: UInt64, ticket: UInt64) {
        lock.withLock { _ = send(matcher.offsetApplied(generation: generation, ticket: ticket)) }
    }

    /// Output that will never be released (a backup's, or one that is not leading).
    public func drop() { lock.withLock { matcher.drop() } }

    /// Releases `output` without holding it (a primary that has no protected backup).
    public func passThrough(_ output: [UInt8]) {
        lock.withLock {
            matcher.passedThrough()
            deliver?(output)
        }
    }

    /// Outputs held now.
    public var heldCount: Int { lock.withLock { matcher.heldCount } }
    /// When the oldest held output arrived; nil when nothing is held.
    public var oldestHeld: ContinuousClock.Instant? { lock.withLock { matcher.oldestHeldAt } }
    /// The first mismatch since the last completed checkpoint (a checkpoint is needed), if any.
    public var mismatch: String? { lock.withLock { matcher.mismatch } }
    /// Both frames' fields of that first mismatch (the checkpoint log's `mismatch=`).
    public var mismatchDetail: String? { lock.withLock { matcher.mismatchDetail } }
    /// Outputs released so far, passed-through ones included.
    public var releasedCount: UInt64 { lock.withLock { matcher.counters.released } }
    /// Outputs dropped so far: never released.
    public var droppedCount: UInt64 { lock.withLock { matcher.counters.dropped } }
    /// Whether output went out by a match since the last completed checkpoint.
    public var releasedByMatchSinceCheckpoint: Bool { lock.withLock { matcher.matchedSinceCheckpoint > 0 } }
    var counters: OutputMatcher.Counters { lock.withLock { matcher.counters } }

    /// A position in the held output: everything read before now. Matching pauses until the
    /// checkpoint that took it ends (`checkpointEnded`).
    public func cut() -> UInt64 { lock.withLock { matcher.cut() } }

    /// Checkpoint `epoch` ended; when it completed, delivers the output before `cut` (and what
    /// the backup's early digests match) and returns how many frames went.
    @discardableResult
    public func checkpointEnded(epoch: UInt64, completed: Bool, cut: UInt64?) -> Int {
        lock.withLock {
            if completed { checkpointsCompleted += 1 }
            return send(matcher.checkpointEnded(epoch: epoch, completed: completed, cut: cut))
        }
    }

    /// Delivers everything held, oldest first (the primary goes on without a backup); returns how many.
    @discardableResult
    public func releaseAll() -> Int { lock.withLock { send(matcher.releaseAll()) } }

    /// Discards everything held (counted as dropped): the VM that produced it is no longer the
    /// one clients see.
    public func dropHeld() { lock.withLock { matcher.dropHeld() } }

    /// The release metrics as `key=value` words (`plover vm status`, the replica's log).
    public var metrics: String {
        lock.withLock {
            let c = matcher.counters
            let seconds = max((ContinuousClock.now - started).inMilliseconds / 1000, 0.001)
            let causes = c.causes.sorted { $0.key < $1.key }.map { "\($0.key):\($0.value)" }.joined(separator: ",")
            return "release_on_match=\(matcher.releaseOnMatch) released_by_match=\(c.releasedByMatch) released_by_checkpoint=\(c.releasedByCheckpoint) "
                + "released_unprotected=\(c.releasedUnprotected) output_mismatches=\(c.mismatches) backup_only_skipped=\(c.backupOnlySkipped) "
                + "stale_digests=\(c.staleDigests) checkpoints_completed=\(checkpointsCompleted) "
                + String(format: "checkpoints_per_second=%.3f", Double(checkpointsCompleted) / seconds)
                + " match_waits=\(c.matchWaits)" + String(format: " match_wait_total_ms=%.1f", c.matchWaitTotal.inMilliseconds)
                + String(format: " match_wait_mean_ms=%.2f match_wait_max_ms=%.2f",
                         c.matchWaits > 0 ? c.matchWaitTotal.inMilliseconds / Double(c.matchWaits) : 0, c.matchWaitMax.inMilliseconds)
                + " matched_by_offset=\(c.matchedByOffset) offsets_learnt=\(c.offsetsLearnt) offsets_applied=\(c.offsetsApplied)"
                + " mismatch_causes=\(causes.isEmpty ? "none" : causes)"
        }
    }
}
