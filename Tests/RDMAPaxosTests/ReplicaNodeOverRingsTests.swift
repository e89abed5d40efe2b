import Foundation
import Synchronization
import Testing
@testable import RDMAPaxos

/// The runtime over the production transport: message rings written with one-sided writes, on
/// every fabric kind — the in-memory and TCP fabrics, and `VerbsFabric` over the software RDMA
/// device (and over a real device where there is one). Leader loss, a deposed leader's fencing,
/// and broken queue pairs: the cluster goes on committing, and nothing fenced is ever applied.
@Suite(.serialized, .timeLimit(.minutes(1))) struct ReplicaNodeOverRingsTests {
    @Test(arguments: FabricKind.allCases)
    func replicatesAndSurvivesLeaderLoss(kind: FabricKind) async throws {
        let c = try await RingNodeCluster.start(kind)
        defer { c.stopAll() }
        let first = try await c.leader()
        for i in 0..<40 { try await c.put("a\(i)", via: first) }
        let old = first.options.replica.id
        c.stop(old)
        let second = try await c.leader(excluding: old)
        for i in 0..<40 { try await c.put("b\(i)", via: second) }
        try await c.waitConverged()
        for (id, sm) in c.machines where c.nodes[id] != nil { #expect(sm.map.count == 80, "node \(id)") }
        #expect(c.transports[second.options.replica.id]!.statistics.delivered > 0)
    }

    /// A leader stalls (no ticks, its rings unread — a long pause), the others elect a new leader
    /// and fence it. A write it still had a queue pair for fails and lands nowhere; a proposal made
    /// to it never commits; when it wakes it steps down and catches up through new queue pairs.
    @Test(arguments: FabricKind.allCases)
    func deposedLeaderIsFencedAndItsLateWritesNeverApply(kind: FabricKind) async throws {
        let c = try await RingNodeCluster.start(kind)
        defer { c.stopAll() }
        let old = try await c.leader()
        let oldID = old.options.replica.id
        for i in 0..<10 { try await c.put("a\(i)", via: old) }
        let followerID = c.ids.first { $0 != oldID }!
        let followerRegion = c.transports[followerID]!.region
        let spare = try await c.fabrics[oldID]!.connect(to: c.transports[followerID]!.listeningAddress,
                                                        exporting: c.transports[oldID]!.region)

        c.ticks[oldID]!.pause(true)
        c.transports[oldID]!.pauseReceiving(true)
        let connectsBefore = c.transports[oldID]!.statistics.connects
        let new = try await c.leader(excluding: oldID)
        // A node fences the deposed leader as it learns of the new one, before it publishes that.
        #expect(await eventually { c.nodes[followerID]!.status.leader == new.options.replica.id })

        // The header cell at offset 0 is written by its owner only: a late write there must not land.
        let header = followerRegion.read(offset: 0, count: 64)
        do {
            try spare.postWrite([UInt8](repeating: 0xEE, count: 64), remoteOffset: 0, workRequestID: 4242)
        } catch {
            #expect(error == .queuePairInError(peer: followerID))  // the fence already broke it
        }
        #expect(await eventually { !spare.isUsable })
        #expect(followerRegion.read(offset: 0, count: 64) == header)

        let late = Task { try await c.put("late", via: old) }
        try await Task.sleep(for: .milliseconds(100))
        c.ticks[oldID]!.pause(false)
        c.transports[oldID]!.pauseReceiving(false)
        if case .success = await late.result { Issue.record("a proposal to the deposed leader committed") }

        for i in 0..<10 { try await c.put("b\(i)", via: new) }
        try await c.waitConverged()
        for (id, sm) in c.machines {
            #expect(sm.map[Array("late".utf8)] == nil, "node \(id) applied the deposed leader's write")
            #expect(sm.map.count == 20, "node \(id)")
        }
        #expect(c.transports[oldID]!.statistics.connects > connectsBefore, "its fenced queue pairs were not replaced")
    }

    /// Every queue pair writing into one follower breaks at once (its region gets a new key, so
    /// their writes fail with remote access errors): the writers reconnect, learn the new key, and
    /// the follower catches up.
    @Test(arguments: FabricKind.allCases)
    func brokenQueuePairsAreReconnectedAndReplicationGoesOn(kind: FabricKind) async throws {
        let c = try await RingNodeCluster.start(kind)
        defer { c.stopAll() }
        let leader = try await c.leader()
        let leaderID = leader.options.replica.id
        for i in 0..<10 { try await c.put("a\(i)", via: leader) }
        let followerID = c.ids.first { $0 != leaderID }!
        let connectsBefore = c.transports[leaderID]!.statistics.connects
        try c.fabrics[followerID]!.rotateKey(of: c.transports[followerID]!.region)
        for i in 0..<30 { try await c.put("b\(i)", via: leader) }
        try await c.waitConverged()
        for (id, sm) in c.machines { #expect(sm.map.count == 40, "node \(id)") }
        #expect(c.transports[leaderID]!.statistics.connects > connectsBefore)
    }
}

/// Ticks a test can hold back: a stalled node sends no heartbeats and times nothing out.
final class PausableTicks: TickSource, Sendable {
    private let timer = TimerTickSource(interval: .milliseconds(5))
    private let paused = Mutex(false)

    func start(_ onTick: @escaping @Sendable () -> Void) {
        timer.start { [weak self] in if self?.paused.withLock({ $0 }) == false { onTick() } }
    }

    func stop() { timer.stop() }
    func pause(_ p: Bool) { paused.withLock { $0 = p } }
}

/// Three voters over `RingTransport` on one fabric kind, with memory logs and real timers.
final class RingNodeCluster: @unchecked Sendable {
    // @unchecked Sendable: mutated only from the test's own task.
    let ids: [NodeID] = [1, 2, 3]
    let world: FabricWorld
    var fabrics: [NodeID: any Fabric] = [:]
    var transports: [NodeID: RingTransport] = [:]
    var nodes: [NodeID: ReplicaNode] = [:]
    var machines: [NodeID: KeyValueStateMachine] = [:]
    var ticks: [NodeID: PausableTicks] = [:]

    private init(_ kind: FabricKind) { world = FabricWorld(kind) }

    static func start(_ kind: FabricKind) async throws -> RingNodeCluster {
        let c = RingNodeCluster(kind)
        let membership = Membership(c.ids.map { Member(id: $0, role: .voter) })
        for n in c.ids {
            let config = RingTransport.Configuration(listenAddress: c.world.listenAddress(n), cluster: c.ids,
                                                     pollInterval: .milliseconds(1), reconnectDelayMin: .milliseconds(5),
                                                     reconnectDelayMax: .milliseconds(100))
            let fabric = try c.world.fabric(n)
            c.fabrics[n] = fabric
            c.transports[n] = try await RingTransport.open(fabric: fabric, configuration: config)
        }
        for (n, t) in c.transports { for (m, other) in c.transports where m != n { t.setAddress(other.listeningAddress) } }
        for n in c.ids {
            var cfg = ReplicaConfig(id: n)
            cfg.electionTimeoutTicks = 10
            cfg.heartbeatTicks = 2
            let sm = KeyValueStateMachine()
            let ticks = PausableTicks()
            let node = ReplicaNode(options: NodeOptions(replica: cfg, bootstrap: membership, seed: UInt64(n)), stateMachine: sm,
                                   log: try MemoryLog(), snapshots: MemorySnapshotStore(), transport: c.transports[n]!, ticks: ticks)
            try node.start()
            c.nodes[n] = node
            c.machines[n] = sm
            c.ticks[n] = ticks
        }
        return c
    }

    func leader(excluding: NodeID? = nil) async throws -> ReplicaNode {
        for _ in 0..<500 {
            if let l = nodes.values.first(where: { $0.status.role == .leader && $0.options.replica.id != excluding }) { return l }
            try await Task.sleep(for: .milliseconds(10))
        }
        throw NodeError.notLeader(leader: nil)
    }

    func put(_ key: String, via node: ReplicaNode) async throws {
        _ = try await node.propose(KeyValueStateMachine.Command.put(key: Array(key.utf8), value: [1]).encoded())
    }

    /// Waits until every running node applied everything its leader committed.
    func waitConverged() async throws {
        for _ in 0..<500 {
            if let l = nodes.values.first(where: { $0.status.role == .leader })?.status, l.commitIndex == l.lastIndex,
               nodes.values.allSatisfy({ $0.status.appliedIndex == l.commitIndex }) { return }
            try await Task.sleep(for: .milliseconds(10))
        }
        Issue.record("replicas did not converge: \(nodes.values.map { "\($0.status.id):\($0.status.appliedIndex)" })")
    }

    func stop(_ id: NodeID) {
        nodes[id]?.stop()
        nodes[id] = nil
        machines[id] = nil
    }

    func stopAll() { nodes.values.forEach { $0.stop() } }
}
