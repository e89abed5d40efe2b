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
        /// `LogRecord.storedBytes` of the durable entries stored, compacted ones still in a
        /// segment included.
        var heldBytes: Int
        /// Of `heldBytes`, the compacted entries' (an estimate: see `updateCompactedBytes`).
        /// `StableLog.heldBytes` is the rest.
        var compactedBytes = 0
        /// Appended, not yet durable: contiguous, ending at `lastIndex`. Served to readers.
        var pending: [LogEntry] = []
        /// The first failure: from then on every operation fails with it.
        var failure: StableLogError?
        var closed = false
        /// Group commits done (appends only): lets tests see that appends share commits.
        var commits = 0
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

    let db: BerkeleyDB
    /// The segments' first indexes as `meta.db` lists them (the writer's own: only whoever
    /// writes, one at a time, touches it), with the `storedBytes` each holds. A segment whose
    /// removal failed (an inspector had it open) stays listed, closed, until a retry removes it.
    private var segments: [(start: LogIndex, heldBytes: Int)]
    /// The first index stored in the oldest segment (nil when nothing is stored).
    private var oldestStored: LogIndex?
    /// A compaction left dead segments that could not be removed yet: retried after group
    /// commits, at most once a second.
    private var removalRetryAfter: ContinuousClock.Instant?
    private let segmentBytes: Int
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
    /// Deleting records logs their old values, so a truncation is split into transactions of
    /// about this many bytes (the in-memory log of `.memory` mode must hold a whole transaction).
    private static let deleteChunkBytes = 1 << 20
    /// A group commit or idle deletion that takes this long is reported (`Options.onSlowWrite`).
    static let slowWrite: Duration = .milliseconds(500)
    private var lastSlowWarning: ContinuousClock.Instant?
    /// Payload bytes in one transaction: unbounded on disk; in `.memory` mode the in-memory log
    /// buffer must hold a whole transaction, so a bigger group commit takes several (nothing in
    /// that mode survives a crash, so nothing depends on one batch being atomic).
    private let transactionBytesMax: Int

    init(db: BerkeleyDB, lock: StoreLock?, durability: Durability, options: BerkeleyDBLog.Options, state: State,
         segments: [(start: LogIndex, heldBytes: Int)], firstStored: LogIndex?) {
        self.db = db
        oldestStored = firstStored
        self.lock = lock
        self.options = options
        self.state = state
        self.segments = segments
        segmentBytes = durability == .memory ? max(1, min(options.segmentBytes, options.memoryBytesMax / 16)) : max(1, options.segmentBytes)
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
        if !queue.isEmpty { cond.signal() }
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
                throw .corrupt(path: path, detail: "a key of \(k.count) bytes in the entries")
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
            while queue.isEmpty || state.writing { cond.wait() }
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
            if let after = removalRetryAfter, ContinuousClock.now >= after, case .success = result {
                removeDeadSegments()
            }
            locked { $0.writing = false }
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
                try startSegmentIfFull(at: chunk[chunk.startIndex].index)
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
                // Appends follow the log's last entry: into the newest segment, or older ones
                // when a truncation emptied newer ones below their start.
                let first = chunk[chunk.startIndex].index, s = segmentPosition(of: first)
                if s == segments.count - 1 || segmentPosition(of: chunk[chunk.endIndex - 1].index) == s {
                    segments[s].heldBytes += chunkStored
                } else {
                    for e in chunk {
                        let bytes = LogRecord.storedBytes(valueBytes: LogRecord.headerBytes + e.payload.count, pageBytes: db.entriesPageBytes)
                        segments[segmentPosition(of: e.index)].heldBytes += bytes
                    }
                }
                if oldestStored == nil { oldestStored = first }
                try maybeCheckpoint(after: bytes)
            }
            return .success(stored)
        } catch {
            return .failure(error)
        }
    }

    /// The position in `segments` of the segment that holds `index`: the reads' and writes'
    /// routing (`BerkeleyDB.segment(holding:)`) for every index above the compaction point.
    private func segmentPosition(of index: LogIndex) -> Int {
        segments.lastIndex { $0.start <= index } ?? 0
    }

    /// Estimates the bytes of the compacted entries still stored: those of the segments that
    /// hold only compacted entries and are still there (an inspector had them open), and a share
    /// of the oldest one that holds live entries too, in proportion to the entries it holds (its
    /// entries' sizes are not kept one by one). Fixed at each compaction: compacted entries do
    /// not change until their segment goes. After a snapshot install or a truncation a segment's
    /// entries need not be spread over its indexes evenly: the estimate may then be off by up to
    /// a segment's bytes.
    private func updateCompactedBytes() {
        let (through, last) = locked { ($0.snapshot.index, $0.lastIndex) }
        var bytes = 0
        for (n, seg) in segments.enumerated() {
            let first = n == 0 ? (oldestStored ?? seg.start) : seg.start
            guard through >= first else { break }
            let end = n + 1 < segments.count ? segments[n + 1].start - 1 : last
            if end <= through {
                bytes += seg.heldBytes
                continue
            }
            bytes += Int(Double(seg.heldBytes) * Double(through - first + 1) / Double(end - first + 1))
            break
        }
        locked { $0.compactedBytes = bytes }
    }

    /// Starts a new segment at `next` (the index of the next entry to write) once the newest
    /// holds `segmentBytes`. In a transaction of its own, without a sync: the group commit that
    /// follows syncs the log, which covers it, and a crash before that undoes it whole.
    private func startSegmentIfFull(at next: LogIndex) throws(StableLogError) {
        guard let newest = segments.last, newest.heldBytes >= segmentBytes, newest.start < next else { return }
        var made: BerkeleyDB.Segment?
        do throws(StableLogError) {
            try StoreDirectory.inTransaction(db, sync: .none) { txn throws(StableLogError) in
                if let m = made { db.discard(m); made = nil } // retried after a deadlock
                made = try db.createSegment(start: next, txn: txn)
                try StoreDirectory.putMeta(db, .segments, LogRecord.encodeSegments(segments.map(\.start) + [next]), txn: txn)
            }
        } catch {
            if let m = made { db.discard(m) }
            throw error
        }
        if let m = made { db.install(m) }
        segments.append((next, 0))
    }

    /// Removes the segments that hold only entries at or below the snapshot point, oldest
    /// first, each in a transaction of its own, then re-estimates the compacted bytes still
    /// stored. One that an inspector has open cannot be removed now (its transaction does not
    /// wait for the lock): it stays listed, closed, and is tried again a second later.
    ///
    /// On disk the removal's commit is synced: Berkeley DB deletes the file as the transaction
    /// commits, whether or not its commit record has reached the disk, so a crash after an
    /// unsynced one would bring back a `segments` record that lists a file no longer there. A
    /// crash in the middle of a removal, or a power cut that reorders the two, is handled at the
    /// next open: a listed segment that holds only compacted entries and cannot be opened is
    /// dropped (`BerkeleyDB.openableSegments`).
    func removeDeadSegments() {
        defer { updateCompactedBytes() }
        removalRetryAfter = nil
        let through = locked { $0.snapshot.index }
        while segments.count > 1, BerkeleyDB.holdsOnlyCompacted(nextStart: segments[1].start, through: through) {
            let dead = segments[0]
            db.closeSegment(start: dead.start)
            let rest = segments.dropFirst().map(\.start)
            do throws(StableLogError) {
                let txn = try db.begin(noWait: true)
                do {
                    try db.removeSegment(start: dead.start, txn: txn)
                    try StoreDirectory.putMeta(db, .segments, LogRecord.encodeSegments(rest), txn: txn)
                } catch {
                    db.abort(txn)
                    throw error
                }
                try db.commit(txn, sync == .none ? .none : .fsync)
            } catch where BerkeleyDB.isDeadlock(error) {
                removalRetryAfter = ContinuousClock.now + .seconds(1)
                return
            } catch {
                locked { if $0.failure == nil { $0.failure = error } }
                return
            }
            segments.removeFirst()
            oldestStored = segments.first?.start
            locked { $0.heldBytes -= dead.heldBytes }
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
                let freed = try deleteEntries(from: from)
                if let first = oldestStored, from <= first { oldestStored = nil }
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
                cond.unlock()
                // Dead entries go with their segment, whole; those in a segment that still holds
                // live ones stay (never read) until it goes too.
                removeDeadSegments()
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
    /// Segments emptied by it stay: the indexes they start at are routed to them again when the
    /// log grows back, as every read and write routes an index to its segment the same way.
    private func deleteEntries(from: LogIndex) throws(StableLogError) -> Int {
        var done = false, freed = 0
        let db = db, pageBytes = db.entriesPageBytes
        var freedBySegment = [Int](repeating: 0, count: segments.count)
        while !done {
            var chunkBySegment = [Int](repeating: 0, count: segments.count)
            let chunkFreed: Int = try StoreDirectory.inTransaction(db, sync: sync) { txn throws(StableLogError) in
                var bytes = 0, stored = 0
                chunkBySegment = [Int](repeating: 0, count: segments.count)
                done = true
                try db.scan(.entries, from: .last, backwards: true, txn: txn) { k, v throws(StableLogError) in
                    guard let i = LogRecord.index(ofKey: k), i >= from else { return .stop }
                    if bytes >= Self.deleteChunkBytes { done = false; return .stop }
                    bytes += v.count
                    let recordBytes = LogRecord.storedBytes(valueBytes: v.count, pageBytes: pageBytes)
                    stored += recordBytes
                    chunkBySegment[segmentPosition(of: i)] += recordBytes
                    return .nextAndDeleteCurrent
                }
                return stored
            }
            freed += chunkFreed
            for (n, b) in chunkBySegment.enumerated() { freedBySegment[n] += b }
        }
        for (n, b) in freedBySegment.enumerated() { segments[n].heldBytes -= b }
        return freed
    }
}
