import CBerkeleyDB
import Foundation

/// The entries of a store live in segments, one Berkeley DB database each: `entries.db` holds
/// the entries from index 0, and each later segment (`entries-<first index>.db`) the entries from
/// its first index up to the next segment's. Appends go to the newest segment; the writer starts
/// a new one once the newest holds `BerkeleyDBLog.Options.segmentBytes`; a compaction removes
/// the segments that hold only entries at or below its point, whole. Removing a file is a few log
/// records, where deleting the entries one by one made Berkeley DB log every deleted record's
/// bytes (docs/design/stable-log.md, "Segments").
///
/// Every use of a segment's handle holds `segmentsLock` for reading; the writer thread changes
/// the list with it held for writing, and never with a transaction of its own open (a reader
/// holding the lock may be waiting for that transaction's page locks).
extension BerkeleyDB {
    /// The position in `segments` of the segment that holds `index` (the first one for an
    /// index below every start); nil when none is open. Call with `segmentsLock` held.
    func segment(holding index: LogIndex) -> Int? {
        guard !segments.isEmpty else { return nil }
        var s = segments.count - 1
        while s > 0 && segments[s].start > index { s -= 1 }
        return s
    }

    /// Whether a segment holds only compacted entries: the next one starts at or below the
    /// first live index (compaction point `through` + 1). Such a segment is removed whole.
    static func holdsOnlyCompacted(nextStart: LogIndex, through: LogIndex) -> Bool {
        nextStart <= through + 1
    }

    /// The open segments' first indexes, oldest first.
    var segmentStarts: [LogIndex] { segmentsLock.read { segments.map(\.start) } }

    /// Opens the segments that start at `starts` (as `meta.db` lists them) and closes any other
    /// open one.
    func useSegments(_ starts: [LogIndex]) throws(StableLogError) {
        let current = segmentStarts
        guard starts != current else { return }
        var opened: [Segment] = []
        var failure: StableLogError?
        segmentsLock.write {
            let kept = segments.filter { starts.contains($0.start) }
            for s in segments where !starts.contains(s.start) { _ = s.handle.pointee.close!(s.handle, UInt32(DB_NOSYNC)) }
            do throws(StableLogError) {
                for start in starts {
                    if let k = kept.first(where: { $0.start == start }) {
                        opened.append(k)
                        continue
                    }
                    let file = LogRecord.segmentFile(start: start)
                    let h = try openTable(file, name: file, create: config.createDatabases && start == 0, txn: nil)
                    opened.append(Segment(start: start, handle: h))
                }
            } catch {
                failure = error
            }
            segments = opened
        }
        if let failure { throw failure }
        readPageBytes()
    }

    private func readPageBytes() {
        segmentsLock.read {
            guard let h = segments.first?.handle else { return }
            var pageBytes: UInt32 = 0
            if h.pointee.get_pagesize!(h, &pageBytes) == 0, pageBytes > 0 { entriesPageBytes = Int(pageBytes) }
        }
    }

    /// The segments `meta` lists, less those that hold only compacted entries and whose file is
    /// gone or is not a whole database. A crash in the middle of such a segment's removal can
    /// leave a stub of its file (512 bytes without a database's magic number, seen after SIGKILL
    /// in `StableLogCrashTests`) under a list that still names it, and a power cut can keep the
    /// removal's file deletion and lose its commit. Such a file is never handed to Berkeley DB
    /// to open (a zero-filled file in a segment's place made its recovery fail with
    /// `DB_RUNRECOVERY`); with `deleteBroken` (the node, after recovery, holding the store) it
    /// is deleted. A listed segment that holds live entries is never left out: if it cannot be
    /// opened, opening the store fails and names it.
    func openableSegments(_ meta: StoreMetadata, deleteBroken: Bool) -> [LogIndex] {
        guard !config.inMemory else { return meta.segments }
        let starts = meta.segments
        var openable: [LogIndex] = []
        for (n, start) in starts.enumerated() {
            let dead = n + 1 < starts.count && Self.holdsOnlyCompacted(nextStart: starts[n + 1], through: meta.snapshot.index)
            let file = path + "/" + LogRecord.segmentFile(start: start)
            if dead && !Self.isBtreeFile(file) {
                if deleteBroken { unlink(file) }
                continue
            }
            openable.append(start)
        }
        return openable
    }

    /// Whether `file` begins with a Berkeley DB btree's metadata page: its magic number
    /// (0x053162, in the creating host's byte order) at byte 12 of a page of at least 512 bytes.
    static func isBtreeFile(_ file: String) -> Bool {
        guard let h = FileHandle(forReadingAtPath: file) else { return false }
        defer { try? h.close() }
        guard let head = try? h.read(upToCount: 512), head.count == 512 else { return false }
        let magic = head.withUnsafeBytes { $0.loadUnaligned(fromByteOffset: 12, as: UInt32.self) }
        return magic == 0x053162 || magic.byteSwapped == 0x053162
    }

    /// Creates the segment that starts at `start` in `txn`, with the page size of the store's
    /// other segments. The caller records the new list in `meta.db` in the same transaction, and
    /// installs the handle (`install`) once it commits, or closes it (`discard`) when it does not.
    func createSegment(start: LogIndex, txn: Txn) throws(StableLogError) -> Segment {
        let file = LogRecord.segmentFile(start: start)
        return Segment(start: start, handle: try openTable(file, name: file, create: true, txn: txn, pageBytes: entriesPageBytes))
    }

    /// Makes a segment created by a committed transaction the newest.
    func install(_ s: Segment) {
        segmentsLock.write { segments.append(s) }
    }

    /// Closes the handle of a segment whose creating transaction did not commit.
    func discard(_ s: Segment) {
        _ = s.handle.pointee.close!(s.handle, UInt32(DB_NOSYNC))
    }

    /// Closes the handle of the segment that starts at `start` and forgets it: readers no longer
    /// reach it. Its pages need not be written (`DB_NOSYNC`): the log holds every change, and
    /// the file is about to be removed.
    func closeSegment(start: LogIndex) {
        segmentsLock.write {
            guard let i = segments.firstIndex(where: { $0.start == start }) else { return }
            let h = segments[i].handle
            segments.remove(at: i)
            _ = h.pointee.close!(h, UInt32(DB_NOSYNC))
        }
    }

    /// Removes the (closed) segment that starts at `start` in `txn`: the file goes when `txn`
    /// commits. Fails with a lock error (`isDeadlock`) in a `noWait` transaction while another
    /// process (an inspector) has it open.
    func removeSegment(start: LogIndex, txn: Txn) throws(StableLogError) {
        guard let env else { throw .closed(path: path) }
        let file = LogRecord.segmentFile(start: start)
        txn.wrote = true
        let rc = config.inMemory
            ? env.pointee.dbremove!(env, txn.raw, nil, file, 0)
            : env.pointee.dbremove!(env, txn.raw, file, nil, 0)
        try check(rc, "removing segment \(file)")
    }

    /// `scan` of the entries, with `segmentsLock` held: the segments walked as one table.
    func scanSegments(from start: Position, backwards: Bool, txn: Txn?,
                      _ body: (_ key: [UInt8], _ value: [UInt8]) throws(StableLogError) -> Step) throws(StableLogError) {
        guard !segments.isEmpty else { throw .closed(path: path) }
        let first: Int
        switch start {
        case .first: first = 0
        case .last: first = segments.count - 1
        case let .atOrAfter(k): first = segment(holding: LogRecord.index(ofKey: k) ?? 0) ?? 0
        }
        if !backwards {
            for s in first..<segments.count {
                let from: Position = s == first ? start : .first
                if try scanOne(segments[s].handle, from: from, backwards: false, txn: txn, body) == .stopped { return }
            }
            return
        }
        if case .last = start {
            for s in (0...first).reversed() {
                if try scanOne(segments[s].handle, from: .last, backwards: true, txn: txn, body) == .stopped { return }
            }
            return
        }
        // Backwards from the first entry at or after the position: it may be in a later segment
        // when this one holds nothing at or after it.
        var s = first
        var end = try scanOne(segments[s].handle, from: start, backwards: true, txn: txn, body)
        while end == .notFound && s + 1 < segments.count {
            s += 1
            end = try scanOne(segments[s].handle, from: .first, backwards: true, txn: txn, body)
        }
        guard end == .exhausted else { return }
        for earlier in (0..<s).reversed() {
            if try scanOne(segments[earlier].handle, from: .last, backwards: true, txn: txn, body) == .stopped { return }
        }
    }
}

/// A POSIX read-write lock (readers first: a thread may take it for reading again while it holds it).
final class ReadWriteLock: @unchecked Sendable {
    // @unchecked Sendable: the pthread lock does the synchronization.
    private let lock = UnsafeMutablePointer<pthread_rwlock_t>.allocate(capacity: 1)

    init() { pthread_rwlock_init(lock, nil) }

    deinit {
        pthread_rwlock_destroy(lock)
        lock.deallocate()
    }

    func read<T, E: Error>(_ body: () throws(E) -> T) throws(E) -> T {
        pthread_rwlock_rdlock(lock)
        defer { pthread_rwlock_unlock(lock) }
        return try body()
    }

    func write<T, E: Error>(_ body: () throws(E) -> T) throws(E) -> T {
        pthread_rwlock_wrlock(lock)
        defer { pthread_rwlock_unlock(lock) }
        return try body()
    }
}
