// The backup's side of an atomic checkpoint: before the primary may write a single page, the
// backup copies every page the sync can overwrite (the dirty union); a checkpoint cut off after
// pages landed puts them back, so the backup's VM is exactly what it was — the state after the
// inputs it executed — and can still take over. docs/design/vmreplica.md, "Atomic checkpoints".

import Foundation

/// Copies of the pages one sync may overwrite, and the way back to them.
public final class PageUndoLog: @unchecked Sendable {
    // @unchecked Sendable: every field is touched only under `lock`.
    private let lock = NSLock()
    private var pages: [UInt32] = []
    private var bytes: [UInt8] = []
    private var pageSize = 0

    /// An empty log.
    public init() {}

    /// How many pages the log holds copies of.
    public var count: Int { lock.withLock { pages.count } }

    /// Replaces the log with copies of `pages` of `memory` (called before the sync lets the
    /// primary write any of them).
    public func save(_ pages: [UInt32], of memory: GuestMemory) {
        let size = memory.pageSize
        var copy = [UInt8](repeating: 0, count: pages.count * size)
        copy.withUnsafeMutableBytes { dst in
            for (i, p) in pages.enumerated() {
                (dst.baseAddress! + i * size).copyMemory(from: memory.pointer(toPage: Int(p)), byteCount: size)
            }
        }
        lock.withLock {
            self.pages = pages
            self.bytes = copy
            self.pageSize = size
        }
    }

    /// Writes every saved page back into `memory`, then empties the log. Nothing may write
    /// `memory` meanwhile: the peer's access is revoked and the VM paused before this is called.
    /// Returns how many pages it put back.
    @discardableResult
    public func restore(into memory: GuestMemory) -> Int {
        let (pages, bytes, size) = lock.withLock { () -> ([UInt32], [UInt8], Int) in
            defer { self.pages = []; self.bytes = [] }
            return (self.pages, self.bytes, self.pageSize)
        }
        precondition(pages.isEmpty || size == memory.pageSize, "undo log of another page size")
        bytes.withUnsafeBytes { src in
            for (i, p) in pages.enumerated() {
                memory.writePage(Int(p), from: UnsafeRawBufferPointer(rebasing: src[(i * size)..<((i + 1) * size)]))
            }
        }
        return pages.count
    }

    /// Forgets the copies (the checkpoint completed, or the VM is replaced anyway).
    public func clear() {
        lock.withLock {
            pages = []
            bytes = []
        }
    }
}
