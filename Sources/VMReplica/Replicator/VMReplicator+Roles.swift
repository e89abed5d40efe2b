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
        guard let address = HostPort(parsing: config.syncAddress, allowingPortZero: true) else {
            throw SocketError(operation: "parse", address: config.syncAddress, errno: EINVAL)
        }
        let fabric = try syncLink.open(me, [me, config.peer])
        let at = PeerAddress(node: me, address)
        let configuration = syncLink.channel
        // The port may linger for a moment after the old fabric closed.
        var attempt = 0
        var opened: FabricSyncChannel.Endpoint?
        while opened == nil {
            do {
                opened = role == .primary
                    ? try await FabricSyncChannel.Endpoint.primary(fabric: fabric, listenAt: at, configuration: configuration, divert: digestDivert)
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
    /// read as the new one's. Called every scheduler window and before each checkpoint; true when
    /// it found the link down.
    @discardableResult
    func reviveLinkIfDown() -> Bool {
        let (down, e) = lock.withLock { () -> (FabricSyncChannel?, FabricSyncChannel.Endpoint?) in
            guard let c = channel, c.isDown else { return (nil, nil) }
            channel = nil
            return (c, endpoint)
        }
        guard let down else { return false }
        down.close()
        logger.info("vm: syncvm link to node \(config.peer) is down; connecting again")
        // Whoever finds it down first (the scheduler, or a checkpoint about to wait for it)
        // tells the machine, whose failure detector may probe the primary.
        if let node {
            let leader = node.status.leader
            lock.withLock { timeline.start() }
            run { $0.linkWentDown(leader: leader) }
        }
        if let e {
            e.resetMailbox()
            Task { await self.connectLoop(e) }
        }
        return true
    }

    // MARK: Role changes (the effects of the machine's becomePrimary / becomeBackup)

    /// Driver thread, after `takeOver(by: me)` made this backup the primary: the standby QEMU
    /// goes, and a primary's syncvm endpoint opens for a backup to join.
    func becomePrimary(at index: LogIndex) {
        let (standby, rewritten) = lock.withLock { () -> (QEMUInstance?, Int) in
            timeline.note(.takeOverApplied)
            // Its whole table is its own now (the output path already rewrote by all of it).
            connections.becomePrimary()
            defer { spare = nil }
            return (spare, connections.base.offsets.count)
        }
        standby?.kill()
        if rewritten > 0 { logger.notice("vm: node \(me) rewrites \(rewritten) connections by the offsets learnt as the backup (seq, TSval out; ack, SACK, TSecr in)") }
        do {
            try blocking(timeout: checkpointTimeout) { try await self.openSyncEndpoint(as: .primary) }
        } catch {
            logger.error("vm: cannot open the primary's syncvm endpoint on \(config.syncAddress): \(error); no backup can be re-protected")
        }
        lock.withLock { timeline.note(.serving) }
    }

    /// Driver thread, after this primary became a backup: its held output is dropped (clients
    /// resend), its RAM is mapped writable with the mailbox, a backup's endpoint and a standby
    /// QEMU open, and the new primary's next checkpoint re-protects it.
    func becomeBackup() {
        let held = outputs.heldCount
        outputs.dropHeld()
        lock.withLock {
            backupGeneration = nil
            connections.reset()
        }
        hashDiff = nil
        logger.notice("vm: node \(me) is a backup now; \(held) answers it held are dropped (clients resend)")
        do {
            memory = try GuestMemory(mappingFile: config.qemu.ramFile, writable: true, trailingBytes: syncLink.channel.mailboxBytes)
            try blocking(timeout: checkpointTimeout) { try await self.openSyncEndpoint(as: .backup) }
            startSpare()
        } catch {
            run { $0.markUnusable("cannot become node \(self.config.peer)'s backup: \(error)") }
        }
    }

    // MARK: Scheduling

    /// One loop per replica, every `idle_window_ms`: revives a syncvm link that went down (and
    /// tells the machine, whose failure detector may probe the primary), then gives the machine
    /// one window of what it observed; the rules are `VMScheduler.decide`.
    func schedulerLoop() {
        var meter: CPUMeter?
        let window = Double(config.idleWindowMilliseconds) / 1000
        while !isStopped {
            Thread.sleep(forTimeInterval: window)
            reviveLinkIfDown()
            guard let node else { continue }
            let status = node.status
            let q = lock.withLock { current }
            let leading = status.role == .leader && q != nil
            if let q, leading {
                if meter?.pid != q.pid { meter = CPUMeter(pid: q.pid) }
            } else {
                meter = nil
            }
            let rate: Double? = meter != nil ? meter!.sample() : nil
            let now = ContinuousClock.now
            let o = VMReplicaMachine.Observation(
                leading: leading, linkUp: lock.withLock { channel.map { !$0.isDown } ?? false },
                oldestHeldAge: outputs.oldestHeld.map { now - $0 },
                guestIdle: rate.map { $0 * 100 < Double(config.idleCPUPercent) } ?? false,
                outputMismatch: outputs.mismatch, releasedByMatchSinceCheckpoint: outputs.releasedByMatchSinceCheckpoint)
            if leading && lock.withLock({ machine.role == .backup }) { lock.withLock { timeline.note(.leading) } }
            run { $0.tick(o, now: now) }
        }
    }
}
