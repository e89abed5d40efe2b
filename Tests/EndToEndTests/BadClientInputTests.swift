import Foundation
import PloverCheck
import Testing
@testable import PloverTesting
import RDMAPaxos

extension EndToEnd {
    /// Malformed client requests over real sockets to running `plover node` processes: each gets
    /// an error frame (or, for an oversized or unfinished frame, a closed connection), and the
    /// cluster keeps serving.
    @Suite(.serialized, .timeLimit(.minutes(3))) struct BadClientInputTests {
        @Test func malformedRequestsGetErrorFramesAndTheNodeKeepsServing() async throws {
            try await EndToEnd.onCluster("bad-client") { c, checks -> Void in
                let leader = try c.waitForLeader(excluding: nil)
                let good = NodeClient(endpoints: c.endpoints, timeout: .seconds(5))
                _ = try good.propose(KeyValueStateMachine.Command.put(key: Array("k".utf8), value: Array("before".utf8)).encoded())

                var f = Fuzzer(seed: 0x3715_0201)
                let valid: [[UInt8]] = [
                    ClientFrame.status(id: 1), .read(id: 2, query: Array("k".utf8)), .localRead(id: 3, query: Array("k".utf8)),
                    .ok(id: 4, result: [1]), .error(id: 5, code: .other, leader: nil, message: "x"),
                ].map { Array($0.encoded().dropFirst(4)) }
                var framed = 0, answered = 0, rejected = 0, streams = 0
                let runs = 1_500 * fuzzScale
                var socket = try ClientSocket(address: c.endpoints[leader]!)
                for i in 0..<runs {
                    if i % 50 == 49 {
                        // An unframed stream: whatever it is, the node must answer or close, not hang or die.
                        let s = try ClientSocket(address: c.endpoints[leader]!)
                        s.send(f.randomBytes(maxCount: 64))
                        s.finishSending()
                        s.drain()
                        streams += 1
                        continue
                    }
                    // A framed body: random, or a mutation of a valid request or response. Proposals
                    // are left out: they would commit whatever the mutation produced.
                    var body = i % 3 == 0 ? f.randomBytes(maxCount: 32) : f.mutate(valid[f.below(valid.count)])
                    if body.first == 1 { body[0] = 200 }
                    let expected = try? ClientFrame(body: body)
                    var w = ByteWriter()
                    w.u32(UInt32(body.count)); w.raw(body)
                    socket.send(w.bytes)
                    framed += 1
                    guard let reply = socket.readFrame() else { throw CLIError("iteration \(i): no answer to \(body)") }
                    let frame = try ClientFrame(body: reply)
                    switch expected {
                    case nil:
                        checks.expect(frame.isError(.badRequest) && frame.id == 0, "iteration \(i): \(frame)")
                        rejected += 1
                    case .ok?, .error?, .statusReply?:
                        checks.expect(frame.isError(.badRequest) && frame.id == expected!.id, "iteration \(i): \(frame)")
                        rejected += 1
                    case let request?:
                        checks.expect(frame.id == request.id && !frame.isError(.badRequest), "iteration \(i): \(frame)")
                        answered += 1
                    }
                    if i % 200 == 199 { socket = try ClientSocket(address: c.endpoints[leader]!) }
                }
                // Frames the node refuses to buffer, and one that never finishes.
                for length in [UInt32(ClientFrame.bytesMax + 1), .max] {
                    let s = try ClientSocket(address: c.endpoints[leader]!)
                    var w = ByteWriter()
                    w.u32(length); w.raw([2, 0, 0, 0, 0, 0, 0, 0, 1])
                    s.send(w.bytes)
                    checks.expect(s.readFrame() == nil, "a \(length)-byte frame was not refused")
                }
                let unfinished = try ClientSocket(address: c.endpoints[leader]!)
                unfinished.send([0, 0, 1, 0, 3])
                unfinished.finishSending()
                unfinished.drain()

                // Still serving, on every node.
                for id in c.ids where c.processes[id]?.isRunning != true {
                    let log = (try? String(contentsOfFile: c.logPath(id), encoding: .utf8)) ?? ""
                    checks.record("node \(id) died (\(c.processes[id].map { "status \($0.terminationStatus)" } ?? "")): \(log.suffix(3000))")
                }
                _ = try good.propose(KeyValueStateMachine.Command.put(key: Array("k".utf8), value: Array("after".utf8)).encoded())
                checks.expect(try good.read(Array("k".utf8)).decodedValue == "after")
                // A leader is in office (not necessarily the same one: on a loaded machine the
                // fuzzing can delay heartbeats enough for an election, which is no fault).
                checks.expect((try? c.waitForLeader(excluding: nil)) != nil, "no leader after the fuzzing")
                print("fuzz: client protocol over sockets: \(framed) framed requests (\(answered) served, \(rejected) refused with an error frame), \(streams) unframed streams, 3 oversized or unfinished frames")
            }
        }
    }
}

extension ClientFrame {
    func isError(_ code: ClientErrorCode) -> Bool {
        if case let .error(_, c, _, _) = self { return c == code }
        return false
    }
}

/// A blocking loopback socket that speaks raw bytes to a node's client address.
final class ClientSocket {
    private let socket: SocketDescriptor

    init(address: String) throws {
        guard let a = HostPort(parsing: address) else { throw CLIError("\"\(address)\" is not host:port") }
        do { socket = try SocketDescriptor.connect(to: a) } catch { throw CLIError("\(error)") }
        socket.setReceiveTimeout(.seconds(10))
    }

    deinit { socket.close() }

    func send(_ bytes: [UInt8]) { _ = try? socket.send(bytes) }

    func finishSending() { socket.shutdownSending() }

    /// Exactly `n` bytes; nil when the connection ended or failed first.
    func read(_ n: Int) -> [UInt8]? { (try? socket.receive(exactly: n)) ?? nil }

    /// One frame's body, or nil when the connection closed (or nothing came for 10 s).
    func readFrame() -> [UInt8]? {
        guard let h = read(4) else { return nil }
        return read(Int(h.reduce(UInt32(0)) { $0 << 8 | UInt32($1) }))
    }

    /// Reads answers until the node closes the connection.
    func drain() { while readFrame() != nil {} }
}

/// Executions per fuzz test (`FUZZ_SCALE=10` runs ten times as many).
let fuzzScale = Int(ProcessInfo.processInfo.environment["FUZZ_SCALE"] ?? "") ?? 1
