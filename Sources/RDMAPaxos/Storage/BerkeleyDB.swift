import CBerkeleyDB
import Foundation

/// The only owner of Berkeley DB's C handles: one environment and the databases of a log store
/// (`meta.db` and the entries' segments, `entries.db` then `entries-<first index>.db`). Every
/// return code goes through `check`, which throws a `StableLogError` naming the store, the C code
/// and Berkeley DB's own message.
///
/// `@unchecked Sendable`: the environment and databases are opened with DB_THREAD, which makes
/// the handles free-threaded (Berkeley DB serializes internally); the environment and meta
/// pointers are written only in `init` and `close`, and owners call `close` once no other thread
/// uses the handle. The segment list changes under `segmentsLock` held for writing, and every
/// use of a segment's handle holds it for reading (see `EntrySegments.swift`).
final class BerkeleyDB: @unchecked Sendable {
    enum Table { case entries, meta }

    struct Config {
        /// A private environment with in-memory databases and log: nothing touches the disk.
        var inMemory = false
        /// Create the databases (a new store).
        var createDatabases = false
        /// Run normal recovery while opening (only under the exclusive environment lock).
        var recover = false
        /// Open the databases read-only (inspectors).
        var readOnly = false
        var cacheBytes = 64 << 20
        /// `inMemory`: the bytes the store may hold (`BerkeleyDBLog.Options.memoryBytesMax`), for
        /// the error an append gets when the cache is full.
        var capacityBytes: Int?
        var logBufferBytes = 8 << 20
        var pageBytes: UInt32 = 16 << 10
    }

    static let entriesFile = "entries.db"
    static let metaFile = "meta.db"

    let path: String
    /// `inMemory` stores: what the cache may hold (see `Config.capacityBytes`); nil on disk.
    let capacityBytes: Int?
    /// Page size of the entries' segments, read back from the first one opened (an existing
    /// store keeps its own).
    var entriesPageBytes = 16 << 10
    let config: Config
    private(set) var env: UnsafeMutablePointer<DB_ENV>?
    private var metaDB: UnsafeMutablePointer<DB>?
    /// The entries' segments, oldest first; changed and used under `segmentsLock`.
    var segments: [Segment] = []
    let segmentsLock = ReadWriteLock()
    let messages = ErrorMessages()

    struct Segment {
        /// The first index the segment holds: it holds the entries from here to the next
        /// segment's start.
        var start: LogIndex
        var handle: UnsafeMutablePointer<DB>
    }

    init(path: String, config: Config) throws(StableLogError) {
        self.path = path
        self.config = config
        capacityBytes = config.inMemory ? config.capacityBytes : nil
        var envp: UnsafeMutablePointer<DB_ENV>?
        try check(db_env_create(&envp, 0), "db_env_create")
        guard let env = envp else { throw .engine(path: path, code: -1, message: "db_env_create returned no handle") }
        self.env = env
        do {
            try open(env: env, config: config)
        } catch {
            close()
            throw error
        }
    }

    deinit { close() }

    private func open(env: UnsafeMutablePointer<DB_ENV>, config: Config) throws(StableLogError) {
        // Route Berkeley DB's own diagnostics into the thrown error instead of stderr.
        env.pointee.app_private = Unmanaged.passUnretained(messages).toOpaque()
        env.pointee.set_errcall!(env) { envp, _, msg in
            guard let envp, let box = envp.pointee.app_private, let msg else { return }
            Unmanaged<ErrorMessages>.fromOpaque(box).takeUnretainedValue().record(String(cString: msg))
        }
        // These only take effect when this process creates the environment region. A private
        // (in-memory) environment mallocs its cache as pages come in, up to this size.
        try check(env.pointee.set_cachesize!(env, UInt32(config.cacheBytes >> 30), UInt32(config.cacheBytes & ((1 << 30) - 1)), 1), "set_cachesize")
        try check(env.pointee.set_lg_bsize!(env, UInt32(config.logBufferBytes)), "set_lg_bsize")
        // A deadlock picks the locker with the fewest write locks: an inspector's read, never the node.
        try check(env.pointee.set_lk_detect!(env, UInt32(DB_LOCK_MINWRITE)), "set_lk_detect")
        if !config.inMemory && !config.readOnly {
            // The region files (__db.00N) are memory-mapped and would be sparse: a page first
            // touched when the disk is full kills the process with SIGBUS. Written out at open
            // instead, a disk too small for them fails the open with ENOSPC (a clear error).
            try check(env.pointee.set_flags!(env, UInt32(DB_REGION_INIT), 1), "set_flags(DB_REGION_INIT)")
        }
        if config.inMemory {
            try check(env.pointee.log_set_config!(env, UInt32(DB_LOG_IN_MEMORY), 1), "log_set_config")
        } else if !config.readOnly {
            // Log files behind the last checkpoint are deleted: we recover from crashes, not media loss.
            try check(env.pointee.log_set_config!(env, UInt32(DB_LOG_AUTO_REMOVE), 1), "log_set_config")
        }
        var flags = UInt32(DB_INIT_TXN | DB_INIT_LOG | DB_INIT_MPOOL | DB_INIT_LOCK | DB_THREAD)
        // Recovery rebuilds the environment's region files, so it needs DB_CREATE too.
        if config.createDatabases || config.recover || config.inMemory { flags |= UInt32(DB_CREATE) }
        if config.recover { flags |= UInt32(DB_RECOVER) }
        if config.inMemory { flags |= UInt32(DB_PRIVATE) }
        try check(env.pointee.open!(env, config.inMemory ? nil : path, flags, 0o600), "opening the environment")

        metaDB = try openTable(Self.metaFile, name: "meta", create: config.createDatabases, txn: nil)
        // A new store's first segment; an existing store's are opened once its metadata is read
        // (`useSegments`).
        if config.createDatabases { try useSegments([0]) }
    }

    /// Opens database `file` (on disk) or `name` (in memory); creates it when `create`, in `txn`
    /// when given (the handle may be used by others only once `txn` commits).
    /// `pageBytes` sets a created database's page size (`config.pageBytes` when nil).
    func openTable(_ file: String, name: String, create: Bool, txn: Txn?, pageBytes: Int? = nil) throws(StableLogError) -> UnsafeMutablePointer<DB> {
        var dbp: UnsafeMutablePointer<DB>?
        try check(db_create(&dbp, env, 0), "db_create")
        guard let db = dbp else { throw .engine(path: path, code: -1, message: "db_create returned no handle") }
        if create { _ = db.pointee.set_pagesize!(db, pageBytes.map { UInt32($0) } ?? config.pageBytes) }
        var flags = UInt32(DB_THREAD)
        if txn == nil { flags |= UInt32(DB_AUTO_COMMIT) }
        if create { flags |= UInt32(DB_CREATE) }
        if config.readOnly { flags |= UInt32(DB_RDONLY) }
        txn?.wrote = true
        let rc = config.inMemory
            ? db.pointee.open!(db, txn?.raw, nil, name, DB_BTREE, flags, 0o600)
            : db.pointee.open!(db, txn?.raw, file, nil, DB_BTREE, flags, 0o600)
        if rc != 0 {
            _ = db.pointee.close!(db, 0)
            if rc == ENOENT { throw .notAStore(path: path, reason: "\(file) is missing") }
            if rc == EINVAL { throw .notAStore(path: path, reason: "\(file) is not a Berkeley DB btree database (\(messages.take() ?? "unexpected format"))") }
            try check(rc, "opening \(file)")
        }
        return db
    }

    /// Closes the databases and the environment; safe to call twice.
    func close() {
        segmentsLock.write {
            for s in segments { _ = s.handle.pointee.close!(s.handle, 0) }
            segments = []
        }
        if let db = metaDB { _ = db.pointee.close!(db, 0); metaDB = nil }
        if let env { _ = env.pointee.close!(env, 0); self.env = nil }
    }

    // MARK: Return codes

    /// Turns a Berkeley DB (or errno) return code into the error a user can act on.
    func check(_ rc: Int32, _ what: @autoclosure () -> String) throws(StableLogError) {
        guard rc != 0 else { return }
        throw Self.error(rc, what(), path: path, detail: messages.take(), capacityBytes: capacityBytes)
    }

    static func error(_ rc: Int32, _ what: String, path: String, detail: String? = nil, capacityBytes: Int? = nil) -> StableLogError {
        if rc == ENOSPC || rc == EDQUOT { return .diskFull(path: path) }
        // An in-memory store's cache is its disk: ENOMEM (BDB3017, "unable to allocate space
        // from the buffer cache") means it is full.
        if rc == ENOMEM, let capacityBytes { return .memoryFull(path: path, capacityBytes: capacityBytes) }
        var message = "\(what): \(String(cString: db_strerror(rc)))"
        if let detail { message += " (\(detail))" }
        return .engine(path: path, code: rc, message: message)
    }

    static func isDeadlock(_ e: StableLogError) -> Bool {
        if case let .engine(_, code, _) = e { return code == DB_LOCK_DEADLOCK || code == DB_LOCK_NOTGRANTED }
        return false
    }

    // MARK: Transactions

    /// A live transaction; commit or abort it exactly once.
    /// A transaction; `wrote` says whether it changed anything (a commit then has a record to sync).
    final class Txn {
        let raw: UnsafeMutablePointer<DB_TXN>
        var wrote = false
        fileprivate init(raw: UnsafeMutablePointer<DB_TXN>) { self.raw = raw }
    }

    enum Sync {
        /// Write and fsync the log.
        case fsync
        /// Write the log to the operating system, no fsync (survives a process crash).
        case write
        /// Leave the log in memory.
        case none
    }

    /// Starts a transaction. Inspectors pass a lock timeout (so a stopped node's leftover locks
    /// cannot hang them) and read committed data only, releasing read locks as the cursor moves.
    /// `noWait`: a lock that is not free at once fails the operation (`isDeadlock`) instead of
    /// waiting for it.
    func begin(lockTimeoutMicros: UInt32? = nil, noWait: Bool = false) throws(StableLogError) -> Txn {
        guard let env else { throw .closed(path: path) }
        var t: UnsafeMutablePointer<DB_TXN>?
        var flags = lockTimeoutMicros == nil ? 0 : UInt32(DB_READ_COMMITTED)
        if noWait { flags |= UInt32(DB_TXN_NOWAIT) }
        try check(env.pointee.txn_begin!(env, nil, &t, flags), "txn_begin")
        guard let t else { throw .engine(path: path, code: -1, message: "txn_begin returned no handle") }
        if let us = lockTimeoutMicros {
            _ = t.pointee.set_timeout!(t, us, UInt32(DB_SET_LOCK_TIMEOUT))
        }
        return Txn(raw: t)
    }

    /// Commits `txn`. With `.fsync` it also checks that Berkeley DB's log really is on disk past
    /// where the log ended before the commit: Berkeley DB 5.3 reports a commit durable when the
    /// flush of a log file it has just switched to fails (EIO, ENOSPC, a lost network disk) and
    /// nothing in that file has been synced yet (`__log_flush_commit` takes a commit in a later
    /// file than the last sync for one already on disk). Without this check such a commit would
    /// be acknowledged and lost at the next power cut (docs/reliability.md, "Power loss").
    func commit(_ txn: Txn, _ sync: Sync) throws(StableLogError) {
        let flags: UInt32 = switch sync {
        case .fsync: UInt32(DB_TXN_SYNC)
        case .write: UInt32(DB_TXN_WRITE_NOSYNC)
        case .none: UInt32(DB_TXN_NOSYNC)
        }
        // A transaction that changed nothing has no commit record, so nothing to sync.
        var endBefore: LogPosition?
        if sync == .fsync && txn.wrote {
            do { endBefore = try logPositions().end } catch { abort(txn); throw error }
        }
        try check(txn.raw.pointee.commit!(txn.raw, flags), "committing")
        guard let endBefore else { return }
        let onDisk = try logPositions().onDisk
        guard onDisk > endBefore else {
            throw .engine(path: path, code: EIO, message: "committing: Berkeley DB reported the commit durable, but its log is on disk only up to \(onDisk) and the commit lies after \(endBefore): a write or fsync of the log failed")
        }
    }

    /// A position in Berkeley DB's log: a log file's number and a byte offset in it.
    struct LogPosition: Comparable, CustomStringConvertible {
        var file: UInt32
        var offset: UInt32
        static func < (a: Self, b: Self) -> Bool { (a.file, a.offset) < (b.file, b.offset) }
        var description: String { "log.\(String(format: "%010u", file)) offset \(offset)" }
    }

    /// Where the next log record goes, and how far the log is known to be on disk (Berkeley DB's
    /// last-synced position: the first byte after what a successful fsync covered).
    func logPositions() throws(StableLogError) -> (end: LogPosition, onDisk: LogPosition) {
        guard let env else { throw .closed(path: path) }
        var stat: UnsafeMutablePointer<DB_LOG_STAT>?
        try check(env.pointee.log_stat!(env, &stat, 0), "reading the log's position")
        guard let stat else { throw .engine(path: path, code: -1, message: "log_stat returned nothing") }
        defer { free(stat) }
        return (LogPosition(file: stat.pointee.st_cur_file, offset: stat.pointee.st_cur_offset),
                LogPosition(file: stat.pointee.st_disk_file, offset: stat.pointee.st_disk_offset))
    }

    func abort(_ txn: Txn) { _ = txn.raw.pointee.abort!(txn.raw) }

    /// Flushes the cache and writes a checkpoint so old log files can be removed.
    func checkpoint() throws(StableLogError) {
        guard let env else { throw .closed(path: path) }
        try check(env.pointee.txn_checkpoint!(env, 0, 0, 0), "checkpoint")
    }

    /// Writes Berkeley DB's log buffer out and fsyncs the log: every transaction committed
    /// before the call is on disk after it (whatever each commit's own sync flag was).
    func flushLog() throws(StableLogError) {
        guard let env else { throw .closed(path: path) }
        try check(env.pointee.log_flush!(env, nil), "flushing the log")
    }

    // MARK: Records

    /// The handle of `meta.db`, or (with `segmentsLock` held) of the segment that holds `key`.
    private func db(_ t: Table, key: [UInt8]) throws(StableLogError) -> UnsafeMutablePointer<DB> {
        guard t == .entries else {
            guard let d = metaDB else { throw .closed(path: path) }
            return d
        }
        guard let i = LogRecord.index(ofKey: key) else {
            throw .engine(path: path, code: EINVAL, message: "a \(key.count)-byte entry key")
        }
        guard let s = segment(holding: i) else { throw .closed(path: path) }
        return segments[s].handle
    }

    func put(_ table: Table, key: [UInt8], value: [UInt8], txn: Txn) throws(StableLogError) {
        txn.wrote = true
        try segmentsLock.read { () throws(StableLogError) in try put(try db(table, key: key), key: key, value: value, txn: txn) }
    }

    private func put(_ d: UnsafeMutablePointer<DB>, key: [UInt8], value: [UInt8], txn: Txn) throws(StableLogError) {
        // DB->put only reads the key and data; the casts avoid copying the arrays.
        let rc = key.withUnsafeBytes { k in
            value.withUnsafeBytes { v in
                var kd = DBT(), vd = DBT()
                kd.data = UnsafeMutableRawPointer(mutating: k.baseAddress); kd.size = UInt32(k.count)
                vd.data = UnsafeMutableRawPointer(mutating: v.baseAddress); vd.size = UInt32(v.count)
                return d.pointee.put!(d, txn.raw, &kd, &vd, 0)
            }
        }
        try check(rc, "writing a record")
    }

    /// The value at `key`, or nil when absent.
    func get(_ table: Table, key: [UInt8], txn: Txn? = nil) throws(StableLogError) -> [UInt8]? {
        try segmentsLock.read { () throws(StableLogError) in try get(try db(table, key: key), key: key, txn: txn) }
    }

    private func get(_ d: UnsafeMutablePointer<DB>, key: [UInt8], txn: Txn?) throws(StableLogError) -> [UInt8]? {
        var key = key
        var vd = DBT()
        vd.flags = UInt32(DB_DBT_MALLOC)
        let rc = key.withUnsafeMutableBytes { k in
            var kd = DBT()
            kd.data = k.baseAddress; kd.size = UInt32(k.count)
            return d.pointee.get!(d, txn?.raw, &kd, &vd, 0)
        }
        if rc == DB_NOTFOUND { return nil }
        try check(rc, "reading a record")
        return Self.take(&vd)
    }

    func delete(_ table: Table, key: [UInt8], txn: Txn) throws(StableLogError) {
        txn.wrote = true
        try segmentsLock.read { () throws(StableLogError) in try delete(try db(table, key: key), key: key, txn: txn) }
    }

    private func delete(_ d: UnsafeMutablePointer<DB>, key: [UInt8], txn: Txn) throws(StableLogError) {
        var key = key
        let rc = key.withUnsafeMutableBytes { k in
            var kd = DBT()
            kd.data = k.baseAddress; kd.size = UInt32(k.count)
            return d.pointee.del!(d, txn.raw, &kd, 0)
        }
        if rc == DB_NOTFOUND { return }
        try check(rc, "deleting a record")
    }

    private static func take(_ dbt: inout DBT) -> [UInt8] {
        guard let p = dbt.data else { return [] }
        let bytes = Array(UnsafeRawBufferPointer(start: p, count: Int(dbt.size)))
        free(p)
        dbt.data = nil
        return bytes
    }

    enum Position { case first, last, atOrAfter([UInt8]) }
    enum Step { case next, nextAndDeleteCurrent, stop }

    /// Walks `table` in key order from `start`, handing each key and value to `body`, which says
    /// whether to go on (and may delete the current record). `.atOrAfter` with nothing at or after
    /// the key calls `body` for nothing, backwards too. The entries are walked across their
    /// segments as one table.
    func scan(_ table: Table, from start: Position, backwards: Bool = false, txn: Txn?,
              _ body: (_ key: [UInt8], _ value: [UInt8]) throws(StableLogError) -> Step) throws(StableLogError) {
        guard table == .entries else {
            guard let d = metaDB else { throw .closed(path: path) }
            _ = try scanOne(d, from: start, backwards: backwards, txn: txn, body)
            return
        }
        try segmentsLock.read { () throws(StableLogError) in
            try scanSegments(from: start, backwards: backwards, txn: txn, body)
        }
    }

    /// How a walk of one database ended.
    enum ScanEnd { case notFound, exhausted, stopped }

    /// Walks one database (see `scan`).
    func scanOne(_ d: UnsafeMutablePointer<DB>, from start: Position, backwards: Bool, txn: Txn?,
                 _ body: (_ key: [UInt8], _ value: [UInt8]) throws(StableLogError) -> Step) throws(StableLogError) -> ScanEnd {
        var cp: UnsafeMutablePointer<DBC>?
        try check(d.pointee.cursor!(d, txn?.raw, &cp, 0), "opening a cursor")
        guard let c = cp else { return .notFound }
        defer { _ = c.pointee.close!(c) }
        var kd = DBT(), vd = DBT()
        kd.flags = UInt32(DB_DBT_MALLOC)
        vd.flags = UInt32(DB_DBT_MALLOC)
        var seek: [UInt8] = []
        var op: UInt32
        switch start {
        case .first: op = UInt32(DB_FIRST)
        case .last: op = UInt32(DB_LAST)
        case let .atOrAfter(k): op = UInt32(DB_SET_RANGE); seek = k
        }
        var rc: Int32
        if op == UInt32(DB_SET_RANGE) {
            // DB_SET_RANGE reads the key from the DBT, then returns the found key in a fresh buffer.
            rc = seek.withUnsafeMutableBytes { s in
                kd.data = s.baseAddress; kd.size = UInt32(s.count)
                kd.flags = UInt32(DB_DBT_MALLOC)
                return c.pointee.get!(c, &kd, &vd, op)
            }
        } else {
            rc = c.pointee.get!(c, &kd, &vd, op)
        }
        let nextOp = UInt32(backwards ? DB_PREV : DB_NEXT)
        var found = false
        while rc == 0 {
            found = true
            let k = Self.take(&kd), v = Self.take(&vd)
            switch try body(k, v) {
            case .stop: return .stopped
            case .next: break
            case .nextAndDeleteCurrent:
                txn?.wrote = true
                try check(c.pointee.del!(c, 0), "deleting a record")
            }
            rc = c.pointee.get!(c, &kd, &vd, nextOp)
        }
        if rc != DB_NOTFOUND { try check(rc, "reading records") }
        return found ? .exhausted : .notFound
    }
}

/// The last message Berkeley DB reported through its error callback.
final class ErrorMessages: @unchecked Sendable {
    // @unchecked Sendable: `last` is only touched under `lock`.
    private let lock = NSLock()
    private var last: String?
    func record(_ m: String) { lock.lock(); last = m; lock.unlock() }
    func take() -> String? { lock.lock(); defer { last = nil; lock.unlock() }; return last }
}
