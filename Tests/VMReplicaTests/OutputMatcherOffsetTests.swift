// Release on match with connection offsets: a SYN-ACK whose only difference is the initial
// sequence number, and a backup whose TCP timestamps lag, are matched with an offset per
// connection, released only once the primary applied the log entry that tells the backup; a
// checkpoint voids the offsets; everything else is compared as strictly as before.

import Testing
@testable import VMReplica

@Suite struct OutputMatcherOffsetTests {
    let t0 = ContinuousClock.now

    func protected() -> OutputMatcher {
        var m = OutputMatcher(releaseOnMatch: true)
        _ = m.checkpointEnded(epoch: 1, completed: true, cut: m.cut())
        return m
    }

    func hold(_ m: inout OutputMatcher, _ f: [UInt8]) -> [[UInt8]] { m.hold(f, digest: OutputDigest(of: f), at: t0).map(\.frame) }
    func backup(_ m: inout OutputMatcher, _ fs: [[UInt8]], generation: UInt64 = 1) -> [[UInt8]] {
        m.backup(generation: generation, digests: fs.map { OutputDigest(of: $0) }).map(\.frame)
    }

    /// The primary's guest chose ISN 1000 for the connection, the backup's 77.
    static let synAck = Frames.tcp(seq: 1000, ack: 5000, flags: 0x12, payload: [])
    static let backupSynAck = Frames.tcp(seq: 77, ack: 5000, flags: 0x12, payload: [])
    static let key = TCPConnectionKey(guestIP: 0x0a63_0002, guestPort: 6379, peerIP: 0x0a63_000a, peerPort: 40001)

    @Test func aSynAckDifferingOnlyInItsISNMatchesWithAnOffset() {
        var m = protected()
        let other = Frames.tcp(seq: 9000, port: 40002)
        _ = hold(&m, Self.synAck)
        _ = hold(&m, other)
        #expect(backup(&m, [other, Self.backupSynAck]).isEmpty, "matched, but the backup does not know the offset yet")
        #expect(m.mismatch == nil)
        let proposals = m.takeProposals()
        #expect(proposals == [LearntOffset(generation: 1, proposer: 0, ticket: 1, key: Self.key, offset: ConnectionOffset(sequence: 923))])
        // Its entry is applied on the primary, in log order: the SYN-ACK goes, and what waited behind it.
        #expect(m.offsetApplied(generation: 1, ticket: 1).map(\.frame) == [Self.synAck, other])
        // Later segments of the connection compare with the offset, and need no new entry.
        _ = hold(&m, Frames.tcp(seq: 1001, ack: 5005))
        #expect(backup(&m, [Frames.tcp(seq: 78, ack: 5005)]).count == 1)
        #expect(m.takeProposals().isEmpty && m.counters.matchedByOffset == 2 && m.counters.offsetsApplied == 1)
        // Everything else stays as strict: another payload, or a sequence number off by one.
        var payload = m, seq = m
        _ = hold(&payload, Frames.tcp(seq: 1006, ack: 5005, payload: Array("+OK\r\n".utf8)))
        #expect(backup(&payload, [Frames.tcp(seq: 83, ack: 5005, payload: Array("-ERR\n".utf8))]).isEmpty)
        #expect(payload.mismatch == "tcp-payload-or-options")
        _ = hold(&seq, Frames.tcp(seq: 1006, ack: 5005))
        #expect(backup(&seq, [Frames.tcp(seq: 84, ack: 5005)]).isEmpty)
        #expect(seq.mismatch == "tcp-seq")
    }

    @Test func onlyASynMayBringANewSequenceOffset() {
        var m = protected()
        _ = hold(&m, Frames.tcp(seq: 1000))
        #expect(backup(&m, [Frames.tcp(seq: 77)]).isEmpty)
        #expect(m.mismatch == "tcp-seq" && m.takeProposals().isEmpty)
        // A SYN-ACK that differs in more than its ISN (here its window) is a mismatch too.
        var n = protected()
        _ = hold(&n, Self.synAck)
        #expect(backup(&n, [Frames.tcp(seq: 77, ack: 5000, flags: 0x12, window: 100, payload: [])]).isEmpty)
        #expect(n.mismatch == "tcp-syn-seq")
        #expect(n.takeProposals().isEmpty)
    }

    @Test func anEntryAppliedAfterACutReleasesNothingAndACheckpointVoidsTheOffsets() {
        var m = protected()
        _ = hold(&m, Self.synAck)
        _ = backup(&m, [Self.backupSynAck])
        #expect(m.takeProposals().count == 1)
        let cut = m.cut()
        #expect(m.offsetApplied(generation: 1, ticket: 1).isEmpty, "the backup may be about to run another VM")
        #expect(m.checkpointEnded(epoch: 2, completed: true, cut: cut).map(\.frame) == [Self.synAck])
        // The backup's VM is now the primary's copy: its numbers are the primary's.
        var n = m
        _ = hold(&m, Frames.tcp(seq: 1001))
        #expect(backup(&m, [Frames.tcp(seq: 1001)], generation: 2).count == 1)
        _ = hold(&n, Frames.tcp(seq: 1001))
        #expect(backup(&n, [Frames.tcp(seq: 78)], generation: 2).isEmpty && n.mismatch == "tcp-seq")
        // An entry of the old generation applied late releases nothing.
        var k = protected()
        _ = hold(&k, Self.synAck)
        _ = backup(&k, [Self.backupSynAck])
        _ = k.checkpointEnded(epoch: 2, completed: false, cut: k.cut())
        #expect(k.offsetApplied(generation: 1, ticket: 1).isEmpty && k.heldCount == 1)
    }

    @Test func aTimestampDeficitIsCarriedAndApplied() {
        var m = protected()
        _ = hold(&m, Frames.tcp(seq: 1000, ts: (700, 1)))
        #expect(backup(&m, [Frames.tcp(seq: 1000, ts: (690, 1))]).isEmpty)
        let slack = OutputMatcher.timestampSlack
        #expect(m.takeProposals().map(\.offset) == [ConnectionOffset(timestamp: 10 + slack)])
        #expect(m.offsetApplied(generation: 1, ticket: 1).count == 1)
        // The carried deficit covers a backup that lags by as much again: no new entry.
        _ = hold(&m, Frames.tcp(seq: 1005, ts: (705, 1)))
        #expect(backup(&m, [Frames.tcp(seq: 1005, ts: (695, 1))]).count == 1)
        #expect(m.takeProposals().isEmpty && m.counters.matchedByOffset == 2)
        // A lag beyond it raises the deficit (a new entry), never lowers it.
        _ = hold(&m, Frames.tcp(seq: 1010, ts: (800, 1)))
        #expect(backup(&m, [Frames.tcp(seq: 1010, ts: (700, 1))]).isEmpty)
        #expect(m.takeProposals().map(\.offset) == [ConnectionOffset(timestamp: 100 + slack)])
        #expect(m.offsetApplied(generation: 1, ticket: 2).count == 1)
        _ = hold(&m, Frames.tcp(seq: 1015, ts: (801, 1)))
        #expect(backup(&m, [Frames.tcp(seq: 1015, ts: (790, 1))]).count == 1 && m.takeProposals().isEmpty)
        #expect(m.mismatch == nil)
    }

    @Test func offsetsStackOnOneConnection() {
        // An ISN offset, then a timestamp deficit on the same connection: one entry each, the
        // second carrying both (the backup keeps the newest entry per connection).
        var m = protected()
        _ = hold(&m, Frames.tcp(seq: 1000, ack: 5000, flags: 0x12, payload: [], ts: (700, 1)))
        _ = backup(&m, [Frames.tcp(seq: 77, ack: 5000, flags: 0x12, payload: [], ts: (700, 1))])
        _ = hold(&m, Frames.tcp(seq: 1001, ack: 5005, ts: (720, 1)))
        _ = backup(&m, [Frames.tcp(seq: 78, ack: 5005, ts: (710, 1))])
        #expect(m.takeProposals().map(\.offset) == [ConnectionOffset(sequence: 923), ConnectionOffset(sequence: 923, timestamp: 10 + OutputMatcher.timestampSlack)])
        #expect(m.offsetApplied(generation: 1, ticket: 1).count == 1, "the second frame waits for its own entry")
        #expect(m.offsetApplied(generation: 1, ticket: 2).count == 1)
    }
}
