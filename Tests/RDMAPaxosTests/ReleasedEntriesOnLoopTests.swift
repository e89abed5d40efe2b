import Testing
@testable import RDMAPaxos
import RDMAPaxosSimulation

/// A node frees a compacted prefix on its loop a slice per pass, not all at once and not
/// elsewhere (docs/design/runtime.md, "Memory freed where the loop can wait for it").
@Suite struct ReleasedEntriesOnLoopTests {
    @Test func aCompactedPrefixIsFreedASlicePerPass() throws {
        let members = Membership([Member(id: 1, role: .voter, priority: 1, peerAddress: "10.0.0.1:7000", clientAddress: "10.0.0.1:7001")])
        let disk = SimulatedStorage(delayTicksMax: 0, seed: 1)
        let p = SimulatedProcess(options: NodeOptions(replica: ReplicaConfig(id: 1), bootstrap: members, seed: 1),
                                 machine: DiscardingStateMachine(), storage: disk, checksDurability: false) { $0.compactEveryEntries = 1 << 30 }
        try p.node.start()
        func settle() {
            repeat {
                disk.completeAll()
                while p.offLoop.runOne() {}
                #expect(p.run())
            } while !disk.pending.isEmpty || !p.offLoop.queued.isEmpty
        }
        for _ in 0..<1000 where p.node.core.role != .leader {
            p.ticks.fire()
            settle()
        }
        try #require(p.node.core.role == .leader)
        let count = 10_000
        try p.node.performOnCore { try $0.propose((0..<count).map { [UInt8(truncatingIfNeeded: $0)] }).1 }
        settle()
        let applied = p.node.core.appliedIndex
        try #require(applied >= LogIndex(count))
        #expect(p.node.releasedEntriesHeld == 0)
        // The whole old storage is handed back; this call's pass frees one slice of it.
        let before = Int(p.node.core.lastIndex - p.node.core.firstIndex) + 1
        p.node.performOnCore { $0.compact(through: applied, snapshot: []) }
        let slice = ReplicaNode.releasedEntriesPerPass
        #expect(p.node.releasedEntriesHeld == before - slice)
        // Each pass of the loop frees the next slice, until nothing is held.
        p.ticks.fire()
        #expect(p.node.step())
        #expect(p.node.releasedEntriesHeld == max(0, before - 2 * slice))
        for _ in 0..<10 where p.node.releasedEntriesHeld > 0 {
            p.ticks.fire()
            _ = p.node.step()
        }
        #expect(p.node.releasedEntriesHeld == 0)
    }
}
