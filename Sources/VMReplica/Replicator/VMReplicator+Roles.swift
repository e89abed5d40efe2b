// Who is primary. The replica that leads owns the VM clients see: a backup that leads becomes
// the primary (its output goes out unprotected until a new backup holds a copy), and a restarted
// primary comes back as that primary's backup (VMReplicator.start). docs/design/vmreplica.md,
// "Re-protection".

#if canImport(Glibc)
import Glibc
#endif
import Foundation
import RDMAPaxos

extension VMReplicator {
    // MARK: syncvm endpoint

    /// Opens this replica's syncvm endpoint for `role` on `sync_address` (a fresh fabric of
    /// `syncLink`'s kind; the previous one, if any, is closed first so the port is free) and starts
    /// connecting it.
    func openSyncEndpoint(as role: Role) async throws {
        let (oldChannel, oldFabric) = lock.withLock { () -> (FabricSyncChannel?, (any Fabric)?) in
            defer {
                channel = nil
                endpoint = nil
                syncFabric = nil
            }
            return (channel, syncFabric)
        }
        oldChannel?.close()
        oldFabric?.close()
        guard let (host, port) = splitHostPort(config.syncAddress) else {
            throw SocketError(operation: "parse", address: config.syncAddress, errno: EINVAL)
        }
        let fabric = try syncLink.open(me, [me, config.peer])
        let at = PeerAddress(node: me, host: host, port: port)
        let configuration = syncLink.channel
        // The port may linger for a moment after the old fabric closed.
        var attempt = 0
        var opened: FabricSyncChannel.Endpoint?
        while opened == nil {
            do {
                opened = role == .primary
                    ? try await FabricSyncChannel.Endpoint.primary(fabric: fabric, listenAt: at, configuration: configuration)
                    : try await FabricSyncChannel.Endpoint.backup(memory: memory, fabric: fabric, listenAt: at, configuration: configuration)
            } catch {
                attempt += 1
                guard attempt < 25 else {
                    fabric.close()
                    throw error
                }
                try await Task.sleep(for: .milliseconds(200))
            }
        }
        let e = opened!
        lock.withLock {
            syncFabric = fabric
            endpoint = e
        }
        Task { await self.connectLoop(e) }
    }

    /// Drops a syncvm link that went down (the peer's process died, a sync failed, the peer
    /// reopened its endpoint in another role) and starts connecting again. The endpoint's
    /// mailbox is cleared first, while no peer is connected, so nothing the old peer wrote is
    /// read as the new one's. Called every scheduler window and before each checkpoint.
    func reviveLinkIfDown() {
        let (down, e) = lock.withLock { () -> (FabricSyncChannel?, FabricSyncChannel.Endpoint?) in
            guard let c = channel, c.isDown else { return (nil, nil) }
            channel = nil
            return (c, endpoint)
        }
        guard let down else { return }
        down.close()
        logger.info("vm: syncvm link to node \(config.peer) is down; connecting again")
        if let e {
            e.resetMailbox()
            Task { await self.connectLoop(e) }
        }
    }

    // MARK: Take-over

    /// Driver thread, applying `takeOver(by: me)` at `index`: this backup becomes the primary.
    /// It has run every input before the entry, its VM is the one clients see from now on: the
    /// standby QEMU goes, a primary's syncvm endpoint opens for a backup to join, and output goes
    /// out at once until the first checkpoint with that backup.
    func becomePrimary(at index: LogIndex) {
        let (ok, standby, why) = lock.withLock { () -> (Bool, QEMUInstance?, String?) in
            guard currentRole == .backup, inconsistent == nil, unusable == nil, !stopped else {
                return (false, nil, inconsistent ?? unusable)
            }
            currentRole = .primary
            protected = false
            inFlight = false
            // It answers without a backup from here: the old primary's VM is no copy until a
            // checkpoint re-protects it, and a take-over by it before that is void.
            unprotectedSince = index
            failedCheckpointsInARow = 0
            linkDownSince = nil
            defer { spare = nil }
            return (true, spare, nil)
        }
        guard ok else {
            if let why { logger.error("vm: the take-over at log index \(index) found this VM unfit (\(why)); no replica holds the VM now") }
            return
        }
        standby?.kill()
        logger.notice("vm: node \(me) is the primary now (take-over at log index \(index)): its VM is the one clients see; output goes out unprotected until a backup is re-protected")
        do {
            try blocking(timeout: checkpointTimeout) { try await self.openSyncEndpoint(as: .primary) }
        } catch {
            logger.error("vm: cannot open the primary's syncvm endpoint on \(config.syncAddress): \(error); no backup can be re-protected")
        }
    }

    /// Driver thread: this primary stops owning the VM (the other replica's take-over was
    /// committed, or its own VM is no copy of anything) and becomes a backup. Its held output
    /// is dropped (clients resend), its RAM is mapped writable with the mailbox, a backup's
    /// endpoint and a standby QEMU open, and the new primary's next checkpoint re-protects it.
    func becomeBackup(because why: String) {
        let (ok, held) = lock.withLock { () -> (Bool, Int) in
            guard currentRole == .primary, !stopped else { return (false, 0) }
            currentRole = .backup
            protected = true
            inFlight = false
            unprotectedSince = nil
            unprotectedRequested = false
            failedCheckpointsInARow = 0
            return (true, outputs.heldCount)
        }
        guard ok else { return }
        markInconsistent(why)
        outputs.dropHeld()
        hashDiff = nil
        logger.notice("vm: node \(me) is a backup now; \(held) answers it held are dropped (clients resend)")
        do {
            memory = try GuestMemory(mappingFile: config.qemu.ramFile, writable: true, trailingBytes: syncLink.channel.mailboxBytes)
            try blocking(timeout: checkpointTimeout) { try await self.openSyncEndpoint(as: .backup) }
            startSpare()
        } catch {
            markUnusable("cannot become node \(config.peer)'s backup: \(error)")
        }
    }

    /// Driver thread, applying `unprotected(by: me)` at `index`: this primary goes on without a
    /// backup. The output it held is released (the entry is committed, so no backup can take the
    /// VM over without a checkpoint after it), and output goes out at once until a backup is
    /// re-protected; the scheduler asks for that checkpoint as soon as a backup's link is up.
    func goUnprotected(at index: LogIndex) {
        let ok = lock.withLock { () -> Bool in
            unprotectedRequested = false
            guard currentRole == .primary, !stopped else { return false }
            protected = false
            unprotectedSince = index
            return true
        }
        guard ok else { return }
        let out = outputs.releaseAll()
        for a in out { front?.deliver(a) }
        logger.warning("vm: primary \(me) goes on without a backup from log index \(index) (released \(out.count) held answers); node \(config.peer) must be re-protected before it may take over")
    }

    // MARK: Scheduling

    /// One loop per replica, every `idle_window_ms`: revives a syncvm link that went down, and
    /// decides what only a leader may:
    /// - a VM that is no copy of the replicated one (restarted, never synced) hands leadership
    ///   to the other VM replica, and a primary with one steps down to backup;
    /// - a consistent backup that leads proposes a take-over when the primary is gone (its syncvm
    ///   link is down) or after `handBackLimit` of trying in vain to hand leadership back to a
    ///   live primary; roles change only when that entry is applied, in log order, on both;
    /// - a primary asks for checkpoints: PLOVER's trigger (output is waiting and the guest went
    ///   idle — its QEMU's CPU rate fell below the threshold for one window — or the oldest held
    ///   output reached the max period) or, while unprotected, as soon as a backup's link is up.
    func schedulerLoop() {
        var meter: CPUMeter?
        var leadingSince: ContinuousClock.Instant?
        let window = Double(config.idleWindowMilliseconds) / 1000
        let rules = SchedulerRules(handBackLimit: handBackLimit, backupLostAfter: backupLostAfter,
                                   checkpointMinGap: .milliseconds(config.checkpointMinGapMilliseconds),
                                   failedCheckpointBackoff: failedCheckpointBackoff,
                                   checkpointMaxAge: .milliseconds(config.checkpointMaxMilliseconds))
        while !lock.withLock({ stopped }) {
            Thread.sleep(forTimeInterval: window)
            reviveLinkIfDown()
            guard let node else { continue }
            let q = lock.withLock { current }
            let leading = node.status.role == .leader && q != nil
            if leading { leadingSince = leadingSince ?? .now } else { leadingSince = nil; meter = nil }
            if let q, leading {
                if meter?.pid != q.pid { meter = CPUMeter(pid: q.pid) }
            }
            let rate: Double? = meter != nil ? meter!.sample() : nil
            let now = ContinuousClock.now
            let view = lock.withLock { () -> SchedulerView in
                let linkUp = channel.map { !$0.isDown } ?? false
                if linkUp { linkDownSince = nil } else if linkDownSince == nil { linkDownSince = now }
                return SchedulerView(
                    role: currentRole, leading: leading, notACopy: unusable ?? inconsistent, protected: protected, linkUp: linkUp,
                    linkDownFor: linkDownSince.map { now - $0 }, checkpointInFlight: inFlight, unprotectedRequested: unprotectedRequested,
                    failedCheckpointsInARow: failedCheckpointsInARow, sinceLastCheckpointEnd: now - lastCheckpointEnd,
                    lastCheckpointFailed: lastCheckpointFailed, leadingFor: leadingSince.map { now - $0 } ?? .zero,
                    sinceHandOff: lastHandOff.map { now - $0 }, sinceTakeOverProposal: lastTakeOverProposal.map { now - $0 },
                    oldestHeldAge: outputs.oldestHeld.map { now - $0 },
                    guestIdle: rate.map { $0 * 100 < Double(config.idleCPUPercent) } ?? false)
            }
            carryOut(VMScheduler.decide(view, rules), node: node)
        }
    }

    /// Does what the scheduler decided.
    func carryOut(_ action: SchedulerAction, node: ReplicaNode) {
        switch action {
        case .nothing:
            return
        case .demote:
            queueCond.withLock {
                demoteRequested = true
                queueCond.signal()
            }
        case let .handLeadership(because):
            lastHandOff = .now
            logger.warning("vm: node \(me) hands leadership to node \(config.peer): \(because)")
            let peer = config.peer
            Task { try? await node.transferLeadership(to: peer) }
        case let .proposeTakeOver(because):
            lastTakeOverProposal = .now
            logger.notice("vm: backup \(me) leads and takes over: \(because)")
            let entry = VMLogEntry.takeOver(by: me).encoded()
            Task {
                do { _ = try await node.propose(entry) } catch {
                    self.logger.warning("vm: take-over by node \(self.me) not committed: \(error)")
                }
            }
        case let .proposeUnprotected(because):
            lock.withLock { unprotectedRequested = true }
            logger.warning("vm: primary \(me) lost its backup (\(because)); going on without it")
            let entry = VMLogEntry.unprotected(by: me).encoded()
            Task {
                do { _ = try await node.propose(entry) } catch {
                    self.logger.warning("vm: going on without a backup not committed: \(error)")
                    self.lock.withLock { self.unprotectedRequested = false }
                }
            }
        case .proposeCheckpoint:
            let epoch = lock.withLock { () -> UInt64? in
                guard !inFlight else { return nil }  // a switchover took the slot meanwhile
                inFlight = true
                defer { nextEpoch += 1 }
                return nextEpoch
            }
            guard let epoch else { return }
            let entry = VMLogEntry.checkpoint(epoch: epoch, proposer: me).encoded()
            Task {
                do { _ = try await node.propose(entry) } catch {
                    self.logger.warning("vm: checkpoint \(epoch) not committed: \(error)")
                    self.lock.withLock { self.inFlight = false }
                }
            }
        }
    }
}
