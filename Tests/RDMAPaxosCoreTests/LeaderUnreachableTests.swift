import Testing
@testable import RDMAPaxosCore

/// `Replica.leaderUnreachable`: the runtime tells a follower that its connection to the leader
/// broke (a killed leader's sockets close at once), and the follower campaigns within a few
/// ticks instead of a whole election timeout; a link that broke while the leader lives does not
/// unseat it. Ticks are the core's logical time (election timeout 10 ticks, 10 to 20 randomized).
@Suite struct LeaderUnreachableTests {
    func elected() throws -> ScenarioCluster { try #require(ScenarioCluster.elected()) }

    func leader(_ c: ScenarioCluster) -> NodeID? { c.ids.first { c.nodes[$0]!.replica?.role == .leader } }

    @Test(arguments: [true, false])
    func followersToldTheLeaderIsGoneElectANewOneWithinFourTicks(told: Bool) throws {
        var c = try elected()
        c.crash(1)
        if told { for id in [2, 3] as [NodeID] { c.with(id) { $0.leaderUnreachable(1) } } }
        for _ in 0..<4 where leader(c) == nil {
            for id in [2, 3] as [NodeID] { c.with(id) { $0.tick() } }
            c.stabilize()
        }
        // Without the notice, nothing happens before the election timeout: the check can fail.
        #expect((leader(c) != nil) == told, "leader after 4 ticks: \(leader(c).map(String.init) ?? "none")")
    }

    @Test func aFollowerWhoseLinkAloneBrokeDoesNotUnseatALiveLeader() throws {
        var c = try elected()
        let ballot = c.nodes[1]!.replica!.promised
        c.with(2) { $0.leaderUnreachable(1) }
        for _ in 0..<4 {
            c.with(2) { $0.tick() }
            c.stabilize()
        }
        #expect(leader(c) == 1 && c.nodes[1]!.replica!.promised == ballot)
        #expect(c.nodes[3]!.replica!.promised == ballot)
    }
}
