import Foundation
import Synchronization
import Testing
@testable import RDMAPaxos

/// What `MemoryLog` does as the log of a memory-mode node, beyond the shared contract
/// (`StableLogConformanceTests`): a bound on what it holds, inline appends that keep the order of
/// the queued ones, and compaction and truncation by position.
@Suite struct MemoryLogTests {
    @Test func anAppendPastTheCapacityFailsWithMemoryFullAndTheLogStaysFailed() throws {
        let log = try MemoryLog(name: "node 1's in-memory log", capacityBytes: 1 << 20)
        defer { try? log.close() }
        var failure: StableLogError?
        var held: LogIndex = 0
        for i in LogIndex(1)...1_000 where failure == nil {
            do {
                try log.append([entry(i, bytes: 4096)])
                held = i
            } catch let e as StableLogError { failure = e }
        }
        #expect(failure == .memoryFull(path: "node 1's in-memory log", capacityBytes: 1 << 20))
        #expect(failure?.description.contains("memory_log_bytes_max") == true)
        #expect(held > 200 && log.heldBytes <= 1 << 20, "held \(held) entries, \(log.heldBytes) bytes")
        // Sticky, like any storage failure: nothing is appended after it, inline or queued.
        #expect(failureOf(log.appendInline([entry(held + 1)])) == failure)
        let queued = Mutex<StableLogError?>(nil)
        let done = DispatchSemaphore(value: 0)
        log.append([entry(held + 1)]) { r in
            queued.withLock { $0 = failureOf(r) }
            done.signal()
        }
        done.wait()
        #expect(queued.withLock { $0 } == failure)
        #expect(throws: StableLogError.self) { try log.entries(1...1) }
    }

    @Test func compactingMakesRoomAgain() throws {
        let log = try MemoryLog(capacityBytes: 1 << 20)
        defer { try? log.close() }
        for i in LogIndex(1)...200 { try log.append([entry(i, bytes: 4096)]) }
        let before = log.heldBytes
        try log.compactPrefix(through: 150, ballot: Ballot(term: 1, node: 1))
        #expect(log.firstIndex == 151 && log.lastIndex == 200)
        #expect(log.heldBytes == before / 200 * 50)
        for i in LogIndex(201)...300 { try log.append([entry(i, bytes: 4096)]) }
        #expect(try log.entries(140...400).map(\.index) == Array(151...300))
        // Through a point past the last entry: everything goes.
        try log.compactPrefix(through: 310, ballot: Ballot(term: 1, node: 1))
        #expect(log.heldBytes == 0 && log.firstIndex == 311 && log.lastIndex == 310)
        try log.append([entry(311)])
        #expect(log.lastIndex == 311)
    }

    @Test func truncatingCutsTheSuffixAndItsBytes() throws {
        let log = try MemoryLog()
        defer { try? log.close() }
        try log.append(entries(1...10))
        let perEntry = log.heldBytes / 10
        try log.truncateSuffix(from: 7)
        #expect(log.lastIndex == 6 && log.heldBytes == 6 * perEntry)
        try log.truncateSuffix(from: 20)  // past the end: nothing
        #expect(log.lastIndex == 6)
        try log.append(entries(7...8))
        #expect(try log.entries(1...8).map(\.index) == Array(1...8))
    }

    /// An inline append must not report before a queued append's completion has run: the node
    /// acknowledges in completion order.
    @Test func anInlineAppendWaitsItsTurnBehindAQueuedOne() async throws {
        let log = try MemoryLog()
        defer { try? log.close() }
        let release = DispatchSemaphore(value: 0)
        let order = Mutex<[String]>([])
        log.append(entries(1...2)) { _ in
            release.wait()
            // Still running when the inline append would go through if the log counted this
            // completion done before it ran.
            Thread.sleep(forTimeInterval: 0.02)
            order.withLock { $0.append("queued") }
        }
        let first = log.appendInline(entries(3...3))
        #expect(first == nil, "appended inline with a completion still to run")
        guard first == nil else { return }
        // A hard state saved meanwhile is reported after the queued append too.
        log.saveHardState(HardState()) { _ in order.withLock { $0.append("hard state") } }
        release.signal()
        var inline: Result<Void, StableLogError>?
        for _ in 0..<1_000 where inline == nil {
            inline = log.appendInline(entries(3...3))
            if inline == nil { try await Task.sleep(for: .milliseconds(1)) }
        }
        order.withLock { $0.append("inline") }
        #expect(inline.map { if case .success = $0 { true } else { false } } == true)
        #expect(order.withLock { $0 } == ["queued", "hard state", "inline"])
        #expect(log.lastIndex == 3)
    }
}

private func failureOf(_ r: Result<Void, StableLogError>?) -> StableLogError? {
    if case let .failure(e)? = r { return e }
    return nil
}
