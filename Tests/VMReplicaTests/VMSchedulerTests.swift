// The scheduler's rules without QEMU: who hands leadership on, who takes the VM over, when a
// primary goes on without its backup, and when it asks for a checkpoint.

import Testing
@testable import VMReplica

@Suite struct VMSchedulerTests {
    let rules = SchedulerRules()

    /// A leading, protected primary with a healthy link, nothing held, nothing in flight.
    func view(_ change: (inout SchedulerView) -> Void = { _ in }) -> SchedulerView {
        var v = SchedulerView(role: .primary, leading: true, notACopy: nil, protected: true, linkUp: true, linkDownFor: nil,
                              checkpointInFlight: false, unprotectedRequested: false, failedCheckpointsInARow: 0,
                              sinceLastCheckpointEnd: .seconds(10), lastCheckpointFailed: false, leadingFor: .seconds(10),
                              sinceHandOff: nil, sinceTakeOverProposal: nil, oldestHeldAge: nil, guestIdle: false)
        change(&v)
        return v
    }

    func decide(_ change: (inout SchedulerView) -> Void) -> SchedulerAction { VMScheduler.decide(view(change), rules) }

    @Test func aReplicaThatDoesNotLeadOnlyStepsDownWhenItsVMIsNoCopy() {
        #expect(decide { $0.leading = false } == .nothing)
        #expect(decide { $0.leading = false; $0.role = .backup; $0.linkUp = false } == .nothing)
        #expect(decide { $0.leading = false; $0.notACopy = "restarted" } == .demote)
        #expect(decide { $0.notACopy = "its QEMU exited" } == .demote, "a leading primary steps down first")
    }

    @Test func aLeaderWhoseVMIsNoCopyHandsLeadershipOnAtMostEveryTwoSeconds() {
        guard case .handLeadership = decide({ $0.role = .backup; $0.notACopy = "restarted" }) else {
            Issue.record("a leading backup with a new VM kept leadership")
            return
        }
        #expect(decide { $0.role = .backup; $0.notACopy = "restarted"; $0.sinceHandOff = .seconds(1) } == .nothing)
        #expect(decide { $0.role = .backup; $0.notACopy = "restarted"; $0.linkUp = false } != .proposeTakeOver(because: "the syncvm link to the primary is down"),
                "a backup that is no copy never takes over")
    }

    @Test func aLeadingBackupTakesOverWhenThePrimaryIsGoneOrWillNotLead() {
        #expect(decide { $0.role = .backup; $0.linkUp = false } == .proposeTakeOver(because: "the syncvm link to the primary is down"))
        #expect(decide { $0.role = .backup; $0.linkUp = false; $0.sinceTakeOverProposal = .seconds(1) } == .nothing)
        // An election while the primary lives: leadership goes back, and only after the limit
        // does the backup take over anyway.
        #expect(decide { $0.role = .backup; $0.leadingFor = .seconds(1) } == .handLeadership(because: "a backup leads while the primary is up"))
        #expect(decide { $0.role = .backup; $0.leadingFor = .seconds(1); $0.sinceHandOff = .milliseconds(500) } == .nothing)
        guard case .proposeTakeOver = decide({ $0.role = .backup; $0.leadingFor = .seconds(7) }) else {
            Issue.record("a backup that led past the hand-back limit did not take over")
            return
        }
    }

    @Test func aPrimaryGoesOnWithoutABackupThatIsGone() {
        #expect(decide { $0.linkUp = false; $0.linkDownFor = .milliseconds(500) } == .nothing, "within backup_lost_ms it waits")
        guard case .proposeUnprotected = decide({ $0.linkUp = false; $0.linkDownFor = .milliseconds(1500) }) else {
            Issue.record("a primary whose link was down past backup_lost_ms kept holding answers")
            return
        }
        guard case .proposeUnprotected = decide({ $0.failedCheckpointsInARow = 3 }) else {
            Issue.record("three failed checkpoints in a row did not make the primary go on alone")
            return
        }
        #expect(decide { $0.linkUp = false; $0.linkDownFor = .seconds(5); $0.unprotectedRequested = true } == .nothing, "proposed once")
        #expect(decide { $0.linkUp = false; $0.linkDownFor = .seconds(5); $0.checkpointInFlight = true } == .nothing, "a checkpoint in flight ends first")
        #expect(decide { $0.linkUp = false; $0.linkDownFor = .seconds(5); $0.protected = false } == .nothing, "already alone")
    }

    @Test func aProtectedPrimaryCheckpointsWhenOutputWaitsAndTheGuestIsIdleOrTheOutputIsOld() {
        #expect(decide { _ in } == .nothing, "nothing held")
        #expect(decide { $0.oldestHeldAge = .milliseconds(200) } == .nothing, "busy guest, young output")
        #expect(decide { $0.oldestHeldAge = .milliseconds(200); $0.guestIdle = true } == .proposeCheckpoint)
        #expect(decide { $0.oldestHeldAge = .milliseconds(1200) } == .proposeCheckpoint, "the maximum age")
        #expect(decide { $0.oldestHeldAge = .seconds(5); $0.checkpointInFlight = true } == .nothing)
        #expect(decide { $0.oldestHeldAge = .seconds(5); $0.lastCheckpointFailed = true; $0.sinceLastCheckpointEnd = .milliseconds(500) } == .nothing,
                "after a failure it waits the back-off")
        #expect(decide { $0.oldestHeldAge = .seconds(5); $0.lastCheckpointFailed = true; $0.sinceLastCheckpointEnd = .milliseconds(1500) } == .proposeCheckpoint)
        var gapped = rules
        gapped.checkpointMinGap = .seconds(2)
        #expect(VMScheduler.decide(view { $0.oldestHeldAge = .seconds(5); $0.sinceLastCheckpointEnd = .seconds(1) }, gapped) == .nothing)
    }

    @Test func anUnprotectedPrimaryReprotectsItsBackupAsSoonAsTheLinkIsUp() {
        #expect(decide { $0.protected = false } == .proposeCheckpoint)
        #expect(decide { $0.protected = false; $0.linkUp = false; $0.linkDownFor = .seconds(3) } == .nothing)
    }

    @Test func releaseOnMatchChecksOnlyOnMismatchOldOutputOrAfterMatchesForAWhile() {
        var r = SchedulerRules()
        r.releaseOnMatch = true
        r.outputHoldMax = .milliseconds(100)
        r.checkpointMaxAge = .seconds(1)
        func decide(_ change: (inout SchedulerView) -> Void) -> SchedulerAction { VMScheduler.decide(view(change), r) }
        // Held output the backup has not matched yet, with the guest idle: no checkpoint (PLOVER's
        // trigger would take one).
        #expect(decide { $0.oldestHeldAge = .milliseconds(30); $0.guestIdle = true } == .nothing)
        #expect(decide { $0.oldestHeldAge = .milliseconds(100) } == .proposeCheckpoint)
        #expect(decide { $0.outputMismatch = "tcp-seq" } == .proposeCheckpoint)
        // Right after a checkpoint the backup's new QEMU is cold: its first answers are late, and
        // a checkpoint for them would only start another cold QEMU. A mismatch still checkpoints.
        #expect(decide { $0.oldestHeldAge = .milliseconds(150); $0.sinceLastCheckpointEnd = .milliseconds(160) } == .nothing)
        #expect(decide { $0.oldestHeldAge = .milliseconds(150); $0.sinceLastCheckpointEnd = .milliseconds(299) } == .nothing)
        #expect(decide { $0.oldestHeldAge = .milliseconds(150); $0.sinceLastCheckpointEnd = .milliseconds(300) } == .proposeCheckpoint)
        #expect(decide { $0.oldestHeldAge = .milliseconds(20); $0.sinceLastCheckpointEnd = .milliseconds(300) } == .nothing)
        #expect(decide { $0.outputMismatch = "tcp-seq"; $0.sinceLastCheckpointEnd = .milliseconds(160) } == .proposeCheckpoint)
        #expect(decide { $0.outputMismatch = "tcp-seq"; $0.checkpointInFlight = true } == .nothing)
        #expect(decide { $0.releasedByMatchSinceCheckpoint = true; $0.sinceLastCheckpointEnd = .milliseconds(500) } == .nothing)
        #expect(decide { $0.releasedByMatchSinceCheckpoint = true; $0.sinceLastCheckpointEnd = .seconds(1) } == .proposeCheckpoint)
        #expect(decide { $0.sinceLastCheckpointEnd = .seconds(5) } == .nothing, "nothing went out: nothing to refresh")
        // Unprotected, the backup is still re-protected as soon as its link is up.
        #expect(decide { $0.protected = false } == .proposeCheckpoint)
    }
}
