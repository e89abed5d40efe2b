import Testing
import RDMAPaxosSimulation

/// The seeded simulator over the consensus core. `make test` also runs 1,000 seeds through
/// `plover simulate`; these cover every topology inside the test suite.
@Suite struct SimulatorTests {
    @Test(arguments: 1...40 as ClosedRange<UInt64>)
    func seedSurvivesFaultsAndConverges(seed: UInt64) throws {
        let report = try simulate(.standard(seed: seed))
        // The run must have done real work, not idled through the faults.
        #expect(report.committed > 20, "\(report)")
        #expect(report.acknowledged > 0, "\(report)")
    }

    /// The learner topology changes its membership under faults (promote, demote, remove, add
    /// back, through the operators' guards) while every checker runs, and converges after.
    @Test func membershipChangesUnderFaultsKeepEveryChecker() throws {
        var changes = 0
        for seed in stride(from: 3, through: 159, by: 4) as StrideThrough<UInt64> {
            let r = try simulate(.standard(seed: seed))
            changes += r.membershipChanges
        }
        #expect(changes >= 40, "only \(changes) membership changes in 40 runs")
    }

    /// Crashes that lose durable state happen, and the replicas that lost it recover.
    @Test func lostStateCrashesHappenAndRecover() throws {
        var lost = 0, recovered = 0
        for seed in 1...40 as ClosedRange<UInt64> {
            let r = try simulate(.standard(seed: seed))
            lost += r.lostStateCrashes
            recovered += r.recoveries
        }
        #expect(lost >= 10 && recovered >= lost / 2, "\(lost) lost-state crashes, \(recovered) recoveries")
    }

    /// The checkers catch the behaviour before recovery existed: a replica that lost its state is
    /// told it is intact and votes at once (`plover simulate --broken trust-lost-state`).
    @Test func withoutRecoveryTheSimulatorFindsAViolation() {
        var failure: SimulationFailure?
        for seed in 1...1000 as ClosedRange<UInt64> {
            var o = SimulationOptions.standard(seed: seed)
            o.trustLostState = true
            do { _ = try simulate(o) } catch {
                failure = error
                break
            }
        }
        #expect(failure != nil, "no violation in 1,000 seeds with recovery off")
    }

    /// The persistence checkers catch a leader that counts itself toward the commit quorum before
    /// its own write is durable and answers clients on that commit (`plover simulate --broken
    /// leader-counts-undurable`): a leader crash then loses an acknowledged write.
    @Test func aLeaderCountingUndurableEntriesIsCaught() {
        var failure: SimulationFailure?
        for seed in 1...1000 as ClosedRange<UInt64> {
            var o = SimulationOptions.standard(seed: seed)
            o.leaderCountsUndurableEntries = true
            do { _ = try simulate(o) } catch {
                failure = error
                break
            }
        }
        #expect(failure != nil, "no violation in 1,000 seeds with the leader counting undurable entries")
    }

    /// SKIPNOOP
    @Test func aLeaderSkippingItsNoopIsCaught() {
        let failure = firstViolation { $0.leaderSkipsNoop = true }
        #expect(failure != nil, "no violation in 1,000 seeds with leaders skipping their no-op")
    }

    /// FORGET
    @Test func aReplicaForgettingItsPromiseOnRestartIsCaught() {
        let failure = firstViolation { $0.forgetPromiseOnRestart = true }
        #expect(failure != nil, "no violation in 1,000 seeds with promises forgotten on restart")
    }

    /// APPLY
    @Test func applyingPastTheCommitIndexIsCaught() {
        let failure = firstViolation { $0.applyPastCommit = true }
        #expect(failure != nil, "no violation in 1,000 seeds with replicas applying past their commit index")
    }

    /// READ
    @Test func readsWithoutQuorumConfirmationAreCaught() {
        let failure = firstViolation { $0.readWithoutQuorum = true }
        #expect(failure != nil, "no violation in 1,000 seeds with reads answered without a quorum round")
    }

    /// The first violation over seeds 1 to 1,000 of the standard fault mixes, changed by `broken`.
    func firstViolation(_ broken: (inout SimulationOptions) -> Void) -> SimulationFailure? {
        for seed in 1...1000 as ClosedRange<UInt64> {
            var o = SimulationOptions.standard(seed: seed)
            broken(&o)
            do { _ = try simulate(o) } catch { return error }
        }
        return nil
    }

    @Test func sameSeedReplaysIdentically() throws {
        let a = try simulate(.standard(seed: 77))
        let b = try simulate(.standard(seed: 77))
        #expect(a == b)
    }

    @Test func faultMixRotatesThroughTopologies() {
        let shapes = (0..<4).map { s -> String in
            let o = SimulationOptions.standard(seed: UInt64(s))
            return "\(o.voters)/\(o.witness)/\(o.learner)"
        }
        #expect(Set(shapes).count == 4)
    }

    @Test func heavyFaultsStillConverge() throws {
        var o = SimulationOptions.standard(seed: 4242)
        o.dropRate = 0.2
        o.crashRate = 0.03
        o.partitionRate = 0.03
        o.diskStallRate = 0.02
        let r = try simulate(o)
        #expect(r.crashes + r.partitions + r.diskStalls > 0)
    }
}
