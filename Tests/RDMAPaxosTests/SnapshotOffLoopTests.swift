import Foundation
import Testing
import RDMAPaxos

/// Compaction must not stop the replica: a large state is serialized and saved off the node
/// thread, so heartbeats, check-quorum and client answers go on meanwhile (a node that stalled
/// for its snapshots lost leadership every 15-20 s under sustained load).
@Suite(.timeLimit(.minutes(1))) struct SnapshotOffLoopTests {
    /// A key-value state machine whose snapshot serialization waits until the test lets it go,
    /// standing for a state that takes seconds to encode.
    final class GatedSnapshots: SnapshotCapturing, @unchecked Sendable {
        // @unchecked Sendable: `inner` is touched by the node thread only; the gates are semaphores.
        let inner = KeyValueStateMachine()
        let started = DispatchSemaphore(value: 0)
        let release = DispatchSemaphore(value: 0)

        func apply(_ command: [UInt8], index: LogIndex) -> [UInt8] { inner.apply(command, index: index) }
        func query(_ query: [UInt8]) -> [UInt8] { inner.query(query) }
        func restore(_ snapshot: [UInt8], index: LogIndex) throws { try inner.restore(snapshot, index: index) }
        func snapshot() -> [UInt8] { gate(); return inner.snapshot() }
        func captureSnapshot() -> @Sendable () -> [UInt8] {
            let serialize = inner.captureSnapshot()
            return { [self] in gate(); return serialize() }
        }
        private func gate() { started.signal(); release.wait() }
    }

    static func put(_ key: String) -> [UInt8] { KeyValueStateMachine.Command.put(key: Array(key.utf8), value: [7]).encoded() }

    /// Proposes each key in turn, waiting at most 10 s for each answer; false at the first that
    /// does not come (a blocked node thread answers nothing, so this fails rather than hangs).
    static func answered(_ node: ReplicaNode, _ keys: [String]) async -> Bool {
        await Task.detached {
            keys.allSatisfy { key in
                let done = DispatchSemaphore(value: 0)
                node.propose(put(key)) { if case .success = $0 { done.signal() } }
                return done.wait(timeout: .now() + 10) == .success
            }
        }.value
    }

    @Test func proposalsCommitWhileASnapshotIsBeingSerialized() async throws {
        var cfg = ReplicaConfig(id: 1)
        cfg.electionTimeoutTicks = 10
        cfg.heartbeatTicks = 2
        var o = NodeOptions(replica: cfg, bootstrap: Membership([Member(id: 1, role: .voter)]), seed: 1)
        o.compactEveryEntries = 10
        let machine = GatedSnapshots()
        let snapshots = MemorySnapshotStore()
        let hub = LocalHub()
        let node = ReplicaNode(options: o, stateMachine: machine, log: try MemoryLog(storage: MemoryLog.Storage()),
                               snapshots: snapshots, transport: hub.transport(for: 1), ticks: TimerTickSource(interval: .milliseconds(5)))
        try node.start()
        defer { machine.release.signal(); node.stop() }
        for _ in 0..<400 where node.status.role != .leader { try await Task.sleep(for: .milliseconds(10)) }
        try #require(node.status.role == .leader)
        let first = await Self.answered(node, (0..<12).map { "a\($0)" })
        #expect(first, "proposals were not answered once a compaction was due")
        // A compaction is due and its serialization has begun (and is held).
        let began = await Task.detached { machine.started.wait(timeout: .now() + 10) == .success }.value
        try #require(began, "no compaction started after 12 entries with compact_every_entries 10")
        // The node thread is not waiting for it: proposals still commit and are answered (a node
        // that serialized on its own thread would answer none of them until the gate opened).
        let answered = await Self.answered(node, (0..<20).map { "b\($0)" })
        #expect(answered, "proposals were not answered while a snapshot was being serialized")
        #expect(node.status.role == .leader)
        #expect(try snapshots.load() == nil, "the snapshot was saved before it was serialized")
        // Let it finish: it is saved, at the index where it was taken, and the log is compacted.
        machine.release.signal()
        for _ in 0..<400 where (try? snapshots.load()) == nil { try await Task.sleep(for: .milliseconds(10)) }
        let saved = try #require(try snapshots.load())
        #expect(saved.index >= 10 && saved.index < node.status.lastIndex, "snapshot at \(saved.index), log at \(node.status.lastIndex)")
        for _ in 0..<400 where node.status.firstIndex <= saved.index { try await Task.sleep(for: .milliseconds(10)) }
        #expect(node.status.firstIndex == saved.index + 1)
        // The state it holds is the state at that index: restored, it has the a-keys, no b-key.
        let restored = KeyValueStateMachine()
        try restored.restore(saved.data, index: saved.index)
        #expect(restored.map[Array("a0".utf8)] == [7])
        #expect(restored.map.count <= 12)
    }

    /// A snapshot store whose `save` waits until the test lets it go, standing for hundreds of MB
    /// written with fsync on a busy disk.
    final class GatedStore: SnapshotStore, @unchecked Sendable {
        // @unchecked Sendable: `inner` is thread-safe; the gates are semaphores.
        let inner = MemorySnapshotStore()
        let started = DispatchSemaphore(value: 0)
        let release = DispatchSemaphore(value: 0)
        func load() throws -> Snapshot? { try inner.load() }
        func save(_ snapshot: Snapshot) throws {
            started.signal()
            release.wait()
            try inner.save(snapshot)
        }
    }

    /// While a compaction's snapshot is being saved, later writes are acknowledged and the
    /// stall detector stays quiet: the save is the node's own work, not its log's disk being
    /// stuck. (Before, the compaction's persist unit stayed in flight until the save ended: every
    /// later ack waited behind it, and after `disk_stall_ticks` the leader stepped down with
    /// "stable log stalled", which is what the soak's leader changes were.)
    @Test func proposalsCommitAndTheLeaderStaysWhileASnapshotIsBeingSaved() async throws {
        var cfg = ReplicaConfig(id: 1)
        cfg.electionTimeoutTicks = 10
        cfg.heartbeatTicks = 2
        cfg.diskStallTicks = 10
        var o = NodeOptions(replica: cfg, bootstrap: Membership([Member(id: 1, role: .voter)]), seed: 1)
        o.compactEveryEntries = 10
        let store = GatedStore()
        let hub = LocalHub()
        let node = ReplicaNode(options: o, stateMachine: KeyValueStateMachine(), log: try MemoryLog(storage: MemoryLog.Storage()),
                               snapshots: store, transport: hub.transport(for: 1), ticks: TimerTickSource(interval: .milliseconds(5)))
        try node.start()
        defer { store.release.signal(); node.stop() }
        for _ in 0..<400 where node.status.role != .leader { try await Task.sleep(for: .milliseconds(10)) }
        try #require(node.status.role == .leader)
        #expect(await Self.answered(node, (0..<12).map { "a\($0)" }))
        let began = await Task.detached { store.started.wait(timeout: .now() + 10) == .success }.value
        try #require(began, "no snapshot save started after 12 entries with compact_every_entries 10")
        // The save is held for 20 stall periods: proposals are still answered, one by one.
        let answered = await Self.answered(node, (0..<20).map { "b\($0)" })
        #expect(answered, "proposals were not answered while a snapshot was being saved")
        try await Task.sleep(for: .milliseconds(1000))
        #expect(node.status.role == .leader, "the leader stepped down while its snapshot was being saved")
        store.release.signal()
        for _ in 0..<400 where (try? store.load()) == nil { try await Task.sleep(for: .milliseconds(10)) }
        #expect(try store.load() != nil)
    }
}
