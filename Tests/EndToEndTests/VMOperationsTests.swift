import Foundation
import RDMAPaxos
import Testing
@testable import VMReplica
@testable import PloverTesting
@testable import plover

/// What an operator drives on a running VM pair, with clients writing: `plover vm status`, the
/// operator's QMP socket (queries answered, `stop` refused, the VM untouched), and a planned
/// switchover each way (no answer lost or repeated, the old primary re-protected as the backup).
extension EndToEnd {
    @Suite(.serialized) struct VMOperationsTests {
        typealias R = VMReprotectionTests

        /// One QMP exchange on `fd`: sends `request`, returns the answer object.
        static func qmp(_ fd: Int32, _ request: String) -> [String: Any]? {
            guard Sockets.writeAll(fd, Array((request + "\n").utf8)) else { return nil }
            return readObject(fd)
        }

        static func readObject(_ fd: Int32) -> [String: Any]? {
            var line: [UInt8] = []
            var b: UInt8 = 0
            while read(fd, &b, 1) == 1 {
                if b == 10 { return (try? JSONSerialization.jsonObject(with: Data(line))) as? [String: Any] }
                line.append(b)
            }
            return nil
        }

        @Test(VMReplicationTests.needsQEMU, .timeLimit(.minutes(5)))
        func statusOperatorQMPAndSwitchoversUnderLoad() async throws {
            try await VMCheckpointKillTests.underLoad { cluster, load, checks in
                guard R.waitForLog(cluster, 2, "vm: protected:", after: 0, timeout: .seconds(120)) else {
                    checks.record("node 2 was never protected")
                    return
                }
                let status = try vmControl(configPath: cluster.configPath(1), "status")
                for field in ["role=primary", "vm=protected", "leading=true", "syncvm_link=up", "last_checkpoint=at="] {
                    checks.expect(status.contains(field), "status of node 1 lacks \(field):\n\(status)")
                }
                let backupStatus = try vmControl(configPath: cluster.configPath(2), "status")
                checks.expect(backupStatus.contains("role=backup") && backupStatus.contains("leading=false"), "status of node 2:\n\(backupStatus)")

                // The operator's QMP socket: a query is answered from the running VM, `stop` is refused.
                let fd = try Sockets.connectUnix(cluster.runDir(1) + "/qmp.sock")
                defer { close(fd) }
                checks.expect(Self.readObject(fd)?["QMP"] != nil, "no QMP greeting")
                checks.expect(Self.qmp(fd, #"{"execute": "qmp_capabilities"}"#)?["return"] != nil, "qmp_capabilities not accepted")
                let st = Self.qmp(fd, #"{"execute": "query-status", "id": 7}"#)
                checks.expect((st?["return"] as? [String: Any])?["status"] != nil && st?["id"] as? Int == 7, "query-status: \(String(describing: st))")
                let stop = Self.qmp(fd, #"{"execute": "stop"}"#)
                let desc = ((stop?["error"] as? [String: Any])?["desc"] as? String) ?? ""
                checks.expect(desc.contains("'stop' is refused"), "stop was not refused: \(String(describing: stop))")
                let before = load.count
                checks.expect(load.waitForAnswers(before + 20, timeout: .seconds(30)), "the VM stopped answering after the refused stop")

                // A switchover asked of the backup is refused and names the primary's node.
                let refused = (try? vmControl(configPath: cluster.configPath(2), "switchover")) ?? ""
                checks.expect(refused.hasPrefix("ERR node 2 is not the primary") && refused.contains("node 1"), "switchover asked of the backup: \(refused)")
                // Planned switchover 1 → 2, then back once node 1 is re-protected.
                for (from, to) in [(NodeID(1), NodeID(2)), (NodeID(2), NodeID(1))] {
                    let offset = R.logSize(cluster, from)
                    let answer = try vmControl(configPath: cluster.configPath(from), "switchover")
                    checks.expect(answer.hasPrefix("OK"), "switchover \(from) → \(to): \(answer)")
                    let asked = ContinuousClock.now
                    checks.expect(R.waitForLog(cluster, to, "is the primary now", after: 0, timeout: .seconds(10)), "node \(to) never became the primary")
                    checks.expect(load.firstAnswer(after: asked + .milliseconds(100), timeout: .seconds(30)) != nil, "no answers after the switchover to node \(to)")
                    checks.expect(R.waitForLog(cluster, from, "vm: protected:", after: offset, timeout: .seconds(60)), "node \(from) was not re-protected as the backup")
                    let s = try vmControl(configPath: cluster.configPath(to), "status")
                    checks.expect(s.contains("role=primary"), "after the switchover node \(to) says:\n\(s)")
                }
                checks.expect(load.timedOut.isEmpty, "requests left unanswered for 10 s: \(load.timedOut.prefix(3))")
            }
        }
    }
}
