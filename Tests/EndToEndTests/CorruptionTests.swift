import Foundation
import Testing
@testable import PloverTesting
import RDMAPaxos

extension EndToEnd {
    /// A stopped replica's Berkeley DB store damaged on disk: the node must refuse to start rather
    /// than serve, and the documented repair (docs/operations.md, "Rebuilding a replica") must bring
    /// it back with every acknowledged write.
    @Suite(.serialized, .timeLimit(.minutes(3))) struct CorruptionTests {
        static func put(_ c: NodeClient, _ k: String, _ v: String) throws {
            _ = try c.propose(KeyValueStateMachine.Command.put(key: Array(k.utf8), value: Array(v.utf8)).encoded())
        }

        /// Flips one byte inside every copy of `needle` in the file; returns how many it found.
        static func corrupt(_ path: String, needle: String) throws -> Int {
            var bytes = [UInt8](try Data(contentsOf: URL(fileURLWithPath: path)))
            let n = Array(needle.utf8)
            var hits = 0
            var i = 0
            while i + n.count <= bytes.count {
                if bytes[i] == n[0] && Array(bytes[i..<(i + n.count)]) == n {
                    bytes[i + n.count / 2] ^= 0x5A
                    hits += 1
                    i += n.count
                } else {
                    i += 1
                }
            }
            try Data(bytes).write(to: URL(fileURLWithPath: path))
            return hits
        }

        static func waitForExit(_ p: Process, timeout: Duration = .seconds(20)) -> Bool {
            let deadline = ContinuousClock.now + timeout
            while p.isRunning && ContinuousClock.now < deadline { Thread.sleep(forTimeInterval: 0.05) }
            return !p.isRunning
        }

        @Test func damagedEntryStopsTheNodeAndRebuildingFromPeersRestoresIt() async throws {
            let stuck = try await EndToEnd.onCluster("corrupt") { c, checks -> Bool in
                let leader = try c.waitForLeader(excluding: nil)
                let victim = c.ids.first { $0 != leader }!
                let client = NodeClient(endpoints: c.endpoints, timeout: .seconds(5))
                var acked: [String: String] = [:]
                for i in 0..<120 {
                    let (k, v) = ("key-\(i)", i == 60 ? "damage-this-value-\(UUID().uuidString)" : "value-\(i)")
                    try Self.put(client, k, v)
                    acked[k] = v
                }
                try c.waitConverged()
                c.stop(victim)

                // One live record damaged on disk.
                let hits = try Self.corrupt(c.dataDir(victim) + "/entries.db", needle: acked["key-60"]!)
                guard hits > 0 else { throw CLIError("the value was not found in entries.db") }
                try c.start(victim)
                guard let p = c.processes[victim] else { throw CLIError("node \(victim) did not start") }
                checks.expect(Self.waitForExit(p), "node \(victim) kept running on a corrupt store")
                checks.expect(p.terminationReason == .exit && p.terminationStatus != 0)
                let log = (try? String(contentsOfFile: c.logPath(victim), encoding: .utf8)) ?? ""
                checks.expect(log.contains("corrupt log store: entry") && log.contains("checksum mismatch"), "log: \(log.suffix(600))")
                checks.expect(log.contains("rebuild this replica from its peers"))
                checks.expect(c.status(victim).isEmpty, "a node on a corrupt store must not answer")
                // The others keep going.
                try Self.put(client, "during", "repair")
                acked["during"] = "repair"

                // The repair: remove the data directory and start the node empty, recovering
                // (docs/operations.md, "Rebuilding a replica").
                c.processes[victim] = nil
                try FileManager.default.removeItem(atPath: c.dataDir(victim))
                try c.start(victim, arguments: ["--recover"])
                try Self.put(client, "after", "rebuild")
                acked["after"] = "rebuild"
                // The leader that knew the replica's old log must believe the empty replica's
                // rejections and resend; the fallback below (a leader change) only keeps the rest
                // of the test going if it does not, and the expectation after it fails then.
                let stuck = (try? c.waitConverged(timeout: .seconds(3))) == nil
                if stuck {
                    let l = try c.waitForLeader(excluding: nil)
                    c.kill(l)
                    _ = try c.waitForLeader(excluding: l)
                    try c.start(l)
                }
                try c.waitConverged()
                var missing = 0
                for (k, v) in acked where try client.localRead(Array(k.utf8), at: victim).decodedValue != v { missing += 1 }
                checks.expect(missing == 0, "the rebuilt replica lacks \(missing) of \(acked.count) acknowledged writes")
                let rebuilt = (try? String(contentsOfFile: c.logPath(victim), encoding: .utf8)) ?? ""
                checks.expect(rebuilt.contains("--recover") && rebuilt.contains("recovered from leader"), "log: \(rebuilt.suffix(800))")
                checks.expect(c.status(victim)["role"] != "recovering", "status: \(c.status(victim))")
                return stuck
            }
            #expect(!stuck, "the rebuilt replica did not catch up under the leader in office")
        }
    }
}
