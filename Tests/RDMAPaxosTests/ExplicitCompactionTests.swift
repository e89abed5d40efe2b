import Foundation
import Testing
import RDMAPaxos

/// `ReplicaNode.compact(through:snapshot:)`: a state machine that can capture its state only at
/// points of its own choosing (libinterpose's server snapshots) compacts the log at exactly the
/// index it names, with exactly the bytes it hands over; an index not applied yet, or at or below
/// the latest snapshot, changes nothing.
@Suite(.timeLimit(.minutes(1))) struct ExplicitCompactionTests {
    @Test func compactsAtTheNamedIndexWithTheGivenBytes() async throws {
        var cfg = ReplicaConfig(id: 1)
        cfg.electionTimeoutTicks = 10
        cfg.heartbeatTicks = 2
        var o = NodeOptions(replica: cfg, bootstrap: Membership([Member(id: 1, role: .voter)]), seed: 1)
        o.compactEveryEntries = Int.max / 2 // the node never compacts on its own
        let snapshots = MemorySnapshotStore()
        let node = ReplicaNode(options: o, stateMachine: KeyValueStateMachine(), log: try MemoryLog(storage: MemoryLog.Storage()),
                               snapshots: snapshots, transport: LocalHub().transport(for: 1), ticks: TimerTickSource(interval: .milliseconds(5)))
        try node.start()
        defer { node.stop() }
        for _ in 0..<400 where node.status.role != .leader { try await Task.sleep(for: .milliseconds(10)) }
        try #require(node.status.role == .leader)
        #expect(await SnapshotOffLoopTests.answered(node, (0..<20).map { "k\($0)" }))
        let applied = node.status.appliedIndex
        try #require(applied >= 20)

        // Beyond what was applied: nothing happens.
        node.compact(through: applied + 5, snapshot: [9])
        // At an index of the caller's choosing, behind the applied one.
        node.compact(through: 7, snapshot: [1, 2, 3])
        for _ in 0..<400 where node.status.firstIndex != 8 { try await Task.sleep(for: .milliseconds(10)) }
        #expect(node.status.firstIndex == 8)
        let saved = try #require(try snapshots.load())
        #expect(saved.index == 7 && saved.data == [1, 2, 3])

        // At or below the latest snapshot: nothing changes.
        node.compact(through: 5, snapshot: [4])
        #expect(await SnapshotOffLoopTests.answered(node, ["after"]))
        #expect(node.status.firstIndex == 8)
        #expect(try snapshots.load()?.data == [1, 2, 3])
    }
}
