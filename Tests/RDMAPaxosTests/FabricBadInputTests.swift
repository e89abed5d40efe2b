import Foundation
import PloverCheck
import Testing
@testable import RDMAPaxos

/// The TCP fabric's listener fed garbage over real loopback sockets: random bytes and mutated
/// handshakes before authentication, and after it, writes aimed at wrong regions, keys and
/// offsets. It must refuse each one and keep serving.
@Suite struct FabricBadInputTests {
    func listener() async throws -> (TCPFabric, MemoryRegion, PeerAddress) {
        let b = try TCPFabric(node: 2, configuration: .init(clusterKey: testClusterKey, members: testMembers))
        let region = try b.registerRegion(lengthBytes: 4096)
        return (b, region, try await b.listen(at: PeerAddress(node: 2, port: 0), exporting: region))
    }

    static func hello(nonce: [UInt8]) -> [UInt8] {
        var w = ByteWriter()
        w.u16(TCPHandshake.version); w.u32(1); w.u32(2); w.raw(nonce)
        return RawClient.frame(FrameType.hello.rawValue, w.bytes)
    }

    @Test func garbageBeforeAuthenticationIsRefusedAndTheListenerKeepsAccepting() async throws {
        let (b, _, address) = try await listener()
        defer { b.close() }
        let port = address.port
        let o = try await onOwnThread {
            var f = Fuzzer(seed: 0x3715_0101)
            var o = FuzzOutcome()
            o.runs = 400 * fuzzScale
            for i in 0..<o.runs {
                let bytes: [UInt8]
                switch i % 3 {
                case 0: bytes = f.randomBytes(maxCount: 300)
                case 1: bytes = f.mutate(Self.hello(nonce: f.bytes(32)))
                default: bytes = f.mutate(Self.hello(nonce: f.bytes(32)) + RawClient.frame(FrameType.response.rawValue, f.bytes(52)))
                }
                let c = try RawClient(port: port)
                c.send(bytes)
                c.finishSending()
                // Whatever was sent, the acceptor answers at most a challenge or a reject, then closes.
                o.check(c.closedByServer(), "iteration \(i): the acceptor kept a garbage connection open")
            }
            return o
        }
        #expect(o.failures.isEmpty, "\(o.failures.prefix(3))")
        #expect(b.statistics.handshakesAccepted == 0)

        let a = try TCPFabric(node: 1, configuration: .init(clusterKey: testClusterKey, members: testMembers))
        defer { a.close() }
        let qp = try await a.connect(to: address, exporting: try a.registerRegion(lengthBytes: 64))
        try qp.postWrite([1], remoteOffset: 0, workRequestID: 1)
        #expect(collect(a.completions, count: 1).map(\.status) == [.success])
        print("fuzz: TCP fabric handshake over sockets: \(o.runs) connections, \(b.statistics.badFrames) bad frames, \(b.statistics.handshakesRejected) handshakes rejected")
    }

    @Test func authenticatedWritesOutsideTheRegionOrWithAWrongKeyAreRefusedOneByOne() async throws {
        let (b, region, address) = try await listener()
        defer { b.close() }
        let port = address.port
        let remote = region.remote
        let (o, lastLanded) = try await onOwnThread { () throws -> (FuzzOutcome, (offset: Int, data: [UInt8])?) in
            let c = try RawClient(port: port)
            let nonce = TCPHandshake.nonce()
            c.send(Self.hello(nonce: nonce))
            guard let challenge = c.readFrame(), challenge.type == FrameType.challenge.rawValue, challenge.body.count == 68 else {
                throw CommandError("no challenge")
            }
            let mac = TCPHandshake.mac(clusterKey: testClusterKey, role: .connector, connector: 1, acceptor: 2,
                                       connectorNonce: nonce, acceptorNonce: Array(challenge.body[4..<36]))
            c.send(RawClient.frame(FrameType.response.rawValue, mac + [UInt8](repeating: 0, count: Frames.regionBytes)))
            guard c.readFrame()?.type == FrameType.accept.rawValue else { throw CommandError("no accept") }

            var f = Fuzzer(seed: 0x3715_0102)
            var o = FuzzOutcome()
            o.runs = 3_000 * fuzzScale
            var lastLanded: (offset: Int, data: [UInt8])?
            for i in 0..<o.runs {
                let base = f.below(8) == 0 ? remote.base &+ UInt64(1 + f.below(4096)) : remote.base
                let key = f.below(8) == 0 ? UInt32(truncatingIfNeeded: f.below(1 << 30)) : remote.key
                let offsets: [UInt64] = [UInt64(f.below(4096)), UInt64(f.below(8192)), 4096, 4095, UInt64(Int.max), .max, 1 << 63]
                let offset = offsets[f.below(offsets.count)]
                let data = f.randomBytes(maxCount: 64)
                let fits = offset <= UInt64(4096 - data.count)
                let expected = base == remote.base && key == remote.key && fits

                var w = ByteWriter()
                w.u64(UInt64(i + 1)); w.u64(base); w.u32(key); w.u64(offset); w.u8(Frames.WriteFlag.acknowledge); w.u32(0); w.raw(data)
                c.send(RawClient.frame(FrameType.write.rawValue, w.bytes))
                guard let ack = c.readFrame(), ack.type == FrameType.ack.rawValue, ack.body.count == 9 else {
                    throw CommandError("iteration \(i): no ack; the connection closed")
                }
                let sequence = ack.body.prefix(8).reduce(UInt64(0)) { $0 << 8 | UInt64($1) }
                o.check(sequence == UInt64(i + 1), "iteration \(i): ack for \(sequence)")
                o.check((ack.body[8] == 0) == expected,
                        "iteration \(i): base ok \(base == remote.base), key ok \(key == remote.key), offset \(offset), \(data.count) bytes")
                if expected {
                    o.accepted += 1
                    lastLanded = (Int(offset), data)
                }
            }
            return (o, lastLanded)
        }
        #expect(o.failures.isEmpty, "\(o.failures.prefix(3))")
        #expect(o.accepted > o.runs / 10 && o.accepted < o.runs)
        if let (offset, data) = lastLanded { #expect(region.read(offset: offset, count: data.count) == data) }
        print("fuzz: TCP fabric authenticated writes: \(o.runs) writes, \(o.accepted) landed, \(o.runs - o.accepted) refused")
    }
}
