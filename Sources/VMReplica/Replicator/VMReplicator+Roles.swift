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

    /// Opens this replica's syncvm endpoint for `role` on `sync_address` (a fresh TCP fabric;
    /// the previous one, if any, is closed first so the port is free) and starts connecting it.
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
        let fabric = try TCPFabric(node: me, configuration: TCPFabric.Configuration(clusterKey: clusterKey.bytes, members: [me, config.peer]))
        let at = PeerAddress(node: me, host: host, port: port)
        let configuration = FabricSyncChannel.Configuration()
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

    // MARK: Take-over

    /// Driver thread: a consistent backup that leads becomes the primary. It has run every
    /// committed input; its VM is what clients see from now on, so it no longer takes
    /// checkpoints, gives up its standby QEMU, and opens a primary's syncvm endpoint for a
    /// backup to join. Its output goes out at once until the first checkpoint with that backup.
    func becomePrimary() {
        guard let node, node.status.role == .leader else { return }
        let (ok, standby) = lock.withLock { () -> (Bool, QEMUInstance?) in
            guard currentRole == .backup, inconsistent == nil, unusable == nil, !stopped else { return (false, nil) }
            currentRole = .primary
            protected = false
            tookOver = true
            defer { spare = nil }
            return (true, spare)
        }
        guard ok else { return }
        standby?.kill()
        logger.notice("vm: node \(me) is the primary now: it leads and its VM is the one clients see; output goes out unprotected until a backup is re-protected")
        do {
            try blocking(timeout: checkpointTimeout) { try await self.openSyncEndpoint(as: .primary) }
        } catch {
            logger.error("vm: cannot open the primary's syncvm endpoint on \(config.syncAddress): \(error); no backup can be re-protected")
        }
    }

    /// Driver thread: a primary whose VM the other replica took over (it leads, and closed the
    /// syncvm link to open a primary's endpoint) becomes that replica's backup. Its VM is no
    /// copy of the one clients now see: its held output is dropped, it answers nobody, and the
    /// new primary's next checkpoint re-protects it (every page compared).
    func becomeBackup() {
        guard let node, node.status.role != .leader, node.status.leader == config.peer else { return }
        let (ok, held) = lock.withLock { () -> (Bool, Int) in
            guard currentRole == .primary, !stopped else { return (false, 0) }
            currentRole = .backup
            protected = true
            tookOver = false
            return (true, outputs.heldCount)
        }
        guard ok else { return }
        markInconsistent("node \(config.peer) took over the VM while this replica did not lead")
        outputs.dropHeld()
        hashDiff = nil
        logger.notice("vm: node \(me) is a backup now; \(held) answers it held are dropped (clients resend)")
        do {
            // The backup's endpoint exports guest RAM for the primary to write into.
            let fabricConfig = FabricSyncChannel.Configuration()
            memory = try GuestMemory(mappingFile: config.qemu.ramFile, writable: true, trailingBytes: fabricConfig.mailboxBytes)
            try blocking(timeout: checkpointTimeout) { try await self.openSyncEndpoint(as: .backup) }
            startSpare()
        } catch {
            markUnusable("cannot become node \(config.peer)'s backup: \(error)")
        }
    }

    // MARK: Scheduling

    /// One loop per replica, every `idle_window_ms`, deciding what only a leader may:
    /// - a VM that is no copy of the replicated one (restarted, never synced) hands leadership
    ///   to the other VM replica;
    /// - a backup that leads takes over when the primary is gone (its syncvm link is down), or
    ///   after `handBackLimit` of trying in vain to hand leadership back to a live primary;
    /// - a primary asks for checkpoints: PLOVER's trigger (output is waiting and the guest went
    ///   idle — its QEMU's CPU rate fell below the threshold for one window — or the oldest held
    ///   output reached the max period) or, while unprotected, as soon as a backup's link is up.
    /// A primary that does not lead, while the other replica leads and the link has been down
    /// for `demoteAfter`, lost the VM to a take-over: it becomes a backup to be re-protected.
    func schedulerLoop() {
        var meter: CPUMeter?
        var rate: Double?
        var leadingSince: ContinuousClock.Instant?
        var peerLeadsSince: ContinuousClock.Instant?
        let window = Double(config.idleWindowMilliseconds) / 1000
        let maxAge = Duration.milliseconds(config.checkpointMaxMilliseconds)
        while !lock.withLock({ stopped }) {
            Thread.sleep(forTimeInterval: window)
            guard let node else { continue }
            let status = node.status
            let (role, why, broken, isProtected, linkUp) = lock.withLock {
                (currentRole, inconsistent, unusable, protected, channel.map { !$0.isDown } ?? false)
            }
            guard status.role == .leader, let q = lock.withLock({ current }) else {
                meter = nil
                leadingSince = nil
                if role == .primary && status.leader == config.peer && !linkUp {
                    if peerLeadsSince == nil { peerLeadsSince = .now }
                    if ContinuousClock.now - peerLeadsSince! >= demoteAfter {
                        peerLeadsSince = nil
                        queueCond.withLock {
                            demoteRequested = true
                            queueCond.signal()
                        }
                    }
                } else {
                    peerLeadsSince = nil
                }
                continue
            }
            peerLeadsSince = nil
            if leadingSince == nil { leadingSince = .now }
            if broken != nil { continue }
            if let why {
                // Its VM is no copy of the one clients saw: let the other replica lead.
                if lastHandOff.map({ ContinuousClock.now - $0 > .seconds(2) }) ?? true {
                    lastHandOff = .now
                    logger.warning("vm: node \(me) leads with a VM that is not the replicated one (\(why)); handing leadership to node \(config.peer)")
                    let peer = config.peer
                    Task { try? await node.transferLeadership(to: peer) }
                }
                continue
            }
            if role == .backup {
                let waited = ContinuousClock.now - leadingSince!
                if !linkUp || waited >= handBackLimit {
                    let first = lock.withLock { () -> Bool in
                        defer { tookOver = true }
                        return !tookOver
                    }
                    if first {
                        let because = linkUp ? "the primary did not take leadership back within \(handBackLimit)" : "the syncvm link to the primary is down"
                        logger.notice("vm: backup \(me) leads and took over: \(because)")
                    }
                    queueCond.withLock {
                        takeOverRequested = true
                        queueCond.signal()
                    }
                } else if lastHandOff.map({ ContinuousClock.now - $0 > .seconds(2) }) ?? true {
                    // An election while the primary lives (its link is up): give leadership back.
                    lastHandOff = .now
                    logger.info("vm: backup \(me) leads while primary \(config.peer) is up; handing leadership back")
                    let peer = config.peer
                    Task { try? await node.transferLeadership(to: peer) }
                }
                continue
            }
            if meter?.pid != q.pid { meter = CPUMeter(pid: q.pid) }
            rate = meter!.sample()
            let minGap = Duration.milliseconds(config.checkpointMinGapMilliseconds)
            guard !lock.withLock({ inFlight || ContinuousClock.now - lastCheckpointEnd < (lastCheckpointFailed ? max(minGap, failedCheckpointBackoff) : minGap) })
            else { continue }
            if isProtected {
                guard let oldest = outputs.oldestHeld else { continue }
                let idle = rate.map { $0 * 100 < Double(config.idleCPUPercent) } ?? false
                guard idle || ContinuousClock.now - oldest >= maxAge else { continue }
            } else {
                guard linkUp else { continue }
            }
            let epoch = lock.withLock { () -> UInt64 in
                inFlight = true
                defer { nextEpoch += 1 }
                return nextEpoch
            }
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
