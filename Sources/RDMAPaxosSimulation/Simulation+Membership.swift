import RDMAPaxosCore

// Membership changes under faults: the leader cycles the learner topology's last node through
// promotion, demotion, removal and re-addition (as a learner, or as a witness that is later
// removed), planned by the same guards operators go through.
// The safety checkers run throughout; the heal phase brings the node back so the cluster converges.
extension Simulation {
    mutating func changeMembership() throws(SimulationFailure) {
        guard options.learner, let target = ids.last, let l = liveLeader(), l != target, let r = nodes[l]!.replica else { return }
        let s = r.membershipSituation(catchUpEntriesMax: 8, nodeIDMax: nil)
        if nodes[target]!.removed, s.membership.member(target) != nil {
            // Added back before the notice of its removal reached it: the operator starts it again.
            startAfresh(target)
            return
        }
        let change: MembershipChange
        switch s.membership.member(target)?.role {
        case nil:
            // With `witnessMembership`, a third of the additions while faults are on make it a
            // witness at once (a second one beside the topology's own), which can only be removed.
            let role: MemberRole = options.witnessMembership && faultsOn && rng.below(3) == 0 ? .witness : .learner
            change = .add(Member(id: target, role: role, priority: 0, peerAddress: "sim:\(target)", clientAddress: "sim-client:\(target)"))
        case .learner? where faultsOn:
            change = rng.below(3) == 0 ? .remove(target) : .promote(target)
        case .voter? where faultsOn:
            change = rng.below(2) == 0 ? .changeRole(target, role: .learner, priority: 0) : .remove(target)
        case .witness? where faultsOn:
            change = .remove(target)
        default:
            return
        }
        guard case .success(.propose) = change.plan(in: s) else { return }
        let request = nextRequest()
        requests[request] = .other("\(change)")
        let p = nodes[l]!.process!
        let inbox = p.inbox
        p.node.changeMembership(change) { result in inbox.answers.append((request, result.map { _ in [] })) }
        report.membershipChanges += 1
        log("leader \(l): \(change)")
        try run(l)
        if case .add = change, nodes[target]!.removed { startAfresh(target) }
    }

    /// The operator starts a member being added on an empty data directory.
    mutating func startAfresh(_ id: NodeID) {
        nodes[id]!.removed = false
        start(id)
        log("start \(id) afresh to join")
    }

    /// A node told it was removed stops and its data is deleted (`plover node` exits on
    /// `Event.removedFromCluster`): otherwise it would campaign with ballots the members adopt.
    mutating func leaveCluster(_ id: NodeID) {
        guard nodes[id]!.process != nil else { return }
        nodes[id]!.process = nil
        nodes[id]!.storage.pending = []
        nodes[id]!.storage.durable = SimulatedStorage.Durable()
        nodes[id]!.storage.flushed = SimulatedStorage.Durable()
        nodes[id]!.restartAt = nil
        nodes[id]!.lostState = false
        nodes[id]!.removed = true
        reads = reads.filter { $0.value.node != id }
        log("\(id) stops: removed from the cluster, its data deleted")
    }
}
