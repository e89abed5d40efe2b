import Foundation
import PloverCheck
import RDMAPaxos
import Testing
@testable import PloverTesting

/// Release on match end to end: a client in its own namespace keeps one TCP connection to
/// redis-server in the replicated guest (over the taps, `network = "tap"`) and writes SET k_i i,
/// while a failpoint on the backup makes its digest of every 5th TCP segment with payload differ
/// from what its guest sent (as if the two guests' frames differed). The test requires that frames
/// went out by a match (no checkpoint in between), that the perturbed segments were never among
/// them (each was held until a checkpoint), that mismatches were seen and checkpoints ran, and
/// that every acknowledged write reads back on the same connection.
extension EndToEnd {
    @Suite(.serialized) struct VMReleaseOnMatchTests {
        typealias VM = VMReplicationTests
        typealias Tap = VMTapFailoverTests

        static let perturbEvery = 5

        @Test(VM.needsQEMU, .timeLimit(.minutes(4)))
        func differingOutputWaitsForACheckpointAndMatchingOutputDoesNot() async throws {
            let checks = Checks()
            defer { checks.recordIssues() }
            try await onOwnThread {
                let lab = try TapLab()
                defer { lab.tearDown() }
                try VM.withCluster(checks, vmExtra: "output_hold_max_ms = 150", taps: lab.taps) { cluster in
                    try Self.scenario(cluster, lab, checks)
                }
            }
        }

        static func lines(_ path: String) -> [String] {
            ((try? String(contentsOfFile: path, encoding: .utf8)) ?? "").split(separator: "\n").map(String.init)
        }

        static func scenario(_ cluster: VMCluster, _ lab: TapLab, _ checks: Checks) throws {
            let env = ["PLOVER_VM_FAILPOINTS": "1"]
            try FileManager.default.createDirectory(atPath: cluster.runDir(2), withIntermediateDirectories: true)
            try "\(perturbEvery)\n".write(toFile: cluster.runDir(2) + "/perturb-output", atomically: true, encoding: .utf8)
            for id: NodeID in [1, 2] { try cluster.start(id, environment: env) }
            try cluster.start(3)
            let redis = try RedisConnection(connect: lab.clientConnect, host: "10.99.0.2", port: 6379, timeout: .seconds(120))
            let writer = Tap.Writer(redis)
            var stopped = false
            defer { if !stopped { writer.stop() } }
            func need(_ ok: Bool, _ what: String) throws {
                if !ok { throw CLIError("\(what); writer: \(writer.acked.count) acknowledged, error \(writer.error ?? "none")") }
            }
            try need(Tap.wait(.seconds(90)) { Tap.log(cluster, 2).contains("vm: protected:") }, "the backup was never protected")
            let before = writer.acked.count
            try need(writer.waitForAcks(150, from: before, timeout: .seconds(90)), "150 writes were not acknowledged after the protection")
            writer.stop()
            stopped = true
            checks.expect(writer.error == nil, "the writer failed: \(writer.error ?? "")")

            let status = vmStatus(runDir: cluster.runDir(1))
            let byMatch = Int(status["released_by_match"] ?? "") ?? 0
            let byCheckpoint = Int(status["released_by_checkpoint"] ?? "") ?? 0
            let mismatches = Int(status["output_mismatches"] ?? "") ?? 0
            let perturbed = Set(lines(cluster.runDir(2) + "/perturbed.log"))
            let released = lines(cluster.runDir(1) + "/released-by-match.log")
            let leaked = released.filter { perturbed.contains($0) }
            checks.expect(!perturbed.isEmpty, "the failpoint never changed a digest on the backup")
            checks.expect(byMatch > 0 && !released.isEmpty, "no frame was released by a match (status: \(status))")
            checks.expect(leaked.isEmpty, "\(leaked.count) frames whose backup digest differed were released by a match: \(leaked.prefix(3))")
            checks.expect(mismatches > 0 && (status["mismatch_causes"] ?? "").contains("tcp-payload-or-options"),
                          "the differing digests were not seen as mismatches (status: \(status))")
            checks.expect(byCheckpoint > 0, "no frame was released by a checkpoint after a mismatch (status: \(status))")

            // Every acknowledged write is there, read on the same connection.
            let acked = writer.acked
            var wrong: [String] = []
            for i in acked {
                let v = try redis.command(["GET", "k_\(i)"], timeout: .seconds(60))
                if v != "\(i)" { wrong.append("k_\(i)=\(v)") }
            }
            checks.expect(wrong.isEmpty, "\(wrong.count) of \(acked.count) acknowledged writes read back wrong: \(wrong.prefix(5))")
            checks.expect(acked == Array(1...acked.count), "acknowledgements out of order or with gaps")
            _ = VM.commonCheckpoints(cluster, checks)
            print("release on match: \(acked.count) writes; released by match \(byMatch), by checkpoint \(byCheckpoint), "
                  + "mismatches \(mismatches) (\(status["mismatch_causes"] ?? "-")), \(perturbed.count) digests perturbed, "
                  + "\(status["checkpoints_completed"] ?? "-") checkpoints")
        }
    }
}
