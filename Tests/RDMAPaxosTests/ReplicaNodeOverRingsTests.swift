import Foundation
import Testing
@testable import RDMAPaxos

/// The runtime over the production transport: message rings written with one-sided writes,
/// on the in-memory and the TCP fabric. Leader loss fences the deposed leader and the cluster
/// goes on committing.
@Suite(.serialized, .timeLimit(.minutes(1))) struct ReplicaNodeOverRingsTests {
    @Test(arguments: FabricKind.allCases)
    func replicatesAndSurvivesLeaderLoss(kind: FabricKind) async throws {
        let world = FabricWorld(kind)
        let ids: [NodeID] = [1, 2, 3]
        let membership = Membership(ids.map { Member(id: $0, role: .voter) })
        var transports: [NodeID: RingTransport] = [:]
        for n in ids {
            let config = RingTransport.Configuration(listenAddress: world.listenAddress(n), cluster: ids,
                                                     pollInterval: .milliseconds(1), reconnectDelayMin: .milliseconds(5),
                                                     reconnectDelayMax: .milliseconds(100))
            transports[n] = try await RingTransport.open(fabric: try world.fabric(n), configuration: config)
        }
        for (n, t) in transports { for (m, other) in transports where m != n { t.setAddress(other.listeningAddress) } }
        var nodes: [NodeID: ReplicaNode] = [:]
        var machines: [NodeID: KeyValueStateMachine] = [:]
        for n in ids {
            var cfg = ReplicaConfig(id: n)
            cfg.electionTimeoutTicks = 10
            cfg.heartbeatTicks = 2
            let sm = KeyValueStateMachine()
            let node = ReplicaNode(options: NodeOptions(replica: cfg, bootstrap: membership, seed: UInt64(n)), stateMachine: sm,
                                   log: try MemoryLog(), snapshots: MemorySnapshotStore(), transport: transports[n]!,
                                   ticks: TimerTickSource(interval: .milliseconds(5)))
            try node.start()
            nodes[n] = node
            machines[n] = sm
        }
        defer { nodes.values.forEach { $0.stop() } }

        func leader(excluding: NodeID? = nil) async throws -> ReplicaNode {
            for _ in 0..<500 {
                if let l = nodes.values.first(where: { $0.status.role == .leader && $0.options.replica.id != excluding }) { return l }
                try await Task.sleep(for: .milliseconds(10))
            }
            throw NodeError.notLeader(leader: nil)
        }
        func put(_ k: String, via n: ReplicaNode) async throws {
            _ = try await n.propose(KeyValueStateMachine.Command.put(key: Array(k.utf8), value: [1]).encoded())
        }

        let first = try await leader()
        for i in 0..<40 { try await put("a\(i)", via: first) }
        let old = first.options.replica.id
        first.stop()
        nodes[old] = nil
        let second = try await leader(excluding: old)
        for i in 0..<40 { try await put("b\(i)", via: second) }
        for _ in 0..<300 {
            if nodes.values.allSatisfy({ $0.status.appliedIndex == second.status.commitIndex }) { break }
            try await Task.sleep(for: .milliseconds(10))
        }
        for (id, sm) in machines where nodes[id] != nil { #expect(sm.map.count == 80, "node \(id)") }
        #expect(transports[second.options.replica.id]!.statistics.delivered > 0)
    }
}
