import Foundation
import Testing
@testable import RDMAPaxos

/// Raw access to a closed store's databases, to damage it the way a bad disk would.
func withRawStore(_ path: String, _ body: (BerkeleyDB) throws -> Void) throws {
    var config = BerkeleyDB.Config()
    config.recover = true
    let db = try BerkeleyDB(path: path, config: config)
    defer { db.close() }
    try body(db)
}

func rawPut(_ db: BerkeleyDB, _ table: BerkeleyDB.Table, key: [UInt8], value: [UInt8]) throws {
    try StoreDirectory.inTransaction(db, sync: .fsync) { txn throws(StableLogError) in
        try db.put(table, key: key, value: value, txn: txn)
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
        try withRawStore(dir.path) { db in
            try rawPut(db, .meta, key: Array("format".utf8), value: LogRecord.encodeMeta(.format, LogRecord.encodeFormat(3)))
        }
        #expect(throws: StableLogError.versionMismatch(path: dir.path, found: 3, expected: 2)) {
            try BerkeleyDBLog.open(path: dir.path)
        }
        #expect(StableLogError.versionMismatch(path: "D", found: 3, expected: 2).description == "D: log format version 3, this build reads version 2 (and upgrades 1 to 2)")
    }

    /// A store written before configurations carried addresses (format 1, its hard state holding a
    /// format-1 configuration) opens, keeps its entries, and is marked format 2.
    @Test func aFormatOneStoreOpensAndIsMarkedFormatTwo() throws {
        let dir = TempDir("version-one")
        defer { dir.remove() }
        try makeStore(dir.path, 1...3)
        let oldHardState: [UInt8] = HardState(promised: Ballot(term: 2, node: 1), commitIndex: 3).encoded().prefix(20) + [0, 0, 0, 8, 0, 1, 0, 0, 0, 1, 0, 1]
        try withRawStore(dir.path) { db in
            try rawPut(db, .meta, key: Array("format".utf8), value: LogRecord.encodeMeta(.format, LogRecord.encodeFormat(1)))
            try rawPut(db, .meta, key: Array("hardstate".utf8), value: LogRecord.encodeMeta(.hardstate, oldHardState))
        }
        let log = try BerkeleyDBLog.open(path: dir.path)
        #expect(try log.entries(1...3).count == 3)
        #expect(try log.loadHardState().membership == Membership([Member(id: 1, role: .voter)]))
        try log.close()
        try withRawStore(dir.path) { db in
            let format = try StoreDirectory.readMetadata(db).formatVersion
            #expect(format == 2)
        }
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
        var compactions = 0
        for i in LogIndex(1)...10_000 {
            try log.append([entry(i, bytes: 4096)])
            if log.heldBytes >= cap / 2 {
                try log.compactPrefix(through: i, ballot: Ballot(term: 1, node: 1))
                #expect(log.heldBytes == 0)
                compactions += 1
            }
        }
        #expect(compactions >= 10)
    }

    @Test func aBigCompactionOnDiskDoesNotHoldTheNextAppendBehindItsDeletion() throws {
        let dir = TempDir("lazy-delete")
        defer { dir.remove() }
        let log = try BerkeleyDBLog.open(path: dir.path, durability: .async)
        defer { try? log.close() }
        for i in stride(from: LogIndex(1), through: 20_000, by: 500) {
            try log.append((i..<i + 500).map { entry($0, bytes: 1024) })
        }
        let before = log.heldBytes
        try log.compactPrefix(through: 19_999, ballot: Ballot(term: 1, node: 1))
        // The compaction point is recorded at once; the next append does not wait for the
        // deletion of ~20 MB of records, which goes on between group commits.
        try log.append([entry(20_001, bytes: 1024)])
        #expect(log.heldBytes > before / 2, "the deletion ran before the next append: \(log.heldBytes) of \(before) bytes left")
        #expect(log.firstIndex == 20_000 && log.lastIndex == 20_001)
        let deadline = ContinuousClock.now + .seconds(30)
        while log.heldBytes > before / 100 && ContinuousClock.now < deadline { Thread.sleep(forTimeInterval: 0.01) }
        #expect(log.heldBytes <= before / 100, "dead records were not deleted: \(log.heldBytes) of \(before) bytes left")
        #expect(try log.entries(20_000...20_001).map(\.index) == [20_000, 20_001])
    }

    /// A crash part-way through a compaction's deletion (which goes newest first) leaves dead
    /// records below a hole; the next open deletes them and the live entries are all there.
    @Test func aCompactionDeletionCutShortIsFinishedWhenTheStoreOpens() throws {
        let dir = TempDir("cut-short")
        defer { dir.remove() }
        try makeStore(dir.path, 1...300)
        var chunkLeftMore = false
        try withRawStore(dir.path) { db in
            // What `compactPrefix` does on disk, then one bounded chunk of its deletion, then the
            // "crash" (the store is closed with the rest of the deletion not done).
            try StoreDirectory.inTransaction(db, sync: .fsync) { txn throws(StableLogError) in
                try StoreDirectory.putMeta(db, .snapshot, LogRecord.encodeSnapshot(SnapshotPoint(index: 250, ballot: Ballot(term: 1, node: 1))), txn: txn)
            }
            let (_, done) = try GroupCommitEngine.deleteChunk(db, through: 250, sync: .fsync, bytesMax: 1000)
            chunkLeftMore = !done
            #expect(try db.get(.entries, key: LogRecord.key(250)) == nil, "the newest dead entry goes first")
            #expect(try db.get(.entries, key: LogRecord.key(1)) != nil, "the chunk deleted the whole dead prefix")
            #expect(try db.get(.entries, key: LogRecord.key(251)) != nil, "the chunk deleted a live entry")
        }
        #expect(chunkLeftMore)
        let log = try BerkeleyDBLog.open(path: dir.path)
        #expect(log.firstIndex == 251 && log.lastIndex == 300)
        #expect(try log.entries(251...300) == entries(251...300))
        try log.close()
        try withRawStore(dir.path) { db in
            var left: [LogIndex] = []
            try db.scan(.entries, from: .first, txn: nil) { k, _ throws(StableLogError) in
                left.append(LogRecord.index(ofKey: k) ?? 0)
                return left.count < 2 ? .next : .stop
            }
            #expect(left == [251, 252], "dead records left after the open: \(left)")
        }
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
