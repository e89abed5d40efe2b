// The primary's release decision without I/O: frames go when the backup's guest sent the same,
// in the guest's order; a difference releases nothing and asks for a checkpoint; digests of
// another VM (generation) never release anything.

import Testing
@testable import VMReplica

@Suite struct OutputMatcherTests {
    let t0 = ContinuousClock.now

    /// A matcher whose first checkpoint (epoch 1) completed, so matching is on.
    func protected(releaseOnMatch: Bool = true) -> OutputMatcher {
        var m = OutputMatcher(releaseOnMatch: releaseOnMatch)
        _ = m.checkpointEnded(epoch: 1, completed: true, cut: m.cut())
        return m
    }

    func hold(_ m: inout OutputMatcher, _ f: [UInt8]) -> [[UInt8]] { m.hold(f, digest: OutputDigest(of: f), at: t0).map(\.frame) }
    func backup(_ m: inout OutputMatcher, _ fs: [[UInt8]], generation: UInt64 = 1) -> [[UInt8]] {
        m.backup(generation: generation, digests: fs.map { OutputDigest(of: $0) }).map(\.frame)
    }

    static let a1 = Frames.tcp(seq: 1000, port: 40001)
    static let a2 = Frames.tcp(seq: 1005, port: 40001)
    static let b1 = Frames.tcp(seq: 9000, port: 40002)

    @Test func matchingFramesGoInTheGuestsOrder() {
        var m = protected()
        #expect(hold(&m, Self.a1).isEmpty && hold(&m, Self.b1).isEmpty && hold(&m, Self.a2).isEmpty)
        // The backup sent b1 first: a1 is older on the tap, so nothing goes yet.
        #expect(backup(&m, [Self.b1]).isEmpty)
        #expect(backup(&m, [Self.a1]) == [Self.a1, Self.b1])
        #expect(backup(&m, [Self.a2]) == [Self.a2])
        #expect(m.heldCount == 0 && m.counters.releasedByMatch == 3 && m.mismatch == nil)
        // The backup may also be ahead: its digest waits for the primary's frame.
        #expect(backup(&m, [Self.b1]).isEmpty)
        #expect(hold(&m, Self.b1) == [Self.b1])
    }

    @Test func aDifferenceReleasesNothingUntilACheckpoint() {
        var m = protected()
        _ = hold(&m, Self.a1)
        _ = hold(&m, Self.a2)
        let differing = Frames.tcp(seq: 1000, payload: Array("-ERR\r".utf8), port: 40001)
        #expect(backup(&m, [differing]).isEmpty)
        #expect(m.mismatch == "tcp-payload-or-options" && m.counters.mismatches == 1)
        // Later matching digests release nothing either: the two VMs are no longer aligned.
        #expect(backup(&m, [Self.a2]).isEmpty && m.heldCount == 2)
        // The checkpoint releases what came before its cut and starts a new generation.
        let cut = m.cut()
        _ = hold(&m, Self.b1)
        #expect(backup(&m, [Self.b1], generation: 1).isEmpty, "the old VM's digests are stale once the cut is taken")
        #expect(m.checkpointEnded(epoch: 2, completed: true, cut: cut).map(\.frame) == [Self.a1, Self.a2])
        #expect(m.mismatch == nil && m.counters.releasedByCheckpoint == 2)
        #expect(backup(&m, [Self.b1], generation: 2) == [Self.b1])
    }

    @Test func aSegmentWithOtherSequenceNumbersIsAMismatch() {
        var m = protected()
        _ = hold(&m, Self.a1)
        #expect(backup(&m, [Frames.tcp(seq: 1001, port: 40001)]).isEmpty)
        #expect(m.mismatch == "tcp-seq" && m.heldCount == 1)
    }

    @Test func digestsOfAnotherGenerationReleaseNothing() {
        var m = protected()
        _ = hold(&m, Self.a1)
        #expect(backup(&m, [Self.a1], generation: 0).isEmpty)
        #expect(m.heldCount == 1 && m.counters.staleDigests == 1)
        // Digests of the checkpoint in flight, sent by a backup that completed it first, wait for it.
        let cut = m.cut()
        _ = hold(&m, Self.a2)
        #expect(backup(&m, [Self.a2], generation: 2).isEmpty)
        #expect(m.checkpointEnded(epoch: 2, completed: true, cut: cut).map(\.frame) == [Self.a1, Self.a2])
    }

    @Test func aCheckpointThatFailedAfterItsCutStopsMatching() {
        var m = protected()
        let cut = m.cut()
        _ = hold(&m, Self.a1)
        #expect(m.checkpointEnded(epoch: 2, completed: false, cut: cut).isEmpty)
        // The backup may run its old VM or the new copy: neither generation's digests count.
        #expect(backup(&m, [Self.a1], generation: 1).isEmpty && backup(&m, [Self.a1], generation: 2).isEmpty)
        #expect(m.heldCount == 1 && m.generation == nil)
        #expect(m.checkpointEnded(epoch: 3, completed: true, cut: m.cut()).map(\.frame) == [Self.a1])
        // A checkpoint that failed before its cut (the backup never got ready) changes nothing.
        _ = hold(&m, Self.a2)
        #expect(m.checkpointEnded(epoch: 4, completed: false, cut: nil).isEmpty)
        #expect(backup(&m, [Self.a2], generation: 3) == [Self.a2])
    }

    @Test func aBackupTimestampBelowOneAClientSawNeedsAnOffset() {
        // Not below: released at once.
        var n = protected()
        _ = hold(&n, Frames.tcp(seq: 1000, ts: (700, 1)))
        #expect(backup(&n, [Frames.tcp(seq: 1000, ts: (703, 1))]).count == 1)
        _ = hold(&n, Frames.tcp(seq: 1005, ts: (705, 1)))
        #expect(backup(&n, [Frames.tcp(seq: 1005, ts: (705, 1))]).count == 1, "705 is not below 705")
        #expect(n.takeProposals().isEmpty && n.counters.matchedByOffset == 0)
        // Below the frame's own TSval (or one released before): it waits for an offset's entry.
        var m = protected()
        _ = hold(&m, Frames.tcp(seq: 1000, ts: (700, 1)))
        #expect(backup(&m, [Frames.tcp(seq: 1000, ts: (690, 1))]).isEmpty, "690 is below the 700 the client would see")
        #expect(m.mismatch == nil && m.takeProposals().map(\.offset) == [ConnectionOffset(timestamp: 10 + OutputMatcher.timestampSlack)])
        // Serial order: a timestamp that wrapped around is still later.
        #expect(OutputMatcher.precedes(.max, 3) && !OutputMatcher.precedes(3, .max))
    }

    @Test func acknowledgementsOnOneSideOnly() {
        var m = protected()
        // A pure ACK only the backup sent promises the client nothing: skipped.
        _ = hold(&m, Self.a1)
        #expect(backup(&m, [Frames.tcp(seq: 1000, ack: 4000, flags: 0x10, payload: []), Self.a1]) == [Self.a1])
        #expect(m.counters.backupOnlySkipped == 1)
        // A pure ACK only the primary sent goes when the backup acknowledged as much at that sequence number.
        let ack = Frames.tcp(seq: 1005, ack: 5000, flags: 0x10, payload: [])
        _ = hold(&m, ack)
        _ = hold(&m, Self.a2)
        #expect(backup(&m, [Frames.tcp(seq: 1005, ack: 5003)]).count == 1)
        // ... and not when the backup acknowledged less.
        var n = protected()
        _ = hold(&n, ack)
        #expect(backup(&n, [Frames.tcp(seq: 1005, ack: 4999)]).isEmpty && n.mismatch != nil)
    }

    @Test func withoutReleaseOnMatchOnlyCheckpointsRelease() {
        var m = protected(releaseOnMatch: false)
        _ = hold(&m, Self.a1)
        #expect(backup(&m, [Self.a1]).isEmpty && m.heldCount == 1)
        #expect(m.checkpointEnded(epoch: 2, completed: true, cut: m.cut()).map(\.frame) == [Self.a1])
    }

    @Test func arpGoesWithoutAMatchAndUnprotectedReleasesAll() {
        var m = protected()
        #expect(hold(&m, Frames.arp) == [Frames.arp])
        _ = hold(&m, Self.a1)
        _ = hold(&m, Frames.arp)
        #expect(m.releaseAll().map(\.frame) == [Self.a1, Frames.arp])
        #expect(m.generation == nil)
        _ = hold(&m, Self.a2)
        #expect(backup(&m, [Self.a2]).isEmpty, "no match before a checkpoint completed again")
    }
}
