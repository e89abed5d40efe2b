import Testing
@testable import RDMAPaxosCore

/// The leader's window towards one follower: at most `inflightBytesMax` bytes of entries in
/// accepts it has not acknowledged (one accept always goes), on top of `inflightMessagesMax`.
@Suite struct FlowControlTests {
    /// Elects node 1 of three with every message delivered, then holds back what it sends to
    /// node 3 (which never answers) while node 2 keeps the cluster committing.
    func leaderWithSilentFollower(bytesMax: Int) -> ScenarioCluster? {
        ScenarioCluster.elected {
            $0.batchBytesMax = 64 << 10
            $0.inflightBytesMax = bytesMax
            $0.preVote = false
        }
    }

    /// Bytes of entries in the accepts queued for `to` (and drops them: `to` never answers).
    func takeAcceptBytes(_ c: inout ScenarioCluster, to: NodeID) -> (messages: Int, bytes: Int) {
        var messages = 0, bytes = 0
        c.queue.removeAll { m in
            guard m.to == to, case let .accept(_, _, entries, _) = m.body, !entries.isEmpty else { return false }
            messages += 1
            bytes += InMemoryLog.wireBytes(entries)
            return true
        }
        return (messages, bytes)
    }

    @Test(arguments: [256 << 10, 768 << 10])
    func acceptsToASilentFollowerStopAtTheByteWindow(bytesMax: Int) throws {
        var c = try #require(leaderWithSilentFollower(bytesMax: bytesMax))
        _ = takeAcceptBytes(&c, to: 3)
        var sent = 0
        // 4 MiB of 4 KiB values, proposed 16 at a time; node 2 answers everything.
        for _ in 0..<64 {
            try c.with(1) { try $0.propose(Array(repeating: [UInt8](repeating: 7, count: 4096), count: 16)).actions }
            sent += takeAcceptBytes(&c, to: 3).bytes
            c.stabilize()
            sent += takeAcceptBytes(&c, to: 3).bytes
        }
        #expect(c.nodes[1]!.replica!.commitIndex >= 1024, "node 2 keeps the cluster committing")
        // A batch holds at least one entry, so the last one may pass the window by one entry.
        let entry = 4096 + InMemoryLog.entryOverheadBytes
        #expect(sent <= bytesMax + entry, "\(sent) bytes in flight to a follower that acknowledged nothing (window \(bytesMax))")
        #expect(sent >= bytesMax - entry, "the window is filled: \(sent) of \(bytesMax)")
    }

    @Test func anAcknowledgementOpensTheWindowAgain() throws {
        var c = try #require(leaderWithSilentFollower(bytesMax: 128 << 10))
        for _ in 0..<16 {
            try c.with(1) { try $0.propose(Array(repeating: [UInt8](repeating: 7, count: 4096), count: 16)).actions }
            c.persistAll(1)
        }
        var first: LogIndex = 0
        for m in c.queue where m.to == 3 {
            if case let .accept(_, _, entries, _) = m.body, let last = entries.last { first = max(first, last.index) }
        }
        _ = takeAcceptBytes(&c, to: 3)
        try #require(first > 0)
        // Node 3 acknowledges everything it was sent: the leader sends more, again within the window.
        let ballot = c.nodes[1]!.replica!.promised
        c.with(1) { $0.receive(Message(from: 3, to: 1, ballot: ballot, body: .accepted(success: true, index: first))) }
        let more = takeAcceptBytes(&c, to: 3)
        #expect(more.messages > 0)
        #expect(more.bytes <= (128 << 10) + 4096 + InMemoryLog.entryOverheadBytes)
    }

    /// The window always admits one accept: a single entry larger than the window still goes.
    @Test func anEntryLargerThanTheWindowStillGoes() throws {
        var c = try #require(leaderWithSilentFollower(bytesMax: 8 << 10))
        _ = takeAcceptBytes(&c, to: 3)
        try c.with(1) { try $0.propose([[UInt8](repeating: 1, count: 32 << 10)]).actions }
        c.persistAll(1)
        #expect(takeAcceptBytes(&c, to: 3).messages == 1)
    }
}
