import RDMAPaxosCore

// Membership changes under faults: the leader cycles the learner topology's last node through
// promotion, demotion, removal and re-addition, planned by the same guards operators go through.
// The safety checkers run throughout; the heal phase brings the node back so the cluster converges.
extension Simulation {
    mutating func changeMembership() throws(SimulationFailure) {
        guard options.learner, let target = ids.last, let l = liveLeader(), l != target, var r = nodes[l]!.replica else { return }
        let s = r.membershipSituation(catchUpEntriesMax: 8, nodeIDMax: nil)
        let change: MembershipChange
        switch s.membership.member(target)?.role {
        case nil:
            change = .add(Member(id: target, role: .learner, priority: 0, peerAddress: "sim:\(target)", clientAddress: "sim-client:\(target)"))
        case .learner? where faultsOn:
            change = rng.below(3) == 0 ? .remove(target) : .promote(target)
        case .voter? where faultsOn:
            change = rng.below(2) == 0 ? .changeRole(target, role: .learner, priority: 0) : .remove(target)
        default:
            return
        }
        guard case let .success(.propose(next)) = change.plan(in: s) else { return }
        do {
            let (index, a) = try r.proposeMembership(next)
            nodes[l]!.replica = r
            report.membershipChanges += 1
            log("leader \(l): \(change) at \(index)")
            try handle(l, a)
        } catch {
            log("leader \(l): \(change) refused by the core: \(error)")
        }
    }
}
