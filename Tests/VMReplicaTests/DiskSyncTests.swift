// The disk step of a checkpoint without QEMU: the syncvm engine over a disk image of 4 KiB
// blocks, divergent blocks as block frames written by the backup (BlockFrames.swift); the
// union of both sides' dirty blocks is needed (a variant without the backup's set leaves the
// images different); a cut-off after blocks landed is undone by the undo log; nbdinfo's map
// is parsed into a dirty set.

import Foundation
import RDMAPaxos
import Testing
@testable import VMReplica

@Suite struct DiskSyncTests {
    static let blocks = 1024

    /// Equal images, then: blocks 10–19 written by both (10–14 to the same bytes, 15–19 not),
    /// 700 only by the primary, 500 and 501 only by the backup (its guest's own noise).
    static func diverged() throws -> (GuestMemory, GuestMemory, DirtyBitmap, DirtyBitmap) {
        let p = try GuestMemory(pageCount: blocks)
        let b = try GuestMemory(pageCount: blocks)
        var rng = SeededRandom(seed: 19)
        for i in 0..<blocks { p.randomize(page: i, &rng); b.copyPage(i, from: p) }
        for i in 10..<20 {
            p.randomize(page: i, &rng)
            if i < 15 { b.copyPage(i, from: p) } else { b.randomize(page: i, &rng) }
        }
        p.randomize(page: 700, &rng)
        b.randomize(page: 500, &rng)
        b.randomize(page: 501, &rng)
        return (p, b, DirtyBitmap(pageCount: blocks, pages: Array(10..<20) + [700]), DirtyBitmap(pageCount: blocks, pages: Array(10..<20) + [500, 501]))
    }

    /// Runs both sides over an in-memory link through the block-frame adapters.
    static func sync(_ p: GuestMemory, _ b: GuestMemory, _ pd: DirtyBitmap, _ bd: DirtyBitmap, undo: PageUndoLog? = nil,
                     cutAfterBlocks: Bool = false) async -> (Result<SyncResult, any Error>, Result<SyncResult, any Error>, Int) {
        let (pc, bc) = InMemorySyncChannel.pair(backupMemory: try! GuestMemory(pageCount: 1))
        let sender = BlockSendingChannel(pc)
        let primarySide: any SyncChannel = cutAfterBlocks ? CutAfterWrites(sender) : sender
        let lander = BlockLandingChannel(bc, landingIn: b)
        let primary = SyncPrimary(memory: p, pool: PageHashPool(threadCount: 2))
        let backup = SyncBackup(memory: b, pool: PageHashPool(threadCount: 2), state: MemorySyncStateStore(), undo: undo)
        async let bs = outcome { try await backup.run(dirty: bd, over: lander, expectedSession: 5) }
        let pr = await outcome { try await primary.run(dirty: pd, over: primarySide, session: 5) }
        return (pr, await bs, sender.blockFrameBytes)
    }

    @Test func divergentBlocksOfTheUnionMakeTheImagesEqual() async throws {
        let (p, b, pd, bd) = try Self.diverged()
        let (pr, br, bytes) = await Self.sync(p, b, pd, bd)
        let stats = try pr.get().stats
        _ = try br.get()
        #expect(b.isIdentical(to: p))
        #expect(stats.unionPages == 13)
        // 15–19, 500, 501, 700; the blocks written alike by both are not sent.
        #expect(stats.divergentPages == 8)
        #expect(bytes == BlockFrames.headerBytes + 8 * (4096 + 4))
    }

    /// The broken variant: the backup's own dirty blocks left out of the union.
    @Test func withoutTheBackupsDirtyBlocksTheImagesStayDifferent() async throws {
        let (p, b, pd, _) = try Self.diverged()
        let (pr, _, _) = await Self.sync(p, b, pd, DirtyBitmap(pageCount: Self.blocks))
        _ = try pr.get()
        #expect(!b.isIdentical(to: p))
        #expect(!b.pageEquals(500, p) && !b.pageEquals(501, p))
    }

    @Test func aSyncCutOffAfterBlocksLandedIsUndone() async throws {
        let (p, b, pd, bd) = try Self.diverged()
        let before = try GuestMemory(pageCount: Self.blocks)
        for i in 0..<Self.blocks { before.copyPage(i, from: b) }
        let undo = PageUndoLog()
        let (pr, br, _) = await Self.sync(p, b, pd, bd, undo: undo, cutAfterBlocks: true)
        #expect(throws: (any Error).self) { try pr.get() }
        #expect(throws: (any Error).self) { try br.get() }
        #expect(!b.isIdentical(to: before), "no block landed before the cut: the test proves nothing")
        #expect(undo.restore(into: b) == 13)
        #expect(b.isIdentical(to: before))
    }

    @Test func aBlockFrameOutsideTheImageOrOfAnotherSizeIsRefused() throws {
        let small = try GuestMemory(pageCount: 4)
        let big = try GuestMemory(pageCount: 8)
        let frame = BlockFrames.encode([6], from: big)
        #expect(throws: SyncChannelError.pageOutOfRange(page: 6, pageCount: 4)) { try BlockFrames.land(frame, into: small) }
        #expect(throws: (any Error).self) { try BlockFrames.land(Array(frame.dropLast()), into: big) }
        let other = try GuestMemory(pageCount: 8, pageSize: 8192)
        #expect(throws: SyncChannelError.pageSizeMismatch(local: 4096, remote: 8192)) { try BlockFrames.land(frame, into: other) }
    }

    @Test func nbdinfoMapLinesBecomeDirtyBlocks() throws {
        let map = """
                     0       65536    0  clean
                 65536        4096    1  dirty
                 69632       61440    0  clean
                131072      131072    1  dirty

            """
        let d = try DiskDirtyLog.parseMap(map, blockSize: 4096, blockCount: 64)
        #expect(d.pageIndices == [16] + (32..<64).map(UInt32.init))
        #expect(throws: DiskDirtyLogError.self) { try DiskDirtyLog.parseMap("0 4096 1 dirty\n8192 4096 0 clean\n", blockSize: 4096, blockCount: 3) }
        #expect(throws: DiskDirtyLogError.self) { try DiskDirtyLog.parseMap("0 4096 1 dirty\n", blockSize: 4096, blockCount: 2) }
    }
}

/// A primary's channel that drops the link right after its block writes, before the commit.
final class CutAfterWrites: SyncChannel {
    let inner: any SyncChannel
    init(_ inner: any SyncChannel) { self.inner = inner }
    func send(_ frame: [UInt8]) async throws { try await inner.send(frame) }
    func receive() async throws -> [UInt8] { try await inner.receive() }
    func writePages(_ pages: ArraySlice<UInt32>, from memory: GuestMemory) async throws {
        try await inner.writePages(pages, from: memory)
        // Let the backup land the frame before the link goes.
        try await Task.sleep(for: .milliseconds(50))
        inner.close()
    }
    func close() { inner.close() }
}
