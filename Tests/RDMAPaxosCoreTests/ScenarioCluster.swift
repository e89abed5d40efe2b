import RDMAPaxos
import RDMAPaxosCore
import RDMAPaxosSimulation

/// A hand-driven cluster for scenario scripts: messages wait in a queue until a command
/// delivers or drops them, and disks complete only when told (`stabilize` does both). Each
/// replica is a real `ReplicaNode`, stepped on the test's thread over a simulated disk, as the
/// simulator runs them: the core's actions are carried out by the runtime's own executor, also
/// for the core calls a test makes by hand (`with`).
struct ScenarioCluster {
    struct Node {
        var process: SimulatedProcess<ScenarioMachine>?
        let storage: SimulatedStorage
        /// The running replica's core (read-only; change it through `with`).
        var replica: Replica? { process?.node.core }
        /// The commands its state machine holds, in order.
        var applied: [String] { process?.machine.applied ?? [] }
    }

    var nodes: [NodeID: Node] = [:]
    var bootstrap = Membership.empty
    var queue: [Message] = []
    var cut: Set<[NodeID]> = []
    /// Nodes whose disks complete nothing until unstalled.
    var stalled: Set<NodeID> = []
    /// What the replicas and the commands printed, in order (the nodes print as they run).
    let transcript = Transcript()
    var output: [String] {
        get { transcript.lines }
        nonmutating set { transcript.lines = newValue }
    }
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
        for m in members { start(m.id, bootstrap: bootstrap, seed: seed) }
    }

    /// Starts node `id`'s replica over its disk (a new, empty one the first time).
    mutating func start(_ id: NodeID, bootstrap: Membership, seed: UInt64, intact: Bool = true) {
        let storage = nodes[id]?.storage ?? SimulatedStorage(delayTicksMax: 0, seed: seed)
        var o = NodeOptions(replica: config(id), bootstrap: bootstrap, seed: seed)
        o.stateIntact = intact
        let t = transcript
        let machine = ScenarioMachine(id: id, transcript: t)
        let p = SimulatedProcess(options: o, machine: machine, storage: storage, checksDurability: false) { o in
            o.onEvent = { t.lines.append("\(id): \($0)") }
            o.onReadsReady = { for r in $0 { t.lines.append("\(id): read \(r.id) ready at \(r.index)") } }
        }
        do {
            try p.node.start()
        } catch {
            preconditionFailure("node \(id) does not start from its disk: \(error)")
        }
        machine.running = true
        nodes[id] = Node(process: p, storage: storage)
    }

    mutating func emit(_ s: String) { transcript.lines.append(s) }

    /// Makes one call into node `id`'s core, carried out by the node (`performOnCore`), then
    /// runs the node until it is idle.
    mutating func with(_ id: NodeID, _ body: (inout Replica) throws -> Actions) rethrows {
        guard let p = nodes[id]?.process else {
            emit("\(id) is down")
            return
        }
        try p.node.performOnCore(body)
        run(id)
    }

    /// One tick of node `id`'s clock, through the node's own tick handling.
    mutating func tick(_ id: NodeID) {
        guard let p = nodes[id]?.process else {
            emit("\(id) is down")
            return
        }
        p.ticks.fire()
        run(id)
    }

    /// Runs node `id` until it has nothing queued, and queues what it sent.
    mutating func run(_ id: NodeID) {
        guard let p = nodes[id]?.process else { return }
        precondition(p.run(), "node \(id)'s loop never went idle")
        queue.append(contentsOf: p.transport.outbox)
        p.transport.outbox = []
    }

    /// Whether node `id` has writes or snapshot saves in flight.
    func hasPending(_ id: NodeID) -> Bool {
        guard let n = nodes[id], let p = n.process else { return false }
        return !n.storage.pending.isEmpty || !p.offLoop.queued.isEmpty
    }

    /// Makes every pending write durable (and runs the snapshot saves), then lets the node act on
    /// it (releasing the acks waiting on it), until nothing is pending.
    mutating func persistAll(_ id: NodeID) {
        while !stalled.contains(id), hasPending(id), let p = nodes[id]?.process {
            nodes[id]!.storage.completeAll()
            while p.offLoop.runOne() {}
            run(id)
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
            guard let p = nodes[m.to]?.process else { emit("dropped (down) \(m)"); continue }
            emit(m.description)
            n += 1
            p.transport.onReceive?(m)
            run(m.to)
        }
        return n
    }

    mutating func stabilize() {
        for _ in 0..<1000 {
            for id in ids { persistAll(id) }
            if queue.isEmpty && ids.allSatisfy({ !hasPending($0) || stalled.contains($0) }) { return }
            deliver()
        }
        emit("did not stabilize in 1000 rounds")
    }

    mutating func crash(_ id: NodeID) {
        nodes[id]!.process = nil
        nodes[id]!.storage.pending = []
        queue.removeAll { $0.from == id }
    }

    /// Restarts from what the node's disk holds. `amnesia`: the disk lost everything first (memory
    /// mode). `intact`: what the replica is told about its state (by default, whether nothing was
    /// lost; telling a replica that lost its state otherwise is the behaviour before recovery).
    mutating func restart(_ id: NodeID, amnesia: Bool = false, intact: Bool? = nil) {
        if amnesia { nodes[id]!.storage.durable = SimulatedStorage.Durable() }
        start(id, bootstrap: bootstrap, seed: seed + 1, intact: intact ?? !amnesia)
    }

    func status(_ id: NodeID) -> String {
        guard let r = nodes[id]!.replica else { return "\(id): down" }
        let role = r.isRecovering ? "recovering" : r.isWitness && r.role == .follower ? "witness" : r.role.rawValue
        return "\(id): \(role) ballot=\(r.promised) leader=\(r.leader.map(String.init) ?? "-") log=\(r.firstIndex)..\(r.lastIndex)"
            + " commit=\(r.commitIndex) applied=\(r.appliedIndex)"
    }
}

/// What a scenario cluster printed, in order: a class, since the nodes print as they run.
final class Transcript: @unchecked Sendable {
    // @unchecked Sendable: the scenario's nodes run on the test's thread only.
    var lines: [String] = []
}

/// The scripts' state machine: the commands applied, as text, printed as they are applied; its
/// snapshot is them joined by commas.
final class ScenarioMachine: StateMachine, @unchecked Sendable {
    // @unchecked Sendable: the scenario's nodes run on the test's thread only.
    let id: NodeID
    let transcript: Transcript
    var applied: [String] = []
    /// Set once the node started: the restore of its own snapshot at start is not printed.
    var running = false

    init(id: NodeID, transcript: Transcript) {
        self.id = id
        self.transcript = transcript
    }

    func apply(_ command: [UInt8], index: LogIndex) -> [UInt8] {
        let text = String(decoding: command, as: UTF8.self)
        applied.append(text)
        transcript.lines.append("\(id): apply \(index) \(text)")
        return []
    }

    func query(_ query: [UInt8]) -> [UInt8] { [] }

    func snapshot() -> [UInt8] { Array(applied.joined(separator: ",").utf8) }

    func restore(_ snapshot: [UInt8], index: LogIndex) throws {
        if running { transcript.lines.append("\(id): restore snapshot \(index)") }
        applied = snapshot.isEmpty ? [] : String(decoding: snapshot, as: UTF8.self).split(separator: ",").map(String.init)
    }
}
