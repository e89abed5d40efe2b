import Foundation

/// The answer to a membership change.
public struct MembershipAnswer: Sendable, Equatable, CustomStringConvertible {
    /// The change asked for.
    public var change: MembershipChange
    /// Index of the committed configuration entry; nil when leadership was handed over instead.
    public var index: LogIndex?
    /// The configuration after the change (before it, when leadership was handed over).
    public var membership: Membership
    /// Set when the change removes the leader: leadership moved to this node first, and the
    /// change must now be asked of it (`plover member remove` does so by itself).
    public var handedOverTo: NodeID?

    /// An answer with every field given.
    public init(change: MembershipChange, index: LogIndex?, membership: Membership, handedOverTo: NodeID? = nil) {
        self.change = change
        self.index = index
        self.membership = membership
        self.handedOverTo = handedOverTo
    }

    public var description: String {
        if let t = handedOverTo {
            return "node \(change.member) was the leader: leadership moved to node \(t) first; ask node \(t) to \(change)"
        }
        return "\(change): committed at index \(index ?? 0)"
    }
}

/// Node-thread state of membership work (`ReplicaNode.membershipWork`).
struct MembershipWork {
    /// Changes that reached a leader before it committed its first entry, retried every tick.
    var waiting: [(change: MembershipChange, deadline: Int, continuation: ReplicaNode.NodeReply<MembershipAnswer>)] = []
    /// Removals of this (leading) replica waiting for leadership to move.
    var handOvers: [(change: MembershipChange, target: NodeID, deadline: Int, continuation: ReplicaNode.NodeReply<MembershipAnswer>)] = []
    /// Removed members still reachable until this tick, so that they can hear they were removed.
    var departing: [NodeID: Int] = [:]
    /// Members currently connected to (by the last configuration followed).
    var peers: Set<NodeID> = []
    /// Why this replica left the cluster, once a leader told it.
    var removed: String?
}

extension ReplicaNode {
    /// Adds `member` (a learner to promote once caught up, or a witness or voter directly).
    /// Answered once the configuration holding it commits. Throws `NodeError.notLeader` on a
    /// follower and `NodeError.membershipRefused` with the member and the reason.
    public func addMember(_ member: Member) async throws -> MembershipAnswer { try await changeMembership(.add(member)) }

    /// Removes member `id`, answered once committed. When `id` is this leader, leadership moves to
    /// the best caught-up voter first and the answer says so (`handedOverTo`): ask the new leader.
    public func removeMember(_ id: NodeID) async throws -> MembershipAnswer { try await changeMembership(.remove(id)) }

    /// Makes learner `id` a voter; refused while its log is more than `NodeOptions.catchUpEntriesMax`
    /// entries behind or it was not heard from recently.
    public func promote(_ id: NodeID) async throws -> MembershipAnswer { try await changeMembership(.promote(id)) }

    /// Gives member `id` another role (voter or learner) and, if given, priority.
    public func changeRole(_ id: NodeID, to role: MemberRole, priority: UInt8? = nil) async throws -> MembershipAnswer {
        try await changeMembership(.changeRole(id, role: role, priority: priority))
    }

    /// Carries out one membership change (`MembershipChange.plan(in:)` decides), answered once
    /// committed. One change at a time; refusals name the member and the reason.
    public func changeMembership(_ change: MembershipChange) async throws -> MembershipAnswer {
        try await withCheckedThrowingContinuation { c in
            changeMembership(change) { c.resume(with: $0) }
        }
    }

    /// `changeMembership(_:)` whose answer goes to `completion`, on the node's thread.
    package func changeMembership(_ change: MembershipChange, completion: @escaping @Sendable (Result<MembershipAnswer, any Error>) -> Void) {
        if !enqueue(.changeMembership(change, NodeReply(deliver: completion))) { completion(.failure(NodeError.stopped)) }
    }

    // MARK: Node thread

    func changeMembership(_ change: MembershipChange, _ c: ReplicaNode.NodeReply<MembershipAnswer>, deadline: Int? = nil) {
        let s = replica.membershipSituation(catchUpEntriesMax: options.catchUpEntriesMax, nodeIDMax: options.nodeIDMax)
        let plan = change.plan(in: s)
        if case .failure(.leaderNotReady) = plan, (deadline ?? .max) > tickCount {
            // A leader just elected commits its first entry within a round trip: wait for it.
            membershipWork.waiting.append((change, deadline ?? tickCount + options.requestTimeoutTicks, c))
            return
        }
        switch plan {
        case let .failure(r):
            let e: NodeError = if case let .notLeader(_, l) = r { .notLeader(leader: l) } else { .membershipRefused(r) }
            completions.append { c.resume(throwing: e) }
        case let .success(.propose(next)):
            do {
                let (index, actions) = try replica.proposeMembership(next)
                let reply = ProposalReply { result in
                    switch result {
                    case .success: c.resume(returning: MembershipAnswer(change: change, index: index, membership: next))
                    case let .failure(e): c.resume(throwing: e)
                    }
                }
                if let earlier = proposals.updateValue(PendingProposal(ballot: replica.promised, deadline: tickCount + options.requestTimeoutTicks,
                                                                       continuation: reply, queuedAt: DispatchTime.now().uptimeNanoseconds), forKey: index) {
                    displaced[index, default: []].append(earlier)
                }
                perform(actions)
            } catch {
                let e: NodeError = switch error {
                case let .notLeader(l): .notLeader(leader: l)
                case .membershipChangeInProgress: .membershipRefused(.changeInProgress(member: change.member, index: replica.membershipIndex))
                case let .invalidMembershipChange(why): .membershipRefused(.invalid(member: change.member, reason: why))
                default: .refused(error)
                }
                completions.append { c.resume(throwing: e) }
            }
        case let .success(.transferLeadershipFirst(target)):
            do {
                perform(try replica.transferLeadership(to: target))
                options.onWarning?("removing node \(change.member), the leader: handing leadership to node \(target) first")
                membershipWork.handOvers.append((change, target, tickCount + 2 * options.replica.electionTimeoutTicks, c))
            } catch {
                completions.append { c.resume(throwing: NodeError.refused(error)) }
            }
        }
    }

    /// Once a tick: answers removals waiting on a hand-over, and forgets removed peers whose
    /// grace period ended.
    func tickMembership() {
        if !membershipWork.waiting.isEmpty {
            let again = membershipWork.waiting
            membershipWork.waiting = []
            for w in again { changeMembership(w.change, w.continuation, deadline: w.deadline) }
        }
        if !membershipWork.handOvers.isEmpty {
            var waiting = membershipWork.handOvers
            waiting.removeAll { h in
                if replica.role != .leader, let l = replica.leader, l != options.replica.id {
                    let answer = MembershipAnswer(change: h.change, index: nil, membership: replica.membership, handedOverTo: l)
                    completions.append { h.continuation.resume(returning: answer) }
                    return true
                }
                if h.deadline <= tickCount {
                    let r = MembershipRefusal.invalid(member: h.change.member, reason: "leadership did not move to node \(h.target) in time; nothing was changed, retry")
                    completions.append { h.continuation.resume(throwing: NodeError.membershipRefused(r)) }
                    return true
                }
                return false
            }
            membershipWork.handOvers = waiting
        }
        let over = membershipWork.departing.filter { $0.value <= tickCount }.map(\.key)
        if !over.isEmpty {
            for n in over {
                membershipWork.departing[n] = nil
                // Fenced as a deposed leader is: whatever it still has in flight fails.
                transport.fence(n)
            }
            transport.updatePeers(connect: [], disconnect: over)
        }
    }

    /// Fails membership requests still waiting (the node stopped or its log failed).
    func failMembershipWork(_ error: NodeError) {
        for w in membershipWork.waiting { w.continuation.resume(throwing: error) }
        for h in membershipWork.handOvers { h.continuation.resume(throwing: error) }
        membershipWork.waiting = []
        membershipWork.handOvers = []
    }

    /// Connects to the members of `m` (the latest configuration in the log) whose addresses it
    /// records. Members it dropped stay reachable for a grace period, long enough for the leader to
    /// tell them they were removed, then are forgotten; the core ignores them meanwhile.
    func followConfiguration(_ m: Membership) {
        let me = options.replica.id
        let now = Set(m.members.map(\.id)).subtracting([me])
        let addressed = m.members.filter { $0.id != me && !$0.peerAddress.isEmpty }.compactMap { member -> PeerAddress? in
            guard let a = HostPort(parsing: member.peerAddress, allowingPortZero: true) else { return nil }
            return PeerAddress(node: member.id, a)
        }
        for gone in membershipWork.peers.subtracting(now) {
            membershipWork.departing[gone] = tickCount + Replica.departedHeartbeats * options.replica.heartbeatTicks + options.replica.electionTimeoutTicks
            options.onWarning?("node \(gone) is no longer a member: it is told so, then disconnected")
        }
        for back in now { membershipWork.departing[back] = nil }
        membershipWork.peers = now
        transport.updatePeers(connect: addressed, disconnect: [])
    }

    /// A leader said this replica is out of the cluster: it logs it and stops serving.
    func leaveCluster(leader: NodeID, index: LogIndex) {
        guard membershipWork.removed == nil else { return }
        let why = "node \(options.replica.id) was removed from the cluster by the configuration at index \(index) (leader \(leader)); it stops serving: its data directory can be deleted"
        membershipWork.removed = why
        options.onRemoved?(why)
    }
}
