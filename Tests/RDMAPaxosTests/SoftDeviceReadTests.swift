import Foundation
import Testing
import VerbsTestSupport
@testable import RDMAPaxos

/// The software device reads a WRITE's source bytes when it sends the packets, not when the work
/// request is posted — as a NIC reads them by DMA — so a sender that reuses a send buffer before
/// its completion is caught here rather than on the first RDMA machine.
@Suite(.timeLimit(.minutes(1))) struct SoftDeviceReadTests {
    /// 64 writes of distinct bytes into distinct places, read by the device up to 2 ms after their
    /// posts. `VerbsQueuePair` stages each in a slot of its own until it completes, so all land
    /// as written; the planted bug — 4 slots for 64 outstanding writes, each reused while the
    /// device has yet to read it — lands other writes' bytes, and the check sees them.
    @Test(arguments: [64, 4])
    func stagingSlotsReusedBeforeTheirCompletionSendTheWrongBytes(stagingSlots: Int) async throws {
        let world = FabricWorld(.verbs)
        let driver = try world.softVerbs(readDelayMicroseconds: 2000)
        let config = VerbsFabric.Configuration(clusterKey: testClusterKey, connection: .outOfBand, members: [1, 2])
        let a = try VerbsFabric(node: 1, configuration: config, driver: driver)
        let b = try VerbsFabric(node: 2, configuration: config, driver: driver)
        defer { a.close(); b.close() }
        let writes = 64, bytes = 64
        let regionA = try a.registerRegion(lengthBytes: 4096)
        let regionB = try b.registerRegion(lengthBytes: writes * bytes)

        let sender = try a.makeQueuePair(peer: 2, inboundFrom: nil, limits: .init(outstandingWritesMax: writes, slotBytesMax: bytes,
                                                                                 stagingSlots: stagingSlots))
        let target = try b.makeQueuePair(peer: 1, inboundFrom: 1)
        try target.connect(to: sender.endpoint, region: regionA.remote)
        try sender.connect(to: target.endpoint, region: regionB.remote)

        func pattern(_ i: Int) -> [UInt8] { [UInt8](repeating: UInt8(i + 1), count: bytes) }
        for i in 0..<writes {
            try sender.postWrite(pattern(i), remoteOffset: i * bytes, key: regionB.key, immediate: nil,
                                 workRequestID: UInt64(i), signaled: i == writes - 1)
        }
        #expect(collect(a.completions, count: 1).map(\.status) == [.success])
        let wrong = (0..<writes).filter { regionB.read(offset: $0 * bytes, count: bytes) != pattern($0) }
        if stagingSlots >= writes {
            #expect(wrong.isEmpty, "writes \(wrong) landed other bytes than were posted")
        } else {
            #expect(!wrong.isEmpty, "every write landed intact although its slot was rewritten before the device read it")
        }
    }
}
