import RDMAPaxosCore
import RDMAPaxosSimulation

/// A hand-driven cluster for scenario scripts: messages wait in a queue until a command
/// delivers or drops them, and disks complete only when told (`stabilize` does both).
struct ScenarioCluster {
    struct Node {
        var replica: Replica?
        var disk = SimulatedDisk()
        var pending: [(Persist, [Message])] = []
        var applied: [String] = []
        var reads: [ReadState] = []
    }

    var nodes: [NodeID: Node] = [:]
    var bootstrap = Membership.empty
    var queue: [Message] = []
    var cut: Set<[NodeID]> = []
    /// Nodes whose disks complete nothing until unstalled.
    var stalled: Set<NodeID> = []
    var output: [String] = []
    var seed: UInt64 = 1
    var snapshotChunkBytes: Int?
    var batchBytesMax: Int?
    var inflightBytesMax: Int?
    var preVote = true
    var checkQuorum = true

    var ids: [NodeID] { nodes.keys.sorted() }

    func config(_ id: NodeID) -> ReplicaConfig {
        var c = ReplicaConfig(id: id)
        c.electionTimeoutTicks = 10
        c.heartbeatTicks = 1
        c.diskStallTicks = 5
        if let n = snapshotChunkBytes { c.snapshotChunkBytes = n }
        if let n = batchBytesMax { c.batchBytesMax = n }
        if let n = inflightBytesMax { c.inflightBytesMax = n }
        c.preVote = preVote
        c.checkQuorum = checkQuorum
        return c
    }

    /// Voters `1...voters`, node 1 elected by ticking it with every message delivered (nil if
    /// it was not within 40 ticks).
    static func elected(voters: Int = 3, configure: (inout ScenarioCluster) -> Void = { _ in }) -> ScenarioCluster? {
        var c = ScenarioCluster()
        configure(&c)
        c.addNodes((1...voters).map { Member(id: NodeID($0), role: .voter) })
        for _ in 0..<40 where c.nodes[1]!.replica!.role != .leader {
            c.with(1) { $0.tick() }
            c.stabilize()
        }
        return c.nodes[1]!.replica!.role == .leader ? c : nil
    }

    mutating func addNodes(_ members: [Member]) {
        bootstrap = Membership(bootstrap.members + members)
        for m in members {
            nodes[m.id] = Node()
            nodes[m.id]!.replica = Replica(config: config(m.id), bootstrap: bootstrap, seed: seed)
        }
    }

    mutating func emit(_ s: String) { output.append(s) }

    /// Carries out one call's actions: persists wait in the node's disk queue with their acks.
    mutating func handle(_ id: NodeID, _ a: Actions) {
        for e in a.events { emit("\(id): \(e)") }
        if let p = a.persist { nodes[id]!.pending.append((p, a.sendAfterPersist)) }
        queue.append(contentsOf: a.send)
        if let s = a.restore { emit("\(id): restore snapshot \(s.index)") }
        for e in a.apply where e.kind == .command {
            let text = String(decoding: e.payload, as: UTF8.self)
            nodes[id]!.applied.append(text)
            emit("\(id): apply \(e.index) \(text)")
        }
        for r in a.reads { emit("\(id): read \(r.id) ready at \(r.index)") }
    }

    mutating func with(_ id: NodeID, _ body: (inout Replica) throws -> Actions) rethrows {
        guard var r = nodes[id]?.replica else {
            emit("\(id) is down")
            return
        }
        let a = try body(&r)
        nodes[id]!.replica = r
        handle(id, a)
    }

    /// Makes every pending persist durable and releases the acks waiting on it.
    mutating func persistAll(_ id: NodeID) {
        while !stalled.contains(id), let (p, acks) = nodes[id]?.pending.first, nodes[id]?.replica != nil {
            nodes[id]!.pending.removeFirst()
            nodes[id]!.disk.apply(p)
            queue.append(contentsOf: acks)
            with(id) { $0.persisted(p.sequence) }
        }
    }

    /// Delivers queued messages (optionally only those between two nodes) one round; returns count.
    @discardableResult
    mutating func deliver(from: NodeID? = nil, to: NodeID? = nil) -> Int {
        let batch = queue
        queue = []
        var n = 0
        for m in batch {
            if let f = from, m.from != f { queue.append(m); continue }
            if let t = to, m.to != t { queue.append(m); continue }
            if cut.contains([m.from, m.to]) { emit("dropped \(m)"); continue }
            guard nodes[m.to]?.replica != nil else { emit("dropped (down) \(m)"); continue }
            emit(m.description)
            n += 1
            with(m.to) { $0.receive(m) }
        }
        return n
    }

    mutating func stabilize() {
        for _ in 0..<1000 {
            for id in ids { persistAll(id) }
            if queue.isEmpty && ids.allSatisfy({ nodes[$0]!.pending.isEmpty || nodes[$0]!.replica == nil || stalled.contains($0) }) { return }
            deliver()
        }
        emit("did not stabilize in 1000 rounds")
    }

    mutating func crash(_ id: NodeID) {
        nodes[id]!.replica = nil
        nodes[id]!.pending = []
        queue.removeAll { $0.from == id }
    }

    /// Restarts from what the node's disk holds. `amnesia`: the disk lost everything first (memory
    /// mode). `intact`: what the replica is told about its state (by default, whether nothing was
    /// lost; telling a replica that lost its state otherwise is the behaviour before recovery).
    mutating func restart(_ id: NodeID, amnesia: Bool = false, intact: Bool? = nil) {
        var n = nodes[id]!
        if amnesia { n.disk = SimulatedDisk() }
        var restored = n.disk.restored
        restored.intact = intact ?? !amnesia
        n.replica = Replica(config: config(id), restoring: restored, bootstrap: bootstrap, seed: seed + 1)
        n.applied = []
        nodes[id] = n
    }

    func status(_ id: NodeID) -> String {
        guard let r = nodes[id]!.replica else { return "\(id): down" }
        let role = r.isRecovering ? "recovering" : r.isWitness && r.role == .follower ? "witness" : r.role.rawValue
        return "\(id): \(role) ballot=\(r.promised) leader=\(r.leader.map(String.init) ?? "-") log=\(r.firstIndex)..\(r.lastIndex)"
            + " commit=\(r.commitIndex) applied=\(r.appliedIndex)"
    }
}
