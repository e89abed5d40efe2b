import Foundation
import NIOCore
import PloverCheck
import Testing
@testable import RDMAPaxos

/// Decoders face bytes from peers, clients and files: seeded random inputs and mutations of
/// valid encodings must be rejected with an error or decoded into something that encodes back
/// to itself, never trap. Each test prints how many inputs it ran (docs/reliability.md).
@Suite struct BadInputTests {
    static func report(_ what: String, _ runs: Int, _ accepted: Int) {
        print("fuzz: \(what): \(runs) inputs, \(accepted) accepted, \(runs - accepted) rejected")
    }

    @Test func wireMessagesFromRandomAndMutatedBytesDecodeOrThrow() throws {
        var f = Fuzzer(seed: 0x3715_0001)
        let valid = everyKindOfMessage().map(WireCodec.encode)
        // Small limits too, so the limit checks see inputs that cross them.
        let small = WireCodec.Limits(messageBytesMax: 200, entriesMax: 2, payloadBytesMax: 8, snapshotBytesMax: 8)
        let runs = 40_000 * fuzzScale
        var accepted = 0
        for i in 0..<runs {
            let bytes = i % 5 == 0 ? f.randomBytes(maxCount: 96) : f.mutate(valid[f.below(valid.count)])
            let limits = i % 3 == 0 ? small : .standard
            guard let m = try? WireCodec.decode(bytes, limits: limits) else { continue }
            accepted += 1
            #expect(try WireCodec.decode(WireCodec.encode(m), limits: limits) == m, "iteration \(i)")
        }
        #expect(accepted > 0)
        Self.report("WireCodec.decode", runs, accepted)
    }

    @Test func clientFramesFromRandomAndMutatedBytesDecodeOrThrow() throws {
        var f = Fuzzer(seed: 0x3715_0002)
        let valid: [[UInt8]] = [
            ClientFrame.propose(id: 7, command: KeyValueStateMachine.Command.put(key: [1], value: [2, 3]).encoded()),
            .read(id: 8, query: [1, 2]), .status(id: 9), .localRead(id: 10, query: []), .ok(id: 11, result: [1, 9]),
            .error(id: 12, code: .notLeader, leader: 3, message: "not the leader"), .statusReply(id: 13, text: "id=1"),
        ].map { Array($0.encoded().dropFirst(4)) }
        let runs = 40_000 * fuzzScale
        var accepted = 0
        for i in 0..<runs {
            let body = i % 5 == 0 ? f.randomBytes(maxCount: 40) : f.mutate(valid[f.below(valid.count)])
            guard let frame = try? ClientFrame(body: body) else { continue }
            accepted += 1
            #expect(try ClientFrame(body: Array(frame.encoded().dropFirst(4))) == frame, "iteration \(i)")
        }
        Self.report("ClientFrame(body:)", runs, accepted)
    }

    @Test func keyValueCommandsFromRandomAndMutatedBytesDecodeOrThrow() throws {
        var f = Fuzzer(seed: 0x3715_0003)
        let valid = [KeyValueStateMachine.Command.put(key: Array("k".utf8), value: Array("value".utf8)).encoded(),
                     KeyValueStateMachine.Command.delete(key: Array("key".utf8)).encoded()]
        let runs = 20_000 * fuzzScale
        var accepted = 0
        let machine = KeyValueStateMachine()
        for i in 0..<runs {
            let bytes = i % 4 == 0 ? f.randomBytes(maxCount: 24) : f.mutate(valid[f.below(valid.count)])
            // What a replica does with a committed command it cannot decode: result [2], no change.
            let before = machine.map
            let result = machine.apply(bytes, index: UInt64(i + 1))
            guard let c = try? KeyValueStateMachine.Command(decoding: bytes) else {
                #expect(result == [2] && machine.map == before, "iteration \(i)")
                continue
            }
            accepted += 1
            #expect(try KeyValueStateMachine.Command(decoding: c.encoded()) == c)
        }
        Self.report("KeyValueStateMachine.Command(decoding:) and apply", runs, accepted)
    }

    /// Handshake and data frame bodies of the TCP fabric, parsed as the connection handler does.
    @Test func tcpFrameBodiesFromRandomAndMutatedBytesParseOrAreRefused() {
        var f = Fuzzer(seed: 0x3715_0004)
        let region = [UInt8](repeating: 0, count: 8) + [0, 0, 0, 5] + [0, 0, 0, 0, 0, 0, 16, 0]
        let valid: [[UInt8]] = [
            [0, 1, 0, 0, 0, 1, 0, 0, 0, 2] + f.bytes(32),  // hello
            [0, 0, 0, 2] + f.bytes(64),  // challenge
            f.bytes(32) + region,  // response
            region,  // accept
            [UInt8](repeating: 0, count: 8) + region.prefix(12) + [0, 0, 0, 0, 0, 0, 0, 9, 1, 0, 0, 0, 7] + f.bytes(12),  // write
            [0, 0, 0, 0, 0, 0, 0, 1, 0],  // ack
        ]
        let runs = 30_000 * fuzzScale
        var accepted = 0
        for i in 0..<runs {
            let body = ByteBuffer(bytes: i % 5 == 0 ? f.randomBytes(maxCount: 90) : f.mutate(valid[f.below(valid.count)]))
            var parsed = 0
            if let h = Frames.parseHello(body) { parsed += 1; #expect(h.nonce.count == Frames.nonceBytes) }
            if let c = Frames.parseChallenge(body) { parsed += 1; #expect(c.nonce.count == Frames.nonceBytes && c.mac.count == Frames.macBytes) }
            if let r = Frames.parseResponse(body, connector: 1) { parsed += 1; #expect(r.region.lengthBytes <= MemoryRegion.lengthBytesMax) }
            if let r = Frames.parseAccept(body, acceptor: 2) { parsed += 1; #expect(r.lengthBytes <= MemoryRegion.lengthBytesMax) }
            if let w = Frames.parseWrite(body) { parsed += 1; #expect(w.data.readableBytes == body.readableBytes - Frames.writeHeaderBytes) }
            if Frames.parseAck(body) != nil { parsed += 1 }
            if parsed > 0 { accepted += 1 }
        }
        #expect(accepted > 0)
        Self.report("TCP fabric frame bodies (6 parsers each)", runs, accepted)
    }

    @Test func mutatedConfigFilesParseOrFailWithAConfigError() {
        var f = Fuzzer(seed: 0x3715_0005)
        let runs = 6_000 * fuzzScale
        var accepted = 0
        for i in 0..<runs {
            let text = f.mutate(text: NodeConfigTests.good)
            let c: NodeConfig
            do {
                c = try NodeConfig.parse(text, file: "c.toml")
            } catch {
                // Typed throws: the only error is a ConfigError that names the file.
                #expect(error.description.hasPrefix("c.toml: "), "iteration \(i)")
                continue
            }
            accepted += 1
            // What a node relies on after parsing: it is a member, ids and addresses are unique
            // and every address splits into a host and a port.
            #expect(c.members.contains { $0.id == c.id }, "iteration \(i)")
            #expect(Set(c.members.map(\.id)).count == c.members.count)
            for m in c.members {
                for a in [m.address, m.clientAddress] {
                    let colon = a.lastIndex(of: ":")
                    #expect(colon.flatMap { Int(a[a.index(after: $0)...]) }.map { (1...65535).contains($0) } == true, "iteration \(i): \(a)")
                }
            }
            #expect(c.heartbeatTicks < c.electionTimeoutTicks)
        }
        #expect(accepted > 0)
        Self.report("NodeConfig.parse", runs, accepted)
    }
}

/// Executions per fuzz test: `FUZZ_SCALE=10 swift test --filter BadInputTests` runs ten times as many.
let fuzzScale = Int(ProcessInfo.processInfo.environment["FUZZ_SCALE"] ?? "") ?? 1
