// Whether the backup's memory may be trusted as a copy of the primary's.
//
// The rule (docs/design/syncvm.md, "syncvm"): the backup records "not in sync" before the first page
// of a session can land, and "in sync" only after the primary's commit arrived (and, with
// verify, the written pages re-hashed to the primary's digest). A sync cut off anywhere in
// between therefore leaves "not in sync" behind, in memory or on disk, and whoever would
// promote the backup must check `isInSync` first.

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import Synchronization

/// Whether the backup's memory is a copy of the primary's, as the backup last recorded it.
public enum BackupSyncState: Equatable, Sendable, CustomStringConvertible {
    /// The memory is not known to match the primary; `reason` says why.
    case notInSync(reason: String)
    /// The memory matched the primary at the end of `session`.
    case inSync(session: UInt64)

    /// Whether the memory may be trusted as the primary's: check it before promoting the backup.
    public var isInSync: Bool {
        if case .inSync = self { return true }
        return false
    }

    public var description: String {
        switch self {
        case .notInSync(let reason): return "not in sync (\(reason))"
        case .inSync(let session): return "in sync after session \(session)"
        }
    }
}

/// Where the backup keeps its sync state. `store` must be durable when it returns for as long
/// as the guest memory itself is (a state file next to a RAM file on the same file system).
public protocol SyncStateStore: Sendable {
    /// The state last stored; before the first `store`, the store's initial state.
    func load() -> BackupSyncState
    /// Records `state`, durably by the time it returns. A sync fails when this throws.
    func store(_ state: BackupSyncState) throws
}

/// State kept in memory: for tests, and for backups whose RAM does not outlive the process.
public final class MemorySyncStateStore: SyncStateStore {
    private let state: Mutex<BackupSyncState>

    /// A store holding `initial` ("not in sync" by default).
    public init(_ initial: BackupSyncState = .notInSync(reason: "never synced")) {
        state = Mutex(initial)
    }

    public func load() -> BackupSyncState { state.withLock { $0 } }
    public func store(_ s: BackupSyncState) { state.withLock { $0 = s } }
}

/// A file operation of `FileSyncStateStore.store` failed.
public struct SyncStateFileError: Error, Equatable, Sendable, CustomStringConvertible {
    /// The file or directory the operation failed on.
    public var path: String
    /// What failed: "create", "write", "replace" or "sync directory of".
    public var operation: String
    /// The system's error number.
    public var errno: Int32
    public var description: String {
        "cannot \(operation) sync state file \(path): \(String(cString: strerror(errno)))"
    }
}

/// State in a one-line text file, replaced atomically (write a temporary file, fsync, rename,
/// fsync the directory). A missing or unreadable file reads as "not in sync": only a complete,
/// well-formed record can claim sync.
public final class FileSyncStateStore: SyncStateStore {
    /// The state file; `store` writes `PATH.tmp` next to it first.
    public let path: String

    /// A store in the file at `path`; nothing is read or written yet.
    public init(path: String) { self.path = path }

    public func load() -> BackupSyncState {
        let fd = open(path, O_RDONLY)
        if fd < 0 { return .notInSync(reason: errno == ENOENT ? "never synced" : "state file unreadable") }
        defer { close(fd) }
        var buffer = [UInt8](repeating: 0, count: 512)
        let n = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
        guard n > 0 else { return .notInSync(reason: "state file empty") }
        let text = String(decoding: buffer[..<n], as: UTF8.self)
        guard text.hasSuffix("\n") else { return .notInSync(reason: "state file truncated") }
        let line = text.dropLast()
        if line.hasPrefix("in-sync "), let s = UInt64(line.dropFirst("in-sync ".count)) {
            return .inSync(session: s)
        }
        if line.hasPrefix("not-in-sync ") {
            return .notInSync(reason: String(line.dropFirst("not-in-sync ".count)))
        }
        return .notInSync(reason: "state file malformed")
    }

    /// Throws `SyncStateFileError` when the file cannot be written or replaced, or its directory
    /// cannot be synced.
    public func store(_ state: BackupSyncState) throws {
        let line: String
        switch state {
        case .inSync(let s): line = "in-sync \(s)\n"
        case .notInSync(let r):
            // One line, bounded, so `load` reads it back whole.
            // Bounded in bytes, not characters: `load` reads 512 bytes, and a character may take 4.
            var clean = ""
            for c in r.map({ $0.isNewline ? " " : $0 }) {
                guard clean.utf8.count + String(c).utf8.count <= 400 else { break }
                clean.append(c)
            }
            line = "not-in-sync \(clean)\n"
        }
        let tmp = path + ".tmp"
        let fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC, 0o644)
        guard fd >= 0 else { throw SyncStateFileError(path: tmp, operation: "create", errno: errno) }
        let bytes = Array(line.utf8)
        let written = bytes.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
        if written != bytes.count || fsync(fd) != 0 {
            let e = errno
            close(fd)
            throw SyncStateFileError(path: tmp, operation: "write", errno: e)
        }
        close(fd)
        guard rename(tmp, path) == 0 else { throw SyncStateFileError(path: path, operation: "replace", errno: errno) }
        let dir = path.lastIndex(of: "/").map { String(path[..<$0]) } ?? "."
        let dfd = open(dir.isEmpty ? "/" : dir, O_RDONLY)
        guard dfd >= 0 else { throw SyncStateFileError(path: dir, operation: "open directory of", errno: errno) }
        defer { close(dfd) }
        guard fsync(dfd) == 0 else { throw SyncStateFileError(path: dir, operation: "sync directory of", errno: errno) }
    }
}
