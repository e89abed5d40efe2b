import Testing
@testable import RDMAPaxosCore

/// Compaction hands the dropped prefix to the caller (`Actions.released`) instead of freeing it
/// entry by entry in the core, and reads the configuration at the compaction point without a
/// scan of the prefix.
@Suite struct CompactionReleaseTests {
    static func member(_ id: NodeID, _ role: MemberRole = .voter) -> Member {
        Member(id: id, role: role, priority: role == .voter ? 1 : 0, peerAddress: "10.0.0.\(id):7000", clientAddress: "10.0.0.\(id):7001")
    }

    /// Carries out `a` the way a runtime would with a disk that completes at once.
    static func settle(_ r: inout Replica, _ a: Actions) {
        var next = a
        while let p = next.persist { next = r.persisted(p.sequence) }
    }

    /// A single-voter replica that leads and has committed `count` commands.
    static func leaderWith(_ count: Int, members: [Member] = [member(1)]) throws -> Replica {
        var r = Replica(config: ReplicaConfig(id: 1), bootstrap: Membership(members), seed: 1)
        for _ in 0..<1000 where r.role != .leader { settle(&r, r.tick()) }
        try #require(r.role == .leader)
        let (_, a) = try r.propose((0..<count).map { [UInt8(truncatingIfNeeded: $0), 7] })
        settle(&r, a)
        return r
    }

    @Test func theDroppedPrefixIsHandedOutAndTheRestKept() throws {
        var r = try Self.leaderWith(1000)
        let last = r.log.lastIndex
        try #require(r.commitIndex == last && r.appliedIndex == last)
        let a = r.compact(through: last - 100, snapshot: [1, 2, 3])
        // Every entry of the old storage is handed out (the kept 100 were copied out of it).
        #expect(a.released.map(\.count) == [Int(last)])
        #expect(r.log.firstIndex == last - 99)
        #expect(r.log.entries(last - 99, through: last).map(\.payload.count) == Array(repeating: 2, count: 100))
        a.released[0].free()
        #expect(a.released[0].count == 0)
        // The kept entries do not depend on the freed storage.
        #expect(r.log.entries(last - 99, through: last).last?.payload == [UInt8(truncatingIfNeeded: 999), 7])
        // Compacting again through the same point drops nothing.
        #expect(r.compact(through: last - 100, snapshot: [1, 2, 3]).released.isEmpty)
    }

    /// A runtime frees a released prefix a slice at a time on its loop: each call frees at most
    /// the number asked for, the count says what is left, and asking for more than is left (or
    /// for none) is safe.
    @Test func aReleasedPrefixIsFreedASliceAtATime() throws {
        var r = try Self.leaderWith(1000)
        let last = r.log.lastIndex
        let released = try #require(r.compact(through: last, snapshot: [1]).released.first)
        let held = released.count
        try #require(held == Int(last))
        #expect(released.free(atMost: 0) == held)
        #expect(released.free(atMost: 300) == held - 300)
        #expect(released.count == held - 300)
        #expect(released.free(atMost: 300) == held - 600)
        #expect(released.free(atMost: held) == 0)
        #expect(released.free(atMost: 10) == 0)
        #expect(released.count == 0)
    }

    /// The configuration recorded with the snapshot is the last one at or below its index: a
    /// membership entry above the compaction point is not taken early.
    @Test func theSnapshotKeepsTheConfigurationAtItsIndex() throws {
        let first = Membership([Self.member(1)])
        var r = try Self.leaderWith(10)
        let (at, a) = try r.proposeMembership(Membership([Self.member(1), Self.member(2, .learner)]))
        Self.settle(&r, a)
        let (_, b) = try r.propose([[9]])
        Self.settle(&r, b)
        try #require(r.appliedIndex == at + 1)
        _ = r.compact(through: at - 1, snapshot: [])
        #expect(r.snapshotMembership == first)
        _ = r.compact(through: at + 1, snapshot: [])
        #expect(r.snapshotMembership == r.membership)
        #expect(r.snapshotMembership != first)
    }
}
