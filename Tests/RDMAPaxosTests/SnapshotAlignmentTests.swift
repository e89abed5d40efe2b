import Foundation
import Testing
import RDMAPaxos

/// A replica that crashed after saving a snapshot but before its log was compacted through it
/// (`ReplicaNode.startPersist`: snapshot first, then `compactPrefix`) starts again: the log is
/// aligned with the snapshot when the node opens it.
@Suite(.timeLimit(.minutes(1))) struct SnapshotAlignmentTests {
    static let me = Membership([Member(id: 1, role: .voter)])
    static let ballot = Ballot(term: 1, node: 1)

    static func put(_ i: LogIndex) -> [UInt8] {
        KeyValueStateMachine.Command.put(key: Array("k\(i)".utf8), value: Array("v\(i)".utf8)).encoded()
    }

    /// The disk as the crash left it: entries 1...`logged` in the log, nothing compacted, and the
    /// snapshot of the state after entries 1...5 (at `snapshotBallot`, else the entries' ballot)
    /// already saved.
    static func crashedStore(logged: LogIndex, snapshotBallot: Ballot? = nil) throws -> (MemoryLog.Storage, MemorySnapshotStore) {
        let storage = MemoryLog.Storage()
        let log = try MemoryLog(storage: storage)
        try log.append((1...logged).map { LogEntry(index: $0, ballot: ballot, kind: .command, payload: put($0)) })
        try log.saveHardState(HardState(promised: ballot, commitIndex: min(logged, 5), membership: me))
        try log.close()
        let machine = KeyValueStateMachine()
        for i in LogIndex(1)...5 { _ = machine.apply(put(i), index: i) }
        let snapshots = MemorySnapshotStore()
        try snapshots.save(Snapshot(index: 5, ballot: snapshotBallot ?? ballot, membership: me, data: machine.snapshot()))
        return (storage, snapshots)
    }

    static func node(_ log: MemoryLog, _ snapshots: MemorySnapshotStore, _ machine: KeyValueStateMachine, _ ticks: ManualTickSource) -> ReplicaNode {
        ReplicaNode(options: NodeOptions(replica: ReplicaConfig(id: 1), bootstrap: me), stateMachine: machine, log: log,
                    snapshots: snapshots, transport: LocalHub().transport(for: 1), ticks: ticks)
    }

    /// 3: the log ends below the snapshot (a follower that installed a leader's snapshot, or that
    /// applied entries before they were durable); 5 and 8: it reaches or passes it.
    @Test(arguments: [LogIndex(3), 5, 8])
    func aLogLeftBehindItsSnapshotIsAlignedAndTheReplicaServesAgain(logged: LogIndex) async throws {
        let (storage, snapshots) = try Self.crashedStore(logged: logged)
        let log = try MemoryLog(storage: storage)
        let machine = KeyValueStateMachine()
        let ticks = ManualTickSource()
        let node = Self.node(log, snapshots, machine, ticks)
        try node.start()
        defer { node.stop() }

        // The log starts right after the snapshot, keeps every entry above it, and ends where the
        // core's log does: the core's next append is contiguous.
        try #require(log.snapshot == SnapshotPoint(index: 5, ballot: Self.ballot))
        try #require(log.lastIndex == node.status.lastIndex)
        #expect(log.lastIndex == max(5, logged))
        #expect(try log.entries(1...logged).map(\.index) == (1...logged).filter { $0 > 5 })

        // The only voter elects itself (its no-op goes right after the log) and commits a command.
        try #require(await eventually { ticks.fire(); return node.status.role == .leader })
        _ = try await node.propose(Self.put(9))
        #expect(machine.map.count == Int(max(5, logged)) + 1)
    }

    /// Entries after the snapshot's index that do not follow the snapshot (another ballot at its
    /// index) cannot come from a crash: the node refuses to start rather than pick a history.
    @Test func aLogThatDoesNotFollowItsSnapshotIsRefusedAndKeptAsItIs() throws {
        let (storage, snapshots) = try Self.crashedStore(logged: 8, snapshotBallot: Ballot(term: 2, node: 2))
        let log = try MemoryLog(storage: storage)
        let node = Self.node(log, snapshots, KeyValueStateMachine(), ManualTickSource())
        defer { node.stop() }
        #expect(throws: NodeError.self) { try node.start() }
        #expect(try log.entries(1...8).count == 8)
    }
}
