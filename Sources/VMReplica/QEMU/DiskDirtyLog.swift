// Which disk blocks a VM wrote since the last checkpoint, from Debian's unpatched QEMU: every
// QEMU of a replica with a disk gets a QMP dirty bitmap on the disk's node at launch (an
// `-incoming` standby too: the bitmap records from the moment its guest runs). At a checkpoint,
// with the VM stopped, the bitmap is disabled, exported read-only over QEMU's NBD server on a
// Unix socket (`nbd-server-start`, `block-export-add` with `bitmaps`), read with libnbd's
// `nbdinfo --map=qemu:dirty-bitmap:NAME`, and cleared and enabled again; the export is gone
// before the migration starts. docs/design/vmreplica.md, "Disk".

#if canImport(Glibc)
import Glibc
#endif
import Foundation

/// A disk block map could not be read; the checkpoint then compares every block.
struct DiskDirtyLogError: Error, CustomStringConvertible {
    var problem: String
    var description: String { problem }
}

/// The dirty-block source of one replica's disk (driver thread only).
final class DiskDirtyLog {
    /// QMP name of the dirty bitmap on the disk's node, and of its NBD meta context.
    static let bitmapName = "plover-dirty"
    /// The NBD export's name.
    static let exportName = "plover-disk"
    /// The disk's block-graph node (`QEMUSettings.diskNodeName`).
    let node: String
    let blockSize: Int
    let blockCount: Int
    let runDir: String
    /// The QEMU whose bitmap holds every write since the last sync point (nil: none does, the
    /// next collection compares every block).
    private(set) var baseline: String?

    init(node: String = QEMUSettings.diskNodeName, blockSize: Int, blockCount: Int, runDir: String) {
        self.node = node
        self.blockSize = blockSize
        self.blockCount = blockCount
        self.runDir = runDir
    }

    /// Adds the bitmap to a QEMU just launched (called before its guest runs).
    func track(_ q: QEMUInstance) throws {
        try q.qmp.execute("block-dirty-bitmap-add", ["node": node, "name": Self.bitmapName, "granularity": blockSize])
    }

    /// The blocks `q`'s guest wrote since the last sync point (every block when that is not
    /// known: first checkpoint, a new QEMU, a failed checkpoint before), and a new sync point
    /// now. `q` must be stopped. `why` says why every block is listed, if it is.
    func collect(from q: QEMUInstance) -> (dirty: DirtyBitmap, why: String?) {
        var dirty: DirtyBitmap?
        var why: String? = baseline == q.name ? nil : "no dirty-bitmap history in \(q.name)"
        if why == nil {
            do { dirty = try read(q) } catch { why = "\(error)" }
        }
        baseline = nil
        do {
            try reset(q)
            baseline = q.name
        } catch {
            why = (why.map { $0 + "; " } ?? "") + "\(error)"
        }
        return (dirty ?? .all(pageCount: blockCount), why)
    }

    /// The backup's new QEMU (the checkpoint's standby) holds a bitmap that recorded since its
    /// guest started, right after the sync point.
    func adopt(_ q: QEMUInstance) { baseline = q.name }

    /// Forgets the sync point: the next collection lists every block.
    func dropBaseline() { baseline = nil }

    private func read(_ q: QEMUInstance) throws -> DirtyBitmap {
        let socket = "\(runDir)/\(q.name).nbd"
        // An enabled bitmap cannot be exported read-only; the VM is stopped, so nothing is lost.
        try q.qmp.execute("block-dirty-bitmap-disable", ["node": node, "name": Self.bitmapName])
        unlink(socket)
        try q.qmp.execute("nbd-server-start", ["addr": ["type": "unix", "data": ["path": socket]]])
        defer {
            // Stopping the server removes the export: none may hold the node during the migration.
            _ = try? q.qmp.execute("nbd-server-stop")
            unlink(socket)
        }
        try q.qmp.execute("block-export-add", ["type": "nbd", "id": Self.exportName, "node-name": node,
                                                "name": Self.exportName, "bitmaps": [Self.bitmapName], "writable": false])
        let map = try Self.nbdinfoMap(socket: socket)
        return try Self.parseMap(map, blockSize: blockSize, blockCount: blockCount)
    }

    /// Clears and re-enables the bitmap; the export may keep it busy for a moment after the
    /// server stopped.
    private func reset(_ q: QEMUInstance) throws {
        let deadline = ContinuousClock.now + .seconds(1)
        while true {
            do {
                try q.qmp.execute("block-dirty-bitmap-clear", ["node": node, "name": Self.bitmapName])
                break
            } catch let e as QMPError where e.problem.contains("in use") && ContinuousClock.now < deadline {
                usleep(1000)
            }
        }
        try q.qmp.execute("block-dirty-bitmap-enable", ["node": node, "name": Self.bitmapName])
    }

    /// `nbdinfo --map` of the dirty-bitmap meta context of the export at `socket`.
    static func nbdinfoMap(socket: String) throws -> String {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: try which("nbdinfo"))
        p.arguments = ["--map=qemu:dirty-bitmap:\(bitmapName)", "nbd+unix:///\(exportName)?socket=\(socket)"]
        let out = Pipe()
        let err = Pipe()
        p.standardOutput = out
        p.standardError = err
        p.standardInput = FileHandle.nullDevice
        try p.run()
        let text = out.fileHandleForReading.readDataToEndOfFile()
        let problem = err.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        guard p.terminationStatus == 0 else {
            throw DiskDirtyLogError(problem: "nbdinfo --map of \(socket) exited with \(p.terminationStatus): \(String(decoding: problem, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines))")
        }
        return String(decoding: text, as: UTF8.self)
    }

    static func which(_ name: String) throws -> String {
        for dir in (ProcessInfo.processInfo.environment["PATH"] ?? "/usr/bin:/bin").split(separator: ":") where access("\(dir)/\(name)", X_OK) == 0 {
            return "\(dir)/\(name)"
        }
        throw DiskDirtyLogError(problem: "\(name) not found on PATH (install libnbd-bin: scripts/install-deps.sh)")
    }

    /// The dirty blocks in `nbdinfo --map` output: one extent per line, "OFFSET LENGTH TYPE
    /// DESCRIPTION", bit 0 of TYPE set for dirty. Extents must cover the image in order.
    static func parseMap(_ text: String, blockSize: Int, blockCount: Int) throws -> DirtyBitmap {
        var dirty = DirtyBitmap(pageCount: blockCount)
        var next = 0
        let size = blockCount * blockSize
        for line in text.split(whereSeparator: \.isNewline) {
            let f = line.split(whereSeparator: \.isWhitespace)
            guard f.count >= 3, let offset = Int(f[0]), let length = Int(f[1]), let type = Int(f[2]),
                  offset == next, length > 0, offset + length <= size else {
                throw DiskDirtyLogError(problem: "nbdinfo map line \"\(line)\" does not continue the map at byte \(next) of \(size)")
            }
            next = offset + length
            guard type & 1 == 1 else { continue }
            for b in (offset / blockSize)..<((offset + length + blockSize - 1) / blockSize) { dirty.insert(b) }
        }
        guard next == size else { throw DiskDirtyLogError(problem: "nbdinfo map ends at byte \(next) of \(size)") }
        return dirty
    }
}
