import Foundation
import NIOCore
import PloverCheck
import Testing
@testable import RDMAPaxos

/// Decoders face bytes from peers, clients and files: seeded random inputs and mutations of
/// valid encodings must be rejected with an error or decoded into something that encodes back
/// to itself, never trap. Each test prints how many inputs it ran (docs/reliability.md).
@Suite struct BadInputTests {
    /// Runs a fuzz loop off the shared test threads, then records what it found.
    static func fuzz(_ what: String, _ loop: @escaping @Sendable () throws -> FuzzOutcome) async throws {
        let o = try await onOwnThread(loop)
        #expect(o.failures.isEmpty, "\(o.failures.count) failures, first: \(o.failures.prefix(3))")
        #expect(o.accepted > 0 && o.accepted < o.runs, "the inputs never (or always) decode: the mutations miss")
        print("fuzz: \(what): \(o.runs) inputs, \(o.accepted) accepted, \(o.runs - o.accepted) rejected")
    }

    @Test func wireMessagesFromRandomAndMutatedBytesDecodeOrThrow() async throws {
        try await Self.fuzz("WireCodec.decode") {
            var f = Fuzzer(seed: 0x3715_0001)
            let valid = everyKindOfMessage().map(WireCodec.encode)
            // Small limits too, so the limit checks see inputs that cross them.
            let small = WireCodec.Limits(messageBytesMax: 200, entriesMax: 2, payloadBytesMax: 8, snapshotBytesMax: 8)
            var o = FuzzOutcome()
            o.runs = 40_000 * fuzzScale
            for i in 0..<o.runs {
                let bytes = i % 5 == 0 ? f.randomBytes(maxCount: 96) : f.mutate(valid[f.below(valid.count)])
                let limits = i % 3 == 0 ? small : .standard
                guard let m = try? WireCodec.decode(bytes, limits: limits) else { continue }
                o.accepted += 1
                o.check((try? WireCodec.decode(WireCodec.encode(m), limits: limits)) == m, "iteration \(i): \(m) does not round-trip")
            }
            return o
        }
    }

    @Test func clientFramesFromRandomAndMutatedBytesDecodeOrThrow() async throws {
        try await Self.fuzz("ClientFrame(body:)") {
            var f = Fuzzer(seed: 0x3715_0002)
            let valid: [[UInt8]] = [
                ClientFrame.propose(id: 7, command: KeyValueStateMachine.Command.put(key: [1], value: [2, 3]).encoded()),
                .read(id: 8, query: [1, 2]), .status(id: 9), .localRead(id: 10, query: []), .ok(id: 11, result: [1, 9]),
                .error(id: 12, code: .notLeader, leader: 3, message: "not the leader"), .statusReply(id: 13, text: "id=1"),
            ].map { Array($0.encoded().dropFirst(4)) }
            var o = FuzzOutcome()
            o.runs = 40_000 * fuzzScale
            for i in 0..<o.runs {
                let body = i % 5 == 0 ? f.randomBytes(maxCount: 40) : f.mutate(valid[f.below(valid.count)])
                guard let frame = try? ClientFrame(body: body) else { continue }
                o.accepted += 1
                o.check((try? ClientFrame(body: Array(frame.encoded().dropFirst(4)))) == frame, "iteration \(i): \(frame) does not round-trip")
            }
            return o
        }
    }

    @Test func keyValueCommandsFromRandomAndMutatedBytesDecodeOrThrow() async throws {
        try await Self.fuzz("KeyValueStateMachine.Command(decoding:) and apply") {
            var f = Fuzzer(seed: 0x3715_0003)
            let valid = [KeyValueStateMachine.Command.put(key: Array("k".utf8), value: Array("value".utf8)).encoded(),
                         KeyValueStateMachine.Command.delete(key: Array("key".utf8)).encoded()]
            var o = FuzzOutcome()
            o.runs = 20_000 * fuzzScale
            let machine = KeyValueStateMachine()
            for i in 0..<o.runs {
                let bytes = i % 4 == 0 ? f.randomBytes(maxCount: 24) : f.mutate(valid[f.below(valid.count)])
                // What a replica does with a committed command it cannot decode: result code `.malformed`, no change.
                // The shards as they were: unchanged, they still share storage and compare at once.
                let before = machine.shards
                let result = machine.apply(bytes, index: UInt64(i + 1))
                guard let c = try? KeyValueStateMachine.Command(decoding: bytes) else {
                    o.check(KeyValueStateMachine.resultCode(result) == .malformed && machine.shards == before, "iteration \(i): an undecodable command changed the map")
                    continue
                }
                o.accepted += 1
                o.check((try? KeyValueStateMachine.Command(decoding: c.encoded())) == c, "iteration \(i): \(c) does not round-trip")
            }
            return o
        }
    }

    /// Handshake and data frame bodies of the TCP fabric, parsed as the connection handler does.
    @Test func tcpFrameBodiesFromRandomAndMutatedBytesParseOrAreRefused() async throws {
        try await Self.fuzz("TCP fabric frame bodies (6 parsers each)") {
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
            var o = FuzzOutcome()
            o.runs = 30_000 * fuzzScale
            for i in 0..<o.runs {
                let body = ByteBuffer(bytes: i % 5 == 0 ? f.randomBytes(maxCount: 90) : f.mutate(valid[f.below(valid.count)]))
                var parsed = 0
                if let h = Frames.parseHello(body) { parsed += 1; o.check(h.nonce.count == Frames.nonceBytes, "iteration \(i): hello") }
                if let c = Frames.parseChallenge(body) { parsed += 1; o.check(c.nonce.count == Frames.nonceBytes && c.mac.count == Frames.macBytes, "iteration \(i): challenge") }
                if let r = Frames.parseResponse(body, connector: 1) { parsed += 1; o.check(r.region.lengthBytes <= MemoryRegion.wrappedLengthBytesMax, "iteration \(i): response") }
                if let r = Frames.parseAccept(body, acceptor: 2) { parsed += 1; o.check(r.lengthBytes <= MemoryRegion.wrappedLengthBytesMax, "iteration \(i): accept") }
                if let w = Frames.parseWrite(body) { parsed += 1; o.check(w.data.readableBytes == body.readableBytes - Frames.writeHeaderBytes, "iteration \(i): write") }
                if Frames.parseAck(body) != nil { parsed += 1 }
                if parsed > 0 { o.accepted += 1 }
            }
            return o
        }
    }

    @Test func mutatedConfigFilesParseOrFailWithAConfigError() async throws {
        try await Self.fuzz("NodeConfig.parse") {
            var f = Fuzzer(seed: 0x3715_0005)
            var o = FuzzOutcome()
            o.runs = 6_000 * fuzzScale
            for i in 0..<o.runs {
                let text = f.mutate(text: NodeConfigTests.good)
                let c: NodeConfig
                do {
                    c = try NodeConfig.parse(text, file: "c.toml")
                } catch {
                    // Typed throws: the only error is a ConfigError that names the file.
                    o.check((error as? ConfigError)?.description.hasPrefix("c.toml: ") == true, "iteration \(i): \(error)")
                    continue
                }
                o.accepted += 1
                // What a node relies on after parsing: it is a member, ids and addresses are unique
                // and every address splits into a host and a port.
                o.check(c.members.contains { $0.id == c.id }, "iteration \(i): not a member")
                o.check(Set(c.members.map(\.id)).count == c.members.count, "iteration \(i): duplicate ids")
                for m in c.members {
                    for a in [m.address, m.clientAddress] {
                        let colon = a.lastIndex(of: ":")
                        o.check(colon.flatMap { Int(a[a.index(after: $0)...]) }.map { (1...65535).contains($0) } == true, "iteration \(i): \(a)")
                    }
                }
                o.check(c.heartbeatTicks < c.electionTimeoutTicks, "iteration \(i): heartbeat not below election timeout")
            }
            return o
        }
    }
}

/// Executions per fuzz test: `FUZZ_SCALE=10 swift test --filter BadInputTests` runs ten times as many.
let fuzzScale = Int(ProcessInfo.processInfo.environment["FUZZ_SCALE"] ?? "") ?? 1
