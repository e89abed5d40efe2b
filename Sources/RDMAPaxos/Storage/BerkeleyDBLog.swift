import Foundation

/// The node's stable log: a Berkeley DB 5.3 transactional store with group commit.
///
/// Appends are queued; one writer thread drains the queue into one transaction and one commit
/// (an fsync in `.fsync` mode), then runs the completions in append order. See docs/design/stable-log.md
/// for the record layout, the durability modes and the directory lock.
public final class BerkeleyDBLog: StableLog, @unchecked Sendable {
    // @unchecked Sendable: only immutable properties; `engine` does its own locking.

    /// Limits fixed when the log is opened.
    public struct Options: Sendable {
        /// Berkeley DB cache for disk modes.
        public var cacheBytes = 64 << 20
        /// Log buffer: one group commit's log records should fit in it.
        public var logBufferBytes = 8 << 20
        /// Upper bound of payload bytes in one group commit.
        public var batchBytesMax = 8 << 20
        /// A checkpoint (which lets old log files be deleted) after this many bytes written.
        public var checkpointEveryBytes = 64 << 20
        /// The writer starts a new segment (a database file of its own) once the newest holds
        /// this many bytes of entries (`LogRecord.storedBytes`); a compaction removes the
        /// segments that hold only compacted entries, whole. So up to about this many bytes of
        /// compacted entries stay on disk. `.memory` mode uses a sixteenth of `memoryBytesMax` if
        /// that is less.
        public var segmentBytes = 64 << 20
        /// `.async` mode: the log is flushed to disk (written and fsynced) this often, which
        /// bounds what a power cut loses to the entries acknowledged in the last interval (plus
        /// one flush). Zero never flushes between checkpoints: only for the test that shows the
        /// bound fails without the flusher.
        public var asyncFlushInterval: Duration = .milliseconds(100)
        /// `.memory` mode keeps everything in a cache: the entries' pages (`heldBytes`) may take
        /// this many bytes (`capacityBytes`; the cache gets 1/16 more for Berkeley DB's buffer
        /// headers). Appends fail with `.memoryFull` past it: compact before (a node does at half).
        public var memoryBytesMax = 512 << 20
        /// Fault injection for tests of stalled disks: while a file exists at this path, the
        /// writer completes nothing (appends and other writes wait), as a hung disk would.
        /// `plover node` sets it from the `PLOVER_FAULT_DISK_STALL_FILE` environment variable.
        public var stallWhileFileExists: String?
        /// Disk modes: free bytes on the store's file system that writes leave untouched (for
        /// Berkeley DB's own log and checkpoints, and for compaction, which needs space to free
        /// space). A node holds writes that would eat into it (`spaceShortfall(forBytes:)`).
        public var diskReserveBytes = 32 << 20
        /// Told (at most once a second, from the thread that wrote: the writer thread, or in
        /// memory mode the caller of an inline append) when a group commit or a deletion of
        /// compacted entries takes 500 ms or more, with what it was and how long it took;
        /// `plover node` logs it as a warning.
        public var onSlowWrite: (@Sendable (String) -> Void)?
        /// Options with the defaults shown: 64 MiB cache, 8 MiB log buffer and batches, no stall
        /// file.
        public init() {}
    }

    public let durability: Durability
    /// The store's directory.
    public let path: String
    public let capacityBytes: Int?
    let engine: GroupCommitEngine
    private let diskReserveBytes: Int

    private init(path: String, durability: Durability, capacityBytes: Int?, engine: GroupCommitEngine, diskReserveBytes: Int) {
        self.diskReserveBytes = diskReserveBytes
        self.path = path
        self.durability = durability
        self.capacityBytes = capacityBytes
        self.engine = engine
    }

    /// Opens the store in directory `path`, creating the directory and the store when `create`.
    ///
    /// In `.memory` mode nothing is read from or written to `path` (it only names the log in
    /// errors): the Berkeley DB environment, databases and log live in this process's memory.
    public static func open(path: String, durability: Durability = .fsync, create: Bool = true,
                            options: Options = .init()) throws -> BerkeleyDBLog {
        var config = BerkeleyDB.Config()
        config.cacheBytes = options.cacheBytes
        config.logBufferBytes = options.logBufferBytes
        var lock: StoreLock?
        var isNew = true
        if durability == .memory {
            config.inMemory = true
            config.capacityBytes = options.memoryBytesMax
            config.cacheBytes = options.memoryBytesMax + options.memoryBytesMax / 16
            config.createDatabases = true
        } else {
            // 64 KiB pages (Berkeley DB's largest) on disk: an item over a quarter page goes to
            // overflow pages of its own, so with 16 KiB pages every 4 KiB command took a whole
            // page and the disk wrote four times the log's bytes. A store keeps the page size it
            // was created with.
            config.pageBytes = 64 << 10
            isNew = try !StoreDirectory.prepare(path, create: create)
            lock = try StoreDirectory.lockForWriting(path)
            config.recover = true
            config.createDatabases = isNew
        }
        do {
            let db = try BerkeleyDB(path: path, config: config)
            let (state, segments, firstStored) = try Self.load(db, durability: durability, isNew: isNew)
            let engine = GroupCommitEngine(db: db, lock: lock, durability: durability, options: options, state: state,
                                           segments: segments, firstStored: firstStored)
            // A compaction's segments that a crash (or an inspector) kept from being removed.
            engine.removeDeadSegments()
            try engine.locked { s throws(StableLogError) in if let f = s.failure { throw f } }
            // Recovery is done: inspectors may now attach to the environment beside us.
            _ = try lock?.tryLock(.environment, .shared)
            engine.start()
            return BerkeleyDBLog(path: path, durability: durability, capacityBytes: db.capacityBytes, engine: engine,
                                 diskReserveBytes: options.diskReserveBytes)
        } catch {
            lock?.unlock(.environment)
            lock?.unlock(.writer)
            throw error
        }
    }

    /// Writes a new store's metadata, or reads an existing one's, opens its segments and finds
    /// its bounds and the bytes each segment holds.
    private static func load(_ db: BerkeleyDB, durability: Durability, isNew: Bool) throws(StableLogError)
        -> (GroupCommitEngine.State, [(start: LogIndex, heldBytes: Int)], LogIndex?) {
        let sync: BerkeleyDB.Sync = durability == .memory ? .none : .fsync
        if isNew {
            try StoreDirectory.inTransaction(db, sync: sync) { txn throws(StableLogError) in
                try StoreDirectory.putMeta(db, .format, LogRecord.encodeFormat(LogRecord.formatVersion), txn: txn)
                try StoreDirectory.putMeta(db, .durability, Array(durability.rawValue.utf8), txn: txn)
                try StoreDirectory.putMeta(db, .snapshot, LogRecord.encodeSnapshot(.none), txn: txn)
                try StoreDirectory.putMeta(db, .hardstate, HardState().encoded(), txn: txn)
                try StoreDirectory.putMeta(db, .segments, LogRecord.encodeSegments([0]), txn: txn)
            }
            return (.init(snapshot: .none, hardState: HardState(), lastIndex: 0, heldBytes: 0), [(0, 0)], nil)
        }
        let meta = try StoreDirectory.readMetadata(db)
        let present = db.openableSegments(meta, deleteBroken: true)
        try db.useSegments(present)
        try StoreDirectory.inTransaction(db, sync: sync) { txn throws(StableLogError) in
            try StoreDirectory.putMeta(db, .durability, Array(durability.rawValue.utf8), txn: txn)
            // An older store is written in this build's format from now on: its `entries.db` is
            // the first segment.
            if meta.formatVersion != LogRecord.formatVersion {
                try StoreDirectory.putMeta(db, .format, LogRecord.encodeFormat(LogRecord.formatVersion), txn: txn)
            }
            if meta.formatVersion != LogRecord.formatVersion || present != meta.segments {
                try StoreDirectory.putMeta(db, .segments, LogRecord.encodeSegments(present), txn: txn)
            }
        }
        var segments = present.map { (start: $0, heldBytes: 0) }
        let pageBytes = db.entriesPageBytes
        var s = 0
        var firstStored: LogIndex?
        try db.scan(.entries, from: .first, txn: nil) { k, v throws(StableLogError) in
            guard let i = LogRecord.index(ofKey: k) else {
                throw .corrupt(path: db.path, detail: "a key of \(k.count) bytes in the entries")
            }
            if firstStored == nil { firstStored = i }
            while s + 1 < segments.count && segments[s + 1].start <= i { s += 1 }
            segments[s].heldBytes += LogRecord.storedBytes(valueBytes: v.count, pageBytes: pageBytes)
            return .next
        }
        let held = segments.reduce(0) { $0 + $1.heldBytes }
        var last: (LogIndex, [UInt8])?
        try db.scan(.entries, from: .last, txn: nil) { k, v throws(StableLogError) in
            if let i = LogRecord.index(ofKey: k) { last = (i, v) }
            return .stop
        }
        // Entries at or below the snapshot point may still be there (their segment holds live
        // ones too, or a crash kept it from being removed): the live log starts right after it.
        guard let last, last.0 > meta.snapshot.index else {
            return (.init(snapshot: meta.snapshot, hardState: meta.hardState, lastIndex: meta.snapshot.index, heldBytes: held), segments, firstStored)
        }
        var first: LogIndex?
        try db.scan(.entries, from: .atOrAfter(LogRecord.key(meta.snapshot.index + 1)), txn: nil) { k, _ throws(StableLogError) in
            first = LogRecord.index(ofKey: k)
            return .stop
        }
        guard first == meta.snapshot.index + 1 else { throw .missing(path: db.path, index: meta.snapshot.index + 1) }
        if case let .failure(p) = LogRecord.decode(index: last.0, value: last.1) {
            throw .corrupt(path: db.path, detail: p.description)
        }
        return (.init(snapshot: meta.snapshot, hardState: meta.hardState, lastIndex: last.0, heldBytes: held), segments, firstStored)
    }

    deinit { engine.shutdown() }

    public var firstIndex: LogIndex { engine.locked { $0.snapshot.index + 1 } }
    public var lastIndex: LogIndex { engine.locked { $0.lastIndex } }
    public var durableIndex: LogIndex { engine.locked { $0.durableIndex } }
    public var snapshot: SnapshotPoint { engine.locked { $0.snapshot } }
    /// The live entries' bytes: compacted entries still stored in a segment that holds live ones
    /// too are left out (estimated; `GroupCommitEngine.updateCompactedBytes`).
    public var heldBytes: Int { engine.locked { max(0, $0.heldBytes - $0.compactedBytes) } }

    public func append(_ entries: [LogEntry], onDurable: @escaping @Sendable (Result<Void, StableLogError>) -> Void) {
        engine.append(entries, onDurable)
    }

    /// In `.memory` mode, while the writer thread is idle: the commit on the caller's thread.
    public func appendInline(_ entries: [LogEntry]) -> Result<Void, StableLogError>? {
        engine.appendInline(entries)
    }

    public func append(_ entries: [LogEntry]) throws {
        let w = Waiter()
        engine.append(entries) { w.finish($0) }
        try w.wait().get()
    }

    public func entries(_ range: ClosedRange<LogIndex>) throws -> [LogEntry] {
        try engine.read(range)
    }

    public func truncateSuffix(from index: LogIndex) throws {
        precondition(index > snapshot.index, "truncateSuffix(from: \(index)) reaches into the compacted prefix (\(snapshot.index))")
        try engine.control(.truncate(index))
    }

    public func compactPrefix(through index: LogIndex, ballot: Ballot) throws {
        try engine.control(.compact(index, ballot))
    }

    public func loadHardState() throws -> HardState {
        try engine.locked { s throws(StableLogError) in
            if let f = s.failure { throw f }
            if s.closed { throw .closed(path: path) }
            return s.hardState
        }
    }

    public func saveHardState(_ state: HardState) throws {
        try engine.control(.hardState(state))
    }

    /// Queued like an append: written after every earlier append and before every later one.
    public func saveHardState(_ state: HardState, onDurable: @escaping @Sendable (Result<Void, StableLogError>) -> Void) {
        engine.control(.hardState(state), onDurable)
    }

    public func close() throws {
        try engine.close()
    }

    /// Disk modes: short when the file system's free bytes (for unprivileged writers) minus the
    /// reserve cannot hold `bytes` written twice (Berkeley DB logs each record, then writes its page).
    public func spaceShortfall(forBytes bytes: Int) -> String? {
        guard durability != .memory else { return nil }
        var fs = statvfs()
        guard statvfs(path, &fs) == 0 else { return nil }
        let free = Int(fs.f_bavail) * Int(fs.f_frsize)
        let needed = 2 * bytes + diskReserveBytes
        guard free < needed else { return nil }
        return "\(path): no space for the log: \(free >> 20) MiB free, \(needed >> 20) MiB needed (\(diskReserveBytes >> 20) MiB of it kept in reserve); writes wait until space is freed, and this replica acknowledges and leads nothing meanwhile"
    }
}

/// One caller waiting for the writer thread.
final class Waiter: @unchecked Sendable {
    // @unchecked Sendable: `result` is written once before `signal` and read after `wait`,
    // which orders the accesses.
    private let sem = DispatchSemaphore(value: 0)
    private var result: Result<Void, StableLogError> = .success(())
    func finish(_ r: Result<Void, StableLogError>) {
        result = r
        sem.signal()
    }
    func wait() -> Result<Void, StableLogError> {
        sem.wait()
        return result
    }
}
