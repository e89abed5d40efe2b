import Foundation
import PloverCheck
import RDMAPaxos
import Testing
@testable import PloverTesting

/// PLOVER end to end with Debian's unpatched QEMU under TCG: `plover vm primary`, `backup` and
/// `witness` processes, a guest built at test time (scripts/build-vm-guest.sh) running a UDP
/// counter, a client through the front, checkpoints, kill -9 of the primary, takeover. Each VM
/// has a disk of its own; the requests write files on it, and checkpoints make the backup's
/// image equal to the primary's.
extension EndToEnd {
    @Suite(.serialized) struct VMReplicationTests {
        static var qemuInstalled: Bool {
            (ProcessInfo.processInfo.environment["PATH"] ?? "/usr/bin").split(separator: ":")
                .contains { access("\($0)/qemu-system-x86_64", X_OK) == 0 }
        }

        /// Runs a test only where QEMU is installed.
        static var needsQEMU: ConditionTrait {
            .enabled(if: qemuInstalled, "qemu-system-x86_64 is not installed; scripts/install-deps.sh (run by make test) installs it")
        }

        static var repoRoot: String {
            URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent().path
        }

        /// Builds (or finds cached) the guest kernel and initramfs; returns their directory.
        static func buildGuest() throws -> String {
            try PloverTesting.buildVMGuest(root: repoRoot, cache: repoRoot + "/build/cache/vm-guest")
        }

        @Test(needsQEMU, .timeLimit(.minutes(5)))
        func checkpointsMakeTheBackupEqualAndItTakesOverAfterKill9() async throws {
            let checks = Checks()
            defer { checks.recordIssues() }
            // Every answer goes through a checkpoint here (release on match has its own test).
            try await onOwnThread { try Self.withCluster(checks, vmExtra: Self.disk + "release_on_match = false\n") { try Self.scenario($0, checks) } }
        }

        /// A 16 MiB disk image per replica (created at its first start).
        static let disk = "disk_image = \"disk-{id}.img\"\ndisk_size_mb = 16\n"
        static let diskBlocks = (16 << 20) >> 12

        /// Runs `body` against a fresh three-replica VM cluster (RAM digests recorded at every
        /// checkpoint); keeps its directory and adds the log tails when a check failed.
        static func withCluster(_ checks: Checks, vmExtra: String = "", taps: [NodeID: String]? = nil, _ body: (VMCluster) throws -> Void) throws {
            let guest = try buildGuest()
            let exe = URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent()
            guard let plover = [exe.appendingPathComponent("plover").path, exe.deletingLastPathComponent().appendingPathComponent("plover").path]
                .first(where: { FileManager.default.isExecutableFile(atPath: $0) }) else {
                throw CLIError("the plover executable is not built next to the tests; run `swift build` first (make test does)")
            }
            let root = FileManager.default.temporaryDirectory.appendingPathComponent("plover-vm-\(UUID().uuidString)").path
            let cluster = try VMCluster(root: root, kernel: guest + "/vmlinuz", initrd: guest + "/initrd.gz",
                                        vmExtra: "record_ram_digest = true\n" + vmExtra, taps: taps, executable: plover)
            var keep = false
            defer {
                cluster.stopAll()
                if !keep { try? FileManager.default.removeItem(atPath: root) }
            }
            do { try body(cluster) } catch {
                checks.record("\(error)")
            }
            if checks.hasFailures {
                keep = true
                checks.record("kept \(root) for inspection\n" + cluster.logTails())
            }
        }

        /// Checkpoints both replicas completed, paired by log index; each pair's RAM digests must be equal.
        static func commonCheckpoints(_ cluster: VMCluster, _ checks: Checks) -> [([String: String], [String: String])] {
            let p = cluster.checkpoints(1).filter { $0["ok"] == "true" }
            let b = cluster.checkpoints(2).filter { $0["ok"] == "true" }
            // The same log entry on both sides (epochs repeat once the other replica is primary).
            let common = p.compactMap { pc in b.first { $0["index"] == pc["index"] && $0["epoch"] == pc["epoch"] }.map { (pc, $0) } }
            for (pc, bc) in common {
                checks.expect(pc["ram_digest"] != nil && pc["ram_digest"] == bc["ram_digest"],
                              "epoch \(pc["epoch"]!): primary RAM digest \(pc["ram_digest"] ?? "-") != backup \(bc["ram_digest"] ?? "-")")
                // With a disk, the images hashed by each side after the disk step must be equal too.
                checks.expect(pc["disk_digest"] == bc["disk_digest"],
                              "epoch \(pc["epoch"]!): primary disk digest \(pc["disk_digest"] ?? "-") != backup \(bc["disk_digest"] ?? "-")")
            }
            return common
        }

        /// The disk's checkpoints: every pair has digests; after the first (every block compared)
        /// only the union of both sides' dirty blocks is compared, the backup's own writes are in
        /// it, some blocks diverged, and what was sent is far less than the image.
        static func checkDisk(_ common: [([String: String], [String: String])], _ checks: Checks) {
            checks.expect(common.allSatisfy { $0.0["disk_digest"] != nil }, "a checkpoint without a disk digest: \(common.map(\.0))")
            let later = common.dropFirst().map(\.0)
            checks.expect(!later.isEmpty, "only one checkpoint completed on both replicas: \(common.map(\.0))")
            func n(_ c: [String: String], _ k: String) -> Int { Int(c[k] ?? "") ?? -1 }
            for c in later {
                checks.expect((0..<diskBlocks).contains(n(c, "disk_union")), "checkpoint \(c["epoch"]!) compared every disk block: \(c)")
                checks.expect((0..<(diskBlocks * 4096 / 16)).contains(n(c, "disk_bytes")), "checkpoint \(c["epoch"]!) sent \(n(c, "disk_bytes")) disk bytes, not far fewer than the image's \(diskBlocks * 4096): \(c)")
            }
            checks.expect(later.contains { n($0, "disk_backup_dirty") > 0 && n($0, "disk_divergent") > 0 },
                          "no later checkpoint saw the backup's own dirty blocks and a divergent block: \(later)")
            print("VMReplicationTests: disk per checkpoint (primary dirty/backup dirty/union/divergent/bytes): "
                  + later.map { "\(n($0, "disk_primary_dirty"))/\(n($0, "disk_backup_dirty"))/\(n($0, "disk_union"))/\(n($0, "disk_divergent"))/\(n($0, "disk_bytes"))" }.joined(separator: ", "))
        }

        static func scenario(_ cluster: VMCluster, _ checks: Checks) throws {
            try cluster.startAll()
            let client = CounterClient(name: "c1", fronts: [cluster.fronts[1]!, cluster.fronts[2]!])
            // The first request also waits out the boot of both guests (a few seconds under TCG).
            var answers: [UInt64] = []
            // Each request also writes 64 KiB to /data/c1 (and the guest writes /data/noise by itself).
            for _ in 0..<5 { answers.append(try client.request("DISK", extra: " 64", timeout: .seconds(90))) }
            checks.expect(answers == [1, 2, 3, 4, 5], "answers before the failover: \(answers)")

            // Every answer was released by a checkpoint (its log line is written just after
            // the release, so give the last one a moment); find one both sides completed and
            // compare the whole-RAM digests they took while paused.
            func released() -> Int { cluster.checkpoints(1).compactMap { Int($0["released"] ?? "") }.reduce(0, +) }
            let deadline = ContinuousClock.now + .seconds(10)
            while released() < 5 && ContinuousClock.now < deadline { Thread.sleep(forTimeInterval: 0.05) }
            let common = commonCheckpoints(cluster, checks)
            checks.expect(!common.isEmpty, "no checkpoint completed on both replicas; primary: \(cluster.checkpoints(1)), backup: \(cluster.checkpoints(2))")
            // The first checkpoint compares every page, later ones only the dirty union.
            if let later = common.dropFirst().first {
                checks.expect(Int(later.0["union"] ?? "") ?? .max < 32768, "a later checkpoint still compared every page: \(later.0)")
            }
            Self.checkDisk(common, checks)
            checks.expect(released() >= 5, "the primary released \(released()) answers through checkpoints, expected at least 5")

            // Next request in flight while the primary dies (kill -9 of its replica process and QEMU).
            client.seq += 1
            _ = client.write("INC c1 \(client.seq)\n")
            cluster.kill(1)
            client.seq -= 1
            var after: [UInt64] = []
            for _ in 0..<3 { after.append(try client.request(timeout: .seconds(60))) }
            checks.expect(after == [6, 7, 8], "answers after the failover: \(after) (expected 6, 7, 8: none lost, none repeated)")
            let log2 = (try? String(contentsOfFile: cluster.logPath(2), encoding: .utf8)) ?? ""
            checks.expect(!log2.contains("can no longer take over"), "the backup declared its VM unusable")
        }
    }
}
