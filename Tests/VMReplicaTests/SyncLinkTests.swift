// The fabric a VM replica's syncvm link runs over: the node's configured one, sized so every write
// the channel posts fits a verbs staging slot.

import RDMAPaxos
import Testing
@testable import VMReplica

@Suite(.timeLimit(.minutes(1))) struct SyncLinkTests {
    static let key = try! ClusterKey(bytes: testClusterKey)

    func node(_ fabricLines: String) throws -> NodeConfig {
        try NodeConfig.parse("""
            id = 1
            data_dir = "d"
            \(fabricLines)
            [[members]]
            id = 1
            address = "127.0.0.1:7001"
            client_address = "127.0.0.1:7101"
            [[members]]
            id = 2
            address = "127.0.0.1:7002"
            client_address = "127.0.0.1:7102"
            """, file: "c.toml")
    }

    @Test func theLinkFollowsTheNodesFabric() throws {
        #expect(SyncLink.kind(of: try node("fabric = \"tcp\"")) == .tcp)
        #expect(SyncLink.kind(of: try node("fabric = \"verbs\"")) == .verbs(.outOfBand))
        #expect(SyncLink.kind(of: try node("fabric = \"verbs\"\nverbs_connect = \"rdma_cm\"")) == .verbs(.connectionManager))
        let auto = SyncLink.kind(of: try node("fabric = \"auto\""))
        #expect(auto == ((try? VerbsProbe.deviceNames()) == nil ? .tcp : .verbs(.outOfBand)))
        #expect(SyncLink.tcp(clusterKey: Self.key).channel.ringBytes == FabricSyncChannel.Configuration().ringBytes)
        #expect(SyncLink.verbs(clusterKey: Self.key, connection: .outOfBand).channel.ringBytes == SyncLink.verbsChannel.ringBytes)
    }

    /// A page batch or a ring record larger than a staging slot would be refused and drop the link.
    @Test(arguments: [SyncLink.verbsChannel, FabricSyncChannel.Configuration(), testFabricConfiguration])
    func everyWriteTheChannelPostsFitsAVerbsStagingSlot(channel: FabricSyncChannel.Configuration) {
        let c = SyncLink.verbsFabricConfiguration(clusterKey: Self.key, connection: .outOfBand, members: [1, 2], channel: channel)
        #expect(c.slotBytesMax >= channel.writeBytesMax && c.slotBytesMax >= channel.ringBytes / 2)
        #expect(c.outstandingWritesMax > 2 * channel.signalEveryWrites)
        #expect(c.clusterKey == testClusterKey && c.connection == .outOfBand)
    }

    @Test func aVerbsBackupPinsItsGuestRAMAndOneStagingBuffer() {
        let backup = SyncLink.verbsMemoryBudget(guestBytes: 256 << 20, backup: true)
        #expect(backup.regionBytes == UInt64((256 << 20) + SyncLink.verbsChannel.mailboxBytes))
        #expect(backup.sendingQueuePairs == 1 && backup.stagingBytesPerQueuePair == 256 * (128 << 10))
        #expect(SyncLink.verbsMemoryBudget(guestBytes: 256 << 20, backup: false).regionBytes == UInt64(SyncLink.verbsChannel.mailboxBytes))
    }

    /// A whole sync with the channel configuration `plover vm` uses over verbs (128 KiB page
    /// writes, 256 KiB rings), on the software device.
    @Test func aSyncWithTheVerbsChannelConfigurationCopiesEveryDivergentPage() async throws {
        var rng = SeededRandom(seed: 21)
        let pages = 512
        let primary = try GuestMemory(pageCount: pages)
        for p in 0..<pages { primary.randomize(page: p, &rng) }
        let backup = try GuestMemory(pageCount: pages, trailingBytes: SyncLink.verbsChannel.mailboxBytes)
        let run = await runSync(primary: primary, primaryDirty: .all(pageCount: pages), backup: backup,
                                backupDirty: .all(pageCount: pages), over: .verbsFabric, channel: SyncLink.verbsChannel)
        #expect(try run.backup.get().divergent.count == pages)
        #expect(backup.isIdentical(to: primary))
        #expect(run.fabric?.primary.pageWrites ?? 0 >= pages * 4096 / SyncLink.verbsChannel.writeBytesMax)
    }
}
