import RDMAPaxosCore

// Operator actions injected as faults: leader transfers to a random voter (caught up or not,
// reachable or not), on top of the automatic hand-overs unequal priorities cause.
extension Simulation {
    mutating func transferLeadership() throws(SimulationFailure) {
        guard let l = liveLeader() else { return }
        let voters = members(of: l).filter { $0 != l }
        guard !voters.isEmpty else { return }
        let target = voters[rng.below(voters.count)]
        let request = nextRequest()
        requests[request] = .other("transfer to \(target)")
        let p = nodes[l]!.process!
        let inbox = p.inbox
        p.node.transferLeadership(to: target) { result in inbox.answers.append((request, result.map { [] })) }
        report.transfers += 1
        log("leader \(l): transfer to \(target)")
        try run(l)
    }

    /// The voters (not witnesses) of the configuration node `id` currently applies.
    func members(of id: NodeID) -> [NodeID] {
        guard let r = nodes[id]!.replica else { return [] }
        let s = r.membershipSituation(catchUpEntriesMax: 8, nodeIDMax: nil)
        return s.membership.members.filter { $0.role == .voter }.map(\.id)
    }
}
