import Foundation
import Testing
@testable import PloverTesting
import RDMAPaxos

extension EndToEnd {
    /// Real `plover node` processes on loopback with Berkeley DB logs and the TCP fabric.
    /// The tests start the executable built next to this test bundle (`make test` builds it first).
    @Suite(.serialized, .timeLimit(.minutes(3))) struct ClusterProcessTests {
        static func scratch(_ name: String) -> String {
            let d = FileManager.default.temporaryDirectory.appendingPathComponent("plover-e2e-\(name)-\(getpid())").path
            try? FileManager.default.removeItem(atPath: d)
            return d
        }

        /// The test bundle runs inside the test runner; the replicas are started from the built
        /// `plover` next to it.
        static func ploverExecutable() throws -> String {
            let exe = URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent()
            let plover = [exe.appendingPathComponent("plover").path, exe.deletingLastPathComponent().appendingPathComponent("plover").path]
                .first { FileManager.default.isExecutableFile(atPath: $0) }
            guard let plover else {
                throw CLIError("the plover executable is not built next to the tests; run `swift build` first (make test does)")
            }
            return plover
        }

        static func withCluster<T>(_ name: String, witness: Bool = false, replicas: Int = 3, extraConfig: String = "",
                                  diskStallFailpoints: Bool = false, _ body: (DemoCluster) throws -> T) throws -> T {
            let root = scratch(name)
            let plover = try ploverExecutable()
            let c = try DemoCluster(root: root, durability: "fsync", witness: witness, replicas: replicas, executable: plover,
                                     extraConfig: extraConfig)
            defer { c.stopAll() }
            c.diskStallFailpoints = diskStallFailpoints
            try c.startAll()
            let result = try body(c)
            // Kept when the body threw: the error names the node logs in it.
            c.stopAll()
            try? FileManager.default.removeItem(atPath: root)
            return result
        }

        @Test func leaderKilledUnderLoadLosesNoAcknowledgedWriteAndRestartCatchesUp() async throws {
            try await EndToEnd.onCluster("kill") { c, checks -> Void in
                let first = try c.waitForLeader(excluding: nil)
                let load = DemoLoad(endpoints: c.endpoints, clients: 3)
                load.start()
                Thread.sleep(forTimeInterval: 1)
                c.kill(first)
                let second = try c.waitForLeader(excluding: first)
                checks.expect(second != first)
                Thread.sleep(forTimeInterval: 1)
                try c.start(first)
                Thread.sleep(forTimeInterval: 0.5)
                load.stop()
                let acked = load.ackedWrites
                checks.expect(acked.count > 50, "the load made too little progress to prove anything")
                try c.waitConverged()
                try Self.expectEveryWrite(acked, on: [1, 2, 3], in: c, checks)
            }
        }

        @Test func pausedFollowerReturnsAndCatchesUp() async throws {
            try await EndToEnd.onCluster("pause") { c, checks -> Void in
                let leader = try c.waitForLeader(excluding: nil)
                let follower = c.ids.first { $0 != leader }!
                c.pause(follower, true)
                let load = DemoLoad(endpoints: c.endpoints.filter { $0.key != follower }, clients: 2)
                load.start()
                Thread.sleep(forTimeInterval: 1)
                c.pause(follower, false)
                Thread.sleep(forTimeInterval: 0.5)
                load.stop()
                let acked = load.ackedWrites
                checks.expect(acked.count > 20)
                try c.waitConverged()
                try Self.expectEveryWrite(acked, on: [follower], in: c, checks)
            }
        }

        @Test func witnessNeverLeadsAndBackupTakesOver() async throws {
            try await EndToEnd.onCluster("witness", witness: true) { c, checks -> Void in
                let primary = try c.waitForLeader(excluding: nil)
                checks.expect(primary != 3)
                let load = DemoLoad(endpoints: c.endpoints.filter { $0.key != 3 }, clients: 2)
                load.start()
                Thread.sleep(forTimeInterval: 0.7)
                c.kill(primary)
                let backup = try c.waitForLeader(excluding: primary)
                checks.expect(backup != 3, "the witness must never lead")
                Thread.sleep(forTimeInterval: 0.7)
                load.stop()
                let acked = load.ackedWrites
                checks.expect(acked.count > 20)
                try Self.expectEveryWrite(acked, on: [backup], in: c, checks)
                checks.expect(c.status(3)["role"] == "witness")
                // The witness persisted the log (every acknowledged write is an entry) without leading.
                checks.expect(Int(c.status(3)["last_index"] ?? "") ?? 0 >= acked.count)
            }
        }

        static func expectEveryWrite(_ acked: [String: String], on nodes: [NodeID], in c: DemoCluster, _ checks: Checks) throws {
            let client = NodeClient(endpoints: c.endpoints)
            for id in nodes {
                var missing = 0
                for (k, v) in acked where KeyValueStateMachine.decodeResult(try client.localRead(Array(k.utf8), at: id)) != Array(v.utf8) {
                    missing += 1
                }
                checks.expect(missing == 0, "node \(id) lacks \(missing) of \(acked.count) acknowledged writes")
            }
        }
    }
}
