import Foundation

/// The writer side of `BerkeleyDBLog`: a queue of operations drained by one thread.
///
/// Consecutive appends become one transaction and one commit; other operations (truncate,
/// compact, hard state, close) run alone, in queue order, so each sees every earlier append done.
/// Completions run on the writer thread, in append order; they should be quick.
///
/// `@unchecked Sendable`: `state` and `queue` are only touched with `cond` held; `db` and `lock`
/// are used by the writer thread only, apart from reads (free-threaded BDB handles).
final class GroupCommitEngine: @unchecked Sendable {
    struct State {
        var snapshot: SnapshotPoint
        var hardState: HardState
        var lastIndex: LogIndex
        var durableIndex: LogIndex = 0
        /// `LogRecord.storedBytes` of the durable entries held (`StableLog.heldBytes`).
        var heldBytes: Int
        /// Appended, not yet durable: contiguous, ending at `lastIndex`. Served to readers.
        var pending: [LogEntry] = []
        /// The first failure: from then on every operation fails with it.
        var failure: StableLogError?
        var closed = false
        /// Group commits done (appends only): lets tests see that appends share commits.
        var commits = 0
        /// Entries at or below this index are dead (a compaction recorded its point) and are
        /// still being deleted, one bounded transaction at a time between group commits.
        var deleteThrough: LogIndex = 0
        /// A checkpoint runs on `checkpoints`.
        var checkpointing = false
        /// Someone writes to the store: the writer thread with a batch, or a caller of
        /// `appendInline`. One at a time, so every write keeps queue order.
        var writing = false

        init(snapshot: SnapshotPoint, hardState: HardState, lastIndex: LogIndex, heldBytes: Int) {
            self.snapshot = snapshot
            self.hardState = hardState
            self.lastIndex = lastIndex
            self.durableIndex = lastIndex
            self.heldBytes = heldBytes
        }
    }

    enum Control {
        case truncate(LogIndex)
        case compact(LogIndex, Ballot)
        case hardState(HardState)
        case close
    }

    private enum Op {
        case append([LogEntry], @Sendable (Result<Void, StableLogError>) -> Void)
        case control(Control, @Sendable (Result<Void, StableLogError>) -> Void)
    }

    private let db: BerkeleyDB
    private let lock: StoreLock?
    private let sync: BerkeleyDB.Sync
    private let options: BerkeleyDBLog.Options
    private let cond = NSCondition()
    private var state: State
    private var queue: [Op] = []
    private var bytesSinceCheckpoint = 0
    /// Runs checkpoints off the writer thread, one at a time.
    private let checkpoints = DispatchQueue(label: "stable-log-checkpoint")
    /// Held by the async flusher while it flushes; `flusherStopped` (under it) ends the flusher
    /// before the environment closes.
    private let flushLock = NSLock()
    private var flusherStopped = false
    /// Deleting records logs their old values, so big deletions are split into transactions of
    /// about this many bytes (the in-memory log of `.memory` mode must hold a whole transaction).
    private static let deleteChunkBytes = 1 << 20
    /// Dead entries deleted in one transaction while the writer is idle, and at least after
    /// each group commit: appends that arrive meanwhile wait for it, and 1 MiB took the writer
    /// 50–480 ms under load (a group commit held that long); 128 KiB deletes an eighth as many
    /// entries per transaction. After a commit the chunk is at least as large as the commit, so
    /// that deletion keeps pace with a writer that is never idle.
    private static let idleDeleteChunkBytes = 128 << 10
    /// A group commit or idle deletion that takes this long is reported (`Options.onSlowWrite`).
    static let slowWrite: Duration = .milliseconds(500)
    private var lastSlowWarning: ContinuousClock.Instant?
    /// Payload bytes in one transaction: unbounded on disk; in `.memory` mode the in-memory log
    /// buffer must hold a whole transaction, so a bigger group commit takes several (nothing in
    /// that mode survives a crash, so nothing depends on one batch being atomic).
    private let transactionBytesMax: Int

    init(db: BerkeleyDB, lock: StoreLock?, durability: Durability, options: BerkeleyDBLog.Options, state: State) {
        self.db = db
        self.lock = lock
        self.options = options
        self.state = state
        sync = switch durability {
        case .fsync: .fsync
        case .async: .write
        case .memory: .none
        }
        transactionBytesMax = durability == .memory ? max(1, options.logBufferBytes / 4) : Int.max
    }

    func start() {
        let t = Thread(named: "log-writer") { [self] in run() }
        t.start()
        if sync == .write && options.asyncFlushInterval > .zero {
            let f = Thread(named: "log-flusher") { [self] in flushPeriodically() }
            f.start()
        }
    }

    /// `.async` mode: commits reach the operating system only, so a power cut would lose every
    /// entry since the last checkpoint. This thread flushes the log every `asyncFlushInterval`,
    /// off the writer thread (a slow flush never holds a group commit), which bounds the loss to
    /// what was acknowledged in the last interval plus one flush (docs/design/stable-log.md).
    private func flushPeriodically() {
        let (s, a) = options.asyncFlushInterval.components
        let interval = Double(s) + Double(a) / 1e18
        while true {
            Thread.sleep(forTimeInterval: interval)
            flushLock.lock()
            defer { flushLock.unlock() }
            if flusherStopped { return }
            do throws(StableLogError) { try db.flushLog() } catch {
                locked { if $0.failure == nil { $0.failure = error } }
                return
            }
        }
    }

    func locked<T, E: Error>(_ body: (inout State) throws(E) -> T) throws(E) -> T {
        cond.lock()
        defer { cond.unlock() }
        return try body(&state)
    }

    // MARK: Caller side

    func append(_ entries: [LogEntry], _ done: @escaping @Sendable (Result<Void, StableLogError>) -> Void) {
        cond.lock()
        if state.closed {
            cond.unlock()
            done(.failure(.closed(path: db.path)))
            return
        }
        takeUp(entries)
        queue.append(.append(entries, done))
        cond.signal()
        cond.unlock()
    }

    /// `.memory` mode: appends on the caller's thread when the writer has nothing queued and
    /// nothing in hand, and returns the commit's result; nil when it cannot (another mode, a
    /// queue to keep order with, a failure or close on record, an injected stall), and the caller
    /// queues the append instead. With no sync to wait for, a commit is a few microseconds of
    /// work: handing it to the writer thread and its completion back cost two thread switches on
    /// every replica's path of a commit (docs/design/runtime.md, "Where a commit's time goes").
    func appendInline(_ entries: [LogEntry]) -> Result<Void, StableLogError>? {
        guard sync == .none, options.stallWhileFileExists == nil, !entries.isEmpty else { return nil }
        cond.lock()
        guard queue.isEmpty, !state.writing, !state.closed, state.failure == nil else {
            cond.unlock()
            return nil
        }
        state.writing = true
        takeUp(entries)
        cond.unlock()
        let committed = commit(entries)
        cond.lock()
        record(committed, of: entries)
        state.writing = false
        // The writer waits while a caller writes: wake it only when there is work for it.
        if !queue.isEmpty || state.deleteThrough > 0 { cond.signal() }
        cond.unlock()
        return committed.map { _ in () }
    }

    /// Entries an append hands over (with `cond` held): they must follow the log's last index
    /// without a gap; readers see them from now on, durable or not.
    private func takeUp(_ entries: [LogEntry]) {
        guard let first = entries.first else { return }
        precondition(first.index == state.lastIndex + 1,
                     "append of entry \(first.index) after \(state.lastIndex): the log must stay contiguous")
        for (a, b) in zip(entries, entries.dropFirst()) {
            precondition(b.index == a.index + 1, "appended entries \(a.index) and \(b.index) are not contiguous")
        }
        state.lastIndex = entries[entries.count - 1].index
        state.pending.append(contentsOf: entries)
    }

    /// Records a commit of `batch` (with `cond` held).
    private func record(_ committed: Result<Int, StableLogError>, of batch: [LogEntry]) {
        switch committed {
        case let .success(bytes):
            if let last = batch.last {
                state.commits += 1
                state.durableIndex = last.index
                state.heldBytes += bytes
                state.pending.removeFirst(min(batch.count, state.pending.count))
            }
        case let .failure(e):
            if state.failure == nil { state.failure = e }
        }
    }

    func control(_ c: Control) throws(StableLogError) {
        let w = Waiter()
        control(c) { w.finish($0) }
        try w.wait().get()
    }

    /// Queues `c` behind every earlier operation; `done` runs on the writer thread once it is
    /// carried out (at once, with `.closed`, on a closed store).
    func control(_ c: Control, _ done: @escaping @Sendable (Result<Void, StableLogError>) -> Void) {
        cond.lock()
        if state.closed {
            cond.unlock()
            done(.failure(.closed(path: db.path)))
            return
        }
        if case .close = c { state.closed = true }
        queue.append(.control(c, done))
        cond.signal()
        cond.unlock()
    }

    func close() throws(StableLogError) { try control(.close) }

    /// Closes without reporting errors (the log object went away without `close`).
    func shutdown() { try? control(.close) }

    func read(_ range: ClosedRange<LogIndex>) throws(StableLogError) -> [LogEntry] {
        cond.lock()
        if let f = state.failure { cond.unlock(); throw f }
        if state.closed { cond.unlock(); throw .closed(path: db.path) }
        let lo = max(range.lowerBound, state.snapshot.index + 1)
        let hi = min(range.upperBound, state.lastIndex)
        let durable = state.durableIndex
        let fromMemory = lo > hi ? [] : state.pending.filter { $0.index >= lo && $0.index <= hi && $0.index > durable }
        cond.unlock()
        guard lo <= hi else { return [] }
        var out: [LogEntry] = []
        let dbHi = min(hi, durable)
        if lo <= dbHi {
            out.reserveCapacity(Int(dbHi - lo + 1))
            var attempt = 0
            while true {
                do {
                    try readStored(from: lo + LogIndex(out.count), through: dbHi, into: &out)
                    break
                } catch where BerkeleyDB.isDeadlock(error) && attempt < 20 {
                    attempt += 1 // a deadlock victim; carry on from the last entry read
                }
            }
        }
        out.append(contentsOf: fromMemory)
        return out
    }

    private func readStored(from lo: LogIndex, through hi: LogIndex, into out: inout [LogEntry]) throws(StableLogError) {
        guard lo <= hi else { return }
        var expected = lo
        let path = db.path
        try db.scan(.entries, from: .atOrAfter(LogRecord.key(lo)), txn: nil) { k, v throws(StableLogError) in
            guard let i = LogRecord.index(ofKey: k) else {
                throw .corrupt(path: path, detail: "a key of \(k.count) bytes in \(BerkeleyDB.entriesFile)")
            }
            if i > hi { return .stop }
            guard i == expected else { throw .missing(path: path, index: expected) }
            switch LogRecord.decode(index: i, value: v) {
            case let .success(e): out.append(e)
            case let .failure(p): throw .corrupt(path: path, detail: p.description)
            }
            expected += 1
            return i == hi ? .stop : .next
        }
        guard expected > hi else { throw .missing(path: path, index: expected) }
    }

    // MARK: Writer thread

    private func run() {
        while true {
            cond.lock()
            while queue.isEmpty || state.writing {
                // Idle: delete dead entries a chunk at a time, then look at the queue again.
                if !state.writing && state.deleteThrough > 0 && state.failure == nil {
                    state.writing = true
                    cond.unlock()
                    deleteDeadChunk(bytesMax: Self.idleDeleteChunkBytes)
                    cond.lock()
                    state.writing = false
                    continue
                }
                cond.wait()
            }
            state.writing = true
            var batch: [LogEntry] = []
            // Payload and record-header bytes of `batch`.
            var batchBytes = 0
            var completions: [@Sendable (Result<Void, StableLogError>) -> Void] = []
            var control: (Control, @Sendable (Result<Void, StableLogError>) -> Void)?
            switch queue[0] {
            case let .control(c, done):
                control = (c, done)
                queue.removeFirst()
            case .append:
                var taken = 0
                for op in queue {
                    guard case let .append(entries, done) = op else { break }
                    if taken > 0 && batchBytes >= options.batchBytesMax { break }
                    batch.append(contentsOf: entries)
                    completions.append(done)
                    batchBytes += entries.reduce(0) { $0 + $1.payload.count + LogRecord.headerBytes }
                    taken += 1
                }
                queue.removeFirst(taken)
            }
            let failure = state.failure
            cond.unlock()
            waitWhileStalled()

            if let (c, finish) = control {
                if case .close = c {
                    finish(finishClose(failure))
                    return
                }
                let done = failure.map { .failure($0) } ?? perform(c)
                locked { $0.writing = false }
                finish(done)
                continue
            }
            let committed: Result<Int, StableLogError> = failure.map { .failure($0) } ?? commit(batch)
            let result = committed.map { _ in () }
            cond.lock()
            record(committed, of: batch)
            cond.unlock()
            for done in completions { done(result) }
            // Under steady load the queue is never empty: one chunk after each commit, at least
            // as large as the commit, still gets a compaction's deletion done without holding
            // appends behind all of it.
            if locked({ $0.deleteThrough > 0 && $0.failure == nil }) {
                deleteDeadChunk(bytesMax: max(Self.idleDeleteChunkBytes, batchBytes))
            }
            locked { $0.writing = false }
        }
    }

    /// Deletes one bounded transaction of dead entries (at or below `deleteThrough`).
    private func deleteDeadChunk(bytesMax: Int) {
        let through = locked { $0.deleteThrough }
        do throws(StableLogError) {
            // Without a sync of its own: the compaction point is durable already, and a deletion
            // cut short is finished at the next open. An fsync here would add one to every group
            // commit while a compaction is being deleted.
            let started = ContinuousClock.now
            let (freed, done) = try Self.deleteChunk(db, through: through, sync: .none, bytesMax: bytesMax)
            reportIfSlow(since: started, "deleting compacted entries", synced: false)
            locked {
                $0.heldBytes -= freed
                if done && $0.deleteThrough == through { $0.deleteThrough = 0 }
            }
        } catch {
            locked { if $0.failure == nil { $0.failure = error } }
        }
    }

    /// The injected stall (`Options.stallWhileFileExists`): no write goes through while the file exists.
    private func waitWhileStalled() {
        guard let path = options.stallWhileFileExists else { return }
        while FileManager.default.fileExists(atPath: path) { Thread.sleep(forTimeInterval: 0.01) }
    }

    /// Writes `batch`; returns the `LogRecord.storedBytes` it added.
    private func commit(_ batch: [LogEntry]) -> Result<Int, StableLogError> {
        guard !batch.isEmpty else { return .success(0) }
        do throws(StableLogError) {
            var stored = 0
            var rest = batch[...]
            while !rest.isEmpty {
                var count = 0, payload = 0
                for e in rest {
                    if count > 0 && payload >= transactionBytesMax { break }
                    payload += e.payload.count + LogRecord.headerBytes
                    count += 1
                }
                let chunk = rest.prefix(count)
                rest = rest.dropFirst(count)
                var bytes = 0, chunkStored = 0
                let started = ContinuousClock.now
                defer { reportIfSlow(since: started, "a group commit of \(chunk.count) entries", synced: sync == .fsync) }
                try StoreDirectory.inTransaction(db, sync: sync) { txn throws(StableLogError) in
                    bytes = 0
                    chunkStored = 0
                    for e in chunk {
                        let value = LogRecord.encode(e)
                        bytes += value.count
                        chunkStored += LogRecord.storedBytes(valueBytes: value.count, pageBytes: db.entriesPageBytes)
                        try db.put(.entries, key: LogRecord.key(e.index), value: value, txn: txn)
                    }
                }
                stored += chunkStored
                try maybeCheckpoint(after: bytes)
            }
            return .success(stored)
        } catch {
            return .failure(error)
        }
    }

    /// Tells `Options.onSlowWrite` (at most once a second; run by whichever thread writes, one at
    /// a time) that `what` took `slowWrite` or longer: when a leader steps down for a stalled
    /// disk, this names the write that was slow.
    private func reportIfSlow(since started: ContinuousClock.Instant, _ what: @autoclosure () -> String, synced: Bool) {
        let now = ContinuousClock.now
        let took = now - started
        guard took >= Self.slowWrite, let report = options.onSlowWrite else { return }
        if let last = lastSlowWarning, now - last < .seconds(1) { return }
        lastSlowWarning = now
        report("stable log: \(what()) took \(took.wholeMilliseconds) ms (\(synced ? "with fdatasync" : "without a sync")); a leader whose log write stays outstanding for disk_stall_ticks steps down once a follower's disk has been ahead of it for an election timeout")
    }

    private func maybeCheckpoint(after bytes: Int) throws(StableLogError) {
        bytesSinceCheckpoint += bytes
        guard bytesSinceCheckpoint >= options.checkpointEveryBytes else { return }
        guard sync != .none else {
            bytesSinceCheckpoint = 0
            try db.checkpoint()
            return
        }
        // On disk a checkpoint writes every dirty cache page and fsyncs the databases: seconds
        // when the disk is busy. On its own thread (the environment is free-threaded) it never
        // holds a group commit behind it, which the replica would take for a stalled disk.
        guard locked({ !$0.checkpointing }) else { return }
        bytesSinceCheckpoint = 0
        locked { $0.checkpointing = true }
        checkpoints.async { [self] in
            do throws(StableLogError) { try db.checkpoint() } catch { locked { if $0.failure == nil { $0.failure = error } } }
            locked { $0.checkpointing = false }
        }
    }

    private func perform(_ c: Control) -> Result<Void, StableLogError> {
        do throws(StableLogError) {
            switch c {
            case let .truncate(from):
                let freed = try Self.deleteEntries(db, from: from, sync: sync)
                cond.lock()
                state.heldBytes -= freed
                state.lastIndex = min(state.lastIndex, from - 1)
                state.durableIndex = min(state.durableIndex, from - 1)
                state.pending.removeAll { $0.index >= from }
                cond.unlock()
            case let .compact(through, ballot):
                let current = locked { $0.snapshot }
                guard through > current.index else { return .success(()) }
                let point = SnapshotPoint(index: through, ballot: ballot)
                // Record the point first: entries at or below it are dead from then on, and an
                // interrupted deletion is finished when the store is opened again.
                try StoreDirectory.inTransaction(db, sync: sync) { txn throws(StableLogError) in
                    try StoreDirectory.putMeta(db, .snapshot, LogRecord.encodeSnapshot(point), txn: txn)
                }
                cond.lock()
                state.snapshot = point
                if state.lastIndex < through { state.lastIndex = through }
                if state.durableIndex < through { state.durableIndex = through }
                state.pending.removeAll { $0.index <= through }
                if sync == .none {
                    // In memory the deletion is quick, and what it frees is what bounds the cache.
                    cond.unlock()
                    let freed = try Self.deleteEntries(db, through: through, sync: sync)
                    locked { $0.heldBytes -= freed }
                } else {
                    // On disk the records go later, a chunk at a time between group commits
                    // (`deleteDeadChunk`): deleting a big prefix at once would hold every append
                    // behind it, long enough for the replica to look like its disk stalled.
                    state.deleteThrough = max(state.deleteThrough, through)
                    cond.unlock()
                }
            case let .hardState(hs):
                try StoreDirectory.inTransaction(db, sync: sync) { txn throws(StableLogError) in
                    try StoreDirectory.putMeta(db, .hardstate, hs.encoded(), txn: txn)
                }
                locked { $0.hardState = hs }
            case .close:
                break
            }
            return .success(())
        } catch {
            locked { if $0.failure == nil { $0.failure = error } }
            return .failure(error)
        }
    }

    private func finishClose(_ failure: StableLogError?) -> Result<Void, StableLogError> {
        checkpoints.sync {} // a background checkpoint finishes before the store closes
        var result: Result<Void, StableLogError> = failure.map { .failure($0) } ?? .success(())
        // A closed store holds no dead records: inspectors (`paxos-log`) read what is there.
        let through = locked { $0.deleteThrough }
        if failure == nil && through > 0 {
            do throws(StableLogError) {
                let freed = try Self.deleteEntries(db, through: through, sync: sync)
                locked { $0.heldBytes -= freed; $0.deleteThrough = 0 }
            } catch { result = .failure(error) }
        }
        if failure == nil && sync != .none {
            do throws(StableLogError) { try db.checkpoint() } catch { result = .failure(error) }
        }
        // Fail whatever was queued behind the close (appends that raced with it).
        cond.lock()
        let rest = queue
        queue.removeAll()
        cond.unlock()
        for op in rest {
            switch op {
            case let .append(_, done): done(.failure(.closed(path: db.path)))
            case let .control(_, done): done(.failure(.closed(path: db.path)))
            }
        }
        flushLock.withLock { flusherStopped = true }
        db.close()
        lock?.unlock(.environment)
        lock?.unlock(.writer)
        return result
    }

    /// Deletes entries with index >= `from`, newest first, in transactions of bounded size: a
    /// crash part-way leaves a shorter but still contiguous log. Returns the `storedBytes` freed.
    @discardableResult
    static func deleteEntries(_ db: BerkeleyDB, from: LogIndex, sync: BerkeleyDB.Sync) throws(StableLogError) -> Int {
        var done = false, freed = 0
        while !done {
            let chunkFreed: Int = try StoreDirectory.inTransaction(db, sync: sync) { txn throws(StableLogError) in
                var bytes = 0, stored = 0
                done = true
                try db.scan(.entries, from: .last, backwards: true, txn: txn) { k, v throws(StableLogError) in
                    guard let i = LogRecord.index(ofKey: k), i >= from else { return .stop }
                    if bytes >= deleteChunkBytes { done = false; return .stop }
                    bytes += v.count
                    stored += LogRecord.storedBytes(valueBytes: v.count, pageBytes: db.entriesPageBytes)
                    return .nextAndDeleteCurrent
                }
                return stored
            }
            freed += chunkFreed
        }
        return freed
    }

    /// Deletes entries with index <= `through`, newest first, in transactions of bounded size
    /// (`deleteChunk`; a crash part-way leaves the oldest, below a hole, for the next open).
    /// Returns the `storedBytes` freed.
    @discardableResult
    static func deleteEntries(_ db: BerkeleyDB, through: LogIndex, sync: BerkeleyDB.Sync) throws(StableLogError) -> Int {
        var done = false, freed = 0
        while !done {
            let (chunkFreed, last) = try deleteChunk(db, through: through, sync: sync)
            freed += chunkFreed
            done = last
        }
        return freed
    }

    /// Deletes entries with index <= `through` in one transaction of about `bytesMax`
    /// (`deleteChunkBytes` unless told), newest first. Returns the `storedBytes` freed and whether
    /// none is left.
    ///
    /// Newest first because a Berkeley DB leaf page keeps its items' bytes packed towards its end
    /// in the order they came: deleting a page's first entry moves every later entry's bytes
    /// (`memmove` in `__db_ditem`), deleting its last moves none. Oldest first, a compaction's
    /// deletion moved half a 64 KiB page per small entry, on the writer thread that group
    /// commits wait for (benchmarks/consensus/README.md, "What compaction costs").
    static func deleteChunk(_ db: BerkeleyDB, through: LogIndex, sync: BerkeleyDB.Sync, bytesMax: Int = deleteChunkBytes) throws(StableLogError) -> (Int, Bool) {
        var done = true
        let freed: Int = try StoreDirectory.inTransaction(db, sync: sync) { txn throws(StableLogError) in
            var bytes = 0, stored = 0
            // From the first entry after `through` (stepped over) or, with none, the last.
            var positioned = false
            let body = { (k: [UInt8], v: [UInt8]) throws(StableLogError) -> BerkeleyDB.Step in
                positioned = true
                guard let i = LogRecord.index(ofKey: k) else { return .stop }
                if i > through { return .next }
                if bytes >= bytesMax { done = false; return .stop }
                bytes += v.count
                stored += LogRecord.storedBytes(valueBytes: v.count, pageBytes: db.entriesPageBytes)
                return .nextAndDeleteCurrent
            }
            if through < LogIndex.max {
                try db.scan(.entries, from: .atOrAfter(LogRecord.key(through + 1)), backwards: true, txn: txn, body)
            }
            if !positioned { try db.scan(.entries, from: .last, backwards: true, txn: txn, body) }
            return stored
        }
        return (freed, done)
    }
}
