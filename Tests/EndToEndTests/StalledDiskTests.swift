import Foundation
import Testing
@testable import PloverTesting
import RDMAPaxos

extension EndToEnd {
    /// A leader whose stable log stops completing writes (a hung disk, injected with the
    /// `PLOVER_FAULT_DISK_STALL_FILE` failpoint) must give up leadership, and the others must go on
    /// committing without it — a failure mode that long went unhandled in widely used Raft
    /// libraries. When the disk recovers, the replica catches up and nothing acknowledged is lost.
    @Suite(.serialized, .timeLimit(.minutes(3))) struct StalledDiskTests {
        @Test func leaderWithAStalledDiskStepsDownAndTheClusterKeepsCommitting() async throws {
            try await EndToEnd.onCluster("stalled-disk", diskStallFailpoints: true) { c, checks -> Void in
                let stalled = try c.waitForLeader(excluding: nil)
                let everyone = NodeClient(endpoints: c.endpoints)
                var acked: [String: String] = [:]
                for i in 0..<5 {
                    _ = try everyone.propose(KeyValueStateMachine.Command.put(key: Array("before-\(i)".utf8), value: Array("v\(i)".utf8)).encoded())
                    acked["before-\(i)"] = "v\(i)"
                }
                c.stallDisk(stalled, true)
                // A write the stalled leader accepts but cannot make durable: what makes a hung disk
                // visible (a leader with nothing to write has nothing to stall on). Its outcome is
                // unknown to the client, so it is not counted as acknowledged.
                let endpoints = c.endpoints
                let stuck = Thread {
                    let only = NodeClient(endpoints: endpoints.filter { $0.key == stalled }, timeout: .seconds(3))
                    _ = try? only.propose(KeyValueStateMachine.Command.put(key: Array("stuck".utf8), value: Array("x".utf8)).encoded(),
                                          attempts: 1)
                }
                stuck.start()
                let successor = try c.waitForLeader(excluding: stalled)
                checks.expect(successor != stalled)
                let client = NodeClient(endpoints: c.endpoints.filter { $0.key != stalled })
                for i in 0..<30 {
                    _ = try client.propose(KeyValueStateMachine.Command.put(key: Array("during-\(i)".utf8), value: Array("v\(i)".utf8)).encoded())
                    acked["during-\(i)"] = "v\(i)"
                }
                // The stalled replica's process is alive and answers status, but it does not lead.
                let s = c.status(stalled)
                checks.expect(c.processes[stalled]?.isRunning == true, "the stalled replica exited")
                checks.expect(s["role"] != nil && s["role"] != "leader", "stalled replica status: \(s)")
                c.stallDisk(stalled, false)
                try c.waitConverged()
                try ClusterProcessTests.expectEveryWrite(acked, on: c.ids, in: c, checks)
            }
        }
    }
}
