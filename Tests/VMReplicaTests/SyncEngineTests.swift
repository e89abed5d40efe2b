// End-to-end behaviour of one sync between two in-process images.

import Testing
@testable import VMReplica

// The time limit turns a protocol deadlock into a failure instead of a hung run.
@Suite(.timeLimit(.minutes(1))) struct SyncEngineTests {
    /// Five seeds in memory, two over each fabric (the fabric runs cost more in a debug build).
    @Test(arguments: SyncTransport.allCases.flatMap { t in (t == .inMemory ? 1...5 : 1...2).map { (t, UInt64($0)) } })
    func imagesAreByteIdenticalAfterSync(over transport: SyncTransport, seed: UInt64) async throws {
        let pair = try DivergedPair(pageCount: 1500, seed: seed)
        #expect(!pair.primary.isIdentical(to: pair.backup), "seed \(seed) produced no divergence")
        let state = MemorySyncStateStore()
        let run = await runSync(primary: pair.primary, primaryDirty: pair.primaryDirty,
                                backup: pair.backup, backupDirty: pair.backupDirty, state: state, over: transport)
        let p = try run.primary.get()
        let b = try run.backup.get()
        #expect(pair.primary.isIdentical(to: pair.backup), "seed \(seed)")
        #expect(p.divergent == pair.divergent, "seed \(seed)")
        #expect(b.divergent == pair.divergent, "seed \(seed)")
        #expect(state.load() == .inSync(session: 7))
        #expect(b.stats.verified)
    }

    /// Wire bytes are exactly the divergent pages plus the frames the format defines.
    @Test(arguments: [(11 as UInt64, 0.02), (12, 0.2), (13, 0.9)], [1, 7, SyncWire.hashesPerFrameMax])
    func bytesOnTheWireAreDivergentPagesPlusExactOverhead(scenario: (UInt64, Double), hashesPerFrame: Int) async throws {
        try await checkWireBytes(seed: scenario.0, dirtyFraction: scenario.1, hashesPerFrame: hashesPerFrame, over: .inMemory)
    }

    /// The same accounting over a fabric: frames in the mailbox rings, pages as one-sided WRITEs.
    @Test(arguments: SyncTransport.fabrics,
          [(11 as UInt64, 0.02, 1), (12, 0.2, 7), (13, 0.9, SyncWire.hashesPerFrameMax)])
    func bytesOverAFabricAreDivergentPagesPlusExactFramesPlusRecordOverhead(
        over transport: SyncTransport, scenario: (UInt64, Double, Int)
    ) async throws {
        try await checkWireBytes(seed: scenario.0, dirtyFraction: scenario.1, hashesPerFrame: scenario.2, over: transport)
    }

    private func checkWireBytes(seed: UInt64, dirtyFraction fraction: Double, hashesPerFrame: Int,
                                over transport: SyncTransport) async throws {
        let pages = 1000
        let pair = try DivergedPair(pageCount: pages, seed: seed, dirtyFraction: fraction)
        let run = await runSync(primary: pair.primary, primaryDirty: pair.primaryDirty,
                                backup: pair.backup, backupDirty: pair.backupDirty,
                                options: SyncOptions(batchPagesMax: 16, hashesPerFrameMax: hashesPerFrame), over: transport)
        let stats = try run.primary.get().stats
        let union = pair.primaryDirty.union(pair.backupDirty).count
        let divergent = pair.divergent.count
        let header = 20
        let toBackup = (header + 24)                                                     // hello
            + (header + expectedBitmapBytes(pageCount: pages, set: pair.primaryDirty.count))
            + (header + 8 + expectedBitmapBytes(pageCount: pages, set: divergent))     // commit
        let hashFrames = (union + hashesPerFrame - 1) / hashesPerFrame
        let toPrimary = (header + 16)                                                    // hello reply
            + (header + expectedBitmapBytes(pageCount: pages, set: pair.backupDirty.count))
            + hashFrames * (header + 8) + union * 8
            + (header + 4)                                                               // commit reply
        #expect(run.counters.controlBytesToBackup == toBackup)
        #expect(run.counters.controlBytesToPrimary == toPrimary)
        #expect(run.counters.pageBytesWritten == divergent * 4096)
        #expect(stats.pageBytesSent == divergent * 4096)
        #expect(stats.controlBytesSent == toBackup && stats.controlBytesReceived == toPrimary)
        #expect(stats.wireBytes == run.counters.totalBytes)
        #expect(stats.unionPages == union && stats.divergentPages == divergent)
        #expect(stats.primaryDirtyPages == pair.primaryDirty.count && stats.backupDirtyPages == pair.backupDirty.count)
        if let (p, b) = run.fabric {
            // Pages crossed only as one-sided WRITEs (contiguous ones coalesced), each batch closed by
            // one "pages done" record that the backup counted; frames crossed only as ring records.
            let batches = (divergent + 15) / 16
            #expect(p.pagesWritten == divergent && b.pagesLanded == divergent)
            #expect(p.pageWrites <= divergent && (divergent == 0 || p.pageWrites >= batches))
            #expect(b.framesSent == run.counters.framesToPrimary && b.controlBytesSent == toPrimary)
            #expect(b.framesReceived == run.counters.framesToBackup && b.controlBytesReceived == toBackup)
            #expect(b.pageBytesWritten == 0)
            // Record overhead: a 32-byte header per record, 16 more bytes per "pages done".
            #expect(p.recordOverheadBytes == 32 * p.recordsPosted + 16 * batches)
            #expect(b.recordOverheadBytes == 32 * b.recordsPosted)
            #expect(p.recordsPosted >= run.counters.framesToBackup + batches)
            #expect(p.postedBytes == toBackup + divergent * 4096 + p.recordOverheadBytes + p.cellBytes)
        }
    }

    @Test(arguments: SyncTransport.allCases)
    func syncWithNothingDirtySendsNoPagesAndClaimsSync(over transport: SyncTransport) async throws {
        let a = try GuestMemory(pageCount: 100)
        let b = try backupMemory(pageCount: 100)
        let state = MemorySyncStateStore()
        let none = DirtyBitmap(pageCount: 100)
        let run = await runSync(primary: a, primaryDirty: none, backup: b, backupDirty: none, state: state, over: transport)
        let stats = try run.primary.get().stats
        #expect(stats.unionPages == 0 && stats.divergentPages == 0)
        #expect(run.counters.pageBytesWritten == 0)
        #expect(run.counters.framesToPrimary == 3)  // hello reply, bitmap, commit reply: no hash frame
        #expect(state.load().isInSync)
    }

    /// A first sync marks everything dirty and copies exactly the differing pages.
    @Test(arguments: SyncTransport.allCases)
    func fullSyncOfAllPagesCopiesOnlyDifferences(over transport: SyncTransport) async throws {
        var rng = SeededRandom(seed: 99)
        let a = try GuestMemory(pageCount: 300)
        let b = try backupMemory(pageCount: 300)
        for p in 0..<300 { a.randomize(page: p, &rng); if p % 3 == 0 { b.copyPage(p, from: a) } }
        let all = DirtyBitmap.all(pageCount: 300)
        let run = await runSync(primary: a, primaryDirty: all, backup: b, backupDirty: all, over: transport)
        #expect(try run.primary.get().stats.divergentPages == 200)
        #expect(a.isIdentical(to: b))
    }

    @Test(arguments: SyncTransport.allCases)
    func differentRAMSizesFailWithBothGeometriesNamed(over transport: SyncTransport) async throws {
        let a = try GuestMemory(pageCount: 64)
        let b = try backupMemory(pageCount: 65)
        let state = MemorySyncStateStore(.inSync(session: 1))
        let run = await runSync(primary: a, primaryDirty: .all(pageCount: 64), backup: b,
                                backupDirty: .all(pageCount: 65), state: state, over: transport)
        let expected = SyncError.geometryMismatch(primary: SyncGeometry(pageSize: 4096, pageCount: 64),
                                                  backup: SyncGeometry(pageSize: 4096, pageCount: 65))
        #expect(run.primary.error as? SyncError == expected)
        #expect(run.backup.error as? SyncError == expected)
        #expect(!state.load().isInSync)
        #expect("\(expected)".contains("64 pages") && "\(expected)".contains("65 pages"))
    }

    @Test func differentPageSizesFail() async throws {
        let a = try GuestMemory(pageCount: 64, pageSize: 4096)
        let b = try GuestMemory(pageCount: 32, pageSize: 8192)
        let run = await runSync(primary: a, primaryDirty: .all(pageCount: 64), backup: b,
                                backupDirty: .all(pageCount: 32))
        guard case .geometryMismatch? = run.primary.error as? SyncError else {
            Issue.record("primary did not report a geometry mismatch: \(String(describing: run.primary.error))")
            return
        }
        #expect(run.backup.error is SyncError)
    }

    @Test func localDirtyBitmapOfWrongSizeIsRejected() async throws {
        let a = try GuestMemory(pageCount: 64)
        let b = try GuestMemory(pageCount: 64)
        let run = await runSync(primary: a, primaryDirty: DirtyBitmap(pageCount: 63), backup: b,
                                backupDirty: DirtyBitmap(pageCount: 64))
        #expect(run.primary.error as? SyncError == .dirtyBitmapMismatch(pages: 63, expected: 64))
        #expect(run.backup.error != nil)  // the primary closes the link instead of leaving it waiting
    }

    @Test func readOnlyBackupIsRefused() async throws {
        let dir = try TempDir()
        let path = try dir.file("ram", bytes: 8 * 4096)
        let a = try GuestMemory(pageCount: 8)
        let b = try GuestMemory(mappingFile: path, writable: false)
        let run = await runSync(primary: a, primaryDirty: .all(pageCount: 8), backup: b, backupDirty: .all(pageCount: 8))
        #expect(run.backup.error as? SyncError == .backupNotWritable(path: path))
        #expect(run.primary.error != nil)
    }

    /// The transfer is cut after `cut` pages have landed: the backup must not claim sync, in
    /// memory or in its state file, even though it claimed sync before this session.
    @Test(arguments: SyncTransport.allCases, [0, 1, 50])
    func transferCutOffMidwayLeavesBackupNotInSync(over transport: SyncTransport, cut: Int) async throws {
        let pair = try DivergedPair(pageCount: 800, seed: 21, dirtyFraction: 0.5)
        #expect(pair.divergent.count > 100)
        let dir = try TempDir()
        let state = FileSyncStateStore(path: dir.path + "/sync-state")
        try state.store(.inSync(session: 3))
        let run = await runSync(primary: pair.primary, primaryDirty: pair.primaryDirty, backup: pair.backup,
                                backupDirty: pair.backupDirty, state: state,
                                options: SyncOptions(batchPagesMax: 8), faults: .init(cutAfterPages: cut), over: transport)
        #expect(run.primary.error as? SyncChannelError == .closed)
        #expect(run.backup.error as? SyncChannelError == .closed)
        #expect(run.counters.pagesWritten == cut)
        if let (_, b) = run.fabric { #expect(b.pagesLanded <= cut) }
        #expect(!pair.primary.isIdentical(to: pair.backup))
        #expect(!FileSyncStateStore(path: state.path).load().isInSync)
    }

    /// Cutting the link after every possible number of control frames: whenever the backup
    /// says "in sync", its image really is identical; before the commit it never says so.
    @Test(arguments: SyncTransport.allCases)
    func noCutPointLeavesAFalseInSyncClaim(over transport: SyncTransport) async throws {
        let options = SyncOptions(hashesPerFrameMax: 50)
        let probe = try DivergedPair(pageCount: 400, seed: 31)
        let full = await runSync(primary: probe.primary, primaryDirty: probe.primaryDirty, backup: probe.backup,
                                 backupDirty: probe.backupDirty, options: options, over: transport)
        let frames = full.counters.framesToBackup + full.counters.framesToPrimary
        #expect(frames > 6)
        for cut in 0..<frames {
            let pair = try DivergedPair(pageCount: 400, seed: 31)
            let state = MemorySyncStateStore()
            let run = await runSync(primary: pair.primary, primaryDirty: pair.primaryDirty, backup: pair.backup,
                                    backupDirty: pair.backupDirty, state: state, options: options,
                                    faults: .init(cutAfterFrames: cut), over: transport)
            #expect(run.primary.error != nil, "cut after \(cut) frames")
            if state.load().isInSync {
                #expect(state.load() == .inSync(session: 7))
                #expect(cut == frames - 1, "claimed sync before the commit, cut after \(cut) frames")
                #expect(pair.primary.isIdentical(to: pair.backup), "claimed sync with different images, cut \(cut)")
            }
        }
    }

    /// The commit took but the backup's reply to it is lost (the link goes down on the last
    /// frame): the primary fails, so the backup must not claim sync either, and the pages it
    /// saved before the primary could write (its `undo` log) put it back exactly as it was.
    @Test func lostCommitReplyLeavesNotInSyncAndTheUndoLogRestoresTheBackup() async throws {
        let probe = try DivergedPair(pageCount: 300, seed: 51)
        let full = await runSync(primary: probe.primary, primaryDirty: probe.primaryDirty, backup: probe.backup, backupDirty: probe.backupDirty)
        let frames = full.counters.framesToBackup + full.counters.framesToPrimary
        let pair = try DivergedPair(pageCount: 300, seed: 51)
        let original = try DivergedPair(pageCount: 300, seed: 51).backup
        let (pc, bc) = InMemorySyncChannel.pair(backupMemory: pair.backup, faults: .init(cutAfterFrames: frames - 1))
        let state = MemorySyncStateStore()
        let undo = PageUndoLog()
        let p = SyncPrimary(memory: pair.primary, pool: PageHashPool(threadCount: 1))
        let b = SyncBackup(memory: pair.backup, pool: PageHashPool(threadCount: 1), state: state, undo: undo)
        async let backupSide = outcome { try await b.run(dirty: pair.backupDirty, over: bc) }
        let pe = await outcome { try await p.run(dirty: pair.primaryDirty, over: pc, session: 8) }.error
        let be = await backupSide.error
        #expect(pe != nil && be as? SyncChannelError == .closed)
        // Every divergent page landed before the commit: the reply alone was lost.
        #expect(pair.primary.isIdentical(to: pair.backup))
        #expect(state.load() == .notInSync(reason: "sync session 8 committed but its reply was not delivered"))
        #expect(undo.restore(into: pair.backup) == pair.primaryDirty.union(pair.backupDirty).count)
        #expect(pair.backup.isIdentical(to: original))
    }

    @Test func pageCorruptedInTransferFailsVerifyAndStaysNotInSync() async throws {
        let pair = try DivergedPair(pageCount: 200, seed: 41)
        let (pc, bc) = InMemorySyncChannel.pair(backupMemory: pair.backup)
        let corrupting = CorruptingChannel(inner: pc, backup: pair.backup)
        let state = MemorySyncStateStore()
        let p = SyncPrimary(memory: pair.primary, pool: PageHashPool(threadCount: 1))
        let b = SyncBackup(memory: pair.backup, pool: PageHashPool(threadCount: 1), state: state)
        async let backupSide = outcome { try await b.run(dirty: pair.backupDirty, over: bc) }
        let pe = await outcome { try await p.run(dirty: pair.primaryDirty, over: corrupting, session: 9) }.error
        let be = await backupSide.error
        #expect(pe as? SyncError == .verifyFailed(session: 9))
        #expect(be as? SyncError == .verifyFailed(session: 9))
        #expect(state.load() == .notInSync(reason: "sync session 9 started and did not finish"))
    }
}

/// Lands every batch, then flips a byte of the first page written: a transfer that lies.
struct CorruptingChannel: SyncChannel {
    let inner: InMemorySyncChannel
    let backup: GuestMemory
    func send(_ frame: [UInt8]) async throws { try await inner.send(frame) }
    func receive() async throws -> [UInt8] { try await inner.receive() }
    func close() { inner.close() }
    func writePages(_ pages: ArraySlice<UInt32>, from memory: GuestMemory) async throws {
        try await inner.writePages(pages, from: memory)
        if let first = pages.first {
            backup.withMutablePage(Int(first)) { $0[0] ^= 0xFF }
        }
    }
}
