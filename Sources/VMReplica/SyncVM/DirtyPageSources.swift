// Where a side's dirty set comes from. syncvm only needs, per side, a superset of the pages
// that changed since the last sync; two ways to get one sit behind one protocol.

/// Tracks which pages changed since the last sync point.
public protocol DirtyPageSource: AnyObject {
    /// Pages that may have changed since the previous call (or since the source was created),
    /// and makes now the new starting point. Call it with the VM paused, right before a sync.
    func collect() throws -> DirtyBitmap

    /// The sync rewrote `pages` of this side's memory (the backup's divergent pages; empty on
    /// the primary). Their new contents are part of the baseline, not guest writes.
    func syncCompleted(rewrote pages: DirtyBitmap)
}

/// A dirty log that does not fit the source's RAM size: a wrong word count, bits set past the
/// last page, or a `DirtyBitmap` over another number of pages.
public struct DirtyLogError: Error, Equatable, Sendable, CustomStringConvertible {
    /// Words in the rejected log.
    public var words: Int
    /// Pages of the source the log was recorded into.
    public var pageCount: Int
    /// Pages the rejected bitmap covers, when a whole bitmap (not raw words) was handed in.
    public var bitmapPages: Int? = nil
    public var description: String {
        if let bitmapPages { return "dirty bitmap of \(bitmapPages) pages does not match the guest's \(pageCount) pages" }
        return "dirty log of \(words) words does not describe \(pageCount) pages (needs \((pageCount + 63) / 64) words, no bits past the last page)"
    }
}

/// (a) Bitmaps handed in from outside: QEMU's dirty log, delivered through the C ABI once the
/// patched QEMU exists. Bitmaps recorded between syncs accumulate.
public final class ExternalDirtyLog: DirtyPageSource {
    /// Pages of the guest RAM the recorded logs describe.
    public let pageCount: Int
    private var pending: DirtyBitmap

    /// A source over `pageCount` pages with nothing recorded yet.
    public init(pageCount: Int) {
        self.pageCount = pageCount
        self.pending = DirtyBitmap(pageCount: pageCount)
    }

    /// Adds a dirty log in QEMU's layout (bit `i % 64` of word `i / 64` is page `i`).
    public func record(words: [UInt64]) throws(DirtyLogError) {
        guard let b = DirtyBitmap(pageCount: pageCount, words: words) else {
            throw DirtyLogError(words: words.count, pageCount: pageCount)
        }
        pending.formUnion(b)
    }

    /// Adds the pages of `bitmap`. Throws when it covers another number of pages.
    public func record(_ bitmap: DirtyBitmap) throws(DirtyLogError) {
        guard bitmap.pageCount == pageCount else { throw DirtyLogError(words: bitmap.words.count, pageCount: pageCount, bitmapPages: bitmap.pageCount) }
        pending.formUnion(bitmap)
    }

    public func collect() -> DirtyBitmap {
        defer { pending.removeAll() }
        return pending
    }

    /// Writes made by syncvm from another process are not guest writes: QEMU never logs them,
    /// so there is nothing to undo.
    public func syncCompleted(rewrote pages: DirtyBitmap) {}
}

/// (b) Hash-diff: the pages whose hash differs from the hash recorded at the last sync. Works
/// with an unpatched QEMU at the cost of hashing all of memory per sync.
public final class HashDiffDirtySource: DirtyPageSource {
    /// The guest RAM whose pages are compared.
    public let memory: GuestMemory
    /// Threads that hash it: every page at each `collect`, the rewritten ones after a sync.
    public let pool: PageHashPool
    /// Local only, never sent: any fixed value works.
    private let seed: UInt64 = 0x706C_6F76_6572
    private var baseline: [UInt64]

    /// Records the memory's current contents as the baseline.
    public init(memory: GuestMemory, pool: PageHashPool) {
        self.memory = memory
        self.pool = pool
        self.baseline = pool.hashAllPages(of: memory, seed: seed)
    }

    public func collect() -> DirtyBitmap {
        let now = pool.hashAllPages(of: memory, seed: seed)
        var dirty = DirtyBitmap(pageCount: memory.pageCount)
        for i in 0..<now.count where now[i] != baseline[i] { dirty.insert(i) }
        baseline = now
        return dirty
    }

    public func syncCompleted(rewrote pages: DirtyBitmap) {
        precondition(pages.pageCount == memory.pageCount, "rewritten-page set of another memory size")
        let list = pages.pageIndices
        for (i, h) in zip(list, pool.hash(pages: list, of: memory, seed: seed)) { baseline[Int(i)] = h }
    }
}
