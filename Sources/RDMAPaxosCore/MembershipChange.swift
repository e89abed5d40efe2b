// Operators' membership changes and the guards around them, as a pure function of what the
// leader knows (docs/design/consensus.md, "Membership for operators"). `Replica.proposeMembership`
// checks that a configuration differs by one member; this decides whether it should be proposed
// now, and what comes first when the leader itself is to go.

/// One change an operator asks for.
public enum MembershipChange: Hashable, Sendable, CustomStringConvertible {
    /// Add a new member (a learner, to catch up before promotion; or a witness or voter directly).
    case add(Member)
    /// Remove a member.
    case remove(NodeID)
    /// Make a learner a voter.
    case promote(NodeID)
    /// Give a member another role (learner or voter) or priority.
    case changeRole(NodeID, role: MemberRole, priority: UInt8?)

    /// The member the change is about.
    public var member: NodeID {
        switch self {
        case let .add(m): m.id
        case let .remove(id), let .promote(id), let .changeRole(id, _, _): id
        }
    }

    public var description: String {
        switch self {
        case let .add(m): "add node \(m.id) as \(m.role) (peers \(m.peerAddress), clients \(m.clientAddress))"
        case let .remove(id): "remove node \(id)"
        case let .promote(id): "promote node \(id) to voter"
        case let .changeRole(id, role, p): "make node \(id) a \(role)" + (p.map { " with priority \($0)" } ?? "")
        }
    }
}

/// Why a membership change was refused. Every case names the member and the reason.
public enum MembershipRefusal: Error, Hashable, Sendable, CustomStringConvertible {
    /// Only the leader changes the configuration.
    case notLeader(member: NodeID, leader: NodeID?)
    /// The configuration at `index` is not committed yet: one change at a time.
    case changeInProgress(member: NodeID, index: LogIndex)
    /// A new leader has not committed an entry of its own ballot yet, so it cannot know whether a
    /// configuration it holds is the last one (`ReplicaNode` waits for it instead of refusing).
    case leaderNotReady(member: NodeID)
    /// Leadership is moving to `to`; ask there.
    case transferInProgress(member: NodeID, to: NodeID)
    /// `member` is not in the configuration.
    case unknownMember(member: NodeID, members: [NodeID])
    /// `member` is in the configuration already.
    case alreadyMember(member: NodeID, role: MemberRole)
    /// Fewer voters than a majority of the new configuration were heard from recently: the
    /// change could leave the cluster unable to commit.
    case wouldLoseQuorum(member: NodeID, reachable: [NodeID], needed: Int, voting: [NodeID])
    /// The learner's log is too far behind the leader's to vote yet.
    case learnerNotCaughtUp(member: NodeID, match: LogIndex, lastIndex: LogIndex)
    /// The request itself is wrong, for the reason given.
    case invalid(member: NodeID, reason: String)

    public var description: String {
        switch self {
        case let .notLeader(m, l):
            "cannot change node \(m): this replica is not the leader" + (l.map { "; the leader is node \($0)" } ?? "; no leader known yet")
        case let .changeInProgress(m, i):
            "cannot change node \(m): the membership change at index \(i) is not committed yet; one change at a time, retry once it commits"
        case let .leaderNotReady(m): "cannot change node \(m) yet: the new leader has not committed its first entry; retry in a moment"
        case let .transferInProgress(m, t): "cannot change node \(m): leadership is moving to node \(t); retry there"
        case let .unknownMember(m, ms): "node \(m) is not a member (members: \(ms.map(String.init).joined(separator: ", ")))"
        case let .alreadyMember(m, r): "node \(m) is already a member (\(r))"
        case let .wouldLoseQuorum(m, r, n, v):
            "refusing to change node \(m): the new configuration's voting members are \(list(v)) and needs \(n) of them to commit, but only \(r.count) were heard from recently (\(list(r))); bring members back first"
        case let .learnerNotCaughtUp(m, match, last):
            "cannot promote node \(m): the learner holds the log through \(match), the leader through \(last); wait until it has caught up"
        case let .invalid(m, r): "cannot change node \(m): \(r)"
        }
    }

    private func list(_ ids: [NodeID]) -> String { ids.isEmpty ? "none" : ids.map(String.init).joined(separator: ", ") }
}

/// What the leader knows when it weighs a change.
public struct MembershipSituation: Sendable, Hashable {
    /// The configuration in force (the latest in the log).
    public var membership: Membership
    /// This replica's id.
    public var me: NodeID
    /// The leader this replica knows of; itself when leading.
    public var leader: NodeID?
    /// Index of a configuration not committed yet, if any.
    public var pendingIndex: LogIndex?
    /// The leader has committed an entry of its own ballot.
    public var leaderReady: Bool
    /// A leadership transfer in progress, to this node.
    public var transferTarget: NodeID?
    /// Members the leader heard from recently (itself not included).
    public var reachable: Set<NodeID>
    /// How far each member's log matches the leader's.
    public var match: [NodeID: LogIndex]
    /// The leader's last index.
    public var lastIndex: LogIndex
    /// A learner whose log is at most this many entries behind counts as caught up.
    public var catchUpEntriesMax: LogIndex
    /// Highest node id the cluster can carry (each id has a ring in every region); nil: no limit.
    public var nodeIDMax: NodeID?

    /// A situation with every field given.
    public init(membership: Membership, me: NodeID, leader: NodeID?, pendingIndex: LogIndex?, leaderReady: Bool = true, transferTarget: NodeID?,
                reachable: Set<NodeID>, match: [NodeID: LogIndex], lastIndex: LogIndex, catchUpEntriesMax: LogIndex,
                nodeIDMax: NodeID?) {
        self.membership = membership
        self.me = me
        self.leader = leader
        self.pendingIndex = pendingIndex
        self.leaderReady = leaderReady
        self.transferTarget = transferTarget
        self.reachable = reachable
        self.match = match
        self.lastIndex = lastIndex
        self.catchUpEntriesMax = catchUpEntriesMax
        self.nodeIDMax = nodeIDMax
    }
}

extension MembershipSituation {
    /// The voter to hand leadership to (a removal of the leader, a graceful stop): another voter
    /// heard from recently, the furthest caught up, then the highest priority, then the lowest id.
    public var handOverTarget: NodeID? {
        membership.members.filter { $0.role == .voter && $0.id != me && reachable.contains($0.id) }
            .min { (match[$0.id] ?? 0, $0.priority, $1.id) > (match[$1.id] ?? 0, $1.priority, $0.id) }?.id
    }
}

/// What to do about a change that passed the guards.
public enum MembershipPlan: Hashable, Sendable {
    /// Propose this configuration.
    case propose(Membership)
    /// The change removes the leader: hand leadership to this voter first; the new leader then
    /// carries out the removal.
    case transferLeadershipFirst(to: NodeID)
}

extension MembershipChange {
    /// Decides whether the leader in `s` may carry out this change now. Refuses a change while an
    /// earlier one is uncommitted, one that would leave fewer recently heard voters than a majority
    /// of the new configuration, and a promotion of a learner that has not caught up. Removing the
    /// leader itself plans a transfer to the best caught-up voter first.
    public func plan(in s: MembershipSituation) -> Result<MembershipPlan, MembershipRefusal> {
        let id = member
        guard s.leader == s.me else { return .failure(.notLeader(member: id, leader: s.leader)) }
        if let t = s.transferTarget { return .failure(.transferInProgress(member: id, to: t)) }
        if let i = s.pendingIndex { return .failure(.changeInProgress(member: id, index: i)) }
        guard s.leaderReady else { return .failure(.leaderNotReady(member: id)) }
        let current = s.membership
        var next = current.members
        let ids = current.members.map(\.id)
        switch self {
        case let .add(m):
            if let old = current.member(id) { return .failure(.alreadyMember(member: id, role: old.role)) }
            guard id != 0 else { return .failure(.invalid(member: id, reason: "node id 0 is reserved")) }
            if let max = s.nodeIDMax, id > max {
                return .failure(.invalid(member: id, reason: "node ids above \(max) (limits.node_id_max) have no ring on the other replicas"))
            }
            guard !m.peerAddress.isEmpty, !m.clientAddress.isEmpty else {
                return .failure(.invalid(member: id, reason: "a new member needs a peer address and a client address"))
            }
            for o in current.members {
                for a in [m.peerAddress, m.clientAddress] where a == o.peerAddress || a == o.clientAddress {
                    return .failure(.invalid(member: id, reason: "address \(a) is already node \(o.id)'s"))
                }
            }
            guard m.peerAddress != m.clientAddress else {
                return .failure(.invalid(member: id, reason: "peer and client address are both \(m.peerAddress)"))
            }
            next.append(m)
        case .remove:
            guard current.contains(id) else { return .failure(.unknownMember(member: id, members: ids)) }
            if id == s.me {
                // A leader outside its own configuration would go on leading it: hand over first.
                guard let target = s.handOverTarget else {
                    return .failure(.wouldLoseQuorum(member: id, reachable: s.reachable.sorted(), needed: current.quorum,
                                                     voting: current.voting))
                }
                return .success(.transferLeadershipFirst(to: target))
            }
            next.removeAll { $0.id == id }
        case .promote:
            guard let m = current.member(id) else { return .failure(.unknownMember(member: id, members: ids)) }
            guard m.role == .learner else { return .failure(.invalid(member: id, reason: "only a learner can be promoted; it is a \(m.role)")) }
            let match = s.match[id] ?? 0
            guard s.reachable.contains(id), match > 0, match + s.catchUpEntriesMax >= s.lastIndex else {
                return .failure(.learnerNotCaughtUp(member: id, match: match, lastIndex: s.lastIndex))
            }
            next = next.map { $0.id == id ? Member(id: id, role: .voter, priority: max(1, $0.priority), peerAddress: $0.peerAddress, clientAddress: $0.clientAddress) : $0 }
        case let .changeRole(_, role, priority):
            guard let m = current.member(id) else { return .failure(.unknownMember(member: id, members: ids)) }
            if role == .voter && m.role == .learner { return MembershipChange.promote(id).plan(in: s).map { plan in
                guard case var .propose(c) = plan, let p = priority else { return plan }
                c = Membership(c.members.map { $0.id == id ? Member(id: id, role: .voter, priority: p, peerAddress: $0.peerAddress, clientAddress: $0.clientAddress) : $0 })
                return .propose(c)
            } }
            if m.role != role && (m.role == .witness || role == .witness) {
                return .failure(.invalid(member: id, reason: "a \(m.role) cannot become a \(role) in place; remove it and add a fresh member"))
            }
            if id == s.me && role != .voter {
                return .failure(.invalid(member: id, reason: "the leader cannot stop being a voter; transfer leadership first"))
            }
            var changed = m
            changed.role = role
            if let p = priority { changed.priority = p }
            guard changed != m else { return .failure(.invalid(member: id, reason: "it is already a \(role) with priority \(m.priority)")) }
            next = next.map { $0.id == id ? changed : $0 }
        }
        let proposed = Membership(next)
        guard proposed.members.contains(where: { $0.role == .voter }) else {
            return .failure(.invalid(member: id, reason: "the configuration must keep at least one voter"))
        }
        let reachable = proposed.voting.filter { $0 == s.me || s.reachable.contains($0) }
        guard reachable.count >= proposed.quorum else {
            return .failure(.wouldLoseQuorum(member: id, reachable: reachable, needed: proposed.quorum, voting: proposed.voting))
        }
        return .success(.propose(proposed))
    }
}

extension Replica {
    /// What this replica knows that `MembershipChange.plan(in:)` weighs (`catchUpEntriesMax` and
    /// `nodeIDMax` come from the caller).
    public func membershipSituation(catchUpEntriesMax: LogIndex, nodeIDMax: NodeID?) -> MembershipSituation {
        let pending: LogIndex? = role == .leader && membershipIndex > commitIndex ? membershipIndex : nil
        // Heard from in this check-quorum period, or in the last one and holding some of our log
        // (a member added a moment ago and never heard from is not reachable).
        let reachable = Set(progress.filter { $0.value.counts && ($0.value.recentActive || $0.value.silentPeriods == 0 && $0.value.match > 0) }.keys)
        return MembershipSituation(membership: membership, me: id, leader: leader, pendingIndex: pending,
                                   leaderReady: role == .leader && log.ballot(at: commitIndex) == promised, transferTarget: transferTarget,
                                   reachable: reachable, match: progress.mapValues(\.match), lastIndex: log.lastIndex,
                                   catchUpEntriesMax: catchUpEntriesMax, nodeIDMax: nodeIDMax)
    }
}
