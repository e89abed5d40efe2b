import Foundation

extension ReplicaNode {
    /// A graceful stop's first step: when this replica leads, hands leadership to the best
    /// caught-up voter (`MembershipSituation.handOverTarget`) and waits until another replica
    /// leads, at most `timeout`. Proposals arriving meanwhile are held and then answered "not the
    /// leader" with the new leader, whom clients follow. Returns the new leader, or nil when this
    /// replica did not lead, had no voter to hand over to, or the hand-over did not finish in time.
    public func handOverLeadership(timeout: Duration) async -> NodeID? {
        let s = status
        guard s.role == .leader, s.failure == nil else { return nil }
        let started: NodeID? = await withCheckedContinuation { c in
            if !enqueue(.handOver(c)) { c.resume(returning: nil) }
        }
        guard started != nil else { return nil }
        let deadline = ContinuousClock.now + timeout
        while ContinuousClock.now < deadline {
            let now = status
            if now.role != .leader, let l = now.leader, l != options.replica.id { return l }
            try? await Task.sleep(for: .milliseconds(1))
        }
        return nil
    }

    /// Node thread: starts the hand-over of `handOverLeadership`; the target, or nil.
    func startHandOver(_ c: CheckedContinuation<NodeID?, Never>) {
        let s = replica.membershipSituation(catchUpEntriesMax: options.catchUpEntriesMax, nodeIDMax: options.nodeIDMax)
        guard replica.role == .leader, let target = s.handOverTarget, let a = try? replica.transferLeadership(to: target) else {
            completions.append { c.resume(returning: nil) }
            return
        }
        perform(a)
        completions.append { c.resume(returning: target) }
    }
}
