// One checkpoint on each side: both VMs pause at the same log position, syncvm makes the
// backup's RAM equal to the primary's, QEMU migration with x-ignore-shared moves CPU and device
// state into a fresh QEMU on the backup, both resume, and the primary releases the output the
// checkpoint covers. Order and failure handling: docs/design/vmreplica.md, "Checkpoint".

#if canImport(Glibc)
import Glibc
#endif
import Foundation
import Synchronization
import RDMAPaxos

/// What one checkpoint did, one line of `checkpoints.log` in the run directory.
struct CheckpointRecord {
    var epoch: UInt64
    var index: LogIndex
    var role: VMReplicator.Role
    var ok = false
    var error: String?
    var pause: Duration = .zero
    var sync: Duration = .zero
    var migrate: Duration = .zero
    /// The hash-diff scan of all guest RAM that finds this side's dirty pages.
    var scan: Duration = .zero
    /// Primary: waiting, VM still running, for the backup to be paused and ready. Backup:
    /// waiting for its guest to go idle before pausing.
    var wait: Duration = .zero
    /// Backup: whether its guest went idle before it paused (false: it hit the bound).
    var idle: Bool?
    var stats: SyncStats?
    var released = 0
    var ramDigest: UInt64?
    /// Backup, with `log_divergent_pages`: the pages the sync rewrote.
    var divergentPages: DirtyBitmap?
    /// Backup: pages put back when the checkpoint was cut off after pages landed.
    var rolledBack: Int?
    /// Backup, with `record_ram_digest`: whether the RAM after the roll-back hashed as before the sync.
    var rollbackDigestMatches: Bool?
    /// The disk step (nil: no disk).
    var disk: DiskCheckpointRecord?
    /// Primary: the output guard's release metrics after this checkpoint (`OutputGuard.metrics`).
    var output: String?
    /// Primary: the output mismatch that asked for this checkpoint, if one did.
    var mismatch: String?

    var line: String {
        func ms(_ d: Duration) -> String { String(format: "%.2f", d.inMilliseconds) }
        var f = ["epoch=\(epoch)", "index=\(index)", "role=\(role.rawValue)", "ok=\(ok)", "pause_ms=\(ms(pause))",
                 "wait_ms=\(ms(wait))", "scan_ms=\(ms(scan))", "sync_ms=\(ms(sync))", "migrate_ms=\(ms(migrate))"]
        if let s = stats {
            f += ["primary_dirty=\(s.primaryDirtyPages)", "backup_dirty=\(s.backupDirtyPages)", "union=\(s.unionPages)",
                  "divergent=\(s.divergentPages)", "page_bytes=\(s.pageBytesSent)", "control_bytes=\(s.controlBytes)",
                  "all_dirty_bytes=\(s.primaryDirtyPages * s.geometry.pageSize)", "hash_ms=\(ms(s.phases.hashing))",
                  "handshake_ms=\(ms(s.phases.handshake))", "transfer_ms=\(ms(s.phases.transfer))"]
        }
        if role == .primary { f.append("released=\(released)") }
        if let i = idle { f.append("idle=\(i)") }
        if let d = ramDigest { f.append("ram_digest=\(String(d, radix: 16))") }
        if let p = divergentPages { f.append("divergent_pages=\(p.rangesDescription)") }
        if let n = rolledBack { f.append("rolled_back_pages=\(n)") }
        if let m = rollbackDigestMatches { f.append("rollback_digest_match=\(m)") }
        if let d = disk { f += d.fields }
        if let o = output { f.append(o) }
        if let m = mismatch { f.append("mismatch=\"\(m)\"") }
        if let e = error {
            // One record per line: quotes and line breaks in the error become ' and spaces.
            let flat = e.replacingOccurrences(of: "\"", with: "'").split(whereSeparator: \.isNewline).joined(separator: " ")
            f.append("error=\"\(flat)\"")
        }
        return f.joined(separator: " ")
    }
}

/// Result of an async call awaited from a plain thread.
final class Box<T>: @unchecked Sendable {
    // @unchecked Sendable: written once before the semaphore is signalled, read after.
    var result: Result<T, any Error>?
}

/// A checkpoint stopped before its end, and why (the link went down, leadership was lost, the
/// replica is stopping, or a step took longer than `checkpoint_timeout_ms`).
struct CheckpointAborted: Error, CustomStringConvertible {
    var reason: String
    var description: String { "checkpoint aborted: \(reason)" }
}

extension VMReplicator {
    /// Runs `body` on the concurrency pool and waits for it on this (non-pool) thread, checking
    /// `abort` every 10 ms. After `timeout`, or as soon as `abort` gives a reason, the sync link
    /// is closed, which fails whatever the sync was waiting for, and that reason is thrown.
    func blocking<T: Sendable>(timeout: Duration, abortIf abort: () -> String? = { nil },
                               _ body: @escaping @Sendable () async throws -> T) throws -> T {
        let box = Box<T>()
        let done = DispatchSemaphore(value: 0)
        Task {
            do { box.result = .success(try await body()) } catch { box.result = .failure(error) }
            done.signal()
        }
        let deadline = ContinuousClock.now + timeout
        var aborted: String?
        while done.wait(timeout: .now() + .milliseconds(10)) == .timedOut {
            guard let why = abort() ?? (ContinuousClock.now >= deadline ? "no progress within \(timeout) (checkpoint_timeout_ms)" : nil) else { continue }
            aborted = why
            _ = lock.withLock { machine.abortCheckpoint(why) }
            lock.withLock { channel }?.close()
            done.wait()
            break
        }
        if case .failure = box.result!, let aborted { throw CheckpointAborted(reason: aborted) }
        return try box.result!.get()
    }

    var checkpointTimeout: Duration { .milliseconds(config.checkpointTimeoutMilliseconds) }

    /// Whole-RAM digest: XXH3 over every page's hash (only with `record_ram_digest`).
    func ramDigest() -> UInt64? {
        guard config.recordRAMDigest else { return nil }
        let hashes = pool.hashAllPages(of: memory, seed: 0)
        return hashes.withUnsafeBytes { pool.function.hash($0, seed: 0) }
    }

    /// Size at which `checkpoints.log` is rotated (one older generation is kept).
    static let checkpointLogBytesMax = 8 << 20

    func record(_ r: CheckpointRecord) {
        let line = r.line
        let stamp = ISO8601DateFormatter().string(from: Date())
        lock.withLock { lastCheckpoint = "at=\(stamp) " + line }
        if r.ok { logger.info("vm: checkpoint \(line)") } else { logger.error("vm: checkpoint failed \(line)") }
        let path = config.runDir + "/checkpoints.log"
        // Bounded: past `checkpointLogBytesMax` the log becomes checkpoints.log.1 (replacing the
        // one before) and a new one starts.
        if let size = (try? FileManager.default.attributesOfItem(atPath: path))?[.size] as? Int, size > Self.checkpointLogBytesMax {
            rename(path, path + ".1")
        }
        if !FileManager.default.fileExists(atPath: path) { _ = FileManager.default.createFile(atPath: path, contents: nil) }
        if let h = FileHandle(forWritingAtPath: path) {
            h.seekToEndOfFile()
            h.write(Data((line + "\n").utf8))
            try? h.close()
        }
    }

    /// Waits until `check` holds, polling every millisecond; throws `CheckpointAborted` once
    /// `abort` gives a reason.
    func poll(_ what: String, timeout: Duration, abortIf abort: () -> String? = { nil }, _ check: () throws -> Bool) throws {
        let deadline = ContinuousClock.now + timeout
        while try !check() {
            guard ContinuousClock.now < deadline else { throw QMPError(socket: "-", problem: "\(what) did not happen within \(timeout)") }
            if let why = abort() { throw CheckpointAborted(reason: "\(why) while waiting for \(what)") }
            usleep(1000)
        }
    }

    /// Why the checkpoint over `ch` must stop now: the machine hears what the wait sees (the
    /// link's state, whether this replica leads) and says whether it may go on (nil) or not.
    func checkpointAbort(_ ch: FabricSyncChannel) -> String? {
        let leading = node?.status.role == .leader
        run { $0.checkpointObserved(linkUp: !ch.isDown, leading: leading) }
        return lock.withLock { machine.checkpointAbort }
    }

    /// The checkpoint reached `phase`: the machine records it, then an armed failpoint may kill
    /// this replica there.
    func reach(_ phase: CheckpointPhase, armed: CheckpointPhase?) {
        lock.withLock { machine.reached(phase) }
        failpoints.reached(phase, armed: armed)
    }

    /// Sync options whose progress reaches this checkpoint's failpoint.
    func syncOptions(armed: CheckpointPhase?) -> SyncOptions {
        var o = SyncOptions()
        o.onProgress = { [weak self] step in
            switch step {
            case .hashesExchanged: self?.reach(.hashes, armed: armed)
            case .firstPagesWritten, .commitReceived: self?.reach(.pages, armed: armed)
            }
        }
        return o
    }

    /// `cont` after an outgoing migration. QEMU reports the migration "completed" before its
    /// migration thread has finished cleaning up, and refuses `cont` until then ("Migration is
    /// not finalized yet"), so that answer is retried for a short while.
    func resume(_ q: QEMUInstance) throws {
        let deadline = ContinuousClock.now + .seconds(5)
        while true {
            do {
                try q.qmp.execute("cont")
                return
            } catch let e as QMPError where e.problem.contains("not finalized") && ContinuousClock.now < deadline {
                usleep(2000)
            }
        }
    }

    /// Samples `q`'s CPU rate one idle window at a time until a window stays below
    /// `idle_cpu_percent`; false when `limit` passed first (the caller goes on anyway).
    func waitUntilIdle(_ q: QEMUInstance, atMost limit: Duration) -> Bool {
        var meter = CPUMeter(pid: q.pid)
        _ = meter.sample()
        let deadline = ContinuousClock.now + limit
        let window = UInt32(config.idleWindowMilliseconds * 1000)
        while ContinuousClock.now < deadline {
            usleep(window)
            // A checkpoint that cannot finish (its primary is gone) does not wait any longer.
            if lock.withLock({ machine.checkpointAbort }) != nil { return false }
            guard let rate = meter.sample() else { return false }
            if rate * 100 < Double(config.idleCPUPercent) { return true }
        }
        return false
    }

    // MARK: Ready handshake

    /// Backup → primary before the sync: "paused at checkpoint `epoch` and scanned", and
    /// whether the backup's VM has a disk (a tenth byte, 1 or 0). Not a syncvm frame: the
    /// primary's replica process reads it before the engine runs.
    static func readyFrame(epoch: UInt64, disk: Bool = false) -> [UInt8] {
        [0xEE] + (0..<8).reversed().map { UInt8(epoch >> (8 * UInt64($0)) & 0xff) } + [disk ? 1 : 0]
    }

    /// Primary → backup in answer to a ready frame for a checkpoint the primary already gave up
    /// on: the backup drops that checkpoint at once and goes on to the next one in the log,
    /// instead of waiting out its timeout while the primary waits for the next one.
    static func skipFrame(epoch: UInt64) -> [UInt8] {
        [0xEF] + (0..<8).reversed().map { UInt8(epoch >> (8 * UInt64($0)) & 0xff) }
    }

    /// The epoch in a handshake frame of `kind` (0xEE ready: 10 bytes, 0xEF skip: 9 bytes).
    static func handshakeEpoch(_ f: [UInt8], kind: UInt8) -> UInt64? {
        guard f.count == (kind == 0xEE ? 10 : 9), f[0] == kind else { return nil }
        return f[1...8].reduce(UInt64(0)) { $0 << 8 | UInt64($1) }
    }

    /// Waits for the backup's ready frame for `epoch`. A ready frame of an earlier checkpoint
    /// (one this primary already gave up on) is answered with a skip frame. A backup whose VM
    /// has a disk when this one has none, or the other way round, is answered with a skip and
    /// refused with an error naming `vm.disk_image` (each checkpoint would otherwise wait out
    /// its timeout, one side in the disk session and the other for the device state).
    static func awaitReady(_ ch: some SyncChannel, epoch: UInt64, disk: Bool = false, peer: NodeID = 0) async throws {
        while true {
            let f = try await ch.receive()
            guard let e = handshakeEpoch(f, kind: 0xEE) else {
                throw SyncError.unexpectedMessage(expected: "ready", got: "a \(f.count)-byte frame")
            }
            if (f[9] != 0) != disk {
                try await ch.send(skipFrame(epoch: e))
                throw DiskImageError(description: disk
                    ? "vm.disk_image: this replica's VM has a disk but node \(peer)'s has none: give both replicas a disk_image (of the same disk_size_mb) or neither"
                    : "vm.disk_image: node \(peer)'s VM has a disk but this replica's has none: give both replicas a disk_image (of the same disk_size_mb) or neither")
            }
            if e == epoch { return }
            guard e < epoch else { throw SyncError.wrongSession(expected: epoch, got: e) }
            try await ch.send(skipFrame(epoch: e))
        }
    }

    // MARK: Primary

    /// Runs checkpoint `epoch` as the syncvm primary; true when it completed. It gives up at
    /// once when the link goes down or this replica stops leading (a failover must not wait for
    /// a checkpoint that cannot finish); the VM then runs on with its output held.
    @discardableResult
    func primaryCheckpoint(epoch: UInt64, index: LogIndex) -> Bool {
        let armed = failpoints.arm(as: .primary)
        var r = CheckpointRecord(epoch: epoch, index: index, role: .primary)
        defer { record(r) }
        defer { r.output = outputs.metrics }
        r.mismatch = outputs.mismatchDetail
        defer { run { $0.checkpointEnded(r.ok ? .completed : .failed(reason: r.error ?? "", pagesMayHaveLanded: false), now: .now) } }
        guard let q = lock.withLock({ current }) else { r.error = "no VM"; return false }
        guard let ch = waitForChannel(timeout: linkGrace) else { r.error = "syncvm link to node \(config.peer) is not up"; return false }
        let abort = { self.checkpointAbort(ch) }
        // The primary keeps running until the backup has reached this log position, paused and
        // scanned: the driver writes no input past the checkpoint, so the state the primary
        // stops in is still "every input up to the checkpoint", just later in guest time.
        let waitStart = ContinuousClock.now
        let (hasDisk, peer) = (disk != nil, config.peer)
        do {
            try blocking(timeout: checkpointTimeout, abortIf: abort) { try await Self.awaitReady(ch, epoch: epoch, disk: hasDisk, peer: peer) }
        } catch let e as DiskImageError {
            logger.error("vm: checkpoint \(epoch) refused: \(e)")
            r.error = "\(e)"
            return false
        } catch { r.error = "backup not ready for checkpoint \(epoch): \(error)"; return false }
        r.wait = ContinuousClock.now - waitStart
        // From the pause on the backup may end up holding this VM (even if this side then fails
        // to see the checkpoint complete): output waits for checkpoints from here (the machine
        // makes the primary protected at the handshake).
        reach(.handshake, armed: armed)
        let start = ContinuousClock.now
        do {
            try q.qmp.execute("stop")
        } catch { r.error = "stop: \(error)"; return false }
        // Everything read from the guest so far was produced before the pause.
        let cut = outputs.cut()
        defer { if !r.ok { outputs.checkpointEnded(epoch: epoch, completed: false, cut: cut) } }
        var resumed = false
        defer { if !resumed { _ = try? resume(q) } }
        do {
            // Until the first sync nothing says which pages are equal: all pages are candidates.
            let scanStart = ContinuousClock.now
            let dirty = hashDiff?.collect() ?? DirtyBitmap.all(pageCount: memory.pageCount)
            r.scan = ContinuousClock.now - scanStart
            let diskDirty = collectDisk(from: q, into: &r)
            let engine = SyncPrimary(memory: memory, pool: pool, options: syncOptions(armed: armed))
            let result = try blocking(timeout: checkpointTimeout, abortIf: abort) { try await engine.run(dirty: dirty, over: ch, session: epoch) }
            r.stats = result.stats
            r.sync = ContinuousClock.now - start
            r.ramDigest = ramDigest()
            if hashDiff == nil { hashDiff = HashDiffDirtySource(memory: memory, pool: pool) }
            try primaryDisk(diskDirty, over: ch, epoch: epoch, armed: armed, abort: abort, record: &r)
            let m = ContinuousClock.now
            try q.qmp.execute("migrate", ["uri": "tcp:\(config.peerMigrationAddress)"])
            reach(.device, armed: armed)
            do {
                try poll("migration of device state to node \(config.peer)", timeout: checkpointTimeout, abortIf: abort) {
                    let (s, info) = try q.qmp.migrationStatus()
                    if s == "failed" || s == "cancelled" { throw QMPError(socket: q.qmp.path, problem: "migration \(s): \(info["error-desc"] ?? "")") }
                    return s == "completed"
                }
            } catch {
                _ = try? q.qmp.execute("migrate_cancel")
                throw error
            }
            r.migrate = ContinuousClock.now - m
            reach(.resume, armed: armed)
            try resume(q)
            resumed = true
            r.pause = ContinuousClock.now - start
            r.released = outputs.checkpointEnded(epoch: epoch, completed: true, cut: cut)
            r.ok = true
        } catch {
            // Output stays held: only a later complete checkpoint may release it. The dirty
            // pages collected above are forgotten with the baseline (the machine's dropBaseline):
            // the next sync compares all.
            r.error = "\(error)"
            r.pause = ContinuousClock.now - start
        }
        return r.ok
    }

    // MARK: Backup

    /// Runs checkpoint `epoch` as the backup, atomically: the pages the primary may overwrite are
    /// copied first (`PageUndoLog`), and a checkpoint cut off at any point — the primary dead, the
    /// link down, a step timed out — fences the primary, puts those pages back and resumes the
    /// old VM, which is then exactly what it was: the VM that executed every input before the
    /// checkpoint, fit to take over. Only a checkpoint whose device state arrived replaces it.
    /// What happens on each ending is the machine's decision (`checkpointEnded`).
    func backupCheckpoint(epoch: UInt64, index: LogIndex) {
        let armed = failpoints.arm(as: .backup)
        var r = CheckpointRecord(epoch: epoch, index: index, role: .backup)
        defer { record(r) }
        // Every path out tells the machine how the checkpoint ended, exactly once.
        var ended = false
        func end(_ outcome: VMReplicaMachine.CheckpointOutcome) -> [VMReplicaMachine.Action] {
            ended = true
            let actions = lock.withLock { machine.checkpointEnded(outcome, now: .now) }
            perform(actions)
            return actions
        }
        defer { if !ended { _ = end(.failed(reason: r.error ?? "", pagesMayHaveLanded: false)) } }
        let (unusable, wasInconsistent, oldVM) = lock.withLock { (machine.unusable, machine.checkpoint?.startedInconsistent, current) }
        guard unusable == nil, let old = oldVM else { r.error = "VM unusable"; return }
        // The backup replays the same inputs later than the primary (and, under TCG, in a QEMU
        // whose translation cache is cold). Stopping it mid-request would make every page that
        // request writes diverge, so it first finishes what it was given: it stops once its
        // guest is idle, as the primary's was when it asked for the checkpoint, or at the bound.
        if wasInconsistent != nil {
            // Nothing of this VM is kept: compare every page, and do not wait for it.
            hashDiff = nil
        } else {
            let idleStart = ContinuousClock.now
            r.idle = waitUntilIdle(old, atMost: .milliseconds(config.backupIdleMaxMilliseconds))
            r.wait = ContinuousClock.now - idleStart
        }
        let start = ContinuousClock.now
        do { try old.qmp.execute("stop") } catch {
            guard wasInconsistent != nil else { r.error = "stop: \(error)"; return }
            // A VM that is no copy is replaced anyway; its QEMU (dead, or alive but not
            // answering) must not write the RAM while it is synced: kill it and wait.
            old.kill()
        }
        // Resume the old QEMU unless the new one took over (or the old one is no copy and its
        // RAM was written).
        var resumeOld = true
        defer {
            if resumeOld { _ = try? old.qmp.execute("cont") }
            r.pause = ContinuousClock.now - start
        }
        // The standby QEMU was started after the previous checkpoint; wait for it if it is slow.
        var next: QEMUInstance?
        try? poll("standby QEMU", timeout: checkpointTimeout, abortIf: { self.isStopped ? "this replica is stopping" : self.lock.withLock { self.machine.checkpointAbort } }) {
            next = lock.withLock { spare }
            return next != nil
        }
        guard let next else {
            r.error = "no standby QEMU for the device state"
            startSpare()  // the last launch failed or is stuck: try again for the next checkpoint
            return
        }
        guard let ch = waitForChannel(timeout: linkGrace) else {
            r.error = "syncvm link to node \(config.peer) is not up"
            return
        }
        let abort = { self.checkpointAbort(ch) }
        let scanStart = ContinuousClock.now
        let dirty = hashDiff?.collect() ?? DirtyBitmap.all(pageCount: memory.pageCount)
        r.scan = ContinuousClock.now - scanStart
        if wasInconsistent != nil { diskLog?.dropBaseline() }
        let diskDirty = collectDisk(from: old, into: &r)
        // Ready, then the primary's first answer: a skip if it gave this checkpoint up before
        // this replica got here (it was late: paused, restarting, catching up in the log).
        // Any failure from here forgets the baseline collect() just moved (the next sync
        // compares every page): the machine's dropBaseline.
        let first: [UInt8]
        // The link's sender is this checkpoint's until it ends (the backup's digest sender waits).
        digestOutbox.holdForCheckpoint()
        defer { digestOutbox.releaseFromCheckpoint() }
        do {
            let hasDisk = disk != nil
            try blocking(timeout: checkpointTimeout, abortIf: abort) { try await ch.send(Self.readyFrame(epoch: epoch, disk: hasDisk)) }
            reach(.handshake, armed: armed)
            first = try blocking(timeout: checkpointTimeout, abortIf: abort) { try await ch.receive() }
        } catch {
            r.error = "\(error)"
            return
        }
        if Self.handshakeEpoch(first, kind: 0xEF) == epoch {
            r.error = "the primary gave checkpoint \(epoch) up before this backup was ready"
            _ = end(.skipped)
            return
        }
        // A QEMU takes one incoming migration in its life: unless this checkpoint makes `next`
        // the current VM, it is replaced by a fresh standby for the next checkpoint.
        var installed = false
        defer {
            if !installed {
                lock.withLock { if spare === next { spare = nil } }
                next.killDetached()
                startSpare()
            }
        }
        do {
            try next.qmp.execute("migrate-incoming", ["uri": "tcp:\(config.migrationAddress)"])
        } catch {
            r.error = "migrate-incoming: \(error)"
            ch.close()  // the primary is waiting in the sync: fail it now rather than at its timeout
            return
        }
        // Before any page can land: a VM that is a copy keeps a way back to itself.
        let undo: PageUndoLog? = wasInconsistent == nil ? PageUndoLog() : nil
        let before = undo != nil ? ramDigest() : nil
        let diskUndo: PageUndoLog? = undo != nil && disk != nil ? PageUndoLog() : nil
        let diskBefore = diskUndo != nil ? diskDigest() : nil
        /// Cuts the checkpoint off after pages may have landed: the machine says whether the old
        /// VM rolls back (it was a copy) or is abandoned (it was none; the next checkpoint
        /// replaces it).
        func cutOff(_ why: String) {
            next.kill()
            for a in end(.failed(reason: why, pagesMayHaveLanded: true)) {
                switch a {
                case .abandonVM:
                    resumeOld = false
                case .rollBack:
                    guard let undo else { preconditionFailure("a roll-back without saved pages") }
                    // Nothing of the primary's may land from here on: fence it, then put the pages back.
                    lock.withLock { syncFabric }?.revokeAccess(from: config.peer)
                    ch.close()
                    let n = undo.restore(into: memory)
                    r.rolledBack = n
                    if let before { r.rollbackDigestMatches = ramDigest() == before }
                    var blocks = ""
                    if let diskUndo, let disk {
                        let k = diskUndo.restore(into: disk)
                        r.disk?.rolledBack = k
                        if let diskBefore { r.disk?.rollbackDigestMatches = diskDigest() == diskBefore }
                        blocks = " and \(k) disk blocks"
                    }
                    logger.notice("vm: checkpoint \(epoch) was cut off (\(why)); put \(n) pages\(blocks) back: this VM is again the one that ran every input before it, and may take over")
                default:
                    break
                }
            }
        }
        let state = MemorySyncStateStore(.inSync(session: 0))
        let engine = SyncBackup(memory: memory, pool: pool, state: state, options: syncOptions(armed: armed), undo: undo)
        let result: SyncResult
        do {
            let replay = FirstFrameReplay(first, then: ch)
            result = try blocking(timeout: checkpointTimeout, abortIf: abort) { try await engine.run(dirty: dirty, over: replay, expectedSession: epoch) }
        } catch {
            r.error = "\(error)"
            if !state.load().isInSync { cutOff("\(error)") }
            return
        }
        r.stats = result.stats
        r.sync = ContinuousClock.now - start
        if config.logDivergentPages { r.divergentPages = result.divergent }
        // The new baseline is taken now, while no VM runs on this RAM (the standby starts running
        // by itself once the device state is in); a cut-off below drops it with the pages.
        if let h = hashDiff { h.syncCompleted(rewrote: result.divergent) } else { hashDiff = HashDiffDirtySource(memory: memory, pool: pool) }
        r.ramDigest = ramDigest()
        do {
            try backupDisk(diskDirty, over: ch, epoch: epoch, armed: armed, undo: diskUndo, abort: abort, record: &r)
        } catch {
            r.error = "disk: \(error)"
            cutOff("RAM synced but the disk sync failed: \(error)")
            return
        }
        reach(.device, armed: armed)
        let m = ContinuousClock.now
        do {
            var status = ""
            try poll("device state from node \(config.peer)", timeout: checkpointTimeout, abortIf: abort) {
                status = try next.qmp.status()
                return status != "inmigrate"
            }
            reach(.resume, armed: armed)
            if status != "running" { try next.qmp.execute("cont") }
        } catch {
            r.error = "\(error)"
            cutOff("RAM synced but the device state did not arrive: \(error)")
            return
        }
        undo?.clear()
        diskUndo?.clear()
        r.migrate = ContinuousClock.now - m
        // From here the old QEMU's RAM is the primary's; it must not run again.
        resumeOld = false
        // The swap and the machine's end of the checkpoint in one step: "inconsistent" ends
        // only together with the swap (a death of `next` from here on is reported against it).
        let actions = lock.withLock { () -> [VMReplicaMachine.Action] in
            current = next
            spare = nil
            backupGeneration = epoch
            // The new VM is the primary's copy: it speaks to clients through the primary's table.
            connections.installCheckpoint(primaryTable: checkpointConnections?.epoch == epoch ? checkpointConnections!.table : ConnectionRewriter())
            return machine.checkpointEnded(.completed, now: .now)
        }
        ended = true
        installed = true
        // The standby's bitmap recorded every guest write since its guest started at the cut.
        diskLog?.adopt(next)
        perform(actions)
        startReader(next)
        old.killDetached { [logger] took in
            if took > .milliseconds(200) { logger.info("vm: the replaced QEMU \(old.name) took \(took) to exit after SIGKILL") }
        }
        startSpare()
        r.ok = true
    }
}

/// A channel whose first received frame is one already read from `inner` (the backup reads the
/// primary's first answer to its ready frame itself, to see whether it is a skip).
final class FirstFrameReplay<Inner: SyncChannel>: SyncChannel {
    private let first: Mutex<[UInt8]?>
    private let inner: Inner
    init(_ frame: [UInt8], then inner: Inner) {
        first = Mutex(frame)
        self.inner = inner
    }
    func send(_ frame: [UInt8]) async throws { try await inner.send(frame) }
    func receive() async throws -> [UInt8] {
        if let f = first.withLock({ f -> [UInt8]? in defer { f = nil }; return f }) { return f }
        return try await inner.receive()
    }
    func writePages(_ pages: ArraySlice<UInt32>, from memory: GuestMemory) async throws {
        try await inner.writePages(pages, from: memory)
    }
    func close() { inner.close() }
}
