import Foundation
import Testing
@testable import RDMAPaxos

/// Raw access to a closed store's databases, to damage it the way a bad disk would.
func withRawStore(_ path: String, _ body: (BerkeleyDB) throws -> Void) throws {
    var config = BerkeleyDB.Config()
    config.recover = true
    let db = try BerkeleyDB(path: path, config: config)
    defer { db.close() }
    // The entries' segments as the store lists them (`entries.db` alone when it lists none).
    try db.useSegments((try? StoreDirectory.readMetadata(db).segments) ?? [0])
    try body(db)
}

func rawPut(_ db: BerkeleyDB, _ table: BerkeleyDB.Table, key: [UInt8], value: [UInt8]) throws {
    try StoreDirectory.inTransaction(db, sync: .fsync) { txn throws(StableLogError) in
        try db.put(table, key: key, value: value, txn: txn)
    }
}

/// Writes `version` into the store's format record, as a store of that version has it.
func markFormat(_ path: String, _ version: UInt32) throws {
    try withRawStore(path) { db in
        try rawPut(db, .meta, key: Array("format".utf8), value: LogRecord.encodeMeta(.format, LogRecord.encodeFormat(version)))
    }
}

/// Flips one payload byte of entry `index` in place, leaving its stored checksum as it was.
func corruptEntry(_ path: String, index: LogIndex) throws {
    try withRawStore(path) { db in
        var value = try #require(try db.get(.entries, key: LogRecord.key(index)))
        value[value.count - 1] ^= 0x40
        try rawPut(db, .entries, key: LogRecord.key(index), value: value)
    }
}

func makeStore(_ path: String, _ range: ClosedRange<LogIndex>, term: UInt64 = 1) throws {
    let log = try BerkeleyDBLog.open(path: path)
    try log.append(entries(range, term: term))
    try log.close()
}

@Suite struct BerkeleyDBLogTests {
    @Test func concurrentAppendsShareGroupCommits() throws {
        let dir = TempDir("group")
        defer { dir.remove() }
        let log = try BerkeleyDBLog.open(path: dir.path, durability: .fsync)
        let done = CompletionRecord()
        for i in 1...2000 as ClosedRange<LogIndex> { log.append([entry(i)]) { done.add(i, $0) } }
        #expect(done.wait(count: 2000))
        let commits = log.engine.locked { $0.commits }
        #expect(commits < 2000, "2000 queued appends took \(commits) commits")
        try log.close()
    }

    @Test func aCorruptRecordIsReportedWithItsIndex() throws {
        let dir = TempDir("corrupt")
        defer { dir.remove() }
        try makeStore(dir.path, 1...5)
        try corruptEntry(dir.path, index: 3)
        let log = try BerkeleyDBLog.open(path: dir.path)
        defer { try? log.close() }
        #expect(try log.entries(1...2) == entries(1...2))
        #expect {
            try log.entries(1...5)
        } throws: { e in
            guard case let .corrupt(p, detail) = e as? StableLogError else { return false }
            return p == dir.path && detail.contains("entry 3: checksum mismatch")
        }
    }

    @Test func aMissingRecordIsReportedByIndex() throws {
        let dir = TempDir("missing")
        defer { dir.remove() }
        try makeStore(dir.path, 1...5)
        try withRawStore(dir.path) { db in
            try StoreDirectory.inTransaction(db, sync: .fsync) { txn throws(StableLogError) in
                try db.delete(.entries, key: LogRecord.key(3), txn: txn)
            }
        }
        let log = try BerkeleyDBLog.open(path: dir.path)
        defer { try? log.close() }
        #expect(throws: StableLogError.missing(path: dir.path, index: 3)) { try log.entries(1...5) }
    }

    @Test func aStoreOfAnotherFormatVersionIsRefused() throws {
        let dir = TempDir("version")
        defer { dir.remove() }
        try makeStore(dir.path, 1...1)
        try markFormat(dir.path, 4)
        #expect(throws: StableLogError.versionMismatch(path: dir.path, found: 4, expected: 3)) {
            try BerkeleyDBLog.open(path: dir.path)
        }
        #expect(StableLogError.versionMismatch(path: "D", found: 4, expected: 3).description == "D: log format version 4, this build reads version 3 (and upgrades 1 and 2 to 3)")
    }

    /// A store written before configurations carried addresses (format 1, its hard state holding a
    /// format-1 configuration) opens, keeps its entries, and is marked format 3.
    @Test func aFormatOneStoreOpensAndIsMarkedFormatThree() throws {
        let dir = TempDir("version-one")
        defer { dir.remove() }
        try makeStore(dir.path, 1...3)
        let oldHardState: [UInt8] = HardState(promised: Ballot(term: 2, node: 1), commitIndex: 3).encoded().prefix(20) + [0, 0, 0, 8, 0, 1, 0, 0, 0, 1, 0, 1]
        try markFormat(dir.path, 1)
        try withRawStore(dir.path) { db in
            try rawPut(db, .meta, key: Array("hardstate".utf8), value: LogRecord.encodeMeta(.hardstate, oldHardState))
        }
        let log = try BerkeleyDBLog.open(path: dir.path)
        #expect(try log.entries(1...3).count == 3)
        #expect(try log.loadHardState().membership == Membership([Member(id: 1, role: .voter)]))
        try log.close()
        try withRawStore(dir.path) { db in
            let format = try StoreDirectory.readMetadata(db).formatVersion
            #expect(format == 3)
        }
    }

    /// A store of format 2 keeps all its entries in `entries.db` and lists no segments: it opens
    /// with `entries.db` as its first segment, and is marked format 3 with that segment listed.
    @Test func aFormatTwoStoreOpensWithEntriesDBAsItsFirstSegment() throws {
        let dir = TempDir("version-two")
        defer { dir.remove() }
        try makeStore(dir.path, 1...40)
        try markFormat(dir.path, 2)
        try withRawStore(dir.path) { db in
            try StoreDirectory.inTransaction(db, sync: .fsync) { txn throws(StableLogError) in
                try db.delete(.meta, key: Array("segments".utf8), txn: txn)
            }
            #expect(try db.get(.meta, key: Array("segments".utf8)) == nil)
        }
        let log = try BerkeleyDBLog.open(path: dir.path, options: Self.segmentPerCommit)
        #expect(try log.entries(1...40) == entries(1...40))
        try log.append(entries(41...42))
        #expect(try log.entries(39...42) == entries(39...42))
        try log.close()
        try withRawStore(dir.path) { db in
            let meta = try StoreDirectory.readMetadata(db)
            #expect(meta.formatVersion == 3)
            #expect(meta.segments == [0, 41])
        }
        #expect(FileManager.default.fileExists(atPath: dir.path + "/entries-00000000000000000041.db"))
    }

    @Test func aFileIsABadPath() throws {
        let dir = TempDir("file")
        defer { dir.remove() }
        _ = FileManager.default.createFile(atPath: dir.path, contents: Data("x".utf8))
        #expect(throws: StableLogError.badPath(path: dir.path, reason: "it is not a directory")) {
            try BerkeleyDBLog.open(path: dir.path)
        }
    }

    @Test func aMissingDirectoryWithoutCreateIsABadPath() {
        let dir = TempDir("absent")
        #expect(throws: StableLogError.badPath(path: dir.path, reason: "no such directory")) {
            try BerkeleyDBLog.open(path: dir.path, create: false)
        }
    }

    @Test func anEmptyDirectoryWithoutCreateIsNotAStore() throws {
        let dir = TempDir("empty")
        defer { dir.remove() }
        try FileManager.default.createDirectory(atPath: dir.path, withIntermediateDirectories: true)
        #expect {
            try BerkeleyDBLog.open(path: dir.path, create: false)
        } throws: { e in
            if case .notAStore(dir.path, _) = e as? StableLogError { return true }
            return false
        }
    }

    @Test func aMetaFileThatIsNotBerkeleyDBIsNotAStore() throws {
        let dir = TempDir("garbage")
        defer { dir.remove() }
        try FileManager.default.createDirectory(atPath: dir.path, withIntermediateDirectories: true)
        _ = FileManager.default.createFile(atPath: dir.path + "/meta.db", contents: Data(repeating: 7, count: 8192))
        _ = FileManager.default.createFile(atPath: dir.path + "/entries.db", contents: Data(repeating: 7, count: 8192))
        #expect {
            try BerkeleyDBLog.open(path: dir.path)
        } throws: { e in
            if case .notAStore(dir.path, _) = e as? StableLogError { return true }
            return false
        }
    }

    @Test func aSecondOpenInTheSameProcessIsLocked() throws {
        let dir = TempDir("twice")
        defer { dir.remove() }
        let log = try BerkeleyDBLog.open(path: dir.path)
        defer { try? log.close() }
        #expect(throws: StableLogError.locked(path: dir.path)) { try BerkeleyDBLog.open(path: dir.path) }
    }

    @Test func noSpaceFromTheEngineBecomesDiskFull() {
        #expect(BerkeleyDB.error(ENOSPC, "committing", path: "/d") == .diskFull(path: "/d"))
        #expect(StableLogError.diskFull(path: "/d").description.contains("no space left"))
    }

    @Test func memoryModeCountsPagesAndCompactionGivesThemBack() throws {
        // A 4 KiB command is past the overflow threshold of a 16 KiB page: it takes a page whole.
        #expect(LogRecord.storedBytes(valueBytes: 4096 + LogRecord.headerBytes, pageBytes: 16 << 10) > 16 << 10)
        #expect(LogRecord.storedBytes(valueBytes: 64 + LogRecord.headerBytes, pageBytes: 16 << 10) < 256)
        var options = BerkeleyDBLog.Options()
        options.memoryBytesMax = 16 << 20
        let log = try BerkeleyDBLog.open(path: "in-memory", durability: .memory, options: options)
        defer { try? log.close() }
        let cap = try #require(log.capacityBytes)
        #expect(cap == 16 << 20)
        // 16 MiB holds about a thousand such pages; compacting at half lets ten times that through.
        // A compaction removes every segment but the newest (a sixteenth of the capacity here,
        // plus the entry that filled it).
        var compactions = 0
        for i in LogIndex(1)...10_000 {
            try log.append([entry(i, bytes: 4096)])
            if log.heldBytes >= cap / 2 {
                try log.compactPrefix(through: i, ballot: Ballot(term: 1, node: 1))
                let stored = log.engine.locked { $0.heldBytes }
                #expect(stored <= cap / 16 + (32 << 10), "\(stored) bytes stored after compacting through the last entry")
                #expect(log.heldBytes == 0, "\(log.heldBytes) live bytes after compacting through the last entry")
                compactions += 1
            }
        }
        #expect(compactions >= 10)
    }

    /// Options under which every group commit after the first starts a segment.
    static var segmentPerCommit: BerkeleyDBLog.Options {
        var options = BerkeleyDBLog.Options()
        options.segmentBytes = 1
        return options
    }

    /// Opens a store at `path` with a segment per group commit and appends entries 1...`through`
    /// in group commits of 50.
    func openWithSegmentsOfFifty(_ path: String, through: LogIndex) throws -> BerkeleyDBLog {
        let log = try BerkeleyDBLog.open(path: path, options: Self.segmentPerCommit)
        for i in stride(from: LogIndex(1), through: through, by: 50) { try log.append(entries(i...i + 49)) }
        return log
    }

    /// Records compaction point `index` in a stopped store, as `compactPrefix` does first.
    func recordSnapshotPoint(_ path: String, _ index: LogIndex) throws {
        try withRawStore(path) { db in
            try StoreDirectory.inTransaction(db, sync: .fsync) { txn throws(StableLogError) in
                try StoreDirectory.putMeta(db, .snapshot, LogRecord.encodeSnapshot(SnapshotPoint(index: index, ballot: Ballot(term: 1, node: 1))), txn: txn)
            }
        }
    }

    /// Files of the entries' segments in `dir`, `entries.db` included.
    func segmentFiles(_ dir: String) -> [String] {
        ((try? FileManager.default.contentsOfDirectory(atPath: dir)) ?? []).filter { $0.hasPrefix("entries") }.sorted()
    }

    /// A compaction removes the segments that hold only compacted entries, whole: it writes a
    /// few log records, not the deleted entries' bytes, and the live entries stay.
    @Test func aCompactionRemovesWholeSegmentsWithoutLoggingTheirEntries() throws {
        let dir = TempDir("segments")
        defer { dir.remove() }
        var options = BerkeleyDBLog.Options()
        options.segmentBytes = 256 << 10
        let log = try BerkeleyDBLog.open(path: dir.path, durability: .async, options: options)
        defer { try? log.close() }
        for i in stride(from: LogIndex(1), through: 20_000, by: 500) {
            try log.append((i..<i + 500).map { entry($0, bytes: 1024) })
        }
        // A segment starts at a group commit: 40 of them, each of 500 entries and over 256 KiB.
        let files = segmentFiles(dir.path)
        #expect(files.count == 40, "40 group commits of 500 KiB in segments of 256 KiB: \(files.count) files")
        let before = log.heldBytes
        let logEndBefore = try log.engine.db.logPositions().end
        try log.compactPrefix(through: 19_999, ballot: Ballot(term: 1, node: 1))
        let logEndAfter = try log.engine.db.logPositions().end
        // Deleting the records one by one logged about 20 MB; removing files logs kilobytes.
        #expect(logEndAfter.file == logEndBefore.file && logEndAfter.offset - logEndBefore.offset < 256 << 10,
                "the compaction wrote the log from \(logEndBefore) to \(logEndAfter)")
        #expect(segmentFiles(dir.path) == ["entries-00000000000000019501.db"], "segments left: \(segmentFiles(dir.path))")
        // One segment of the forty is left, holding the last 500 entries; of those, one is live.
        let stored = log.engine.locked { $0.heldBytes }
        #expect(stored == before / 40, "\(stored) of \(before) bytes stored")
        #expect(log.heldBytes == stored / 500, "\(log.heldBytes) bytes held by the one live entry of \(stored)")
        try log.append([entry(20_001, bytes: 1024)])
        #expect(log.firstIndex == 20_000 && log.lastIndex == 20_001)
        #expect(try log.entries(20_000...20_001).map(\.index) == [20_000, 20_001])
        try log.close()
        let again = try BerkeleyDBLog.open(path: dir.path, durability: .async, options: options)
        #expect(again.firstIndex == 20_000 && again.lastIndex == 20_001)
        #expect(try again.entries(20_000...20_001).map(\.index) == [20_000, 20_001])
        try again.close()
    }

    /// A crash after a compaction recorded its point but before it removed the dead segments
    /// leaves them listed: the next open removes them, and the live entries are all there.
    @Test func deadSegmentsACrashLeftAreRemovedWhenTheStoreOpens() throws {
        let dir = TempDir("cut-short")
        defer { dir.remove() }
        try openWithSegmentsOfFifty(dir.path, through: 300).close()
        #expect(segmentFiles(dir.path).count == 6)
        try recordSnapshotPoint(dir.path, 250) // what `compactPrefix` records first; then the "crash"
        let reopened = try BerkeleyDBLog.open(path: dir.path, options: Self.segmentPerCommit)
        #expect(reopened.firstIndex == 251 && reopened.lastIndex == 300)
        #expect(try reopened.entries(251...300) == entries(251...300))
        try reopened.close()
        // Segments 1–50 … 201–250 hold only dead entries; 251–300 is live.
        #expect(segmentFiles(dir.path) == ["entries-00000000000000000251.db"])
        try withRawStore(dir.path) { db in
            let segments = try StoreDirectory.readMetadata(db).segments
            #expect(segments == [251])
        }
    }

    /// A power cut may keep a removed segment's file deletion and lose the removal's commit: the
    /// store lists a file it no longer has. One that held only compacted entries is dropped from
    /// the list at the next open; one that held live entries is reported missing. (A stub left by
    /// a crash in the middle of a removal is checked by `segmentFilesAreToldFromStubs` and by the
    /// kill test in `StableLogCrashTests`.)
    @Test func aListedSegmentWithoutItsFileIsDroppedOnlyWhenItHeldCompactedEntries() throws {
        let dir = TempDir("lost-removal")
        defer { dir.remove() }
        try openWithSegmentsOfFifty(dir.path, through: 200).close()
        // The compaction point moved past the first two segments, their files went, the list did not.
        try recordSnapshotPoint(dir.path, 100)
        for f in ["entries.db", "entries-00000000000000000051.db"] { try FileManager.default.removeItem(atPath: dir.path + "/" + f) }
        let reopened = try BerkeleyDBLog.open(path: dir.path, options: Self.segmentPerCommit)
        #expect(reopened.firstIndex == 101 && reopened.lastIndex == 200)
        #expect(try reopened.entries(101...200) == entries(101...200))
        try reopened.close()
        try withRawStore(dir.path) { db in
            let segments = try StoreDirectory.readMetadata(db).segments
            #expect(segments == [101, 151])
        }
        // A live segment's file gone is an error that names it, not a shorter log.
        try FileManager.default.removeItem(atPath: dir.path + "/entries-00000000000000000151.db")
        #expect(throws: StableLogError.notAStore(path: dir.path, reason: "entries-00000000000000000151.db is missing")) {
            try BerkeleyDBLog.open(path: dir.path, options: Self.segmentPerCommit)
        }
    }

    /// What a crash in the middle of a segment's removal left (seen after SIGKILL: a 512-byte file
    /// with the start of a page header but no database magic number) is told from a segment file.
    @Test func segmentFilesAreToldFromStubs() throws {
        let dir = TempDir("stubs")
        defer { dir.remove() }
        try openWithSegmentsOfFifty(dir.path, through: 100).close()
        let real = dir.path + "/entries-00000000000000000051.db"
        #expect(BerkeleyDB.isBtreeFile(real))
        #expect(BerkeleyDB.isBtreeFile(dir.path + "/entries.db"))
        var stub = [UInt8](repeating: 0, count: 512)
        stub[12...15] = [0x00, 0x08, 0x03, 0x00] // what the stub held there
        let stubPath = dir.path + "/stub.db"
        #expect(FileManager.default.createFile(atPath: stubPath, contents: Data(stub)))
        #expect(!BerkeleyDB.isBtreeFile(stubPath))
        let head = try #require(FileManager.default.contents(atPath: real)).prefix(100)
        #expect(FileManager.default.createFile(atPath: stubPath, contents: head))
        #expect(!BerkeleyDB.isBtreeFile(stubPath), "a file shorter than a page")
        #expect(!BerkeleyDB.isBtreeFile(dir.path + "/absent.db"))
    }

    /// An inspector attached to a running node may hold a dead segment open: the node's removal
    /// does not wait for it (the writer would stall), and removes it once the inspector has let it go.
    @Test func aDeadSegmentAnInspectorHoldsOpenIsRemovedOnceItLetsGo() throws {
        let dir = TempDir("inspected")
        defer { dir.remove() }
        let log = try openWithSegmentsOfFifty(dir.path, through: 200)
        defer { try? log.close() }
        let reader = try LogStoreReader.open(path: dir.path)
        defer { reader.close() }
        #expect(reader.live)
        var seen = 0
        try reader.scan { _ in seen += 1; return true } // opens every segment
        #expect(seen == 200)
        let started = ContinuousClock.now
        try log.compactPrefix(through: 150, ballot: Ballot(term: 1, node: 1))
        try log.append(entries(201...201))
        #expect(ContinuousClock.now - started < .seconds(5), "the compaction waited for the inspector")
        #expect(try log.entries(151...201).count == 51)
        // The inspector lets the dead segments go at its next read; the node retries its
        // removal after a group commit, at most once a second.
        #expect(try reader.bounds()?.last == 201)
        let dead = ["entries.db", "entries-00000000000000000051.db", "entries-00000000000000000101.db"]
        let deadline = ContinuousClock.now + .seconds(10)
        var n = 202 as LogIndex
        while !Set(segmentFiles(dir.path)).isDisjoint(with: dead) && ContinuousClock.now < deadline {
            try log.append(entries(n...n))
            n += 1
            Thread.sleep(forTimeInterval: 0.1)
        }
        #expect(segmentFiles(dir.path).first == "entries-00000000000000000151.db", "segments left: \(segmentFiles(dir.path))")
        #expect(try log.entries(151...(n - 1)).count == Int(n - 151))
        // Nothing compacted is stored any more: every stored byte is live.
        let stored = log.engine.locked { $0.heldBytes }
        #expect(log.heldBytes == stored && stored > 0, "\(log.heldBytes) live of \(stored) stored bytes")
    }

    @Test func memoryModeAppendsInlineOnlyWhenNothingIsQueuedBeforeIt() throws {
        let dir = TempDir("inline")
        defer { dir.remove() }
        let onDisk = try BerkeleyDBLog.open(path: dir.path, durability: .fsync)
        #expect(onDisk.appendInline([entry(1)]) == nil, "a log that syncs must not append inline")
        #expect(onDisk.lastIndex == 0)
        try onDisk.close()

        let log = try BerkeleyDBLog.open(path: "in-memory", durability: .memory)
        defer { try? log.close() }
        // Queued and inline appends interleaved: an inline one may only go ahead of nothing, so
        // when it returns every queued append before it has been reported durable.
        let queued = CompletionRecord()
        var issuedQueued = 0, inline = 0
        for i in LogIndex(1)...3_000 {
            if i % 3 != 0, let r = log.appendInline([entry(i)]) {
                if case let .failure(e) = r { Issue.record("inline append of \(i) failed: \(e)") }
                inline += 1
                let done = queued.indexes.count
                #expect(done == issuedQueued, "entry \(i) appended inline while \(issuedQueued - done) queued appends before it were not durable")
                #expect(log.durableIndex == i)
                if done != issuedQueued { break }
            } else {
                issuedQueued += 1
                log.append([entry(i)]) { queued.add(i, $0) }
            }
        }
        #expect(queued.wait(count: issuedQueued))
        #expect(queued.indexes == queued.indexes.sorted(), "queued appends reported out of order")
        #expect(inline > 0, "no append went inline")
        #expect(log.durableIndex == 3_000)
        #expect(try log.entries(1...3_000) == (LogIndex(1)...3_000).map { entry($0) })
    }

    @Test func aFullMemoryLogSaysSo() throws {
        var options = BerkeleyDBLog.Options()
        options.memoryBytesMax = 16 << 20
        let log = try BerkeleyDBLog.open(path: "in-memory", durability: .memory, options: options)
        defer { try? log.close() }
        var failure: StableLogError?
        for i in LogIndex(1)...5_000 where failure == nil {
            do { try log.append([entry(i, bytes: 4096)]) } catch let e as StableLogError { failure = e }
        }
        #expect(failure == .memoryFull(path: "in-memory", capacityBytes: 16 << 20))
        #expect(failure?.description.contains("memory_log_bytes_max") == true)
    }

    @Test func debianBerkeleyDBToolsReadTheStore() throws {
        let dir = TempDir("dbtools")
        defer { dir.remove() }
        let log = try BerkeleyDBLog.open(path: dir.path)
        try log.append([LogEntry(index: 1, ballot: Ballot(term: 1, node: 1), kind: .command, payload: Array("hello-bdb".utf8))])
        try log.append(entries(2...100))
        try log.close()
        for file in ["entries.db", "meta.db"] {
            let v = try runCommand("/usr/bin/db5.3_verify", ["-h", dir.path, file])
            #expect(v.status == 0, "db5.3_verify \(file): \(v.stderr)")
        }
        let d = try runCommand("/usr/bin/db5.3_dump", ["-p", "-h", dir.path, "entries.db"])
        #expect(d.status == 0, "\(d.stderr)")
        #expect(d.stdout.contains("hello-bdb"))
        #expect(d.stdout.contains("type=btree"))
    }
}
