import Foundation
import Testing
import VerbsTestSupport
@testable import RDMAPaxos

/// RLIMIT_MEMLOCK against what verbs pins. The tests run as root, whose CAP_IPC_LOCK lifts the
/// real limit, so the software device enforces one it is given (`memlockLimitBytes`), and the
/// doctor's check runs in a child without the capability (DoctorCommandTests).
@Suite(.timeLimit(.minutes(1))) struct MemlockTests {
    @Test func theCapabilityIsReadFromTheEffectiveSet() {
        #expect(MemlockLimit.hasIPCLock(status: "Name:\tx\nCapInh:\t0000000000000000\nCapEff:\t0000000000004000\n"))
        #expect(!MemlockLimit.hasIPCLock(status: "CapPrm:\t0000000000004000\nCapEff:\t000001fffeffbfff\n"))
        #expect(!MemlockLimit.hasIPCLock(status: "CapEff:\tnot hex\n") && !MemlockLimit.hasIPCLock(status: ""))
    }

    @Test func aLimitAllowsWhatFitsUnlessTheCapabilityLiftsIt() {
        let eight = MemlockLimit(bytes: 8 << 20, capabilityBypasses: false)
        #expect(eight.allows(8 << 20) && !eight.allows((8 << 20) + 1) && !eight.allows(4096, pinned: 8 << 20))
        #expect(MemlockLimit(bytes: 8 << 20, capabilityBypasses: true).allows(1 << 40))
        #expect(MemlockLimit(bytes: nil, capabilityBypasses: false).allows(1 << 40))
        #expect(eight.description == "8.0 MiB (RLIMIT_MEMLOCK)")
        #expect(MemlockLimit.format(65536) == "64.0 KiB" && MemlockLimit.format(100) == "100 B")
    }

    /// A 3-member replica with the defaults: its receive region (2 rings of 1 MiB) and a 32 MiB
    /// staging buffer for each of the 2 queue pairs it sends on.
    @Test func aReplicaPinsItsRegionAndOneStagingBufferPerPeer() throws {
        let budget = try VerbsMemoryBudget.replica(members: [1, 2, 3], ringBytes: 1 << 20,
                                                   configuration: .init(clusterKey: testClusterKey, members: [1, 2, 3]))
        #expect(budget.regionBytes == UInt64(try RingLayout(owner: 1, cluster: [1, 2, 3], ringBytes: 1 << 20).regionBytes))
        #expect(budget.sendingQueuePairs == 2 && budget.stagingBytesPerQueuePair == 32 << 20)
        #expect(budget.totalBytes == VerbsMemoryBudget.pages(budget.regionBytes) + 64 << 20)
        let (ok, line) = budget.check(against: MemlockLimit(bytes: 8 << 20, capabilityBypasses: false))
        #expect(!ok && line.contains("more than the memlock limit 8.0 MiB (RLIMIT_MEMLOCK)") && line.contains("ulimit -l unlimited"))
        #expect(budget.check(against: MemlockLimit(bytes: 1 << 30, capabilityBypasses: false)).ok)
    }

    func limitedFabric(_ node: NodeID, limit: UInt64, world: FabricWorld) throws -> VerbsFabric {
        var driver = try world.softVerbs()
        driver.memlockLimitBytes = limit
        return try VerbsFabric(node: node, configuration: .init(clusterKey: testClusterKey, members: [1, 2, 3]), driver: driver)
    }

    /// A registration past the limit fails saying what the limit is, what is pinned, and how to
    /// raise it; within it, it works.
    @Test func aRegistrationPastTheLimitSaysHowToRaiseIt() throws {
        let fabric = try limitedFabric(1, limit: 1 << 20, world: FabricWorld(.verbs))
        defer { fabric.close() }
        _ = try fabric.registerRegion(lengthBytes: 512 << 10)
        do {
            _ = try fabric.registerRegion(lengthBytes: 1 << 20)
            Issue.record("1.5 MiB registered under a 1 MiB limit")
        } catch {
            let text = "\(error)"
            #expect(text.contains("cannot register 1.0 MiB with soft_ib (ibv_reg_mr: errno ENOMEM"), "\(text)")
            #expect(text.contains("this process may pin 1.0 MiB (RLIMIT_MEMLOCK) and has 512.0 KiB pinned already"), "\(text)")
            #expect(text.contains("ulimit -l unlimited") && text.contains("LimitMEMLOCK=infinity"), "\(text)")
        }
    }

    /// A node checks before it starts (`ReplicaServer` does this with the system's limit), and a
    /// ring transport that cannot register its region fails with the same advice.
    @Test func aNodeThatCannotPinItsRingsAndStagingFailsWithTheAdvice() async throws {
        let world = FabricWorld(.verbs)
        let fabric = try limitedFabric(1, limit: 8 << 20, world: world)
        defer { fabric.close() }
        let budget = try VerbsMemoryBudget.replica(members: [1, 2, 3], ringBytes: 1 << 20, configuration: fabric.configuration)
        #expect(throws: VerbsError.self) { try fabric.checkMemlock(budget) }
        do {
            try fabric.checkMemlock(budget)
        } catch {
            #expect(error.message.hasPrefix("the verbs fabric of node 1 pins "), "\(error)")
            #expect(error.message.contains("more than the memlock limit 8.0 MiB") && error.message.contains("ulimit -l unlimited"))
        }
        let tiny = try limitedFabric(2, limit: 64 << 10, world: world)
        defer { tiny.close() }
        do {
            _ = try await RingTransport.open(fabric: tiny, configuration: .init(listenAddress: PeerAddress(node: 2, host: "127.0.0.1", port: 0),
                                                                               cluster: [1, 2, 3]))
            Issue.record("rings of 2 MiB registered under a 64 KiB limit")
        } catch {
            #expect("\(error)".contains("ulimit -l unlimited"), "\(error)")
        }
    }

    /// Only the queue pairs a node sends on stage: accepting one pins nothing more.
    @Test func anInboundQueuePairPinsNoStaging() async throws {
        let world = FabricWorld(.verbs)
        let config = VerbsFabric.Configuration(clusterKey: testClusterKey, members: [1, 2], outstandingWritesMax: 16, slotBytesMax: 4096)
        let a = try VerbsFabric(node: 1, configuration: config, driver: try world.softVerbs())
        let b = try VerbsFabric(node: 2, configuration: config, driver: try world.softVerbs())
        defer { a.close(); b.close() }
        let address = try await b.listen(at: world.listenAddress(2), exporting: try b.registerRegion(lengthBytes: 4096))
        let regionA = try a.registerRegion(lengthBytes: 4096)
        let qp = try await a.connect(to: address, exporting: regionA)
        defer { qp.moveToError() }
        #expect(a.device.pinnedBytes.withLock { $0 } == 4096 + 16 * 4096)
        #expect(b.device.pinnedBytes.withLock { $0 } == 4096)
    }
}
