import Foundation

extension ReplicaNode {
    /// Starts a forced election on this replica at once because `leader`, the leader it follows,
    /// is known to be gone (a client of the log found its process dead, e.g. a connection reset
    /// with nothing listening any more), instead of waiting for the election timeout.
    ///
    /// The replica takes the step a leader's TimeoutNow gives it in a leadership transfer: it
    /// campaigns with a forced prepare, which members grant even while they still count `leader`'s
    /// lease (pre-vote and check-quorum would make it wait out the election timeout). Safety is
    /// the ballots' as in any election; the cost of a wrong suspicion is a leader change, so call
    /// it only on evidence that the leader's process is gone. Returns false, doing nothing, unless
    /// this replica is a running follower of `leader` and not a witness.
    @discardableResult
    public func campaignNow(replacing leader: NodeID) -> Bool {
        let s = status
        guard s.role == .follower, s.leader == leader, !s.isWitness, s.failure == nil, leader != options.replica.id else { return false }
        // The node thread steps the core with it as with any message: it follows `leader` at the
        // current ballot and, being promotable, becomes a candidate with force.
        return enqueue(.message(Message(from: leader, to: options.replica.id, ballot: s.ballot, body: .timeoutNow)))
    }
}
