// One bit per guest page, packed in 64-bit words: the shape of QEMU's dirty log, so a bitmap
// handed over through the C ABI can be adopted without conversion. A 1 GiB guest needs 32 KiB.

/// A set of page indices in `0..<pageCount`. Bits at and past `pageCount` in the last word are
/// always zero, so counts and unions never see phantom pages.
public struct DirtyBitmap: Equatable, Sendable {
    /// Pages the set ranges over: its members are in `0..<pageCount`.
    public let pageCount: Int
    /// The bits: page `i` is bit `i % 64` of word `i / 64` (QEMU's dirty-log layout).
    public private(set) var words: [UInt64]

    static func wordCount(forPages pages: Int) -> Int { (pages + 63) >> 6 }

    /// An empty set over `pageCount` pages.
    public init(pageCount: Int) {
        precondition(pageCount >= 0, "negative page count")
        self.pageCount = pageCount
        self.words = [UInt64](repeating: 0, count: Self.wordCount(forPages: pageCount))
    }

    /// Every page set: the first sync of a fresh backup compares the whole image.
    public static func all(pageCount: Int) -> DirtyBitmap {
        var b = DirtyBitmap(pageCount: pageCount)
        for i in b.words.indices { b.words[i] = ~0 }
        b.clearTail()
        return b
    }

    /// Adopts words produced elsewhere (QEMU's dirty log). Returns nil when the word count does
    /// not match `pageCount` or a bit past the last page is set: such a bitmap belongs to a
    /// different RAM size.
    public init?(pageCount: Int, words: [UInt64]) {
        guard pageCount >= 0, words.count == Self.wordCount(forPages: pageCount) else { return nil }
        self.pageCount = pageCount
        self.words = words
        if let last = words.last, last & ~Self.tailMask(pageCount) != 0 { return nil }
    }

    /// The set holding `pages`; indices out of range are a caller bug and trap.
    public init<S: Sequence>(pageCount: Int, pages: S) where S.Element: BinaryInteger {
        self.init(pageCount: pageCount)
        for p in pages { insert(Int(p)) }
    }

    /// Mask of the valid bits in the last word.
    static func tailMask(_ pageCount: Int) -> UInt64 {
        let r = pageCount & 63
        return r == 0 ? ~0 : (UInt64(1) << UInt64(r)) - 1
    }

    private mutating func clearTail() {
        if !words.isEmpty { words[words.count - 1] &= Self.tailMask(pageCount) }
    }

    /// Whether `page` is in the set; indices out of range trap.
    @inline(__always)
    public func contains(_ page: Int) -> Bool {
        precondition(page >= 0 && page < pageCount, "page \(page) outside 0..<\(pageCount)")
        return words[page >> 6] & (1 << UInt64(page & 63)) != 0
    }

    /// Adds `page`; indices out of range trap.
    @inline(__always)
    public mutating func insert(_ page: Int) {
        precondition(page >= 0 && page < pageCount, "page \(page) outside 0..<\(pageCount)")
        words[page >> 6] |= 1 << UInt64(page & 63)
    }

    /// Removes `page`; indices out of range trap.
    public mutating func remove(_ page: Int) {
        precondition(page >= 0 && page < pageCount, "page \(page) outside 0..<\(pageCount)")
        words[page >> 6] &= ~(1 << UInt64(page & 63))
    }

    /// Empties the set; `pageCount` stays.
    public mutating func removeAll() {
        for i in words.indices { words[i] = 0 }
    }

    /// Number of pages in the set (population count, a word at a time).
    public var count: Int {
        var n = 0
        for w in words { n &+= w.nonzeroBitCount }
        return n
    }

    /// Whether no page is in the set.
    public var isEmpty: Bool { words.allSatisfy { $0 == 0 } }

    /// Adds every page of `other`. Both bitmaps must describe the same RAM size.
    public mutating func formUnion(_ other: DirtyBitmap) {
        precondition(other.pageCount == pageCount, "union of bitmaps over \(pageCount) and \(other.pageCount) pages")
        words.withUnsafeMutableBufferPointer { a in
            other.words.withUnsafeBufferPointer { b in
                for i in 0..<a.count { a[i] |= b[i] }
            }
        }
    }

    /// The pages in either bitmap. Both must describe the same RAM size.
    public func union(_ other: DirtyBitmap) -> DirtyBitmap {
        var u = self
        u.formUnion(other)
        return u
    }

    /// Calls `body` with each page index in ascending order, skipping empty words whole.
    @inline(__always)
    public func forEachPage(_ body: (Int) throws -> Void) rethrows {
        for (wi, word) in words.enumerated() where word != 0 {
            var w = word
            let base = wi << 6
            while w != 0 {
                try body(base + w.trailingZeroBitCount)
                w &= w &- 1
            }
        }
    }

    /// The page indices in ascending order. Both syncvm peers derive their hash arrays from this
    /// list, so entry `i` on one side is the same page as entry `i` on the other.
    public var pageIndices: [UInt32] {
        precondition(pageCount <= Int(UInt32.max) + 1, "page indices exceed 32 bits")
        var out = [UInt32]()
        out.reserveCapacity(count)
        forEachPage { out.append(UInt32(truncatingIfNeeded: $0)) }
        return out
    }

    /// The pages as ranges, "3-7,12,40-41" (for logs).
    public var rangesDescription: String {
        var parts: [String] = []
        var run: (Int, Int)?
        func flush() {
            guard let (a, b) = run else { return }
            parts.append(a == b ? "\(a)" : "\(a)-\(b)")
        }
        forEachPage { p in
            if let (a, b) = run, b + 1 == p { run = (a, p) } else { flush(); run = (p, p) }
        }
        flush()
        return parts.joined(separator: ",")
    }
}
