import Foundation

/// What `meta.db` says about a store.
public struct StoreMetadata: Hashable, Sendable {
    /// The record format version the store was written with.
    public var formatVersion: UInt32
    /// The durability mode the store was last opened with (a node may change it between runs).
    public var durability: String
    /// The point the log's prefix was compacted through.
    public var snapshot: SnapshotPoint
    /// The last saved hard state.
    public var hardState: HardState
    /// The first index of each segment of the entries (`entries.db` first, at 0): a segment holds
    /// the entries from its first index up to the next segment's.
    public var segments: [LogIndex] = [0]
}

/// Checks a log directory, takes its locks and reads or writes its metadata. Shared by the node's
/// `BerkeleyDBLog` and the read-only `LogStoreReader`.
enum StoreDirectory {
    /// Whether `path` holds a store; creates the directory when asked. Throws when it cannot be used.
    static func prepare(_ path: String, create: Bool) throws(StableLogError) -> Bool {
        var isDir: ObjCBool = false
        if FileManager.default.fileExists(atPath: path, isDirectory: &isDir) {
            guard isDir.boolValue else { throw .badPath(path: path, reason: "it is not a directory") }
        } else {
            guard create else { throw .badPath(path: path, reason: "no such directory") }
            do {
                try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
            } catch {
                throw .badPath(path: path, reason: "cannot create it: \(error.localizedDescription)")
            }
        }
        guard access(path, R_OK | W_OK | X_OK) == 0 else {
            throw .badPath(path: path, reason: "no read/write permission")
        }
        let hasMeta = FileManager.default.fileExists(atPath: path + "/" + BerkeleyDB.metaFile)
        if !hasMeta && !create {
            throw .notAStore(path: path, reason: "no \(BerkeleyDB.metaFile) (a store holds \(BerkeleyDB.metaFile), \(BerkeleyDB.entriesFile) or later entries-N.db segments, and Berkeley DB log files)")
        }
        return hasMeta
    }

    /// Takes the writer lock and then the environment lock exclusively (to run recovery).
    static func lockForWriting(_ path: String) throws(StableLogError) -> StoreLock {
        let lock = try StoreLock(directory: path, create: true)
        // A second long-lived owner must fail fast; only a momentary holder is waited out.
        guard try lock.lock(.writer, .exclusive, waitingUpTo: 1) else { throw .locked(path: path) }
        lock.writeOwner("pid=\(getpid()) nonce=\(UInt64.random(in: 1...UInt64.max))")
        // Inspectors attached to a previous node's environment detach within their poll interval.
        guard try lock.lock(.environment, .exclusive, waitingUpTo: 5) else {
            lock.unlock(.writer)
            throw .locked(path: path)
        }
        return lock
    }

    static func readMetadata(_ db: BerkeleyDB, txn: BerkeleyDB.Txn? = nil) throws(StableLogError) -> StoreMetadata {
        let path = db.path
        func body(_ key: LogRecord.MetaKey) throws(StableLogError) -> [UInt8]? {
            guard let v = try db.get(.meta, key: Array(key.rawValue.utf8), txn: txn) else { return nil }
            switch LogRecord.decodeMeta(key, v) {
            case let .success(b): return b
            case let .failure(p): throw .corrupt(path: path, detail: p.detail)
            }
        }
        guard let formatBytes = try body(.format) else {
            throw .notAStore(path: path, reason: "\(BerkeleyDB.metaFile) has no format record")
        }
        let format: UInt32
        do { format = try LogRecord.decodeFormat(formatBytes) } catch {
            throw .corrupt(path: path, detail: "format record: \(error)")
        }
        guard LogRecord.formatsRead.contains(format) else {
            throw .versionMismatch(path: path, found: format, expected: LogRecord.formatVersion)
        }
        var meta = StoreMetadata(formatVersion: format, durability: "unknown", snapshot: .none, hardState: HardState())
        if let d = try body(.durability) { meta.durability = String(decoding: d, as: UTF8.self) }
        do {
            if let s = try body(.snapshot) { meta.snapshot = try LogRecord.decodeSnapshot(s) }
        } catch let e as StableLogError { throw e } catch {
            throw .corrupt(path: path, detail: "snapshot record: \(error)")
        }
        do {
            if let h = try body(.hardstate) { meta.hardState = try HardState(decoding: h) }
        } catch let e as StableLogError { throw e } catch {
            throw .corrupt(path: path, detail: "hard state record: \(error)")
        }
        // Before format 3 a store had one segment, `entries.db`.
        if format >= 3 {
            guard let b = try body(.segments) else {
                throw .corrupt(path: path, detail: "\(BerkeleyDB.metaFile) has no segments record")
            }
            do { meta.segments = try LogRecord.decodeSegments(b) } catch {
                throw .corrupt(path: path, detail: "segments record: \(error)")
            }
        }
        return meta
    }

    static func putMeta(_ db: BerkeleyDB, _ key: LogRecord.MetaKey, _ body: [UInt8], txn: BerkeleyDB.Txn) throws(StableLogError) {
        try db.put(.meta, key: Array(key.rawValue.utf8), value: LogRecord.encodeMeta(key, body), txn: txn)
    }

    /// Runs `body` in a transaction, retrying when Berkeley DB picks it as a deadlock victim.
    static func inTransaction<T>(_ db: BerkeleyDB, sync: BerkeleyDB.Sync,
                                 _ body: (BerkeleyDB.Txn) throws(StableLogError) -> T) throws(StableLogError) -> T {
        var attempt = 0
        while true {
            attempt += 1
            let txn = try db.begin()
            let value: T
            do {
                value = try body(txn)
            } catch {
                db.abort(txn)
                if BerkeleyDB.isDeadlock(error) && attempt < 20 { continue }
                throw error
            }
            // A failed commit ends the transaction itself: no abort after it.
            do {
                try db.commit(txn, sync)
            } catch {
                if BerkeleyDB.isDeadlock(error) && attempt < 20 { continue }
                throw error
            }
            return value
        }
    }
}
