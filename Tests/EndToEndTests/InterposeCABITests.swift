import Foundation
import PloverCheck
import Testing
@testable import PloverTesting
import RDMAPaxos

extension EndToEnd {
    /// libinterpose.so's C ABI from a C program: the test compiles `interpose-c/replica_driver.c`
    /// with `cc` against include/interpose.h and the library alone, and runs three of them as a
    /// cluster (each process one replica, Berkeley DB logs, TCP fabric on loopback).
    @Suite(.serialized, .timeLimit(.minutes(3))) struct InterposeCABITests {
        /// Three drivers; returns each finished driver's delivered entries ("INDEX KIND PAYLOAD" lines).
        static func runDrivers(_ name: String, count: Int, killLeaderAfter: LogIndex?, _ checks: Checks) throws -> [NodeID: [String]] {
            let root = EndToEnd.ClusterProcessTests.scratch(name)
            try FileManager.default.createDirectory(atPath: root, withIntermediateDirectories: true)
            let driver = try InterposeHarness.compileDriver(into: root)
            let cluster = try DemoCluster(root: root, durability: "fsync", timing: DemoCluster.Timing(electionTimeoutTicks: 40),
                                          executable: driver)
            var procs: [NodeID: Process] = [:]
            defer { for p in procs.values where p.isRunning { InterposeHarness.kill9(p) } }
            for id in cluster.ids {
                procs[id] = try InterposeHarness.spawn(driver, [cluster.configPath(id), root + "/out-\(id).txt", String(count)],
                                                       log: root + "/driver-\(id).log")
            }
            var killed: NodeID?
            if let after = killLeaderAfter {
                let leader = try InterposeHarness.waitForLeader(cluster.endpoints, among: cluster.ids)
                let progressed = InterposeHarness.waitUntil(.seconds(60)) {
                    (cluster.status(leader)["applied_index"].flatMap { LogIndex($0) } ?? 0) >= after
                }
                checks.expect(progressed, "the leader never applied \(after) entries")
                InterposeHarness.kill9(procs[leader]!)
                killed = leader
            }
            let finished = InterposeHarness.waitUntil(.seconds(90)) { procs.values.allSatisfy { !$0.isRunning } }
            checks.expect(finished, "drivers still running after 90 s:\n" + cluster.logTails())
            var outputs: [NodeID: [String]] = [:]
            for id in cluster.ids where id != killed {
                let p = procs[id]!
                guard !p.isRunning else { continue }
                let log = (try? String(contentsOfFile: root + "/driver-\(id).log", encoding: .utf8)) ?? ""
                checks.expect(p.terminationStatus == 0, "driver \(id) exited \(p.terminationStatus):\n" + log.split(separator: "\n").filter { $0.hasPrefix("FAIL") }.joined(separator: "\n"))
                let text = (try? String(contentsOfFile: root + "/out-\(id).txt", encoding: .utf8)) ?? ""
                outputs[id] = text.split(separator: "\n").map(String.init)
            }
            if finished { try? FileManager.default.removeItem(atPath: root) }
            return outputs
        }

        /// Every output holds the same entries in the same order: increasing indexes, items 1...count
        /// exactly once each, a checkpoint, then "end".
        static func expectSameCompleteLog(_ outputs: [NodeID: [String]], replicas: Int, count: Int, _ checks: Checks) {
            checks.expect(outputs.count == replicas, "\(outputs.count) of \(replicas) replicas finished")
            guard let first = outputs.values.first else { return }
            for (id, o) in outputs { checks.expect(o == first, "replica \(id)'s delivered entries differ from another's") }
            let fields = first.map { $0.split(separator: " ", maxSplits: 2).map(String.init) }
            let indexes = fields.compactMap { UInt64($0[0]) }
            checks.expect(indexes.count == first.count && zip(indexes, indexes.dropFirst()).allSatisfy { $0 < $1 }, "indexes are not increasing")
            let items = fields.filter { $0.count == 3 && $0[1] == "0" && $0[2].hasPrefix("item-") }.map { $0[2] }
            checks.expect(items == (1...count).map { "item-\($0)" }, "items are not item-1...item-\(count) once each, in order: \(items.prefix(5))… (\(items.count))")
            checks.expect(fields.contains { $0.count >= 2 && $0[1] == "1" }, "no checkpoint was delivered")
            checks.expect(fields.last.map { $0.count == 3 && $0[2] == "end" } ?? false, "the last entry is not \"end\"")
        }

        @Test func threeCReplicasDeliverTheSameInputsInTheSameOrder() async throws {
            let checks = Checks()
            defer { checks.recordIssues() }
            try await onOwnThread {
                let outputs = try Self.runDrivers("cabi", count: 60, killLeaderAfter: nil, checks)
                Self.expectSameCompleteLog(outputs, replicas: 3, count: 60, checks)
            }
        }

        @Test func killedLeaderIsReplacedAndSurvivorsAgree() async throws {
            let checks = Checks()
            defer { checks.recordIssues() }
            try await onOwnThread {
                let outputs = try Self.runDrivers("cabi-kill", count: 150, killLeaderAfter: 40, checks)
                Self.expectSameCompleteLog(outputs, replicas: 2, count: 150, checks)
            }
        }
    }
}

extension EndToEnd.InterposeCABITests {
    /// The APUS log entry format (Sources/Interpose/wire.c) under a seeded fuzzer, with address and
    /// undefined-behaviour sanitizers: valid entries decode to what was encoded; mutated ones are
    /// rejected whole (nothing visited) or decode to items inside the entry.
    @Test func wireFormatSurvivesSeededFuzzing() async throws {
        let checks = Checks()
        defer { checks.recordIssues() }
        try await onOwnThread {
            let root = EndToEnd.ClusterProcessTests.scratch("wire-fuzz")
            try FileManager.default.createDirectory(atPath: root, withIntermediateDirectories: true)
            let fuzz = try InterposeHarness.compileC("wire_fuzz", into: root, linkLibrary: false,
                                                     flags: ["-g", "-fsanitize=address,undefined", "-fno-sanitize-recover=all"])
            let seed = ProcessInfo.processInfo.environment["PLOVER_INTERPOSE_SEED"] ?? "1"
            let (status, output) = try InterposeHarness.run(fuzz, [seed, "200000"])
            checks.expect(status == 0 && output.contains("ok 200000"), "seed \(seed): the wire fuzzer failed (\(status)):\n\(output.suffix(2000))")
            if !checks.hasFailures { try? FileManager.default.removeItem(atPath: root) }
        }
    }
}
