import Testing
@testable import RDMAPaxos

/// Authentication and defensive decoding of the TCP fabric.
@Suite struct TCPFabricTests {
    /// Node 2 listening on loopback with an exported region.
    private func listener(members: Set<NodeID> = testMembers) async throws -> (TCPFabric, PeerAddress) {
        let b = try TCPFabric(node: 2, configuration: .init(clusterKey: testClusterKey, members: members))
        let address = try await b.listen(at: PeerAddress(node: 2, port: 0), exporting: try b.registerRegion(lengthBytes: 4096))
        return (b, address)
    }

    @Test func wrongClusterKeyIsRejected() async throws {
        let (b, address) = try await listener()
        defer { b.close() }
        let wrongKey = Array("another cluster's key, 32 bytes!".utf8)
        let a = try TCPFabric(node: 1, configuration: .init(clusterKey: wrongKey, members: testMembers))
        defer { a.close() }
        await #expect(throws: FabricError.self) {
            try await a.connect(to: address, exporting: try a.registerRegion(lengthBytes: 64))
        }
        // The connector checks the acceptor's MAC first and refuses it.
        #expect(a.statistics.handshakesRejected == 1)
        #expect(b.statistics.handshakesAccepted == 0)
    }

    @Test func forgedResponseIsRejectedByTheAcceptor() async throws {
        let (b, address) = try await listener()
        defer { b.close() }
        let client = try RawClient(port: address.port)
        let nonce = TCPHandshake.nonce()
        client.send(hello(from: 1, to: 2, nonce: nonce))
        let challenge = try #require(client.readFrame())
        #expect(challenge.type == FrameType.challenge.rawValue)
        let forged = [UInt8](repeating: 0xAA, count: 32) + [UInt8](repeating: 0, count: Frames.regionBytes)
        client.send(RawClient.frame(FrameType.response.rawValue, forged))
        let reject = try #require(client.readFrame())
        #expect(reject.type == FrameType.reject.rawValue && reject.body == [RejectReason.badMAC.rawValue])
        #expect(client.closedByServer())
        #expect(b.statistics.handshakesRejected == 1)
    }

    @Test func unknownNodeIdIsRejected() async throws {
        let (b, address) = try await listener()
        defer { b.close() }
        // Node 9 holds the key and believes it is a member; node 2 does not list it.
        let stranger = try TCPFabric(node: 9, configuration: .init(clusterKey: testClusterKey, members: [2, 9]))
        defer { stranger.close() }
        var failure: FabricError?
        do {
            _ = try await stranger.connect(to: address, exporting: try stranger.registerRegion(lengthBytes: 64))
        } catch {
            failure = error
        }
        guard case let .connectFailed(peer, reason)? = failure else {
            Issue.record("node 9 was not refused: \(String(describing: failure))")
            return
        }
        #expect(peer == 2)
        #expect(reason.contains("not a cluster member"))
        #expect(b.statistics.handshakesRejected == 1)
    }

    @Test func replayedHandshakeIsRejected() async throws {
        let (b, address) = try await listener()
        defer { b.close() }
        // A genuine handshake, recorded.
        let nonce = TCPHandshake.nonce()
        let helloBytes = hello(from: 1, to: 2, nonce: nonce)
        let first = try RawClient(port: address.port)
        first.send(helloBytes)
        let challenge = try #require(first.readFrame())
        try #require(challenge.body.count == 4 + 32 + 32)
        let mac = TCPHandshake.mac(clusterKey: testClusterKey, role: .connector, connector: 1, acceptor: 2,
                                   connectorNonce: nonce, acceptorNonce: Array(challenge.body[4..<36]))
        let responseBytes = RawClient.frame(FrameType.response.rawValue, mac + [UInt8](repeating: 0, count: Frames.regionBytes))
        first.send(responseBytes)
        #expect(first.readFrame()?.type == FrameType.accept.rawValue)

        // The same bytes again: the hello's nonce was already used.
        let replay = try RawClient(port: address.port)
        replay.send(helloBytes + responseBytes)
        #expect(replay.readFrame().map { $0.type == FrameType.reject.rawValue && $0.body == [RejectReason.replayed.rawValue] } == true)
        #expect(replay.closedByServer())

        // A fresh hello with the recorded response: the MAC was for another acceptor nonce.
        let spliced = try RawClient(port: address.port)
        spliced.send(hello(from: 1, to: 2, nonce: TCPHandshake.nonce()))
        _ = spliced.readFrame()
        spliced.send(responseBytes)
        #expect(spliced.readFrame().map { $0.body == [RejectReason.badMAC.rawValue] } == true)
        #expect(b.statistics.handshakesRejected == 2)
        #expect(b.statistics.handshakesAccepted == 1)
    }

    @Test func oversizedFrameClosesTheConnectionAndTheListenerKeepsWorking() async throws {
        let (b, address) = try await listener()
        defer { b.close() }
        let client = try RawClient(port: address.port)
        client.send([0x40, 0, 0, 0, 1, 2, 3])  // claims a 1 GiB frame before authenticating
        #expect(client.closedByServer())
        let garbage = try RawClient(port: address.port)
        garbage.send(RawClient.frame(99, [1, 2, 3]))  // unknown frame type
        #expect(garbage.closedByServer())
        let early = try RawClient(port: address.port)
        early.send(RawClient.frame(FrameType.write.rawValue, [UInt8](repeating: 0, count: 40)))  // data before the handshake
        #expect(early.closedByServer())
        #expect(await eventually { b.statistics.badFrames == 3 })

        let a = try TCPFabric(node: 1, configuration: .init(clusterKey: testClusterKey, members: testMembers))
        defer { a.close() }
        let qp = try await a.connect(to: address, exporting: try a.registerRegion(lengthBytes: 64))
        try qp.postWrite([1], remoteOffset: 0, workRequestID: 1)
        #expect(collect(a.completions, count: 1).map(\.status) == [.success])
    }

    @Test func connectingToTheWrongNodeFails() async throws {
        let (b, address) = try await listener()
        defer { b.close() }
        let a = try TCPFabric(node: 1, configuration: .init(clusterKey: testClusterKey, members: testMembers))
        defer { a.close() }
        var wrong = address
        wrong.node = 3
        await #expect(throws: FabricError.self) { try await a.connect(to: wrong, exporting: try a.registerRegion(lengthBytes: 64)) }
        #expect(b.statistics.handshakesRejected == 1)
    }

    @Test func shortClusterKeyIsABadConfiguration() {
        #expect(throws: FabricError.self) {
            try TCPFabric(node: 1, configuration: .init(clusterKey: [1, 2, 3], members: [1]))
        }
    }

    private func hello(from: NodeID, to: NodeID, nonce: [UInt8]) -> [UInt8] {
        var w = ByteWriter()
        w.u16(TCPHandshake.version); w.u32(from); w.u32(to); w.raw(nonce)
        return RawClient.frame(FrameType.hello.rawValue, w.bytes)
    }
}
