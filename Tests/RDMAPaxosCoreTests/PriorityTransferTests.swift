import RDMAPaxosCore
import Testing

/// Automatic leader transfer to a higher-priority voter must not loop: a transfer that does not
/// complete (the preferred replica cannot take over in time, say its disk is slow) is not tried
/// again for `priorityTransferIntervalTicks`, and every attempt refuses clients meanwhile.
@Suite struct PriorityTransferTests {
    /// Runs `ticks` ticks on every node, delivering everything after each one, and returns how
    /// many TimeoutNow messages the leader sent (each is one transfer attempt reaching its end);
    /// they are dropped, so no transfer completes.
    static func run(_ c: inout ScenarioCluster, ticks: Int) -> Int {
        var attempts = 0
        for _ in 0..<ticks {
            for id in c.ids { c.with(id) { $0.tick() } }
            for _ in 0..<50 {
                for id in c.ids { c.persistAll(id) }
                let before = c.queue.count
                c.queue.removeAll { if case .timeoutNow = $0.body { return true } else { return false } }
                attempts += before - c.queue.count
                if c.deliver() == 0 { break }
            }
        }
        return attempts
    }

    @Test func aTransferThatDoesNotCompleteIsNotRetriedUntilTheInterval() throws {
        var c = ScenarioCluster()
        c.addNodes([Member(id: 1, role: .voter, priority: 1), Member(id: 2, role: .voter, priority: 1),
                    Member(id: 3, role: .voter, priority: 3)])
        c.with(1) { $0.campaign() }
        c.stabilize()
        try #require(c.nodes[1]!.replica!.role == .leader)
        let interval = c.config(1).priorityTransferIntervalTicks
        try #require(interval > 200, "the default interval is too short for this test: \(interval)")
        // 200 ticks: one attempt, which times out after an election timeout (10 ticks here).
        let first = Self.run(&c, ticks: 200)
        #expect(first == 1, "\(first) automatic transfer attempts in 200 ticks")
        #expect(c.nodes[1]!.replica!.role == .leader)
        // Proposals are accepted again once the attempt timed out.
        var refused = false
        c.with(1) { r in
            do { return try r.propose([Array("x".utf8)]).1 } catch { refused = true; return r.tick() }
        }
        #expect(!refused, "the leader still refuses proposals long after its transfer attempt timed out")
        // After the interval, one more attempt.
        let later = Self.run(&c, ticks: interval)
        #expect(later == 1, "\(later) automatic transfer attempts in the next \(interval) ticks")
    }
}
