import Counter
import Foundation
import RDMAPaxos
import Testing

/// Three counter replicas in one process: `ReplicaNode`s over `MemoryFabric` (one-sided writes
/// into message rings, in memory) and `MemoryLog`s, with real timers. The same node code as a
/// replica process, without sockets or disks.
@Suite(.timeLimit(.minutes(1))) struct MemoryClusterTests {
    final class Cluster: @unchecked Sendable {
        // @unchecked Sendable: mutated only from the test's own task.
        let ids: [NodeID] = [1, 2, 3]
        let network = MemoryNetwork()
        var nodes: [NodeID: ReplicaNode] = [:]
        var counters: [NodeID: CounterStateMachine] = [:]

        init() async throws {
            let membership = Membership(ids.map { Member(id: $0, role: .voter) })
            var transports: [NodeID: RingTransport] = [:]
            for id in ids {
                let fabric = MemoryFabric(node: id, network: network)
                let config = RingTransport.Configuration(listenAddress: PeerAddress(node: id), cluster: ids,
                                                         pollInterval: .milliseconds(1))
                transports[id] = try await RingTransport.open(fabric: fabric, configuration: config)
            }
            // Each transport learns where the others listen (a config file's `[[members]]`).
            for (id, t) in transports { for (other, o) in transports where other != id { t.setAddress(o.listeningAddress) } }
            for id in ids {
                var replica = ReplicaConfig(id: id)
                replica.electionTimeoutTicks = 10
                replica.heartbeatTicks = 2
                let counter = CounterStateMachine()
                let node = ReplicaNode(options: NodeOptions(replica: replica, bootstrap: membership, seed: UInt64(id)),
                                       stateMachine: counter, log: try MemoryLog(), snapshots: MemorySnapshotStore(),
                                       transport: transports[id]!, ticks: TimerTickSource(interval: .milliseconds(5)))
                try node.start()
                nodes[id] = node
                counters[id] = counter
            }
        }

        func leader(excluding: NodeID? = nil) async throws -> ReplicaNode {
            for _ in 0..<500 {
                if let l = nodes.values.first(where: { $0.status.role == .leader && $0.status.id != excluding }) { return l }
                try await Task.sleep(for: .milliseconds(10))
            }
            throw CounterError("no leader elected within 5 s")
        }

        func stop(_ id: NodeID) {
            nodes[id]?.stop()
            nodes[id] = nil
        }

        func stopAll() { nodes.values.forEach { $0.stop() } }
    }

    @Test func everyReplicaCountsTheSameAndALinearizableReadSeesEveryAdd() async throws {
        let c = try await Cluster()
        defer { c.stopAll() }
        let leader = try await c.leader()
        var answers: [Int64] = []
        for n in 1...20 {
            answers.append(CounterCommand.decodeTotal(try await leader.propose(CounterCommand.add(Int64(n)).encoded()))!)
        }
        #expect(answers.last == 210)
        #expect(answers == answers.sorted(), "each add answers the total after it")
        // A linearizable read: the leader confirms it still leads before answering.
        #expect(CounterCommand.decodeTotal(try await leader.read([])) == 210)
        for _ in 0..<500 where c.counters.values.contains(where: { $0.total != 210 }) { try await Task.sleep(for: .milliseconds(10)) }
        for (id, counter) in c.counters { #expect(counter.total == 210, "replica \(id)") }
    }

    @Test func theCountSurvivesTheLeadersLoss() async throws {
        let c = try await Cluster()
        defer { c.stopAll() }
        let first = try await c.leader()
        for _ in 0..<10 { _ = try await first.propose(CounterCommand.add(1).encoded()) }
        let old = first.status.id
        c.stop(old)
        let second = try await c.leader(excluding: old)
        for _ in 0..<10 { _ = try await second.propose(CounterCommand.add(1).encoded()) }
        #expect(CounterCommand.decodeTotal(try await second.read([])) == 20)
    }
}
