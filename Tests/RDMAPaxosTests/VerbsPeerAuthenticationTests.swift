import Foundation
import Testing
import VerbsTestSupport
@testable import RDMAPaxos

/// The out-of-band connect path over the software RDMA device: a peer that cannot prove the
/// cluster key, or is no member, gets no queue pair on the accepting side and none past INIT on
/// its own, and the acceptor's log names its address, the node it claimed and why.
@Suite(.timeLimit(.minutes(1))) struct VerbsPeerAuthenticationTests {
    /// An acceptor (node 2, members 1…3) with its own ledger and log, and its listening address.
    struct Acceptor {
        let fabric: VerbsFabric
        let ledger: SoftVerbsLedger
        let log: CapturedLog.Lines
        let address: PeerAddress

        static func start(_ world: FabricWorld) async throws -> Acceptor {
            let ledger = SoftVerbsLedger()
            var driver = try world.softVerbs()
            driver.ledger = ledger
            let (logger, log) = CapturedLog.logger()
            let fabric = try VerbsFabric(node: 2, configuration: .init(clusterKey: testClusterKey, connection: .outOfBand, members: [1, 2, 3]),
                                         driver: driver, logger: logger)
            let address = try await fabric.listen(at: world.listenAddress(2), exporting: try fabric.registerRegion(lengthBytes: 4096))
            return Acceptor(fabric: fabric, ledger: ledger, log: log, address: address)
        }
    }

    /// A connector with its own ledger.
    func connector(_ world: FabricWorld, node: NodeID, key: [UInt8], members: Set<NodeID>) throws -> (VerbsFabric, SoftVerbsLedger) {
        let ledger = SoftVerbsLedger()
        var driver = try world.softVerbs()
        driver.ledger = ledger
        return (try VerbsFabric(node: node, configuration: .init(clusterKey: key, connection: .outOfBand, members: members), driver: driver), ledger)
    }

    func connectError(_ fabric: VerbsFabric, to address: PeerAddress) async -> String? {
        do {
            let qp = try await fabric.connect(to: address, exporting: try fabric.registerRegion(lengthBytes: 64))
            qp.moveToError()
            return nil
        } catch {
            return "\(error)"
        }
    }

    @Test func aPeerWithAnotherKeyIsRefusedBeforeAnyQueuePairReachesRTR() async throws {
        let world = FabricWorld(.verbs)
        let acceptor = try await Acceptor.start(world)
        let (intruder, intruderLedger) = try connector(world, node: 1, key: Array("another cluster's key, 32 bytes!".utf8), members: [1, 2, 3])
        defer { acceptor.fabric.close(); intruder.close() }

        let error = try #require(await connectError(intruder, to: acceptor.address), "a peer with another key connected")
        #expect(error.contains("authentication failed (cluster keys differ)"), "\(error)")
        #expect(acceptor.ledger.queuePairsCreated == 0 && acceptor.ledger.queuePairsReadyToReceive == 0)
        #expect(intruderLedger.queuePairsReadyToReceive == 0, "the connector moved its queue pair past INIT")
        #expect(await eventually { acceptor.log.contains("refused an out-of-band connection from 127.0.0.1:") },
                "\(acceptor.log.all)")
        #expect(acceptor.log.contains("claiming node 1: authentication failed (cluster keys differ)"), "\(acceptor.log.all)")
        #expect(!acceptor.log.all.joined().contains(String(decoding: testClusterKey, as: UTF8.self)))
        #expect(acceptor.fabric.statistics.connectionsRefused == 1 && intruder.statistics.connectionsRefused == 1)

        // The same acceptor still takes a member with the key.
        let (member, memberLedger) = try connector(world, node: 3, key: testClusterKey, members: [1, 2, 3])
        defer { member.close() }
        #expect(await connectError(member, to: acceptor.address) == nil)
        #expect(acceptor.ledger.queuePairsReadyToReceive == 1 && memberLedger.queuePairsReadyToReceive == 1)
    }

    @Test func aNodeOutsideTheClusterIsRefusedAtItsHello() async throws {
        let world = FabricWorld(.verbs)
        let acceptor = try await Acceptor.start(world)
        let (stranger, strangerLedger) = try connector(world, node: 4, key: testClusterKey, members: [2, 4])
        defer { acceptor.fabric.close(); stranger.close() }

        let error = try #require(await connectError(stranger, to: acceptor.address), "a non-member connected")
        #expect(error.contains("node 4 is not a cluster member"), "\(error)")
        #expect(acceptor.ledger.queuePairsCreated == 0 && strangerLedger.queuePairsReadyToReceive == 0)
        #expect(await eventually { acceptor.log.contains("claiming node 4: node 4 is not a cluster member") }, "\(acceptor.log.all)")
    }

    /// A hello sent again word for word (its nonce seen before) is refused with `replayed`, before
    /// any challenge, over a raw socket.
    @Test func aReplayedHelloIsRefused() async throws {
        let world = FabricWorld(.verbs)
        let acceptor = try await Acceptor.start(world)
        defer { acceptor.fabric.close() }
        let hello = OutOfBandDialer(key: testClusterKey, me: 1, peer: 2).hello.encoded()

        let first = try RawClient(port: acceptor.address.port)
        first.send(hello)
        #expect(first.read(OutOfBandMessage.headerBytes)?[6] == 2, "no challenge to the first hello")
        let second = try RawClient(port: acceptor.address.port)
        second.send(hello)
        #expect(second.read(12) == OutOfBandMessage.reject(.replayed).encoded())
        #expect(await eventually { acceptor.log.contains("claiming node 1: replayed nonce") }, "\(acceptor.log.all)")
        #expect(acceptor.ledger.queuePairsCreated == 0)
    }
}
