// The two dirty-page sources.

import Testing
@testable import VMReplica

@Suite struct DirtyPageSourceTests {
    @Test func hashDiffFindsExactlyTheChangedPages() throws {
        var rng = SeededRandom(seed: 8)
        let m = try GuestMemory(pageCount: 2000)
        for p in 0..<2000 where p % 2 == 0 { m.randomize(page: p, &rng) }
        let source = HashDiffDirtySource(memory: m, pool: PageHashPool(threadCount: 2))
        var changed = Set<Int>()
        for _ in 0..<150 {
            let p = Int(rng.next() % 2000)
            m.randomize(page: p, &rng)
            changed.insert(p)
        }
        // Rewriting a page with its own bytes is not a change.
        m.withMutablePage(3) { page in let copy = Array(page); page.copyBytes(from: copy) }
        #expect(source.collect().pageIndices.map(Int.init) == changed.sorted())
        #expect(source.collect().isEmpty, "collect makes now the new baseline")
    }

    @Test func hashDiffTreatsPagesRewrittenBySyncAsBaseline() throws {
        var rng = SeededRandom(seed: 9)
        let m = try GuestMemory(pageCount: 64)
        let source = HashDiffDirtySource(memory: m, pool: PageHashPool(threadCount: 1))
        _ = source.collect()
        m.randomize(page: 10, &rng)  // written by syncvm, not by the guest
        source.syncCompleted(rewrote: DirtyBitmap(pageCount: 64, pages: [10]))
        m.randomize(page: 20, &rng)  // written by the guest
        #expect(source.collect().pageIndices == [20])
    }

    @Test func externalLogAccumulatesUntilCollected() throws {
        let log = ExternalDirtyLog(pageCount: 100)
        try log.record(words: [0b11, 0])
        try log.record(DirtyBitmap(pageCount: 100, pages: [1, 99]))
        #expect(log.collect().pageIndices == [0, 1, 99])
        #expect(log.collect().isEmpty)
    }

    @Test func externalLogRejectsALogOfAnotherSize() {
        let log = ExternalDirtyLog(pageCount: 100)
        #expect(throws: DirtyLogError(words: 1, pageCount: 100)) { try log.record(words: [1]) }
        #expect(throws: DirtyLogError.self) { try log.record(words: [0, 1 << 40]) }  // page 104
        // A whole bitmap of 120 pages has as many words as 100 pages need: the error names pages.
        let wrong = DirtyLogError(words: 2, pageCount: 100, bitmapPages: 120)
        #expect(throws: wrong) { try log.record(DirtyBitmap(pageCount: 120, pages: [3])) }
        #expect("\(wrong)" == "dirty bitmap of 120 pages does not match the guest's 100 pages")
    }
}
