import Testing
@testable import RDMAPaxosCore

/// With pre-vote off, a replica that cannot win an election (its log is behind, or it is a member
/// a configuration it does not hold yet removed) still campaigns, with a higher ballot each time.
/// It must not keep the cluster from electing and keeping a leader. The simulator found such
/// seeds (docs/reliability.md); these are their three mechanisms, one at a time.
@Suite struct CandidatesThatCannotWinTests {
    /// Three voters, pre-vote and check-quorum off, node 1 elected and everything delivered.
    func cluster() throws -> ScenarioCluster {
        try #require(ScenarioCluster.elected { $0.preVote = false; $0.checkQuorum = false })
    }

    func replica(_ c: ScenarioCluster, _ id: NodeID) -> Replica { c.nodes[id]!.replica! }

    /// Cuts `id` off from every other node, both ways.
    func isolate(_ c: inout ScenarioCluster, _ id: NodeID) {
        for other in c.ids where other != id { c.cut.insert([id, other]); c.cut.insert([other, id]) }
    }

    /// A follower that heard from its leader within an election timeout neither votes for a
    /// candidate nor adopts its ballot, even with check-quorum off.
    @Test func aFollowerInItsLeadersLeaseIgnoresACandidate() throws {
        var c = try cluster()
        let ballot = replica(c, 2).promised
        // Only node 2 hears it (with check-quorum off, the leader itself would back a candidate
        // as up to date as it is).
        c.cut.insert([3, 1])
        c.with(3) { $0.campaign() }
        c.stabilize()
        #expect(replica(c, 2).promised == ballot, "node 2 adopted the candidate's ballot \(replica(c, 2).promised)")
        #expect(replica(c, 1).role == .leader && replica(c, 2).leader == 1)
    }

    /// A leader (check-quorum off: it has no lease) that a candidate behind it asks for a vote
    /// keeps leading: the candidate cannot win, and its ballot is declined, not adopted.
    @Test func aLeaderKeepsLeadingWhenACandidateBehindItCampaigns() throws {
        var c = try cluster()
        isolate(&c, 3)
        try c.with(1) { try $0.propose([Array("x".utf8)]).actions }
        c.stabilize()
        c.cut = []
        let ballot = replica(c, 1).promised
        c.with(3) { $0.campaign() }
        c.stabilize()
        #expect(replica(c, 1).role == .leader && replica(c, 1).promised == ballot,
                "node 1 is \(replica(c, 1).role) at \(replica(c, 1).promised)")
    }

    /// Without a leader, a voter whose log is ahead of a candidate's declines its ballot and
    /// campaigns above it at once, instead of waiting out its timeout while the candidate that
    /// cannot win campaigns again.
    @Test func aVoterAheadOfACandidateStandsAboveItAtOnce() throws {
        var c = try cluster()
        isolate(&c, 3)
        try c.with(1) { try $0.propose([Array("x".utf8)]).actions }
        c.stabilize()
        c.crash(1)
        c.cut = []
        c.queue = []
        // Node 2 last heard from its leader an election timeout ago; node 3 (behind) campaigns.
        let timeout = c.config(2).electionTimeoutTicks
        c.with(2) { r in
            r.electionElapsed = timeout
            return Actions()
        }
        c.with(3) { $0.campaign() }
        c.stabilize()
        #expect(replica(c, 2).role == .leader, "node 2 is \(replica(c, 2).role) at \(replica(c, 2).promised)")
        #expect(replica(c, 3).leader == 2)
    }

    /// A leader that a follower behind its commit index rejects for a higher ballot (the
    /// follower's own failed campaigns) takes a higher ballot at once, instead of stepping down
    /// and leaving the field to a candidate that cannot win.
    @Test func aLeaderRejectedByAFollowerBehindItTakesAHigherBallotAtOnce() throws {
        var c = try cluster()
        isolate(&c, 3)
        try c.with(1) { try $0.propose([Array("x".utf8)]).actions }
        c.stabilize()
        // Cut off, node 3 campaigns three times; its ballot climbs past the leader's.
        for _ in 0..<3 { c.with(3) { $0.campaign() }; c.stabilize() }
        c.queue = []
        c.cut = []
        try #require(replica(c, 3).promised > replica(c, 1).promised)
        c.with(1) { $0.tick() }
        c.stabilize()
        #expect(replica(c, 1).role == .leader, "node 1 is \(replica(c, 1).role) at \(replica(c, 1).promised)")
        #expect(replica(c, 1).promised > replica(c, 3).promised || replica(c, 3).leader == 1)
        #expect(replica(c, 3).leader == 1 && replica(c, 3).commitIndex == replica(c, 1).commitIndex)
    }

    /// A member that a configuration the candidates lack made a learner hands its log over to a
    /// candidate behind it (as a witness does), so the candidate adopts that configuration and
    /// wins in it. Without the hand-over, no one could lead while the old leader is down: the
    /// candidates need the new learner's vote, and it refused every candidate behind it.
    @Test func aMemberALaterConfigurationMadeALearnerHandsOverItsLog() throws {
        var c = try #require(ScenarioCluster.elected(voters: 4))
        // Node 1 makes node 4 a learner; only node 4 receives the change, then node 1 crashes.
        c.cut = [[1, 2], [1, 3]]
        let next = Membership(replica(c, 1).membership.members.map { $0.id == 4 ? Member(id: 4, role: .learner, priority: 0) : $0 })
        try c.with(1) { try $0.proposeMembership(next).actions }
        c.stabilize()
        try #require(replica(c, 4).membership.member(4)?.role == .learner)
        try #require(replica(c, 2).membership.member(4)?.role == .voter)
        c.crash(1)
        c.cut = []
        for _ in 0..<100 where ![2, 3].contains(where: { replica(c, $0).role == .leader }) {
            for id in [2, 3, 4] as [NodeID] { c.with(id) { $0.tick() } }
            c.stabilize()
        }
        let leader = [2, 3].first { replica(c, $0).role == .leader }
        #expect(leader != nil, "no leader: node 2 is \(replica(c, 2).role), node 3 is \(replica(c, 3).role)")
        if let leader { #expect(replica(c, leader).membership.member(4)?.role == .learner) }
    }
}
