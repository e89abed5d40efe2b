// The VM replica's role and checkpoint state machine without QEMU: every checkpoint phase
// against a primary, backup or witness killed, the link down and leadership lost; roll-back,
// re-protection, the failure detector, no ping-pong after a restarted replica rejoins, and the
// planned switchover.

import Testing
@testable import VMReplica

@Suite struct VMReplicaMachineTests {
    typealias Action = VMReplicaMachine.Action
    let t0 = ContinuousClock.now
    let rules = SchedulerRules()

    /// Node 1, a leading primary whose backup (node 2) is protected.
    func primary() -> VMReplicaMachine {
        var m = VMReplicaMachine(role: .primary, me: 1, peer: 2, rules: rules, now: t0)
        _ = m.started(recoveredThrough: 0)
        _ = m.observe(leading: true, linkUp: true, now: t0)
        return m
    }

    /// Node 2, a backup made a copy by one complete checkpoint of node 1.
    func protectedBackup() -> VMReplicaMachine {
        var m = VMReplicaMachine(role: .backup, me: 2, peer: 1, rules: rules, now: t0)
        _ = m.started(recoveredThrough: 0)
        #expect(m.apply(.checkpoint(epoch: 1, proposer: 1), at: 5) == [.runCheckpoint(epoch: 1, index: 5, side: .backup)])
        let out = m.checkpointEnded(.completed, now: t0)
        #expect(out.contains { if case let .notice(s) = $0 { s.hasPrefix("vm: protected:") } else { false } })
        #expect(m.notACopy == nil)
        return m
    }

    /// The phases a checkpoint reaches before `phase` (inclusive); nil: killed before the handshake.
    static let cutPoints: [CheckpointPhase?] = [nil] + CheckpointPhase.allCases.map { $0 }
    func reach(_ m: inout VMReplicaMachine, through phase: CheckpointPhase?) {
        guard let phase else { return }
        for p in CheckpointPhase.allCases {
            m.reached(p)
            if p == phase { return }
        }
    }

    /// Pages may have landed once the backup sent its hashes (the primary writes only after it has them).
    func pagesMayHaveLanded(_ phase: CheckpointPhase?) -> Bool {
        guard let phase else { return false }
        return phase != .handshake
    }

    func takesOver(_ m: inout VMReplicaMachine, at index: LogIndex) -> Bool {
        // The failure detector: the link reset, nothing listens at the primary's address.
        guard m.linkWentDown(leader: 1) == [.probePeer] else { return false }
        guard case .campaignNow? = m.peerProbed(listening: false, leader: 1, now: t0 + .seconds(1)).first else { return false }
        // Elected: the next window proposes the take-over, whose application makes it primary.
        guard m.tick(.init(leading: true, linkUp: false), now: t0 + .seconds(1)).contains(.propose(.takeOver(by: 2))) else { return false }
        guard m.apply(.takeOver(by: 2), at: index).contains(.becomePrimary(index: index)) else { return false }
        return m.role == .primary && m.answersClients && !m.protected
    }

    /// The disk step comes after the RAM's pages and before the device state: a backup cut off
    /// there rolls back (RAM pages and disk blocks) and stays a copy; a backup that was no copy
    /// is abandoned, and a primary forgets its baselines (RAM and disk: the next sync compares all).
    @Test func aCheckpointCutOffInTheDiskPhaseRollsBackOrForgetsItsBaseline() {
        let order = CheckpointPhase.allCases
        #expect(order.firstIndex(of: .disk)! == order.firstIndex(of: .pages)! + 1 && order.firstIndex(of: .disk)! + 1 == order.firstIndex(of: .device)!)
        var b = protectedBackup()
        _ = b.apply(.checkpoint(epoch: 2, proposer: 1), at: 9)
        reach(&b, through: .disk)
        #expect(b.checkpoint?.phase == .disk)
        #expect(b.checkpointEnded(.failed(reason: "disk sync: link down", pagesMayHaveLanded: true), now: t0)
                == [.dropBaseline, .rollBack(reason: "disk sync: link down")])
        #expect(b.notACopy == nil)
        var fresh = VMReplicaMachine(role: .backup, me: 2, peer: 1, rules: rules, now: t0)
        _ = fresh.started(recoveredThrough: 0)
        _ = fresh.apply(.checkpoint(epoch: 1, proposer: 1), at: 5)
        reach(&fresh, through: .disk)
        #expect(fresh.checkpointEnded(.failed(reason: "cut", pagesMayHaveLanded: true), now: t0).prefix(2) == [.dropBaseline, .abandonVM])
        var p = primary()
        _ = p.apply(.checkpoint(epoch: 3, proposer: 1), at: 11)
        reach(&p, through: .disk)
        #expect(p.checkpointEnded(.failed(reason: "disk sync failed", pagesMayHaveLanded: false), now: t0) == [.dropBaseline])
    }

    @Test func thePrimaryKilledAtAnyPhaseLeavesABackupThatTakesOver() {
        for cut in Self.cutPoints {
            var m = protectedBackup()
            #expect(m.apply(.checkpoint(epoch: 2, proposer: 1), at: 9) == [.runCheckpoint(epoch: 2, index: 9, side: .backup)])
            reach(&m, through: cut)
            var out: [Action]
            if cut == .resume {
                // The device state arrived: the checkpoint completed before the primary died.
                out = m.checkpointEnded(.completed, now: t0)
                #expect(out.isEmpty)
            } else {
                #expect(m.checkpointObserved(linkUp: false, leading: false) == [.abortCheckpoint(reason: "the syncvm link to node 1 went down")])
                #expect(m.checkpointAbort != nil)
                out = m.checkpointEnded(.failed(reason: "link down", pagesMayHaveLanded: pagesMayHaveLanded(cut)), now: t0)
                #expect(out.contains(.rollBack(reason: "link down")) == pagesMayHaveLanded(cut), "cut at \(String(describing: cut))")
                #expect(!out.contains(.abandonVM))
            }
            #expect(m.notACopy == nil, "cut at \(String(describing: cut)): the backup's VM stays a copy")
            #expect(takesOver(&m, at: 12), "cut at \(String(describing: cut))")
        }
    }

    @Test func theBackupKilledAtAnyPhaseLeavesThePrimaryServingWithoutIt() {
        for cut in Self.cutPoints where cut != .resume {
            var m = primary()
            #expect(m.tick(.init(leading: true, linkUp: true, oldestHeldAge: .milliseconds(5), guestIdle: true), now: t0 + .seconds(1))
                    == [.propose(.checkpoint(epoch: 1, proposer: 1))])
            #expect(m.apply(.checkpoint(epoch: 1, proposer: 1), at: 7) == [.runCheckpoint(epoch: 1, index: 7, side: .primary)])
            reach(&m, through: cut)
            #expect(m.checkpointObserved(linkUp: false, leading: true).count == 1)
            let out = m.checkpointEnded(.failed(reason: "link down", pagesMayHaveLanded: false), now: t0 + .seconds(1))
            #expect(out.contains(.dropBaseline) == (cut != nil), "only a paused primary moved its baseline")
            #expect(m.protected && m.role == .primary)
            // Within backup_lost_ms it waits; then it proposes to go on alone, and applying that releases what it held.
            #expect(m.tick(.init(leading: true, linkUp: false, oldestHeldAge: .milliseconds(100)), now: t0 + .seconds(1)).isEmpty)
            let later = m.tick(.init(leading: true, linkUp: false, oldestHeldAge: .milliseconds(1200)), now: t0 + .milliseconds(2100))
            #expect(later.contains(.propose(.unprotected(by: 1))), "cut at \(String(describing: cut))")
            #expect(m.apply(.unprotected(by: 1), at: 8).first == .releaseHeld)
            #expect(m.role == .primary && !m.protected && m.unprotectedSince == 8 && m.answersClients)
        }
    }

    @Test func theWitnessKilledAtAnyPhaseChangesNothing() {
        // Primary and backup still form a quorum: the link stays up, the primary keeps leading.
        for cut in Self.cutPoints {
            var p = primary()
            _ = p.claimCheckpoint()
            _ = p.apply(.checkpoint(epoch: 1, proposer: 1), at: 7)
            var b = protectedBackup()
            _ = b.apply(.checkpoint(epoch: 1, proposer: 1), at: 7)
            reach(&p, through: cut)
            reach(&b, through: cut)
            #expect(p.checkpointObserved(linkUp: true, leading: true).isEmpty && p.checkpointAbort == nil)
            #expect(b.checkpointObserved(linkUp: true, leading: false).isEmpty && b.checkpointAbort == nil)
            #expect(p.checkpointEnded(.completed, now: t0).isEmpty && !p.checkpointSlotTaken && !p.lastCheckpointFailed)
            _ = b.checkpointEnded(.completed, now: t0)
            #expect(b.notACopy == nil && b.role == .backup && p.role == .primary)
        }
    }

    @Test func leadershipLostAtAnyPhaseAbortsThePrimarysCheckpointOnly() {
        for cut in Self.cutPoints {
            var p = primary()
            _ = p.claimCheckpoint()
            _ = p.apply(.checkpoint(epoch: 1, proposer: 1), at: 7)
            reach(&p, through: cut)
            #expect(p.checkpointObserved(linkUp: true, leading: false) == [.abortCheckpoint(reason: "this replica no longer leads")])
            #expect(p.checkpointObserved(linkUp: false, leading: false).isEmpty, "the first reason wins, once")
            _ = p.checkpointEnded(.failed(reason: "aborted", pagesMayHaveLanded: false), now: t0)
            #expect(p.failedCheckpointsInARow == 1 && p.protected)
            var b = protectedBackup()
            _ = b.apply(.checkpoint(epoch: 1, proposer: 1), at: 7)
            reach(&b, through: cut)
            #expect(b.checkpointObserved(linkUp: true, leading: true).isEmpty, "a backup's checkpoint does not depend on who leads")
        }
    }

    @Test func aCutOffCheckpointRollsBackOnlyAVMThatWasACopy() {
        var fresh = VMReplicaMachine(role: .backup, me: 2, peer: 1, rules: rules, now: t0)
        _ = fresh.started(recoveredThrough: 0)
        _ = fresh.apply(.checkpoint(epoch: 1, proposer: 1), at: 3)
        fresh.reached(.handshake)
        fresh.reached(.hashes)
        let out = fresh.checkpointEnded(.failed(reason: "link down", pagesMayHaveLanded: true), now: t0)
        #expect(out.contains(.abandonVM) && !out.contains(.rollBack(reason: "link down")))
        #expect(fresh.notACopy != nil)
        // Before any page landed nothing is undone, and the baseline is forgotten.
        var copy = protectedBackup()
        _ = copy.apply(.checkpoint(epoch: 2, proposer: 1), at: 4)
        #expect(copy.checkpointEnded(.failed(reason: "x", pagesMayHaveLanded: false), now: t0) == [.dropBaseline])
        _ = copy.apply(.checkpoint(epoch: 3, proposer: 1), at: 5)
        #expect(copy.checkpointEnded(.skipped, now: t0) == [.dropBaseline])
        #expect(copy.notACopy == nil)
    }

    @Test func reProtectionClearsOnlyTheReasonTheCheckpointStartedWith() {
        var b = VMReplicaMachine(role: .backup, me: 2, peer: 1, rules: rules, now: t0)
        _ = b.started(recoveredThrough: 0)
        // No inputs reach a VM that is no copy; they do once it is one.
        #expect(b.apply(.input(frame: [1]), at: 1).isEmpty)
        _ = b.apply(.checkpoint(epoch: 1, proposer: 1), at: 2)
        _ = b.checkpointEnded(.completed, now: t0)
        #expect(b.notACopy == nil)
        #expect(b.apply(.input(frame: [1]), at: 3) == [.writeInput(frame: [1])])
        // A reason arriving during a checkpoint of a VM that was a copy ...
        _ = b.apply(.checkpoint(epoch: 2, proposer: 1), at: 4)
        _ = b.markInconsistent("the log was restored from a snapshot")
        _ = b.checkpointEnded(.completed, now: t0)
        #expect(b.notACopy != nil, "... is not cleared by it")
        // The primary went on alone: the backup is no copy until a checkpoint after that.
        var c = protectedBackup()
        _ = c.apply(.unprotected(by: 1), at: 4)
        #expect(c.notACopy != nil)
        _ = c.apply(.checkpoint(epoch: 2, proposer: 1), at: 5)
        _ = c.checkpointEnded(.completed, now: t0)
        #expect(c.notACopy == nil)
        // The primary's side: a take-over by the backup before it was re-protected is void.
        var p = primary()
        _ = p.apply(.unprotected(by: 1), at: 4)
        #expect(p.apply(.takeOver(by: 2), at: 6).allSatisfy { if case .warning = $0 { true } else { false } })
        #expect(p.role == .primary)
        _ = p.claimCheckpoint()
        _ = p.apply(.checkpoint(epoch: 1, proposer: 1), at: 7)
        _ = p.checkpointEnded(.completed, now: t0)
        #expect(p.unprotectedSince == nil, "a checkpoint after the entry re-protects the pair")
    }

    @Test func aRestartedReplicaRejoinsAsBackupWithoutPingPong() {
        // The old primary restarts with a new VM: it is the backup, skips its replays, and
        // however the link and leadership look it never takes the VM or forces an election.
        var m = VMReplicaMachine(role: .primary, me: 1, peer: 2, rules: rules, now: t0)
        _ = m.started(recoveredThrough: 10)
        #expect(m.role == .backup && m.notACopy != nil)
        #expect(m.apply(.takeOver(by: 1), at: 4).isEmpty, "a replayed entry changes nothing")
        #expect(!m.linkWentDown(leader: 2).contains(.probePeer))
        #expect(m.peerProbed(listening: false, leader: 2, now: t0).isEmpty)
        var changes = 0
        for w in 0..<3000 {  // 60 s of 20 ms windows, leading and not, link up and down
            let now = t0 + .milliseconds(20 * w)
            let out = m.tick(.init(leading: w % 7 == 0, linkUp: w % 5 != 0), now: now)
            #expect(!out.contains(.propose(.takeOver(by: 1))))
            changes += out.filter { if case .handLeadership = $0 { true } else { false } }.count
        }
        #expect(changes <= 30, "leadership handed back at most once per 2 s")
        // The primary's first checkpoint with it re-protects it; it then hands leadership back
        // to a live primary instead of taking over.
        _ = m.apply(.checkpoint(epoch: 4, proposer: 2), at: 11)
        _ = m.checkpointEnded(.completed, now: t0)
        #expect(m.notACopy == nil)
        guard case .handLeadership? = m.tick(.init(leading: true, linkUp: true), now: t0 + .seconds(70)).last else {
            Issue.record("a protected backup elected while the primary lives kept leadership")
            return
        }
    }

    @Test func theFailureDetectorForcesAnElectionOnlyWhenThePrimarysProcessIsGone() {
        var m = protectedBackup()
        #expect(m.linkWentDown(leader: nil).isEmpty, "no leader to replace")
        #expect(m.linkWentDown(leader: 1) == [.probePeer])
        #expect(!m.peerProbed(listening: true, leader: 1, now: t0).contains { if case .campaignNow = $0 { true } else { false } },
                "a link dropped by a live primary leaves leadership alone")
        #expect(m.peerProbed(listening: false, leader: 3, now: t0).isEmpty, "it follows someone else")
        guard case .campaignNow? = m.peerProbed(listening: false, leader: 1, now: t0).first else {
            Issue.record("a dead primary's backup waited for the election timeout")
            return
        }
        #expect(m.peerProbed(listening: false, leader: 1, now: t0 + .seconds(1)).isEmpty, "one forced election per 2 s")
        #expect(!m.peerProbed(listening: false, leader: 1, now: t0 + .seconds(3)).isEmpty)
        // A checkpoint the backup waits in (its link is gone, so it never sees it drop) is
        // aborted by the detector's verdict, and by its own take-over, so the driver is free.
        var w = protectedBackup()
        _ = w.apply(.checkpoint(epoch: 2, proposer: 1), at: 9)
        #expect(w.peerProbed(listening: false, leader: 1, now: t0).first == .abortCheckpoint(reason: "primary 1's process is gone"))
        var v = protectedBackup()
        _ = v.apply(.checkpoint(epoch: 2, proposer: 1), at: 9)
        #expect(v.peerProbed(listening: true, leader: 1, now: t0).allSatisfy { if case .info = $0 { true } else { false } })
        #expect(v.tick(.init(leading: true, linkUp: false), now: t0).first == .abortCheckpoint(reason: "this backup takes the VM over"))
        var p = primary()
        #expect(p.linkWentDown(leader: 1).isEmpty, "a primary never campaigns against itself")
        _ = p.stop()
        #expect(p.tick(.init(leading: true, linkUp: true, oldestHeldAge: .seconds(5)), now: t0 + .seconds(9)).isEmpty)
    }

    @Test func aSwitchoverIsACheckpointThenATakeOverByTheBackup() {
        var p = primary()
        guard let epoch = p.claimCheckpoint() else { Issue.record("no slot"); return }
        #expect(p.claimCheckpoint() == nil, "one checkpoint at a time")
        #expect(p.tick(.init(leading: true, linkUp: true, oldestHeldAge: .seconds(5), guestIdle: true), now: t0 + .seconds(1)).isEmpty)
        _ = p.apply(.checkpoint(epoch: epoch, proposer: 1), at: 20)
        p.reached(.handshake)
        _ = p.checkpointEnded(.completed, now: t0)
        #expect(!p.lastCheckpointFailed && !p.checkpointSlotTaken)
        var b = protectedBackup()
        _ = b.apply(.checkpoint(epoch: epoch, proposer: 1), at: 20)
        _ = b.checkpointEnded(.completed, now: t0)
        let old = p.apply(.takeOver(by: 2), at: 21)
        #expect(old.contains(.becomeBackup(because: "node 2 took the VM over at log index 21")))
        #expect(p.role == .backup && p.notACopy != nil)
        #expect(b.apply(.takeOver(by: 2), at: 21).contains(.becomePrimary(index: 21)))
        #expect(b.role == .primary && b.unprotectedSince == 21)
        // A failed proposal frees the slot again.
        var q = primary()
        _ = q.claimCheckpoint()
        _ = q.proposalFailed(.checkpoint(epoch: 1, proposer: 1))
        #expect(!q.checkpointSlotTaken)
    }

    /// A connection offset is the primary's to release by and its backup's to rewrite by, each
    /// only while in that role at the entry's log position: after a take-over the old primary's
    /// entries change nothing on either side.
    @Test func aConnectionOffsetEntryActsOnlyForItsPrimaryAndThatPrimarysBackup() {
        let key = TCPConnectionKey(guestIP: 1, guestPort: 2, peerIP: 3, peerPort: 4)
        let e = LearntOffset(generation: 1, proposer: 1, ticket: 7, key: key, offset: ConnectionOffset(sequence: 9))
        var p = primary()
        #expect(p.apply(.connectionOffset(e), at: 6) == [.offsetApplied(generation: 1, ticket: 7)])
        var b = protectedBackup()
        #expect(b.apply(.connectionOffset(e), at: 6) == [.learnOffset(e)])
        // The backup took over at 7: the old primary's later entry is nobody's.
        _ = b.apply(.takeOver(by: 2), at: 7)
        #expect(b.role == .primary && b.apply(.connectionOffset(e), at: 8).isEmpty)
        _ = p.apply(.takeOver(by: 2), at: 7)
        #expect(p.role == .backup && p.apply(.connectionOffset(e), at: 8).isEmpty)
    }
}
