// Disk blocks over a sync channel's control frames. The engine's bulk path lands pages in the
// backup's registered RAM; a disk image is not registered memory, so its divergent blocks travel
// as frames instead and the backup's receiving side writes them into its image itself. With the
// two adapters below, the unchanged syncvm engine (SyncPrimary/SyncBackup: bitmaps, union,
// parallel hashing, divergent set, commit with digest) syncs a disk image mapped as a
// `GuestMemory` of 4 KiB blocks. docs/design/syncvm.md, "Disk images".

import Synchronization

/// The frame that carries disk blocks: kind u8 `0xDB`, 3 reserved bytes, block count u32,
/// block size u32, the block indices (u32 each, ascending), then the blocks' bytes in that order.
public enum BlockFrames {
    /// First byte of a block frame (a syncvm frame starts with its magic's 0x50).
    public static let kind: UInt8 = 0xDB
    /// Bytes before the indices.
    public static let headerBytes = 12

    /// Most blocks of `blockSize` bytes one frame may carry.
    public static func blocksPerFrameMax(blockSize: Int) -> Int {
        (SyncWire.frameBytesMax - headerBytes) / (blockSize + 4)
    }

    /// The frame carrying `blocks` of `disk`.
    public static func encode(_ blocks: ArraySlice<UInt32>, from disk: GuestMemory) -> [UInt8] {
        let size = disk.pageSize
        var w = ByteWriter(capacity: headerBytes + blocks.count * (size + 4))
        w.u8(kind)
        w.u8(0); w.u8(0); w.u8(0)
        w.u32(UInt32(blocks.count))
        w.u32(UInt32(size))
        for b in blocks { w.u32(b) }
        for b in blocks { w.raw(UnsafeRawBufferPointer(start: disk.pointer(toPage: Int(b)), count: size)) }
        return w.bytes
    }

    /// Writes the blocks of `frame` into `disk`; returns how many. A frame of another block
    /// size, a block outside the image, or a length that does not add up throws, naming it.
    @discardableResult
    public static func land(_ frame: [UInt8], into disk: GuestMemory) throws -> Int {
        var r = ByteReader(frame, what: "disk block frame")
        guard try r.u8() == kind else { throw SyncError.unexpectedMessage(expected: "disk blocks", got: "a frame of another kind") }
        _ = try r.u8(); _ = try r.u8(); _ = try r.u8()
        let count = Int(try r.u32())
        let size = Int(try r.u32())
        guard size == disk.pageSize else { throw SyncChannelError.pageSizeMismatch(local: size, remote: disk.pageSize) }
        guard count * (size + 4) == r.remaining else { throw r.error("\(count) blocks of \(size) bytes do not fill its \(frame.count) bytes") }
        var blocks = [Int]()
        blocks.reserveCapacity(count)
        for _ in 0..<count {
            let b = Int(try r.u32())
            guard b < disk.pageCount else { throw SyncChannelError.pageOutOfRange(page: b, pageCount: disk.pageCount) }
            blocks.append(b)
        }
        let dataStart = headerBytes + 4 * count
        frame.withUnsafeBytes { raw in
            for (i, b) in blocks.enumerated() {
                let from = dataStart + i * size
                disk.writePage(b, from: UnsafeRawBufferPointer(rebasing: raw[from..<(from + size)]))
            }
        }
        return count
    }
}

/// The primary's side: `writePages` sends the blocks as block frames on `inner`, in order with
/// the control frames, so the commit that follows arrives after them.
public final class BlockSendingChannel<Inner: SyncChannel>: SyncChannel {
    private let inner: Inner
    private let sent = Atomic<Int>(0)
    private let framed = Atomic<Int>(0)

    /// Wraps `inner`, whose control frames pass unchanged.
    public init(_ inner: Inner) { self.inner = inner }

    /// Bytes of block frames sent (indices and block data).
    public var blockFrameBytes: Int { sent.load(ordering: .relaxed) }
    /// Blocks sent.
    public var blocksSent: Int { framed.load(ordering: .relaxed) }

    public func send(_ frame: [UInt8]) async throws { try await inner.send(frame) }
    public func receive() async throws -> [UInt8] { try await inner.receive() }
    public func writePages(_ pages: ArraySlice<UInt32>, from memory: GuestMemory) async throws {
        let most = BlockFrames.blocksPerFrameMax(blockSize: memory.pageSize)
        var start = pages.startIndex
        while start < pages.endIndex {
            let end = min(start + most, pages.endIndex)
            let frame = BlockFrames.encode(pages[start..<end], from: memory)
            try await inner.send(frame)
            sent.wrappingAdd(frame.count, ordering: .relaxed)
            framed.wrappingAdd(end - start, ordering: .relaxed)
            start = end
        }
    }
    public func close() { inner.close() }
}

/// The backup's side: block frames arriving on `inner` are written into `disk` as they are
/// received; every other frame is handed to the engine. The engine has saved the union's blocks
/// (its undo log) before it sends the hashes that let the primary send any block.
public final class BlockLandingChannel<Inner: SyncChannel>: SyncChannel {
    private let inner: Inner
    private let disk: GuestMemory
    private let landed = Atomic<Int>(0)

    /// Wraps `inner`; blocks land in `disk`, which must be writable.
    public init(_ inner: Inner, landingIn disk: GuestMemory) {
        self.inner = inner
        self.disk = disk
    }

    /// Blocks written into the disk so far.
    public var blocksLanded: Int { landed.load(ordering: .relaxed) }

    public func send(_ frame: [UInt8]) async throws { try await inner.send(frame) }
    public func receive() async throws -> [UInt8] {
        while true {
            let f = try await inner.receive()
            guard f.first == BlockFrames.kind else { return f }
            do { landed.wrappingAdd(try BlockFrames.land(f, into: disk), ordering: .relaxed) } catch {
                inner.close()
                throw error
            }
        }
    }
    public func writePages(_ pages: ArraySlice<UInt32>, from memory: GuestMemory) async throws {
        throw SyncError.unexpectedMessage(expected: "disk blocks from the primary", got: "a write from the backup's side")
    }
    public func close() { inner.close() }
}
