import CVerbs
import Testing
@testable import RDMAPaxos

private let key = testClusterKey
private let otherKey = Array("another cluster's key, 32 bytes!".utf8)
private let port = VerbsPortAddress(lid: 7, gid: Array(0..<16), ethernet: true, mtu: IBV_MTU_4096.rawValue)
private func endpoint(_ qpn: UInt32) -> VerbsEndpoint { VerbsEndpoint(queuePair: qpn, psn: 0xABCDE, port: port) }
private func descriptor(_ node: NodeID) -> [UInt8] {
    VerbsFabric.privateData(node: node, region: RemoteRegion(node: node, base: 0x7F00_0000_1000, key: 0xDEAD_BEEF, lengthBytes: 1 << 20))
}

/// The out-of-band exchange's messages and rules, without sockets or a device.
@Suite struct OutOfBandAuthenticationTests {
    @Test func messagesRoundTripAndMalformedBytesAreRefused() throws {
        let nonce = [UInt8](repeating: 9, count: 32), mac = [UInt8](repeating: 3, count: 32)
        let messages: [OutOfBandMessage] = [
            .hello(from: 1, to: 2, nonce: nonce), .challenge(from: 2, to: 1, nonce: nonce, mac: mac),
            .request(endpoint: endpoint(0x12345), descriptor: descriptor(1), mac: mac),
            .accept(endpoint: endpoint(0x54321), descriptor: descriptor(2), mac: mac), .reject(.badMAC),
        ]
        for m in messages {
            let bytes = m.encoded()
            #expect(bytes.count == OutOfBandMessage.headerBytes + OutOfBandMessage.bodyBytes(kind: m.kind)!)
            #expect(try OutOfBandMessage.decode(bytes) == m)
            #expect(throws: VerbsPeerRefusal(.malformed)) { try OutOfBandMessage.decode(Array(bytes.dropLast())) }
            #expect(throws: VerbsPeerRefusal(.malformed)) { try OutOfBandMessage.decode(bytes + [0]) }
        }
        let request = messages[2].encoded()
        // Another protocol, another version, an unknown kind, a nonzero pad, a bad MTU, a 25-bit QP number.
        for (offset, value, reason) in [(0, 0, .malformed), (5, 1, .badVersion), (6, 9, .malformed), (7, 1, .malformed),
                                        (9, 0, .malformed), (12, 1, .malformed)] as [(Int, UInt8, VerbsPeerRefusal.Reason)] {
            var bad = request
            bad[offset] = value
            #expect(throws: VerbsPeerRefusal(reason), "byte \(offset) = \(value)") { try OutOfBandMessage.decode(bad) }
        }
        #expect(throws: VerbsPeerRefusal(.malformed)) { try OutOfBandMessage.decode([UInt8](OutOfBandMessage.reject(.badMAC).encoded().dropLast(4)) + [99, 0, 0, 0]) }
    }

    /// Both ends prove the key and learn each other's queue pair and region.
    @Test func bothEndsProveTheKeyAndLearnTheOthersEndpoint() throws {
        let replays = VerbsReplayMemory()
        var dialer = OutOfBandDialer(key: key, me: 1, peer: 2)
        var answerer = OutOfBandAnswerer(key: key, me: 2, members: [1, 2, 3])
        let challenge = try answerer.challenge(dialer.hello, replays: replays)
        let request = try dialer.respond(to: challenge, endpoint: endpoint(11), descriptor: descriptor(1))
        let (peer, connectorEndpoint, connectorRegion) = try answerer.verify(request)
        #expect(peer == 1 && connectorEndpoint == endpoint(11) && connectorRegion.node == 1)
        let (acceptorEndpoint, acceptorRegion) = try dialer.accepted(answerer.accept(endpoint: endpoint(22), descriptor: descriptor(2)))
        #expect(acceptorEndpoint == endpoint(22) && acceptorRegion.node == 2 && acceptorRegion.key == 0xDEAD_BEEF)
    }

    @Test func aWrongKeyIsRefusedByWhicheverEndChecksFirst() throws {
        let replays = VerbsReplayMemory()
        // The connector holds another key: it refuses the acceptor's challenge…
        var dialer = OutOfBandDialer(key: otherKey, me: 1, peer: 2)
        var answerer = OutOfBandAnswerer(key: key, me: 2, members: [1, 2])
        let challenge = try answerer.challenge(dialer.hello, replays: replays)
        #expect(throws: VerbsPeerRefusal(.badMAC, claimed: 2)) {
            try dialer.respond(to: challenge, endpoint: endpoint(11), descriptor: descriptor(1))
        }
        // …and a connector that answered anyway (a forger signing with its own key) fails at the acceptor.
        var forger = OutOfBandDialer(key: otherKey, me: 1, peer: 2)
        var fresh = OutOfBandAnswerer(key: otherKey, me: 2, members: [1, 2])
        let forged = try forger.respond(to: try fresh.challenge(forger.hello, replays: VerbsReplayMemory()),
                                        endpoint: endpoint(11), descriptor: descriptor(1))
        var honest = OutOfBandAnswerer(key: key, me: 2, members: [1, 2], nonce: fresh.nonce)
        _ = try honest.challenge(forger.hello, replays: replays)
        #expect(throws: VerbsPeerRefusal(.badMAC, claimed: 1)) { try honest.verify(forged) }
        // An accept signed with another key.
        var connector = OutOfBandDialer(key: key, me: 1, peer: 2)
        var acceptor = OutOfBandAnswerer(key: key, me: 2, members: [1, 2])
        _ = try connector.respond(to: try acceptor.challenge(connector.hello, replays: replays), endpoint: endpoint(11), descriptor: descriptor(1))
        let impostor = OutOfBandAnswerer(key: otherKey, me: 2, members: [1, 2], nonce: acceptor.nonce)
        #expect(throws: VerbsPeerRefusal(.badMAC, claimed: 2)) {
            try connector.accepted(impostor.accept(endpoint: endpoint(22), descriptor: descriptor(2)))
        }
    }

    @Test func unknownNodesWrongAddresseesAndReplayedHellosAreRefusedBeforeAnyChallenge() throws {
        let replays = VerbsReplayMemory()
        var answerer = OutOfBandAnswerer(key: key, me: 2, members: [1, 2, 3])
        #expect(throws: VerbsPeerRefusal(.unknownNode, claimed: 4)) {
            try answerer.challenge(OutOfBandDialer(key: key, me: 4, peer: 2).hello, replays: replays)
        }
        #expect(throws: VerbsPeerRefusal(.unknownNode, claimed: 2)) {
            try answerer.challenge(OutOfBandDialer(key: key, me: 2, peer: 2).hello, replays: replays)
        }
        #expect(throws: VerbsPeerRefusal(.wrongNode, claimed: 1)) {
            try answerer.challenge(OutOfBandDialer(key: key, me: 1, peer: 3).hello, replays: replays)
        }
        let hello = OutOfBandDialer(key: key, me: 1, peer: 2).hello
        _ = try answerer.challenge(hello, replays: replays)
        var again = OutOfBandAnswerer(key: key, me: 2, members: [1, 2, 3])
        #expect(throws: VerbsPeerRefusal(.replayed, claimed: 1)) { try again.challenge(hello, replays: replays) }
    }

    /// A recorded request (or accept) proves nothing on another connection: the other end's nonce
    /// is fresh each time. Nor does a request whose endpoint was changed on the way.
    @Test func recordedOrTamperedRequestsAndAcceptsAreRefused() throws {
        let replays = VerbsReplayMemory()
        var dialer = OutOfBandDialer(key: key, me: 1, peer: 2)
        var first = OutOfBandAnswerer(key: key, me: 2, members: [1, 2])
        let recorded = try dialer.respond(to: try first.challenge(dialer.hello, replays: replays), endpoint: endpoint(11), descriptor: descriptor(1))
        let recordedAccept = first.accept(endpoint: endpoint(22), descriptor: descriptor(2))

        var second = OutOfBandAnswerer(key: key, me: 2, members: [1, 2])
        var replayer = OutOfBandDialer(key: key, me: 1, peer: 2)  // a fresh hello, then the old request
        _ = try second.challenge(replayer.hello, replays: replays)
        #expect(throws: VerbsPeerRefusal(.badMAC, claimed: 1)) { try second.verify(recorded) }

        guard case let .request(_, d, mac) = recorded else { Issue.record("not a request"); return }
        #expect(throws: VerbsPeerRefusal(.badMAC, claimed: 1)) { try first.verify(.request(endpoint: endpoint(99), descriptor: d, mac: mac)) }
        #expect(throws: VerbsPeerRefusal(.badMAC, claimed: 1)) { try first.verify(.request(endpoint: endpoint(11), descriptor: descriptor(3), mac: mac)) }

        _ = try replayer.respond(to: try second.challenge(replayer.hello, replays: VerbsReplayMemory()), endpoint: endpoint(11), descriptor: descriptor(1))
        #expect(throws: VerbsPeerRefusal(.badMAC, claimed: 2)) { try replayer.accepted(recordedAccept) }
    }

    @Test func aRejectNamesTheReasonAtTheConnector() {
        var dialer = OutOfBandDialer(key: key, me: 4, peer: 2)
        #expect(throws: VerbsPeerRefusal(.unknownNode, claimed: 4)) {
            try dialer.respond(to: .reject(.unknownNode), endpoint: endpoint(11), descriptor: descriptor(4))
        }
        #expect(VerbsPeerRefusal(.unknownNode, claimed: 4).description == "node 4 is not a cluster member")
    }
}

/// rdma_cm's signed private data: what `ConnectionManager` sends and checks on hardware.
@Suite struct ConnectRequestAuthenticationTests {
    let region = RemoteRegion(node: 1, base: 0x7F00_0000_1000, key: 0xDEAD_BEEF, lengthBytes: 1 << 20)
    let now: UInt32 = 1_750_000_000

    func verify(_ data: [UInt8], key: [UInt8] = key, me: NodeID = 2, now: UInt32? = nil,
                replays: VerbsReplayMemory = VerbsReplayMemory()) throws(VerbsPeerRefusal) -> VerbsConnectRequest {
        try VerbsConnectRequest.verify(data, key: key, me: me, members: [1, 2, 3], now: now ?? self.now, replays: replays)
    }

    @Test func theRequestFitsTheConnectPrivateDataAndVerifies() throws {
        let (sent, data) = VerbsConnectRequest.signed(key: key, node: 1, region: region, acceptor: 2, time: now)
        #expect(data.count == VerbsConnectRequest.bytes && data.count <= 56)  // rdma_connect's limit for RC
        #expect(try verify(data) == sent)
        // rdma_cm may hand the listener the private data padded with zeros.
        #expect(try verify(data + [UInt8](repeating: 0, count: 36)) == sent)
        #expect(throws: VerbsPeerRefusal(.malformed)) { try verify(Array(data.prefix(55))) }
    }

    @Test func wrongKeyUnknownNodeOrAnotherAcceptorIsRefused() throws {
        let (_, data) = VerbsConnectRequest.signed(key: key, node: 1, region: region, acceptor: 2, time: now)
        #expect(throws: VerbsPeerRefusal(.badMAC, claimed: 1)) { try verify(data, key: otherKey) }
        #expect(throws: VerbsPeerRefusal(.badMAC, claimed: 1)) { try verify(data, me: 3) }  // signed for node 2
        let (_, stranger) = VerbsConnectRequest.signed(key: key, node: 4, region: region, acceptor: 2, time: now)
        #expect(throws: VerbsPeerRefusal(.unknownNode, claimed: 4)) { try verify(stranger) }
        let (_, itself) = VerbsConnectRequest.signed(key: key, node: 2, region: region, acceptor: 2, time: now)
        #expect(throws: VerbsPeerRefusal(.unknownNode, claimed: 2)) { try verify(itself) }
        var tampered = data
        tampered[13] ^= 1  // the rkey
        #expect(throws: VerbsPeerRefusal(.badMAC, claimed: 1)) { try verify(tampered) }
        var version = data
        version[24] = 2
        #expect(throws: VerbsPeerRefusal(.badVersion, claimed: 1)) { try verify(version) }
    }

    @Test func aRequestIsTakenOnceAndOnlyWithinTheTimeWindow() throws {
        let window = VerbsConnectRequest.windowSeconds
        let replays = VerbsReplayMemory()
        let (_, data) = VerbsConnectRequest.signed(key: key, node: 1, region: region, acceptor: 2, time: now)
        _ = try verify(data, replays: replays)
        #expect(throws: VerbsPeerRefusal(.replayed, claimed: 1)) { try verify(data, now: now + 1, replays: replays) }
        #expect(throws: VerbsPeerRefusal(.expired, claimed: 1)) { try verify(data, now: now + window + 1, replays: VerbsReplayMemory()) }
        #expect(throws: VerbsPeerRefusal(.expired, claimed: 1)) { try verify(data, now: now - window - 1, replays: VerbsReplayMemory()) }
        _ = try verify(data, now: now + window, replays: VerbsReplayMemory())
        // A refused forgery leaves no trace: the genuine request with its nonce still passes.
        let (_, genuine) = VerbsConnectRequest.signed(key: key, node: 1, region: region, acceptor: 2, time: now)
        var forged = genuine
        forged[40] ^= 1
        #expect(throws: VerbsPeerRefusal(.badMAC, claimed: 1)) { try verify(forged, replays: replays) }
        _ = try verify(genuine, replays: replays)
    }

    @Test func theAcceptIsSignedForItsRequest() throws {
        let (request, data) = VerbsConnectRequest.signed(key: key, node: 1, region: region, acceptor: 2, time: now)
        let received = try verify(data)
        let acceptorRegion = RemoteRegion(node: 2, base: 0x1000, key: 77, lengthBytes: 4096)
        let reply = received.accept(key: key, acceptor: 2, region: acceptorRegion)
        #expect(reply.count == VerbsConnectRequest.acceptBytes)
        #expect(try request.verifyAccept(reply, key: key, acceptor: 2) == acceptorRegion)
        #expect(throws: VerbsPeerRefusal(.badMAC, claimed: 2)) { try request.verifyAccept(reply, key: otherKey, acceptor: 2) }
        #expect(throws: VerbsPeerRefusal(.badMAC, claimed: 3)) { try request.verifyAccept(reply, key: key, acceptor: 3) }
        let (other, _) = VerbsConnectRequest.signed(key: key, node: 1, region: region, acceptor: 2, time: now)
        #expect(throws: VerbsPeerRefusal(.badMAC, claimed: 2)) { try other.verifyAccept(reply, key: key, acceptor: 2) }
    }

    @Test func theReplayMemoryForgetsOnlyWhatTheWindowRefusesAnyway() {
        let memory = VerbsReplayMemory(capacity: 2)
        #expect(memory.admit([1], time: 100, now: 100, window: 30))
        #expect(memory.admit([2], time: 100, now: 100, window: 30))
        #expect(!memory.admit([3], time: 100, now: 110, window: 30))  // full of requests still in the window
        #expect(!memory.admit([1], time: 100, now: 110, window: 30))
        #expect(memory.admit([3], time: 131, now: 131, window: 30))   // [1] and [2] left the window
        let hellos = VerbsReplayMemory(capacity: 2)
        #expect(hellos.admit([1]) && hellos.admit([2]) && !hellos.admit([2]))
        #expect(hellos.admit([3]) && hellos.admit([1]))  // [1] was the oldest of the last two
    }
}
