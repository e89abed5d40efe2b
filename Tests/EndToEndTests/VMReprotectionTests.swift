import Foundation
import PloverCheck
import RDMAPaxos
import Testing
@testable import PloverTesting

/// A VM backup whose process and QEMU were killed and started again: it boots a new VM, so until
/// a checkpoint has copied the primary's VM into it, it must not answer anyone, even as leader;
/// the next checkpoint (every page compared) re-protects it, and it can take over again. The
/// same when only a replica's QEMU dies: a primary gives the VM to its backup first.
extension EndToEnd {
    @Suite(.serialized) struct VMReprotectionTests {
        typealias VM = VMReplicationTests

        /// How long a line may take to appear in a replica's log.
        static func waitForLog(_ cluster: VMCluster, _ id: NodeID, _ text: String, after offset: Int, timeout: Duration) -> Bool {
            let deadline = ContinuousClock.now + timeout
            while ContinuousClock.now < deadline {
                let log = (try? String(contentsOfFile: cluster.logPath(id), encoding: .utf8)) ?? ""
                if log.utf8.count > offset, String(log.utf8.dropFirst(offset))?.contains(text) ?? false { return true }
                Thread.sleep(forTimeInterval: 0.1)
            }
            return false
        }

        static func logSize(_ cluster: VMCluster, _ id: NodeID) -> Int {
            ((try? FileManager.default.attributesOfItem(atPath: cluster.logPath(id)))?[.size] as? Int) ?? 0
        }

        /// Kills replica `id`; the survivor must continue from the released state with `expected`.
        static func killAndExpect(_ cluster: VMCluster, _ id: NodeID, _ client: CounterClient, _ checks: Checks,
                                  _ expected: [UInt64], _ what: String) throws {
            cluster.kill(id)
            var after: [UInt64] = []
            for _ in expected { after.append(try client.request(timeout: .seconds(60))) }
            checks.expect(after == expected, "answers \(what): \(after) (expected \(expected))")
        }

        /// Kills and restarts the backup (node 2), which must say its VM is new; returns the
        /// size its log had before the restart.
        static func restartBackup(_ cluster: VMCluster, _ checks: Checks) throws -> Int {
            cluster.kill(2)
            let offset = logSize(cluster, 2)
            try cluster.restart(2)
            checks.expect(waitForLog(cluster, 2, "this replica restarted", after: offset, timeout: .seconds(30)),
                          "the restarted backup did not say its VM is new")
            return offset
        }

        /// Starts the three replicas, gets the first three answers through a client of both
        /// fronts, then runs `body` with them.
        static func fromThreeAnswers(vmExtra: String = "",
                                     _ body: @escaping @Sendable (VMCluster, CounterClient, Checks, inout [UInt64]) throws -> Void) async throws {
            let checks = Checks()
            defer { checks.recordIssues() }
            try await onOwnThread {
                try VM.withCluster(checks, vmExtra: vmExtra) { cluster in
                    try cluster.startAll()
                    let client = CounterClient(name: "c1", fronts: [cluster.fronts[1]!, cluster.fronts[2]!])
                    var answers: [UInt64] = []
                    for _ in 0..<3 { answers.append(try client.request(timeout: .seconds(90))) }
                    try body(cluster, client, checks, &answers)
                }
            }
        }

        @Test(VM.needsQEMU, .timeLimit(.minutes(5)))
        func restartedBackupIsReprotectedThenTakesOverWithTheRightState() async throws {
            try await Self.fromThreeAnswers(vmExtra: "checkpoint_timeout_ms = 8000") { cluster, client, checks, answers in
                checks.expect(answers == [1, 2, 3], "answers before the backup's restart: \(answers)")

                let offset = try Self.restartBackup(cluster, checks)
                // The primary holds these answers until a checkpoint with the new backup completes.
                for _ in 0..<3 { answers.append(try client.request(timeout: .seconds(90))) }
                checks.expect(answers == [1, 2, 3, 4, 5, 6], "answers around the backup's restart: \(answers)")
                checks.expect(Self.waitForLog(cluster, 2, "vm: protected:", after: offset, timeout: .seconds(30)),
                              "the restarted backup never logged its re-protection")
                // The checkpoint that re-protected it compared every page, and left both RAMs equal.
                let restartedEpochs = cluster.checkpoints(2).filter { $0["ok"] == "true" && $0["union"] == "32768" }.compactMap { $0["epoch"] }
                let common = VM.commonCheckpoints(cluster, checks)
                checks.expect(common.contains { restartedEpochs.contains($0.1["epoch"]!) && $0.1["index"] != nil },
                              "no full checkpoint after the restart completed on both sides: backup \(cluster.checkpoints(2))")

                // Now the primary dies; the re-protected backup continues from the released state.
                try Self.killAndExpect(cluster, 1, client, checks, [7, 8, 9], "after the failover")
            }
        }

        @Test(VM.needsQEMU, .timeLimit(.minutes(5)))
        func afterFailoverTheRestartedPrimaryBecomesTheNewPrimarysBackup() async throws {
            // Checks that answers wait for checkpoints once re-protected: without release on match.
            try await Self.fromThreeAnswers(vmExtra: "checkpoint_timeout_ms = 8000\nrelease_on_match = false") { cluster, client, checks, answers in
                // Failover: node 2 leads, becomes the primary and answers unprotected.
                cluster.kill(1)
                for _ in 0..<3 { answers.append(try client.request(timeout: .seconds(60))) }
                checks.expect(Self.waitForLog(cluster, 2, "is the primary now", after: 0, timeout: .seconds(10)),
                              "node 2 never became the primary")
                // Node 1 comes back with the same command; it joins as node 2's backup.
                let offset = Self.logSize(cluster, 1)
                try cluster.restart(1)
                checks.expect(Self.waitForLog(cluster, 1, "joins as the backup of node 2", after: offset, timeout: .seconds(30)),
                              "the restarted primary did not join as the backup")
                checks.expect(Self.waitForLog(cluster, 1, "vm: protected:", after: offset, timeout: .seconds(60)),
                              "the restarted primary was never re-protected")
                // Protected again: node 2's answers now wait for checkpoints with node 1.
                let releasedBefore = cluster.checkpoints(2).compactMap { Int($0["released"] ?? "") }.reduce(0, +)
                for _ in 0..<3 { answers.append(try client.request(timeout: .seconds(60))) }
                checks.expect(answers == Array(1...9), "answers through failover and re-protection: \(answers)")
                let deadline = ContinuousClock.now + .seconds(10)
                func released() -> Int { cluster.checkpoints(2).compactMap { Int($0["released"] ?? "") }.reduce(0, +) }
                while released() < releasedBefore + 3 && ContinuousClock.now < deadline { Thread.sleep(forTimeInterval: 0.05) }
                checks.expect(released() >= releasedBefore + 3, "node 2 released \(released() - releasedBefore) answers through checkpoints after re-protection, expected 3")
                let common = VM.commonCheckpoints(cluster, checks).filter { $0.0["role"] == "backup" }
                checks.expect(!common.isEmpty, "no checkpoint with node 2 as primary completed on both sides")

                // And back: node 2 dies, node 1 continues from the released state.
                try Self.killAndExpect(cluster, 2, client, checks, [10, 11, 12], "after the second failover")
            }
        }

        /// Node 1, the primary, loses its VM (`lose`); node 2 takes over and answers 4–6;
        /// `afterTakeOver` runs; node 1 must become node 2's backup and be re-protected (answers
        /// 7–9 through checkpoints), then carry on alone when node 2 dies (10–12).
        static func primaryLosesItsVMAndIsReprotected(_ cluster: VMCluster, _ client: CounterClient, _ checks: Checks,
                                                      _ answers: inout [UInt64], what: String,
                                                      lose: () -> Void, afterTakeOver: () -> Void = {}) throws {
            let offset1 = logSize(cluster, 1)
            lose()
            for _ in 0..<3 { answers.append(try client.request(timeout: .seconds(60))) }
            checks.expect(waitForLog(cluster, 2, "is the primary now", after: 0, timeout: .seconds(10)),
                          "\(what): node 2 never became the primary")
            afterTakeOver()
            checks.expect(waitForLog(cluster, 1, "is a backup now", after: offset1, timeout: .seconds(30)),
                          "\(what): node 1 did not become a backup")
            checks.expect(waitForLog(cluster, 1, "vm: protected:", after: offset1, timeout: .seconds(60)),
                          "\(what): node 1 was never re-protected")
            for _ in 0..<3 { answers.append(try client.request(timeout: .seconds(60))) }
            checks.expect(answers == Array(1...9), "answers through \(what) and re-protection: \(answers)")
            try killAndExpect(cluster, 2, client, checks, [10, 11, 12], "after node 2 died")
        }

        @Test(VM.needsQEMU, .timeLimit(.minutes(5)))
        func pausedPrimaryThatWasTakenOverBecomesTheBackupWhenItWakes() async throws {
            try await Self.fromThreeAnswers(vmExtra: "checkpoint_timeout_ms = 8000") { cluster, client, checks, answers in
                // The primary's host stops (replica process and QEMU); node 2 takes over. Node 1
                // wakes up to find its VM taken over: it becomes node 2's backup.
                try Self.primaryLosesItsVMAndIsReprotected(cluster, client, checks, &answers, what: "the pause",
                                                           lose: { cluster.signal(1, SIGSTOP) },
                                                           afterTakeOver: { cluster.signal(1, SIGCONT) })
            }
        }

        @Test(VM.needsQEMU, .timeLimit(.minutes(5)))
        func primarysQEMUKilledAloneHandsTheVMToTheBackupWhichReprotectsIt() async throws {
            try await Self.fromThreeAnswers(vmExtra: "checkpoint_timeout_ms = 8000") { cluster, client, checks, answers in
                // Only the primary's QEMU dies; its replica process lives and must give the VM up.
                try Self.primaryLosesItsVMAndIsReprotected(cluster, client, checks, &answers, what: "the QEMU's death") {
                    let offset1 = Self.logSize(cluster, 1)
                    cluster.killQEMUs(of: 1)
                    checks.expect(Self.waitForLog(cluster, 1, "exited", after: offset1, timeout: .seconds(10)),
                                  "node 1 did not notice its QEMU exit")
                }
            }
        }

        @Test(VM.needsQEMU, .timeLimit(.minutes(5)))
        func backupsQEMUsKilledAloneAreReplacedAndItCanTakeOverAgain() async throws {
            try await Self.fromThreeAnswers(vmExtra: "checkpoint_timeout_ms = 8000") { cluster, client, checks, answers in
                // The backup's running QEMU and its standby die; its replica process lives.
                let offset2 = Self.logSize(cluster, 2)
                cluster.killQEMUs(of: 2)
                checks.expect(Self.waitForLog(cluster, 2, "exited", after: offset2, timeout: .seconds(10)),
                              "node 2 did not notice its QEMU exit")
                // The primary's answers wait for a checkpoint that re-protects node 2.
                for _ in 0..<3 { answers.append(try client.request(timeout: .seconds(90))) }
                checks.expect(Self.waitForLog(cluster, 2, "vm: protected:", after: offset2, timeout: .seconds(60)),
                              "node 2 was never re-protected into a new QEMU")
                checks.expect(answers == Array(1...6), "answers around the backup's QEMU death: \(answers)")
                try Self.killAndExpect(cluster, 1, client, checks, [7, 8, 9], "after the primary died")
            }
        }

        @Test(VM.needsQEMU, .timeLimit(.minutes(5)))
        func restartedBackupThatWasNeverReprotectedAnswersNobody() async throws {
            try await Self.fromThreeAnswers { cluster, client, checks, answers in
                checks.expect(answers == [1, 2, 3], "answers before the backup's restart: \(answers)")
                // No request is pending, so no checkpoint runs: the restarted backup stays a new VM.
                let offset = try Self.restartBackup(cluster, checks)
                checks.expect(Self.waitForLog(cluster, 2, "syncvm link to node 1 is up", after: offset, timeout: .seconds(30)),
                              "the restarted backup never connected its syncvm link")
                cluster.kill(1)
                // Node 2 leads with the witness, but its VM booted afresh: answering would
                // contradict the counter clients saw. It must stay silent.
                let before = client.retries
                let answered = try? client.request(timeout: .seconds(12))
                checks.expect(answered == nil, "the restarted, never re-protected backup answered \(answered.map(String.init) ?? "-")")
                checks.expect(client.retries > before, "the client never tried again")
                checks.expect(Self.waitForLog(cluster, 2, "became leader", after: offset, timeout: .seconds(1)), "node 2 never led after its restart")
                let log = (try? String(contentsOfFile: cluster.logPath(2), encoding: .utf8)) ?? ""
                checks.expect(!log.contains("is the primary now"), "node 2 became the primary with a new VM")
            }
        }
    }
}
