// The hash pool's output order and the interchangeability of the XXH3 builds.

import Testing
@testable import VMReplica

@Suite struct PageHashingTests {
    /// Entry i is the hash of pages[i] however many threads split the work, so the two peers'
    /// arrays line up even when their pools differ.
    @Test func outputOrderFollowsInputOrderForAnyThreadCount() throws {
        var rng = SeededRandom(seed: 17)
        let m = try GuestMemory(pageCount: 3000)
        for p in 0..<3000 { m.randomize(page: p, &rng) }
        let pages = (0..<3000).filter { _ in rng.next() % 3 != 0 }.map { UInt32($0) }
        let expected = pages.map { PageHashFunction.default.hash(m.pointer(toPage: Int($0)), count: 4096, seed: 5) }
        for threads in [1, 2, 3, 8] {
            #expect(PageHashPool(threadCount: threads).hash(pages: pages, of: m, seed: 5) == expected, "\(threads) threads")
        }
    }

    @Test func dispatchAndGenericBuildsAgree() throws {
        var rng = SeededRandom(seed: 18)
        let m = try GuestMemory(pageCount: 64)
        for p in 0..<64 { m.randomize(page: p, &rng) }
        let dispatch = PageHashPool(threadCount: 2, function: .xxh3Dispatch).hashAllPages(of: m, seed: 77)
        let generic = PageHashPool(threadCount: 2, function: .xxh3Generic).hashAllPages(of: m, seed: 77)
        #expect(dispatch == generic)
        #expect(Set(dispatch).count == 64)
    }

    @Test func seedChangesEveryHash() throws {
        let m = try GuestMemory(pageCount: 4)
        let pool = PageHashPool(threadCount: 1)
        let a = pool.hashAllPages(of: m, seed: 1), b = pool.hashAllPages(of: m, seed: 2)
        #expect(zip(a, b).allSatisfy { $0 != $1 })
    }

    @Test func concurrentCallersOnOnePoolEachGetTheirOwnResult() async throws {
        var rng = SeededRandom(seed: 19)
        let m = try GuestMemory(pageCount: 2048)
        for p in 0..<2048 { m.randomize(page: p, &rng) }
        let pool = PageHashPool(threadCount: 2)
        let all = (0..<2048).map { UInt32($0) }
        let expected = pool.hash(pages: all, of: m, seed: 3)
        await withTaskGroup(of: Bool.self) { group in
            for _ in 0..<4 { group.addTask { pool.hash(pages: all, of: m, seed: 3) == expected } }
            for await ok in group { #expect(ok) }
        }
    }
}
