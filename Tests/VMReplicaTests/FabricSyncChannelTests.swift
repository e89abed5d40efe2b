// `FabricSyncChannel` on its own: where page batches land, how control frames cross the bounded
// rings, and how either end learns that the link is gone. The sync suites run over it as well.

import RDMAPaxos
import Synchronization
import Testing
@testable import VMReplica

@Suite(.timeLimit(.minutes(1))) struct FabricSyncChannelTests {
    static let fabrics = SyncTransport.fabrics

    @Test(arguments: fabrics)
    func pageBatchesLandInTheBackupsOwnGuestMemoryAtTheirOffsets(over transport: SyncTransport) async throws {
        var rng = SeededRandom(seed: 5)
        let primary = try GuestMemory(pageCount: 32)
        for p in 0..<32 { primary.randomize(page: p, &rng) }
        let backup = try backupMemory(pageCount: 32)
        let link = try await FabricLink.make(transport, backup: backup)
        defer { link.close() }

        try await link.primary.writePages([3, 4, 5, 9, 31], from: primary)
        try await link.primary.send([1, 2, 3])
        // The frame sent after the batch arrives after it: the pages are in the backup's memory.
        #expect(try await link.backup.receive() == [1, 2, 3])
        for p in 0..<32 {
            let written = [3, 4, 5, 9, 31].contains(p)
            #expect(backup.pageEquals(p, primary) == written, "page \(p)")
            if !written { #expect(backup.page(p).allSatisfy { $0 == 0 }, "page \(p) untouched") }
        }
        let p = link.primary.counters, b = link.backup.counters
        #expect(p.pagesWritten == 5 && p.pageBytesWritten == 5 * 4096)
        #expect(p.pageWrites == 3)  // 3–5 coalesced, 9, 31
        #expect(b.pagesLanded == 5)
    }

    @Test(arguments: fabrics)
    func framesLargerThanTheRingArriveWholeAndInOrderBothWays(over transport: SyncTransport) async throws {
        let link = try await FabricLink.make(transport, backup: try backupMemory(pageCount: 4))
        defer { link.close() }
        // The test ring is 4 KiB: a record carries at most 2 KiB, so these are cut into pieces that
        // wrap the ring many times and wait for credit.
        let sizes = [1, 2015, 2016, 2017, 4096, 70_001, 5, 200_000]
        @Sendable func frame(_ i: Int, _ n: Int) -> [UInt8] { (0..<n).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ i) } }
        @Sendable func sendAll(_ channel: FabricSyncChannel, first: Int) async throws {
            for (i, n) in sizes.enumerated() { try await channel.send(frame(i + first, n)) }
        }
        async let toPrimary: Void = sendAll(link.backup, first: 100)
        try await sendAll(link.primary, first: 0)
        for (i, n) in sizes.enumerated() { #expect(try await link.backup.receive() == frame(i, n), "frame \(i)") }
        for (i, n) in sizes.enumerated() { #expect(try await link.primary.receive() == frame(i + 100, n), "frame \(i)") }
        _ = try await toPrimary
        let p = link.primary.counters
        #expect(p.framesSent == sizes.count && p.controlBytesSent == sizes.reduce(0, +))
        #expect(p.recordsPosted > 100)
    }

    @Test(arguments: fabrics)
    func theBackupsOutputDigestsAreTakenAsideAndTheSessionsFramesStillArriveInOrder(over transport: SyncTransport) async throws {
        let taken = Mutex<[[UInt8]]>([])
        let divert = FabricSyncChannel.Divert(selects: SyncFrame.isOutputDigests) { fs in taken.withLock { $0 += fs } }
        let link = try await FabricLink.make(transport, backup: try backupMemory(pageCount: 4), divert: divert)
        defer { link.close() }
        let digests = SyncFrame(session: 0, .outputDigests(generation: 3, digests: [OutputDigest(kind: .other, stream: 0, content: 9)])).encoded()
        let reply = SyncFrame(session: 5, .commitReply(.inSync)).encoded()
        for f in [[0xEE, 1], digests, reply, digests] { try await link.backup.send(f) }
        #expect(try await link.primary.receive() == [0xEE, 1])
        #expect(try await link.primary.receive() == reply)
        // The second digests frame landed with or after the reply; give the receiving thread a scan.
        for _ in 0..<200 where taken.withLock({ $0.count }) < 2 { try await Task.sleep(for: .milliseconds(5)) }
        #expect(taken.withLock { $0 } == [digests, digests])
    }

    @Test(arguments: fabrics)
    func closingOneEndFailsTheOthersReceiveAfterDeliveringWhatWasSent(over transport: SyncTransport) async throws {
        let link = try await FabricLink.make(transport, backup: try backupMemory(pageCount: 4))
        defer { link.close() }
        try await link.backup.send([7])
        link.backup.close()
        #expect(try await link.primary.receive() == [7])
        await #expect(throws: SyncChannelError.closed) { try await link.primary.receive() }
        await #expect(throws: SyncChannelError.closed) { try await link.primary.send([8]) }
    }

    @Test(arguments: fabrics)
    func aCutLinkIsNoticedByTheWaitingPeer(over transport: SyncTransport) async throws {
        var configuration = testFabricConfiguration
        configuration.faults = .init(cutAfterFrames: 1)
        let link = try await FabricLink.make(transport, backup: try backupMemory(pageCount: 4), configuration: configuration)
        defer { link.close() }
        try await link.primary.send([1])
        #expect(try await link.backup.receive() == [1])
        // The second frame cuts the link without a goodbye; the backup finds out on its own.
        await #expect(throws: SyncChannelError.closed) { try await link.primary.send([2]) }
        await #expect(throws: SyncChannelError.closed) { try await link.backup.receive() }
    }

    @Test func backupEndpointNeedsWritableMemoryWithRoomForTheMailbox() async throws {
        let fabric = MemoryFabric(node: 2, network: MemoryNetwork())
        defer { fabric.close() }
        let tooSmall = try GuestMemory(pageCount: 4, trailingBytes: 100)
        await #expect(throws: FabricSyncChannelError.noMailboxRoom(trailingBytes: 100, needed: testFabricConfiguration.mailboxBytes)) {
            _ = try await FabricSyncChannel.Endpoint.backup(memory: tooSmall, fabric: fabric, listenAt: PeerAddress(node: 2),
                                                           configuration: testFabricConfiguration)
        }
        let dir = try TempDir()
        let path = try dir.file("ram", bytes: 4 * 4096)
        let readOnly = try GuestMemory(mappingFile: path, writable: false, trailingBytes: testFabricConfiguration.mailboxBytes)
        await #expect(throws: SyncError.backupNotWritable(path: path)) {
            _ = try await FabricSyncChannel.Endpoint.backup(memory: readOnly, fabric: fabric, listenAt: PeerAddress(node: 2),
                                                           configuration: testFabricConfiguration)
        }
    }

    @Test(arguments: fabrics)
    func differentRingSizesAreRefusedAtConnect(over transport: SyncTransport) async throws {
        var bigger = testFabricConfiguration
        bigger.ringBytes = 8192
        let memory = try GuestMemory(pageCount: 4, trailingBytes: bigger.mailboxBytes)
        await #expect(throws: FabricSyncChannelError.self) {
            let link = try await FabricLink.make(transport, backup: memory, backupConfiguration: bigger)
            link.close()
        }
    }

    @Test(arguments: fabrics)
    func syncOverAFileBackedBackupWritesTheFile(over transport: SyncTransport) async throws {
        let dir = try TempDir()
        let path = try dir.file("ram", bytes: 64 * 4096)
        var rng = SeededRandom(seed: 8)
        let primary = try GuestMemory(pageCount: 64)
        for p in 0..<64 { primary.randomize(page: p, &rng) }
        let backup = try GuestMemory(mappingFile: path, writable: true, trailingBytes: testFabricConfiguration.mailboxBytes)
        let run = await runSync(primary: primary, primaryDirty: .all(pageCount: 64), backup: backup,
                                backupDirty: .all(pageCount: 64), over: transport)
        #expect(try run.backup.get().divergent.count == 64)
        let reread = try GuestMemory(mappingFile: path, writable: false)
        #expect(reread.isIdentical(to: primary))
    }
}
