import Foundation
import Testing
@testable import PloverTesting
import RDMAPaxos

extension EndToEnd {
    /// `plover kv` and `plover status --watch` as an operator runs them, against a running cluster.
    @Suite(.serialized, .timeLimit(.minutes(3))) struct ClientCommandTests {
        /// Runs `plover ARGS` with `input` on its standard input; its exit status and standard output.
        static func plover(_ c: DemoCluster, _ args: [String], input: [UInt8] = []) throws -> (Int32, String) {
            let p = Process()
            p.executableURL = URL(fileURLWithPath: c.executable)
            p.arguments = args
            let stdin = Pipe(), out = Pipe(), err = Pipe()
            p.standardInput = stdin
            p.standardOutput = out
            p.standardError = err
            try p.run()
            // Write on another thread: a large value would fill the pipe before the reader drains it.
            let writer = Thread {
                stdin.fileHandleForWriting.write(Data(input))
                try? stdin.fileHandleForWriting.close()
            }
            writer.start()
            let text = String(decoding: out.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
            let errors = String(decoding: err.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
            p.waitUntilExit()
            return (p.terminationStatus, text + errors)
        }

        static func endpoints(_ c: DemoCluster) -> String {
            c.endpoints.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }.joined(separator: ",")
        }

        /// A value over the kernel's 128 KiB limit for one argument (and under the default 256 KiB
        /// limit of one command) goes in on standard input (value omitted, or `-`); the same bytes
        /// come back.
        @Test func kvPutReadsTheValueFromStandardInput() async throws {
            try await EndToEnd.onCluster("kv-stdin") { c, checks -> Void in
                _ = try c.waitForLeader(excluding: nil)
                let e = ["--endpoints", Self.endpoints(c)]
                let big = (0..<(200 << 10)).map { i in UInt8(ascii: "a") + UInt8(i % 26) }
                let put = try Self.plover(c, ["kv", "put", "big"] + e, input: big)
                checks.expect(put.0 == 0 && put.1.contains("(no previous value)"), "put from stdin: \(put)")
                let get = try Self.plover(c, ["kv", "get", "big"] + e)
                checks.expect(get.0 == 0 && get.1 == String(decoding: big, as: UTF8.self) + "\n",
                              "get returned \(get.1.utf8.count) bytes, expected \(big.count + 1)")

                let dash = try Self.plover(c, ["kv", "put", "small", "-"] + e, input: Array("from stdin".utf8))
                checks.expect(dash.0 == 0, "put -: \(dash)")
                checks.expect(try Self.plover(c, ["kv", "get", "small"] + e).1 == "from stdin\n")
                let argument = try Self.plover(c, ["kv", "put", "small", "as argument"] + e, input: Array("ignored".utf8))
                checks.expect(argument.0 == 0 && argument.1.contains("from stdin"), "put with a value prints the previous one: \(argument)")
                checks.expect(try Self.plover(c, ["kv", "get", "small"] + e).1 == "as argument\n")

                let tooBig = [UInt8](repeating: 0x41, count: KeyValueStateMachine.Command.valueBytesMax + 1)
                let refused = try Self.plover(c, ["kv", "put", "huge"] + e, input: tooBig)
                checks.expect(refused.0 != 0 && refused.1.contains("over the limit of \(KeyValueStateMachine.Command.valueBytesMax) bytes"),
                              "an over-limit value is refused with the limit named: \(refused.0) \(refused.1.prefix(300))")
            }
        }

        /// `plover status --watch` redraws a table of every replica; with standard output not a
        /// terminal, frames follow one another.
        @Test func statusWatchRedrawsEveryReplicasRow() async throws {
            try await EndToEnd.onCluster("status-watch") { c, checks -> Void in
                let leader = try c.waitForLeader(excluding: nil)
                _ = try NodeClient(endpoints: c.endpoints).propose(KeyValueStateMachine.Command.put(key: [1], value: [2]).encoded())
                let p = Process()
                p.executableURL = URL(fileURLWithPath: c.executable)
                p.arguments = ["status", "--watch", "--interval", "0.2", "--endpoints", Self.endpoints(c)]
                let out = Pipe()
                p.standardOutput = out
                try p.run()
                var text = ""
                let deadline = ContinuousClock.now + .seconds(20)
                while text.components(separatedBy: "plover cluster,").count < 3 && ContinuousClock.now < deadline {
                    let chunk = out.fileHandleForReading.availableData
                    if chunk.isEmpty { break }
                    text += String(decoding: chunk, as: UTF8.self)
                }
                p.terminate()
                p.waitUntilExit()
                let frames = text.components(separatedBy: "plover cluster,").dropFirst()
                checks.expect(frames.count >= 2, "two frames within 20 s: \(text)")
                guard let second = frames.dropFirst().first else { return }
                checks.expect(second.contains("lag (entries)") && second.contains("lag (bytes, est.)") && second.contains("commits"), second)
                let rows = second.split(separator: "\n").filter { $0.first.map { "123".contains($0) } ?? false }
                checks.expect(rows.count == 3, "one row per replica: \(second)")
                checks.expect(rows.contains { $0.hasPrefix("\(leader) ") && $0.contains("leader") }, "the leader's row: \(second)")
                checks.expect(rows.filter { $0.contains("follower") }.count == 2, "two followers: \(second)")
            }
        }
    }
}
