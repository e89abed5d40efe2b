import Foundation

/// Read-only access to a `BerkeleyDBLog` store, for inspection tools (`paxos-log`).
///
/// - When a node has the store open, the reader attaches to the node's Berkeley DB environment
///   (shared environment lock) and reads committed data in short transactions with a lock
///   timeout, so it never sees a half-written group commit and never holds up the node for long.
/// - When no node has it open, the reader takes the writer lock, runs normal recovery (what the
///   node's next start would do; it never changes the log's content) and reads. A node cannot
///   start while such a reader is open, so one-shot commands close promptly.
///
/// Records are handed out raw with their decoding result, so a tool can report corruption
/// precisely instead of stopping at the first bad record.
public final class LogStoreReader {
    /// The store's directory.
    public let path: String
    /// Whether a node had the store open when this reader attached.
    public let live: Bool
    private let db: BerkeleyDB
    private let lock: StoreLock
    private let owner: String
    private static let lockTimeoutMicros: UInt32 = 2_000_000
    private static let recordsPerTransaction = 512
    /// On a stopped store (held by this reader) the segments cannot change: read once.
    private var segmentsRead = false

    /// One stored entry record, undecoded and decoded.
    public struct Record: Sendable {
        /// The entry index the record is stored under.
        public var index: LogIndex
        /// The record's stored bytes.
        public var value: [UInt8]
        /// The decoded entry, or what is wrong with the record.
        public var entry: Result<LogEntry, RecordProblem>
    }

    private init(path: String, live: Bool, db: BerkeleyDB, lock: StoreLock) {
        self.path = path
        self.live = live
        self.db = db
        self.lock = lock
        owner = lock.readOwner()
    }

    deinit { close() }

    /// Attaches to the store at `path`, retrying while a node starts or stops. Throws
    /// `StableLogError` (`.locked` when the store stays busy).
    public static func open(path: String) throws -> LogStoreReader {
        _ = try StoreDirectory.prepare(path, create: false)
        let lock = try StoreLock(directory: path, create: true)
        var config = BerkeleyDB.Config()
        config.readOnly = true
        // A node may be starting or stopping right now: look again a few times.
        for _ in 0..<50 {
            if lock.isHeldElsewhere(.writer) {
                guard try lock.lock(.environment, .shared, waitingUpTo: 0.1) else { continue }
                do {
                    return LogStoreReader(path: path, live: true, db: try BerkeleyDB(path: path, config: config), lock: lock)
                } catch {
                    lock.unlock(.environment)
                    throw error
                }
            }
            guard try lock.tryLock(.writer, .exclusive) else { continue }
            guard try lock.lock(.environment, .exclusive, waitingUpTo: 2) else {
                lock.unlock(.writer)
                continue
            }
            config.recover = true
            do {
                let db = try BerkeleyDB(path: path, config: config)
                _ = try lock.tryLock(.environment, .shared)
                return LogStoreReader(path: path, live: false, db: db, lock: lock)
            } catch {
                lock.unlock(.environment)
                lock.unlock(.writer)
                throw error
            }
        }
        throw StableLogError.locked(path: path)
    }

    /// Whether a node holds the store at `path` now (without taking any lock).
    public static func isNodeRunning(path: String) -> Bool {
        guard let lock = try? StoreLock(directory: path, create: false) else { return false }
        return lock.isHeldElsewhere(.writer)
    }

    /// Detaches; safe to call twice.
    public func close() {
        db.close()
        lock.unlock(.environment)
        if !live { lock.unlock(.writer) }
    }

    /// True once the node this reader follows has stopped or been replaced: the reader must close
    /// (a new node needs the environment to itself for recovery) and open again.
    public var nodeGone: Bool {
        live && (!lock.isHeldElsewhere(.writer) || lock.readOwner() != owner)
    }

    /// The store's format version, durability mode, snapshot point and hard state.
    public func metadata() throws -> StoreMetadata {
        try read { txn throws(StableLogError) in try StoreDirectory.readMetadata(db, txn: txn) }
    }

    /// Lowest and highest entry index stored, or nil when there are no entries.
    public func bounds() throws -> (first: LogIndex, last: LogIndex)? {
        try read { txn throws(StableLogError) in
            var first: LogIndex?, last: LogIndex?
            try db.scan(.entries, from: .first, txn: txn) { k, _ throws(StableLogError) in
                first = LogRecord.index(ofKey: k); return .stop
            }
            try db.scan(.entries, from: .last, txn: txn) { k, _ throws(StableLogError) in
                last = LogRecord.index(ofKey: k); return .stop
            }
            guard let first, let last else { return nil }
            return (first, last)
        }
    }

    /// Hands every stored record with index in `from...through` to `body`, in index order,
    /// until `body` returns false. Keys that are not 8 bytes are reported as a problem record.
    public func scan(from: LogIndex = 0, through: LogIndex = .max, _ body: (Record) throws -> Bool) throws {
        var next = from
        while next <= through {
            var batch: [Record] = []
            var more = false
            let start = next
            try read { txn throws(StableLogError) in
                batch.removeAll(keepingCapacity: true)
                more = false
                try db.scan(.entries, from: .atOrAfter(LogRecord.key(start)), txn: txn) { k, v throws(StableLogError) in
                    guard let i = LogRecord.index(ofKey: k) else {
                        throw .corrupt(path: path, detail: "a \(k.count)-byte key in the entries")
                    }
                    if i > through { return .stop }
                    batch.append(Record(index: i, value: v, entry: LogRecord.decode(index: i, value: v)))
                    if batch.count >= Self.recordsPerTransaction { more = true; return .stop }
                    return .next
                }
            }
            for r in batch where try !body(r) { return }
            guard more, let last = batch.last, last.index < .max else { return }
            next = last.index + 1
        }
    }

    /// Opens the segments `meta.db` lists now and closes the others (on a stopped store, once).
    /// Attached to a running node, it leaves out the segments that hold only compacted entries:
    /// the node removes those, and cannot while another process has them open.
    private func refreshSegments() throws(StableLogError) {
        if !live && segmentsRead { return }
        // In a transaction with the lock timeout: a node stuck in a synced commit that wrote
        // `meta.db` must not hang the inspector.
        let txn = try db.begin(lockTimeoutMicros: Self.lockTimeoutMicros)
        let meta: StoreMetadata
        do { meta = try StoreDirectory.readMetadata(db, txn: txn) } catch {
            db.abort(txn)
            throw error
        }
        try db.commit(txn, .none)
        var starts = meta.segments
        if live {
            while starts.count > 1 && BerkeleyDB.holdsOnlyCompacted(nextStart: starts[1], through: meta.snapshot.index) {
                starts.removeFirst()
            }
        } else {
            starts = db.openableSegments(meta, deleteBroken: false)
        }
        try db.useSegments(starts)
        segmentsRead = true
    }

    /// Runs `body` in a short read-committed transaction, retrying when Berkeley DB picks it as a
    /// deadlock victim or its lock wait times out (the node keeps priority), or when a segment
    /// the node removed meanwhile was about to be opened.
    private func read<T>(_ body: (BerkeleyDB.Txn) throws(StableLogError) -> T) throws -> T {
        var attempt = 0
        while true {
            attempt += 1
            do {
                try refreshSegments()
            } catch {
                if attempt < 10 && (BerkeleyDB.isDeadlock(error) || live) {
                    usleep(20_000)
                    continue
                }
                throw error
            }
            let txn = try db.begin(lockTimeoutMicros: Self.lockTimeoutMicros)
            let v: T
            do {
                v = try body(txn)
            } catch {
                db.abort(txn)
                if BerkeleyDB.isDeadlock(error) && attempt < 10 {
                    usleep(20_000)
                    continue
                }
                throw error
            }
            try db.commit(txn, .none) // Ends the read; a failed commit ends the transaction too.
            return v
        }
    }
}
