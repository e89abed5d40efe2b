// The disk step of a checkpoint (phase `disk`, between the RAM sync and the device state): both
// replicas' QEMUs are stopped; each side's dirty blocks come from its QEMU's dirty bitmap
// (DiskDirtyLog); the syncvm engine runs a second session over the same link on the disk image
// mapped as 4 KiB blocks, with divergent blocks carried as block frames (BlockFrames.swift) and
// written by the backup into its image, after it saved the union's blocks for a roll-back.
// docs/design/vmreplica.md, "Disk".

#if canImport(Glibc)
import Glibc
#endif
import Foundation
import RDMAPaxos

/// A disk image that cannot be created or does not fit the configuration.
struct DiskImageError: Error, CustomStringConvertible {
    var description: String
}

/// What the disk step of one checkpoint did (fields of its `checkpoints.log` line).
struct DiskCheckpointRecord {
    var primaryDirty = 0
    var backupDirty = 0
    var union = 0
    var divergent = 0
    /// Bytes of block frames sent (primary) or received (backup): indices and block data.
    var blockBytes = 0
    /// Bytes of the disk session's other frames (hello, bitmaps, hashes, commit), both ways.
    var controlBytes = 0
    var blockSize = 0
    /// Reading this side's dirty bitmap out of QEMU (NBD export, nbdinfo) and rotating it.
    var collect: Duration = .zero
    var took: Duration = .zero
    /// Why this side listed every block (no bitmap history, a failed read).
    var all: String?
    var digest: UInt64?
    /// Backup: blocks put back after a cut-off, and whether the image then hashed as before.
    var rolledBack: Int?
    var rollbackDigestMatches: Bool?

    var fields: [String] {
        var f = ["disk_primary_dirty=\(primaryDirty)", "disk_backup_dirty=\(backupDirty)", "disk_union=\(union)",
                 "disk_divergent=\(divergent)", "disk_bytes=\(blockBytes)", "disk_control_bytes=\(controlBytes)",
                 "disk_all_dirty_bytes=\(primaryDirty * blockSize)", "disk_collect_ms=\(String(format: "%.2f", collect.inMilliseconds))",
                 "disk_ms=\(String(format: "%.2f", took.inMilliseconds))"]
        if all != nil { f.append("disk_all_blocks=true") }
        if let d = digest { f.append("disk_digest=\(String(d, radix: 16))") }
        if let n = rolledBack { f.append("disk_rolled_back_blocks=\(n)") }
        if let m = rollbackDigestMatches { f.append("disk_rollback_digest_match=\(m)") }
        return f
    }
}

extension VMReplicator {
    /// Bytes per disk block: the dirty bitmap's granularity and the unit hashed and sent.
    static let diskBlockBytes = 4096

    /// The disk session of checkpoint `epoch`: the RAM sync uses the epoch itself.
    static func diskSession(_ epoch: UInt64) -> UInt64 { epoch | 1 << 63 }

    /// Creates the disk image (sparse, `disk_size_mb`) if it does not exist, maps it and sets
    /// up its dirty log; nothing without `disk_image`.
    func openDisk() throws {
        guard let path = config.qemu.diskImage else { return }
        let bytes = config.diskSizeMiB << 20
        var st = stat()
        if stat(path, &st) != 0 {
            let fd = open(path, O_RDWR | O_CREAT | O_EXCL, 0o644)
            guard fd >= 0 else { throw DiskImageError(description: "cannot create disk image \(path) (vm.disk_image): \(String(cString: strerror(errno)))") }
            defer { close(fd) }
            guard ftruncate(fd, off_t(bytes)) == 0 else { throw DiskImageError(description: "cannot size disk image \(path) to \(bytes) bytes: \(String(cString: strerror(errno)))") }
            logger.notice("vm: created disk image \(path) (\(config.diskSizeMiB) MiB, raw, sparse)")
        } else if Int(st.st_size) != bytes {
            throw DiskImageError(description: "disk image \(path) (vm.disk_image) is \(st.st_size) bytes, but vm.disk_size_mb = \(config.diskSizeMiB) asks for \(bytes): both replicas' images must have the configured size")
        }
        let m = try GuestMemory(mappingFile: path, writable: true, pageSize: Self.diskBlockBytes)
        disk = m
        diskLog = DiskDirtyLog(blockSize: Self.diskBlockBytes, blockCount: m.pageCount, runDir: config.runDir)
    }

    /// This side's dirty blocks, read from `q` (stopped); nil without a disk.
    func collectDisk(from q: QEMUInstance, into r: inout CheckpointRecord) -> DirtyBitmap? {
        guard let diskLog else { return nil }
        let start = ContinuousClock.now
        let (dirty, why) = diskLog.collect(from: q)
        r.disk = DiskCheckpointRecord(blockSize: Self.diskBlockBytes, collect: ContinuousClock.now - start, all: why)
        if let why, !why.hasPrefix("no dirty-bitmap history") || why.contains("; ") {
            logger.warning("vm: reading the disk's dirty bitmap failed, comparing every block: \(why)")
        }
        return dirty
    }

    /// Whole-image digest: XXH3 over every block's hash (only with `record_ram_digest`).
    func diskDigest() -> UInt64? {
        guard config.recordRAMDigest, let disk else { return nil }
        let hashes = pool.hashAllPages(of: disk, seed: 0)
        return hashes.withUnsafeBytes { pool.function.hash($0, seed: 0) }
    }

    /// Progress of a disk session that reaches phase `disk` at its first block (primary) or its
    /// commit (backup).
    func diskOptions(reached: @escaping @Sendable () -> Void) -> SyncOptions {
        var o = SyncOptions()
        o.onProgress = { step in if step != .hashesExchanged { reached() } }
        return o
    }

    /// Primary: the disk step after the RAM sync. Without a disk it only passes phase `disk`.
    func primaryDisk(_ dirty: DirtyBitmap?, over ch: FabricSyncChannel, epoch: UInt64, armed: CheckpointPhase?,
                     abort: @escaping () -> String?, record r: inout CheckpointRecord) throws {
        guard let dirty, let disk else { return reach(.disk, armed: armed) }
        let start = ContinuousClock.now
        let reachedDisk = ReachedFlag()
        let engine = SyncPrimary(memory: disk, pool: pool, options: diskOptions { [weak self] in
            if reachedDisk.set() { self?.reach(.disk, armed: armed) }
        })
        let sender = BlockSendingChannel(ch)
        let result = try blocking(timeout: checkpointTimeout, abortIf: abort) {
            try await engine.run(dirty: dirty, over: sender, session: Self.diskSession(epoch))
        }
        // No block diverged: the phase is passed once the backup confirmed the (empty) commit.
        if reachedDisk.set() { reach(.disk, armed: armed) }
        r.disk?.note(result.stats, blockBytes: sender.blockFrameBytes, took: ContinuousClock.now - start)
        r.disk?.digest = diskDigest()
    }

    /// Backup: the disk step after the RAM sync; `undo` (a VM that is a copy) keeps the union's
    /// blocks for a roll-back. Without a disk it only passes phase `disk`.
    func backupDisk(_ dirty: DirtyBitmap?, over ch: FabricSyncChannel, epoch: UInt64, armed: CheckpointPhase?, undo: PageUndoLog?,
                    abort: @escaping () -> String?, record r: inout CheckpointRecord) throws {
        guard let dirty, let disk else { return reach(.disk, armed: armed) }
        let start = ContinuousClock.now
        let state = MemorySyncStateStore(.inSync(session: 0))
        let engine = SyncBackup(memory: disk, pool: pool, state: state, options: diskOptions { [weak self] in
            self?.reach(.disk, armed: armed)
        }, undo: undo)
        let lander = BlockLandingChannel(ch, landingIn: disk)
        let result = try blocking(timeout: checkpointTimeout, abortIf: abort) {
            try await engine.run(dirty: dirty, over: lander, expectedSession: Self.diskSession(epoch))
        }
        r.disk?.note(result.stats, blockBytes: lander.blocksLanded * (Self.diskBlockBytes + 4), took: ContinuousClock.now - start)
        r.disk?.digest = diskDigest()
    }
}

extension DiskCheckpointRecord {
    mutating func note(_ s: SyncStats, blockBytes: Int, took: Duration) {
        primaryDirty = s.primaryDirtyPages
        backupDirty = s.backupDirtyPages
        union = s.unionPages
        divergent = s.divergentPages
        self.blockBytes = blockBytes
        controlBytes = s.controlBytesSent + s.controlBytesReceived
        self.took = took
    }
}

/// Set once, from whichever thread gets there first.
final class ReachedFlag: @unchecked Sendable {
    // @unchecked Sendable: `done` is only touched under `lock`.
    private let lock = NSLock()
    private var done = false
    /// True the first time only.
    func set() -> Bool { lock.withLock { defer { done = true }; return !done } }
}
