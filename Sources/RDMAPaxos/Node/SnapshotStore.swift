import Foundation

/// Where a replica keeps its latest state machine snapshot (the log keeps only the point).
public protocol SnapshotStore: AnyObject, Sendable {
    /// The latest saved snapshot, or nil if none was ever saved.
    func load() throws -> Snapshot?
    /// Saves `snapshot` durably, replacing the previous one.
    func save(_ snapshot: Snapshot) throws
}

/// Why a snapshot could not be loaded or saved.
public struct SnapshotStoreError: Error, CustomStringConvertible, Sendable {
    /// The snapshot file concerned.
    public var path: String
    /// What went wrong, for the operator.
    public var reason: String
    public var description: String { "\(path): snapshot: \(reason)" }
}

/// Keeps the snapshot in memory only (durability `memory`, and tests).
public final class MemorySnapshotStore: SnapshotStore, @unchecked Sendable {
    // @unchecked Sendable: `latest` is only touched under `lock`.
    private let lock = NSLock()
    private var latest: Snapshot?
    /// An empty store: `load()` returns nil until the first `save`.
    public init() {}
    public func load() throws -> Snapshot? { lock.withLock { latest } }
    public func save(_ snapshot: Snapshot) throws { lock.withLock { latest = snapshot } }
}

/// One file, `snapshot.bin`, replaced atomically (write, fsync, rename, fsync the directory),
/// with a version and a checksum so a torn or foreign file is reported, never restored.
public final class FileSnapshotStore: SnapshotStore, @unchecked Sendable {
    // @unchecked Sendable: immutable after init; file operations are atomic renames.
    /// The snapshot file, `snapshot.bin` in the store's directory.
    public let path: String
    private let sync: Bool
    static let magic: UInt32 = 0x504C_5653 // "PLVS"
    /// Version 2 holds the configuration in format 2 (with addresses); version 1 files still load.
    static let version: UInt32 = 2
    static let versionsRead: ClosedRange<UInt32> = 1...2

    /// `sync: false` skips the fsyncs. Durability `async` syncs too: the log's compaction is
    /// flushed within `async_flush_ms`, and a snapshot lost to a power cut behind a compaction
    /// that survived it would lose far more than that bound.
    public init(directory: String, sync: Bool = true) {
        path = directory + "/snapshot.bin"
        self.sync = sync
    }

    public func load() throws -> Snapshot? {
        guard FileManager.default.fileExists(atPath: path) else { return nil }
        guard let data = FileManager.default.contents(atPath: path) else {
            throw SnapshotStoreError(path: path, reason: "cannot be read")
        }
        return try Self.decode([UInt8](data), path: path)
    }

    /// A snapshot from the bytes of a snapshot file (`encode(_:)`, a backup written by `plover
    /// snapshot save`); errors name `path`.
    public static func decode(_ bytes: [UInt8], path: String) throws -> Snapshot {
        guard bytes.count >= 16 else { throw SnapshotStoreError(path: path, reason: "truncated (\(bytes.count) bytes)") }
        let body = Array(bytes.dropLast(8))
        var tail = ByteReader(Array(bytes.suffix(8)), what: "snapshot checksum")
        guard try tail.u64() == checksum(body) else {
            throw SnapshotStoreError(path: path, reason: "checksum mismatch: the file is corrupt")
        }
        do {
            var r = ByteReader(body, what: "snapshot")
            guard try r.u32() == magic else { throw SnapshotStoreError(path: path, reason: "not a plover snapshot") }
            let v = try r.u32()
            guard versionsRead.contains(v) else { throw SnapshotStoreError(path: path, reason: "format version \(v), this build reads versions 1 and \(version)") }
            let index = try r.u64()
            let ballot = try r.ballot()
            let membership = try Membership(decoding: try r.blob(max: 1 << 20))
            let data = try r.blob(max: Int(UInt32.max))
            try r.finish()
            return Snapshot(index: index, ballot: ballot, membership: membership, data: data)
        } catch let e as DecodeError {
            throw SnapshotStoreError(path: path, reason: e.description)
        }
    }

    public func save(_ s: Snapshot) throws {
        let bytes = Self.encode(s)
        let tmp = path + ".tmp"
        try writeFile(tmp, bytes)
        guard rename(tmp, path) == 0 else { throw SnapshotStoreError(path: path, reason: "rename failed: \(String(cString: strerror(errno)))") }
        if sync {
            let dir = open((path as NSString).deletingLastPathComponent, O_RDONLY)
            if dir >= 0 { fsync(dir); close(dir) }
        }
    }

    /// The bytes of a snapshot file: magic, version, index, ballot, configuration, data, checksum.
    public static func encode(_ s: Snapshot) -> [UInt8] {
        var w = ByteWriter(capacity: s.data.count + 64)
        w.u32(Self.magic)
        w.u32(Self.version)
        w.u64(s.index)
        w.ballot(s.ballot)
        w.blob(s.membership.encoded())
        w.blob(s.data)
        var bytes = w.bytes
        var sum = ByteWriter()
        sum.u64(Self.checksum(bytes))
        bytes += sum.bytes
        return bytes
    }

    private func writeFile(_ file: String, _ bytes: [UInt8]) throws {
        let fd = open(file, O_WRONLY | O_CREAT | O_TRUNC, 0o600)
        guard fd >= 0 else { throw SnapshotStoreError(path: file, reason: "cannot create: \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        var done = 0
        var flushed = 0
        while done < bytes.count {
            // Flushed as it goes: one fsync of hundreds of MB at the end would flood the disk
            // and hold the log's own fsyncs behind it.
            if sync && done - flushed >= Self.flushEveryBytes {
                if fdatasync(fd) != 0 { throw SnapshotStoreError(path: file, reason: "fdatasync failed: \(String(cString: strerror(errno)))") }
                flushed = done
            }
            let n = bytes[done..<min(bytes.count, done + Self.flushEveryBytes)].withUnsafeBytes { Foundation.write(fd, $0.baseAddress, $0.count) }
            if n < 0 {
                if errno == EINTR { continue }
                throw SnapshotStoreError(path: file, reason: "write failed: \(String(cString: strerror(errno)))")
            }
            done += n
        }
        if sync && fsync(fd) != 0 { throw SnapshotStoreError(path: file, reason: "fsync failed: \(String(cString: strerror(errno)))") }
    }

    static func checksum(_ b: [UInt8]) -> UInt64 { LogRecord.checksum(b[...], seed: UInt64(magic)) }
    /// How much of a snapshot is written between two flushes.
    static let flushEveryBytes = 8 << 20
}
