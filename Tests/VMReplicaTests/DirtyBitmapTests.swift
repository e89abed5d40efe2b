// The bitmap's set operations and its QEMU-compatible word layout.

import Testing
@testable import VMReplica

@Suite struct DirtyBitmapTests {
    @Test func unionCountAndIterationAgreeWithASetModel() {
        var rng = SeededRandom(seed: 5)
        for pages in [1, 63, 64, 65, 1000, 4097] {
            var a = DirtyBitmap(pageCount: pages), b = DirtyBitmap(pageCount: pages)
            var sa = Set<Int>(), sb = Set<Int>()
            for _ in 0..<(pages / 3 + 1) {
                let x = Int(rng.next() % UInt64(pages)), y = Int(rng.next() % UInt64(pages))
                a.insert(x); sa.insert(x)
                b.insert(y); sb.insert(y)
            }
            let u = a.union(b)
            #expect(u.count == sa.union(sb).count, "pages \(pages)")
            #expect(u.pageIndices.map(Int.init) == sa.union(sb).sorted(), "pages \(pages)")
            var visited = [Int]()
            a.forEachPage { visited.append($0) }
            #expect(visited == sa.sorted())
            #expect(sa.allSatisfy { a.contains($0) })
        }
    }

    @Test func rangesDescriptionJoinsRunsOfPages() {
        #expect(DirtyBitmap(pageCount: 200, pages: [3, 4, 5, 7, 63, 64, 65, 199]).rangesDescription == "3-5,7,63-65,199")
        #expect(DirtyBitmap(pageCount: 10).rangesDescription == "")
        #expect(DirtyBitmap.all(pageCount: 130).rangesDescription == "0-129")
    }

    @Test func allSetsExactlyThePagesThatExist() {
        for pages in [1, 64, 100] {
            let all = DirtyBitmap.all(pageCount: pages)
            #expect(all.count == pages)
            #expect(all.words.count == (pages + 63) / 64)
        }
    }

    /// QEMU's layout: bit i % 64 of word i / 64 is page i.
    @Test func adoptsWordsInQEMULayout() throws {
        let b = try #require(DirtyBitmap(pageCount: 130, words: [0b101, 1 << 63, 0b10]))
        #expect(b.pageIndices == [0, 2, 127, 129])
    }

    @Test func rejectsWordsForAnotherSize() {
        #expect(DirtyBitmap(pageCount: 130, words: [0, 0]) == nil)
        #expect(DirtyBitmap(pageCount: 130, words: [0, 0, 0b100]) == nil)  // bit for page 130
    }

    @Test func removeAndRemoveAllEmptyTheSet() {
        var b = DirtyBitmap(pageCount: 200, pages: [1, 2, 199])
        b.remove(2)
        #expect(b.pageIndices == [1, 199])
        b.removeAll()
        #expect(b.isEmpty && b.count == 0)
    }
}
