import Foundation
import Testing
@testable import RDMAPaxos

/// Every `StableLog` implementation the package ships.
enum LogKind: String, CaseIterable, Sendable, CustomTestStringConvertible {
    case berkeleyFsync, berkeleyAsync, berkeleyMemory, memoryLog
    var testDescription: String { rawValue }
    /// Whether what was written is there after close and open.
    var persists: Bool { self != .berkeleyMemory }
    static let persisting = allCases.filter(\.persists)
}

/// Opens and reopens one log of a kind; `finish()` closes it and removes its directory.
final class LogFixture {
    let kind: LogKind
    let dir = TempDir("conformance")
    let storage = MemoryLog.Storage()
    private(set) var log: any StableLog

    init(_ kind: LogKind) throws {
        self.kind = kind
        log = try Self.open(kind, dir.path, storage)
    }

    static func open(_ kind: LogKind, _ path: String, _ storage: MemoryLog.Storage) throws -> any StableLog {
        switch kind {
        case .berkeleyFsync: try BerkeleyDBLog.open(path: path, durability: .fsync)
        case .berkeleyAsync: try BerkeleyDBLog.open(path: path, durability: .async)
        case .berkeleyMemory: try BerkeleyDBLog.open(path: path, durability: .memory)
        case .memoryLog: try MemoryLog(name: path, storage: storage)
        }
    }

    func reopen() throws -> any StableLog {
        try log.close()
        log = try Self.open(kind, dir.path, storage)
        return log
    }

    func finish() {
        try? log.close()
        dir.remove()
    }
}

@Suite struct StableLogConformanceTests {
    @Test(arguments: LogKind.allCases)
    func emptyLogStartsBeforeIndexOne(kind: LogKind) throws {
        let f = try LogFixture(kind)
        defer { f.finish() }
        #expect(f.log.firstIndex == 1)
        #expect(f.log.lastIndex == 0)
        #expect(f.log.durableIndex == 0)
        #expect(f.log.snapshot == .none)
        #expect(try f.log.loadHardState() == HardState())
        #expect(try f.log.entries(1...10).isEmpty)
    }

    @Test(arguments: LogKind.allCases)
    func appendedEntriesReadBackInIndexOrder(kind: LogKind) throws {
        let f = try LogFixture(kind)
        defer { f.finish() }
        try f.log.append(entries(1...3))
        try f.log.append([LogEntry(index: 4, ballot: Ballot(term: 2, node: 3), kind: .noop, payload: [])])
        try f.log.append(entries(5...20, term: 2))
        #expect(f.log.lastIndex == 20)
        #expect(f.log.durableIndex == 20)
        let got = try f.log.entries(1...20)
        #expect(got.map(\.index) == Array(1...20))
        #expect(got[3] == LogEntry(index: 4, ballot: Ballot(term: 2, node: 3), kind: .noop, payload: []))
        #expect(got[19] == entry(20, term: 2))
    }

    @Test(arguments: LogKind.allCases)
    func readsAreClampedToWhatIsHeld(kind: LogKind) throws {
        let f = try LogFixture(kind)
        defer { f.finish() }
        try f.log.append(entries(1...5))
        #expect(try f.log.entries(0...100).map(\.index) == [1, 2, 3, 4, 5])
        #expect(try f.log.entries(4...4) == [entry(4)])
        #expect(try f.log.entries(6...9).isEmpty)
    }

    @Test(arguments: LogKind.allCases)
    func entriesAreReadableAsSoonAsAppended(kind: LogKind) throws {
        let f = try LogFixture(kind)
        defer { f.finish() }
        let done = DispatchSemaphore(value: 0)
        f.log.append(entries(1...50)) { _ in done.signal() }
        #expect(f.log.lastIndex == 50)
        #expect(try f.log.entries(1...50).map(\.index) == Array(1...50))
        done.wait()
        #expect(f.log.durableIndex == 50)
    }

    @Test(arguments: LogKind.allCases)
    func truncateSuffixDropsConflictingEntriesAndAllowsReappend(kind: LogKind) throws {
        let f = try LogFixture(kind)
        defer { f.finish() }
        try f.log.append(entries(1...10))
        try f.log.truncateSuffix(from: 7)
        #expect(f.log.lastIndex == 6)
        #expect(f.log.durableIndex == 6)
        #expect(try f.log.entries(1...10).map(\.index) == Array(1...6))
        try f.log.append(entries(7...8, term: 3))
        #expect(try f.log.entries(7...8) == entries(7...8, term: 3))
        try f.log.truncateSuffix(from: 100) // beyond the end: nothing to remove
        #expect(f.log.lastIndex == 8)
    }

    @Test(arguments: LogKind.allCases)
    func compactPrefixMovesFirstIndexAndKeepsTheRest(kind: LogKind) throws {
        let f = try LogFixture(kind)
        defer { f.finish() }
        try f.log.append(entries(1...10))
        try f.log.compactPrefix(through: 4, ballot: Ballot(term: 1, node: 1))
        #expect(f.log.firstIndex == 5)
        #expect(f.log.snapshot == SnapshotPoint(index: 4, ballot: Ballot(term: 1, node: 1)))
        #expect(try f.log.entries(1...10).map(\.index) == Array(5...10))
        try f.log.compactPrefix(through: 2, ballot: .zero) // already compacted: no change
        #expect(f.log.snapshot.index == 4)
        try f.log.append([entry(11)])
        #expect(f.log.lastIndex == 11)
    }

    @Test(arguments: LogKind.allCases)
    func compactBeyondTheLastEntryLeavesAnEmptyLogAtTheSnapshot(kind: LogKind) throws {
        let f = try LogFixture(kind)
        defer { f.finish() }
        try f.log.append(entries(1...3))
        try f.log.compactPrefix(through: 50, ballot: Ballot(term: 4, node: 2))
        #expect(f.log.firstIndex == 51)
        #expect(f.log.lastIndex == 50)
        #expect(try f.log.entries(1...100).isEmpty)
        try f.log.append([entry(51, term: 4)])
        #expect(try f.log.entries(1...100) == [entry(51, term: 4)])
    }

    @Test(arguments: LogKind.allCases)
    func hardStateRoundTrips(kind: LogKind) throws {
        let f = try LogFixture(kind)
        defer { f.finish() }
        let hs = HardState(promised: Ballot(term: 9, node: 2), commitIndex: 7,
                           membership: Membership([Member(id: 1, role: .voter), Member(id: 2, role: .witness, priority: 0)]))
        try f.log.saveHardState(hs)
        #expect(try f.log.loadHardState() == hs)
    }

    @Test(arguments: LogKind.persisting)
    func reopenRestoresEntriesSnapshotAndHardState(kind: LogKind) throws {
        let f = try LogFixture(kind)
        defer { f.finish() }
        let hs = HardState(promised: Ballot(term: 3, node: 1), commitIndex: 12, membership: Membership([Member(id: 1, role: .voter)]))
        try f.log.append(entries(1...20))
        try f.log.compactPrefix(through: 5, ballot: Ballot(term: 1, node: 1))
        try f.log.truncateSuffix(from: 19)
        try f.log.saveHardState(hs)
        let log = try f.reopen()
        #expect(log.firstIndex == 6)
        #expect(log.lastIndex == 18)
        #expect(log.durableIndex == 18)
        #expect(log.snapshot == SnapshotPoint(index: 5, ballot: Ballot(term: 1, node: 1)))
        #expect(try log.loadHardState() == hs)
        #expect(try log.entries(1...100) == entries(6...18))
        try log.append([entry(19, term: 2)])
        #expect(log.lastIndex == 19)
    }

    @Test(arguments: LogKind.allCases)
    func concurrentAppendersCompleteInAppendOrderWithEveryEntryPresent(kind: LogKind) throws {
        let f = try LogFixture(kind)
        defer { f.finish() }
        let log = f.log
        let order = NSLock()
        let completed = CompletionRecord()
        let perThread = 150, threads = 8
        nonisolated(unsafe) var next: LogIndex = 1 // guarded by `order`
        DispatchQueue.concurrentPerform(iterations: threads) { _ in
            for _ in 0..<perThread {
                order.lock()
                let i = next
                next += 1
                log.append([entry(i)]) { result in completed.add(i, result) }
                order.unlock()
            }
        }
        let total = LogIndex(threads * perThread)
        try log.append([]) // completes after everything queued before it
        #expect(completed.wait(count: Int(total)))
        #expect(completed.indexes == Array(1...total))
        #expect(completed.failures == 0)
        #expect(try log.entries(1...total) == entries(1...total))
    }

    @Test(arguments: LogKind.allCases)
    func callsAfterCloseThrowClosed(kind: LogKind) throws {
        let f = try LogFixture(kind)
        defer { f.finish() }
        try f.log.append(entries(1...2))
        try f.log.close()
        #expect(throws: StableLogError.closed(path: f.dir.path)) { try f.log.entries(1...2) }
        #expect(throws: StableLogError.closed(path: f.dir.path)) { try f.log.append([entry(3)]) }
        #expect(throws: StableLogError.closed(path: f.dir.path)) { try f.log.saveHardState(HardState()) }
        #expect(throws: StableLogError.closed(path: f.dir.path)) { try f.log.close() }
    }

    @Test func memoryLogInjectedFailureIsStickyAndReachesCompletions() throws {
        let log = try MemoryLog(name: "m")
        try log.append(entries(1...2))
        log.fail(with: .diskFull(path: "m"))
        let result = CompletionRecord()
        log.append([entry(3)]) { result.add(3, $0) }
        #expect(result.wait(count: 1))
        #expect(result.failures == 1)
        #expect(throws: StableLogError.diskFull(path: "m")) { try log.entries(1...2) }
    }

    @Test func memoryLogStorageCannotBeOpenedTwice() throws {
        let storage = MemoryLog.Storage()
        let log = try MemoryLog(name: "m", storage: storage)
        #expect(throws: StableLogError.locked(path: "m")) { try MemoryLog(name: "m", storage: storage) }
        try log.close()
        _ = try MemoryLog(name: "m", storage: storage)
    }

    @Test func appendThatSkipsAnIndexTrapsInMemoryLog() async {
        await #expect(processExitsWith: .failure) {
            let log = try MemoryLog(name: "m")
            try log.append([entry(2)])
        }
    }

    @Test func appendThatSkipsAnIndexTrapsInBerkeleyDBLog() async {
        await #expect(processExitsWith: .failure) {
            let log = try BerkeleyDBLog.open(path: "in-memory", durability: .memory)
            try log.append([entry(1), entry(3)])
        }
    }
}

/// Completions as they arrive, in arrival order.
final class CompletionRecord: @unchecked Sendable {
    // @unchecked Sendable: guarded by `lock`.
    private let lock = NSCondition()
    private var got: [LogIndex] = []
    private var failed = 0
    func add(_ i: LogIndex, _ r: Result<Void, StableLogError>) {
        lock.lock()
        got.append(i)
        if case .failure = r { failed += 1 }
        lock.broadcast()
        lock.unlock()
    }
    var indexes: [LogIndex] { lock.lock(); defer { lock.unlock() }; return got }
    var failures: Int { lock.lock(); defer { lock.unlock() }; return failed }
    func wait(count: Int, seconds: Double = 30) -> Bool {
        let deadline = Date().addingTimeInterval(seconds)
        lock.lock()
        defer { lock.unlock() }
        while got.count < count { if !lock.wait(until: deadline) { return false } }
        return true
    }
}
