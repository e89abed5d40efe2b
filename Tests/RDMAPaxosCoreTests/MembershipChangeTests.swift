import RDMAPaxosCore
import Testing

/// The operator's membership guards (`MembershipChange.plan(in:)`) and the configuration's
/// encoding (format 2 with addresses; format 1 still read).
@Suite struct MembershipChangeTests {
    static func member(_ id: NodeID, _ role: MemberRole = .voter) -> Member {
        Member(id: id, role: role, priority: role == .voter ? 1 : 0, peerAddress: "10.0.0.\(id):7000", clientAddress: "10.0.0.\(id):7001")
    }

    /// Leader 1 of voters 1, 2, 3 that heard from `reachable`, each holding the log through 100.
    static func situation(reachable: Set<NodeID> = [2, 3], members: [Member] = [member(1), member(2), member(3)],
                          match: [NodeID: LogIndex]? = nil) -> MembershipSituation {
        let ms = Membership(members)
        return MembershipSituation(membership: ms, me: 1, leader: 1, pendingIndex: nil, transferTarget: nil, reachable: reachable,
                                   match: match ?? Dictionary(uniqueKeysWithValues: ms.members.map { ($0.id, LogIndex(100)) }),
                                   lastIndex: 100, catchUpEntriesMax: 10, nodeIDMax: 16)
    }

    @Test func addingALearnerWithOneVoterDeadIsAllowedButAddingAVoterIsRefused() {
        let s = Self.situation(reachable: [2])
        guard case let .success(.propose(next)) = MembershipChange.add(Self.member(4, .learner)).plan(in: s) else {
            Issue.record("a learner changes no quorum and was refused")
            return
        }
        #expect(next.member(4)?.role == .learner && next.member(4)?.peerAddress == "10.0.0.4:7000")
        guard case let .failure(r) = MembershipChange.add(Self.member(4)).plan(in: s) else {
            Issue.record("a fourth voter with two of four reachable was not refused")
            return
        }
        #expect(r == .wouldLoseQuorum(member: 4, reachable: [1, 2], needed: 3, voting: [1, 2, 3, 4]))
        #expect(r.description.contains("refusing to change node 4"))
    }

    @Test func removingADeadVoterKeepsAQuorumButRemovingALiveOneWithAnotherDeadDoesNot() {
        let s = Self.situation(reachable: [2], members: [1, 2, 3, 4].map { Self.member($0) })
        #expect(throws: Never.self) { try MembershipChange.remove(3).plan(in: s).get() }
        // Left with 1, 3, 4 of which only 1 is reachable.
        guard case .failure(.wouldLoseQuorum(member: 2, _, needed: 2, _)) = MembershipChange.remove(2).plan(in: s) else {
            Issue.record("removing the only other reachable voter was not refused")
            return
        }
    }

    @Test func secondChangeWhileOneIsUncommittedIsRefusedNamingTheMember() {
        var s = Self.situation()
        s.pendingIndex = 42
        let plan = MembershipChange.remove(3).plan(in: s)
        #expect(plan == .failure(.changeInProgress(member: 3, index: 42)))
        #expect(MembershipRefusal.changeInProgress(member: 3, index: 42).description.contains("node 3"))
        s.pendingIndex = nil
        s.leaderReady = false
        #expect(MembershipChange.remove(3).plan(in: s) == .failure(.leaderNotReady(member: 3)))
    }

    @Test func followersRefuseAndNameTheLeader() {
        var s = Self.situation()
        s.leader = 2
        #expect(MembershipChange.promote(3).plan(in: s) == .failure(.notLeader(member: 3, leader: 2)))
    }

    @Test func promotionWaitsForTheLearnerToCatchUp() {
        let members = [Self.member(1), Self.member(2), Self.member(3), Self.member(4, .learner)]
        let behind = Self.situation(reachable: [2, 3, 4], members: members, match: [2: 100, 3: 100, 4: 50])
        #expect(MembershipChange.promote(4).plan(in: behind) == .failure(.learnerNotCaughtUp(member: 4, match: 50, lastIndex: 100)))
        let silent = Self.situation(reachable: [2, 3], members: members, match: [2: 100, 3: 100, 4: 100])
        #expect(MembershipChange.promote(4).plan(in: silent) == .failure(.learnerNotCaughtUp(member: 4, match: 100, lastIndex: 100)))
        let near = Self.situation(reachable: [2, 3, 4], members: members, match: [2: 100, 3: 100, 4: 95])
        guard case let .success(.propose(next)) = MembershipChange.promote(4).plan(in: near) else {
            Issue.record("a caught-up learner was not promoted")
            return
        }
        #expect(next.member(4)?.role == .voter && next.member(4)?.priority == 1)
    }

    @Test func removingTheLeaderHandsOverToTheFurthestCaughtUpReachableVoterFirst() {
        let s = Self.situation(reachable: [2, 3], match: [2: 90, 3: 100])
        #expect(MembershipChange.remove(1).plan(in: s) == .success(.transferLeadershipFirst(to: 3)))
        let alone = Self.situation(reachable: [])
        guard case .failure(.wouldLoseQuorum(member: 1, _, _, _)) = MembershipChange.remove(1).plan(in: alone) else {
            Issue.record("a leader with no reachable voter to hand over to was not refused")
            return
        }
    }

    @Test func badRequestsAreRefusedWithTheReason() {
        let s = Self.situation()
        let cases: [(MembershipChange, String)] = [
            (.add(Self.member(2)), "node 2 is already a member"),
            (.add(Self.member(17, .learner)), "node ids above 16"),
            (.add(Member(id: 5, role: .learner)), "needs a peer address and a client address"),
            (.add(Member(id: 5, role: .learner, peerAddress: "10.0.0.2:7000", clientAddress: "x:1")), "already node 2's"),
            (.remove(9), "node 9 is not a member (members: 1, 2, 3)"),
            (.promote(2), "only a learner can be promoted"),
            (.changeRole(3, role: .witness, priority: nil), "cannot become a witness in place"),
            (.changeRole(1, role: .learner, priority: nil), "the leader cannot stop being a voter"),
        ]
        for (change, text) in cases {
            guard case let .failure(r) = change.plan(in: s) else {
                Issue.record("\(change) was not refused")
                continue
            }
            #expect(r.description.contains(text), "\(change): \(r)")
        }
    }

    @Test func configurationRoundTripsWithAddressesAndTheOldFormatStillDecodes() throws {
        let m = Membership([Self.member(1), Self.member(2, .witness), Self.member(3, .learner)])
        #expect(try Membership(decoding: m.encoded()) == m)
        // Format 1: u16 count, then id, role, priority per member; no addresses.
        let old: [UInt8] = [0, 2, 0, 0, 0, 1, 0, 1, 0, 0, 0, 3, 1, 0]
        #expect(try Membership(decoding: old) == Membership([Member(id: 1, role: .voter), Member(id: 3, role: .witness, priority: 0)]))
        var future = m.encoded()
        future[1] = 3
        #expect(throws: DecodeError("membership", "format 3, this build reads formats 1 and 2")) { try Membership(decoding: future) }
        for n in 0..<m.encoded().count {
            #expect(throws: DecodeError.self) { try Membership(decoding: Array(m.encoded().prefix(n))) }
        }
    }

    /// A member that joined after the leader's snapshot (it is not in the snapshot's configuration)
    /// keeps the role it joined with: a witness restores nothing from the (empty) snapshot data and
    /// applies nothing; a learner restores the state machine.
    @Test func aJoinerNotInTheSnapshotsConfigurationKeepsItsRole() {
        let old = Membership([Self.member(1), Self.member(2), Self.member(3, .witness)])
        let snapshot = Snapshot(index: 10, ballot: Ballot(term: 1, node: 1), membership: old, data: [])
        for (role, restores) in [(MemberRole.witness, false), (.learner, true)] {
            let joined = Membership(old.members.filter { $0.id != 3 } + [Self.member(4, role)])
            var r = Replica(config: ReplicaConfig(id: 4), bootstrap: joined, seed: 1)
            let a = r.receive(Message(from: 1, to: 4, ballot: Ballot(term: 1, node: 1), body: .installSnapshot(SnapshotChunk(whole: snapshot))))
            #expect((a.restore != nil) == restores, "\(role)")
            #expect(r.isWitness == (role == .witness), "\(role)")
            #expect(r.commitIndex == 10)
        }
    }
}
