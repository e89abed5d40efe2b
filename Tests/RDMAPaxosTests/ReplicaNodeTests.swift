import Foundation
import Metrics
import Testing
import RDMAPaxos

/// The runtime over in-process transports and memory logs, with real timers.
@Suite(.timeLimit(.minutes(1))) struct ReplicaNodeTests {
    final class Cluster: @unchecked Sendable {
        // @unchecked Sendable: mutated only from the test's own task.
        let hub = LocalHub()
        var nodes: [NodeID: ReplicaNode] = [:]
        var machines: [NodeID: KeyValueStateMachine] = [:]
        var storage: [NodeID: MemoryLog.Storage] = [:]
        var snapshots: [NodeID: MemorySnapshotStore] = [:]
        let membership: Membership
        let metricsFactory: (any MetricsFactory)?

        init(_ members: [Member], metricsFactory: (any MetricsFactory)? = nil) throws {
            membership = Membership(members)
            self.metricsFactory = metricsFactory
            for m in members {
                storage[m.id] = MemoryLog.Storage()
                snapshots[m.id] = MemorySnapshotStore()
                try start(m.id)
            }
        }

        func start(_ id: NodeID) throws {
            var cfg = ReplicaConfig(id: id)
            cfg.electionTimeoutTicks = 10
            cfg.heartbeatTicks = 2
            var o = NodeOptions(replica: cfg, bootstrap: membership, seed: UInt64(id) * 7919)
            o.compactEveryEntries = 50
            o.metricsFactory = metricsFactory
            let sm = KeyValueStateMachine()
            let node = ReplicaNode(options: o, stateMachine: sm, log: try MemoryLog(storage: storage[id]!),
                                   snapshots: snapshots[id]!, transport: hub.transport(for: id),
                                   ticks: TimerTickSource(interval: .milliseconds(5)))
            try node.start()
            nodes[id] = node
            machines[id] = sm
            hub.reconnect(id)
        }

        func crash(_ id: NodeID) {
            hub.isolate(id)
            nodes[id]!.stop()
            nodes[id] = nil
        }

        func leader(excluding: Set<NodeID> = []) async throws -> ReplicaNode {
            for _ in 0..<400 {
                if let l = nodes.values.first(where: { $0.status.role == .leader && !excluding.contains($0.options.replica.id) }) { return l }
                try await Task.sleep(for: .milliseconds(10))
            }
            throw NodeError.notLeader(leader: nil)
        }

        func put(_ key: String, _ value: String, via node: ReplicaNode) async throws {
            _ = try await node.propose(KeyValueStateMachine.Command.put(key: Array(key.utf8), value: Array(value.utf8)).encoded())
        }

        /// Waits until every running node applied everything the leader committed.
        func waitConverged() async throws {
            for _ in 0..<400 {
                let l = nodes.values.first { $0.status.role == .leader }?.status
                if let l, l.commitIndex == l.lastIndex,
                   nodes.values.allSatisfy({ $0.status.appliedIndex == l.commitIndex || $0.status.isWitness && $0.status.lastIndex == l.lastIndex }) { return }
                try await Task.sleep(for: .milliseconds(10))
            }
            Issue.record("replicas did not converge: \(nodes.values.map { "\($0.status.id):\($0.status.appliedIndex)" })")
        }

        func stopAll() { nodes.values.forEach { $0.stop() } }
    }

    static let three = [Member(id: 1, role: .voter), Member(id: 2, role: .voter), Member(id: 3, role: .voter)]

    @Test func proposalsCommitAndApplyOnEveryReplica() async throws {
        let c = try Cluster(Self.three)
        defer { c.stopAll() }
        let l = try await c.leader()
        try await withThrowingTaskGroup(of: Void.self) { g in
            for i in 0..<100 { g.addTask { try await c.put("k\(i)", "v\(i)", via: l) } }
            try await g.waitForAll()
        }
        try await c.waitConverged()
        for (id, sm) in c.machines { #expect(sm.map.count == 100, "node \(id): \(c.nodes[id]!.status)") }
        #expect(c.machines[1]!.map == c.machines[2]!.map && c.machines[2]!.map == c.machines[3]!.map)
    }

    @Test func leadershipMovesToTheNamedVoterAndFollowersAndBadTargetsAreRefused() async throws {
        let c = try Cluster(Self.three)
        defer { c.stopAll() }
        let l = try await c.leader()
        try await c.put("a", "1", via: l)
        let me = l.options.replica.id
        let target = c.nodes.keys.sorted().first { $0 != me }!
        await #expect(throws: NodeError.refused(.invalidTransferTarget(me))) { try await l.transferLeadership(to: me) }
        await #expect(throws: NodeError.refused(.invalidTransferTarget(9))) { try await l.transferLeadership(to: 9) }
        let follower = c.nodes[target]!
        await #expect(throws: NodeError.notLeader(leader: me)) { try await follower.transferLeadership(to: me) }
        try await l.transferLeadership(to: target)
        let next = try await c.leader(excluding: [me])
        #expect(next.options.replica.id == target)
        try await c.put("b", "2", via: next)
        try await c.waitConverged()
        for (id, sm) in c.machines { #expect(sm.map.count == 2, "node \(id)") }
    }

    @Test func followersRefuseProposalsAndNameTheLeader() async throws {
        let c = try Cluster(Self.three)
        defer { c.stopAll() }
        let l = try await c.leader()
        try await c.put("a", "1", via: l)
        let follower = c.nodes.values.first { $0.status.role == .follower }!
        await #expect(throws: NodeError.notLeader(leader: l.options.replica.id)) {
            _ = try await follower.propose([1])
        }
    }

    @Test func leaderCrashLosesNoAcknowledgedWriteAndRestartCatchesUp() async throws {
        let c = try Cluster(Self.three)
        defer { c.stopAll() }
        let first = try await c.leader()
        for i in 0..<120 { try await c.put("k\(i)", "v\(i)", via: first) }
        let old = first.options.replica.id
        c.crash(old)
        let second = try await c.leader(excluding: [old])
        for i in 120..<150 { try await c.put("k\(i)", "v\(i)", via: second) }
        try c.start(old) // same stable log: restarts from what was durable, catches up (by snapshot: compaction is every 50)
        try await c.waitConverged()
        for (id, sm) in c.machines { #expect(sm.map.count == 150, "node \(id)") }
    }

    @Test func linearizableReadSeesAcknowledgedWrite() async throws {
        let c = try Cluster(Self.three)
        defer { c.stopAll() }
        let l = try await c.leader()
        try await c.put("x", "42", via: l)
        let v = try await l.read(Array("x".utf8))
        #expect(KeyValueStateMachine.decodeResult(v) == Array("42".utf8))
    }

    @Test func witnessPersistsButNeverLeadsOrApplies() async throws {
        let c = try Cluster([Member(id: 1, role: .voter, priority: 2), Member(id: 2, role: .voter), Member(id: 3, role: .witness, priority: 0)])
        defer { c.stopAll() }
        let l = try await c.leader()
        try await c.put("a", "1", via: l)
        #expect(c.nodes[3]!.status.role != .leader)
        #expect(c.machines[3]!.map.isEmpty)
        try await Task.sleep(for: .milliseconds(50))
        #expect(c.nodes[3]!.status.lastIndex >= l.status.commitIndex - 1)
        // With the primary gone, the backup leads; the witness still does not.
        c.crash(l.options.replica.id)
        let next = try await c.leader(excluding: [l.options.replica.id])
        #expect(next.options.replica.id != 3)
        try await c.put("b", "2", via: next)
    }
}
