import Testing
@testable import RDMAPaxos
import RDMAPaxosSimulation

/// Three replicas (primary 1, backup 2, witness 3), real `ReplicaNode`s stepped by the test over
/// simulated disks that complete at once, on an in-test network that carries every message
/// through the wire codec and, as `RingTransport` does, drops what one record of a default ring
/// (1 MiB) cannot carry. The core's actions are carried out by the nodes' own executor.
struct WireCluster {
    var processes: [NodeID: SimulatedProcess<DiscardingStateMachine>] = [:]
    var disks: [NodeID: SimulatedStorage] = [:]
    var queue: [Message] = []
    /// Nodes that receive nothing (cut off, or down).
    var unreachable: Set<NodeID> = []
    var down: Set<NodeID> = []
    let payloadBytesMax: Int
    var oversized = 0
    var largest = 0
    /// Promises that carried part of a witness's log.
    var handOvers = 0

    /// Each node's consensus core.
    var replicas: [NodeID: Replica] { processes.mapValues { $0.node.core } }

    init(members: Membership) throws {
        payloadBytesMax = try RingLayout(owner: 1, cluster: members.members.map(\.id), ringBytes: 1 << 20).payloadBytesMax
        for m in members.members {
            let options = NodeOptions(replica: ReplicaConfig(id: m.id), bootstrap: members, seed: UInt64(m.id))
            let disk = SimulatedStorage(delayTicksMax: 0, seed: UInt64(m.id))
            let p = SimulatedProcess(options: options, machine: DiscardingStateMachine(), storage: disk, checksDurability: false)
            try p.node.start()
            processes[m.id] = p
            disks[m.id] = disk
        }
    }

    mutating func enqueue(_ m: Message) throws {
        let bytes = WireCodec.encode(m)
        largest = max(largest, bytes.count)
        guard bytes.count <= payloadBytesMax else {
            oversized += 1
            return
        }
        let decoded = try WireCodec.decode(bytes)
        if case let .promise(_, _, suffix, _) = decoded.body, !suffix.isEmpty { handOvers += 1 }
        queue.append(decoded)
    }

    /// Runs node `id` until it is idle with its disk caught up, queueing what it sends.
    mutating func settle(_ id: NodeID) throws {
        let p = processes[id]!, disk = disks[id]!
        repeat {
            disk.completeAll()
            while p.offLoop.runOne() {}
            #expect(p.run(), "node \(id)'s loop never went idle")
            let sent = p.transport.outbox
            p.transport.outbox = []
            for m in sent { try enqueue(m) }
        } while !disk.pending.isEmpty || !p.offLoop.queued.isEmpty
    }

    mutating func call(_ id: NodeID, _ body: (inout Replica) throws -> Actions) throws {
        guard !down.contains(id) else { return }
        try processes[id]!.node.performOnCore(body)
        try settle(id)
    }

    /// Delivers until nothing is left.
    mutating func deliverAll() throws {
        while !queue.isEmpty {
            let m = queue.removeFirst()
            if unreachable.contains(m.to) || down.contains(m.to) { continue }
            processes[m.to]!.transport.onReceive?(m)
            try settle(m.to)
        }
    }

    mutating func tickAll(_ n: Int) throws {
        for _ in 0..<n {
            for id in processes.keys.sorted() where !down.contains(id) {
                processes[id]!.ticks.fire()
                try settle(id)
            }
            try deliverAll()
        }
    }
}

/// A state machine that keeps nothing: the test looks at the replicas' logs.
final class DiscardingStateMachine: StateMachine {
    func apply(_ command: [UInt8], index: LogIndex) -> [UInt8] { [] }
    func query(_ query: [UInt8]) -> [UInt8] { [] }
    func snapshot() -> [UInt8] { [] }
    func restore(_ snapshot: [UInt8], index: LogIndex) throws {}
}

@Suite struct WitnessHandOverTests {
    /// The backup misses 10 MiB of entries that reach the witness; the primary dies. The witness's
    /// hand-over is far larger than one ring record, yet the backup must become leader holding
    /// every entry (docs/design/consensus.md, "Witness hand-over").
    @Test func backupTenMegabytesBehindIsElectedWithEveryEntry() throws {
        let members = Membership([Member(id: 1, role: .voter, priority: 2), Member(id: 2, role: .voter, priority: 1),
                                  Member(id: 3, role: .witness, priority: 0)])
        var c = try WireCluster(members: members)
        try c.call(1) { $0.campaign() }
        try c.deliverAll()
        #expect(c.replicas[1]!.role == .leader)

        c.unreachable = [2]
        let count = 2_560
        for i in 0..<count {
            var command = [UInt8](repeating: UInt8(truncatingIfNeeded: i), count: 4096)
            command[0] = UInt8(i >> 8)
            try c.call(1) { try $0.propose([command]).actions }
        }
        try c.deliverAll()
        try c.tickAll(3)
        let last = c.replicas[1]!.lastIndex
        #expect(c.replicas[1]!.commitIndex == last && c.replicas[3]!.lastIndex == last, "the witness holds and commits everything")
        #expect(c.replicas[2]!.lastIndex == 1, "the backup missed it all")

        c.down = [1]
        c.unreachable = []
        try c.tickAll(200)
        let backup = c.replicas[2]!
        #expect(backup.role == .leader)
        #expect(c.oversized == 0, "\(c.oversized) messages larger than a ring record (\(c.payloadBytesMax) bytes); largest \(c.largest)")
        // 10 MiB in pieces of at most batchBytesMax (256 KiB, 63 entries of 4 KiB and framing).
        #expect(c.handOvers == (count + 62) / 63, "\(c.handOvers) promises carried the hand-over")
        #expect(c.largest <= ReplicaConfig(id: 1).batchBytesMax + 64)
        #expect(backup.lastIndex > last && backup.commitIndex == backup.lastIndex)
        for i in 0..<count {
            let e = backup.entry(at: LogIndex(i + 2))
            #expect(e?.kind == .command && e?.payload.count == 4096 && e?.payload[0] == UInt8(i >> 8) && e?.payload[1] == UInt8(truncatingIfNeeded: i))
            if e?.payload.count != 4096 { break }
        }
    }
}
