import Foundation
import PloverCheck
import Testing
@testable import PloverTesting
import RDMAPaxos

extension EndToEnd {
    /// A replica whose disk fills up under load: it must neither crash (Berkeley DB's region files
    /// are memory-mapped; a page first touched on a full disk was a SIGBUS) nor stop for good. It
    /// holds its writes, says why in `status` naming its directory, stops leading and
    /// acknowledging, keeps answering, and catches up by itself once space is freed.
    @Suite(.serialized, .timeLimit(.minutes(4))) struct DiskFullTests {
        static func run(_ command: String) -> Int32 {
            (try? InterposeHarness.run("/bin/sh", ["-c", command]).0) ?? -1
        }

        @Test func aReplicaOnAFullDiskHoldsItsWritesAndCatchesUpWhenSpaceReturns() async throws {
            let checks = Checks()
            defer { checks.recordIssues() }
            try await onOwnThread {
                let root = ClusterProcessTests.scratch("disk-full")
                let c = try DemoCluster(root: root, durability: "fsync", executable: try ClusterProcessTests.ploverExecutable())
                let victim: NodeID = 1
                let dir = c.dataDir(victim)
                try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
                // Room for the Berkeley DB regions (~75 MB, written out at open) and a few MB of log.
                guard Self.run("mount -t tmpfs -o size=112m plover-test '\(dir)'") == 0 else {
                    checks.record("cannot mount a tmpfs on \(dir) (the test needs root)")
                    return
                }
                defer {
                    c.stopAll()
                    _ = Self.run("umount -l '\(dir)'")
                    try? FileManager.default.removeItem(atPath: root)
                }
                try c.startAll()
                _ = try c.waitForLeader(excluding: nil)
                let client = NodeClient(endpoints: c.endpoints, timeout: .seconds(2))
                let value = String(repeating: "v", count: 100_000)
                var acked: [String: String] = [:]
                var warned = false
                // Write until the victim reports that it holds its writes, then some more.
                var i = 0
                var afterWarning = 0
                while i < 1_500 && afterWarning < 30 {
                    i += 1
                    let key = "k\(i)"
                    if (try? client.propose(KeyValueStateMachine.Command.put(key: Array(key.utf8), value: Array((value + key).utf8)).encoded())) != nil {
                        acked[key] = value + key
                    }
                    if warned { afterWarning += 1 } else if i % 5 == 0 { warned = c.status(victim)["storage_warning"] != nil }
                }
                // A leader whose own writes are held steps down once its disk looks stalled
                // (`disk_stall_ticks`); the others go on committing meanwhile.
                _ = InterposeHarness.waitUntil(.seconds(15)) { c.status(victim)["role"] != "leader" }
                let status = c.status(victim)
                checks.expect(warned, "node \(victim) never reported a full disk after \(i) puts of 100 KB; status: \(status)\n" + c.logTails())
                checks.expect(c.processes[victim]?.isRunning == true, "node \(victim) died on the full disk:\n" + c.logTails())
                checks.expect((status["storage_warning"] ?? "").contains(dir), "the warning does not name \(dir): \(status)")
                checks.expect(status["failure"] == nil, "node \(victim) stopped serving: \(status)")
                checks.expect(status["role"] != "leader", "node \(victim) still leads with a full disk: \(status)")
                checks.expect(acked.count > 30, "only \(acked.count) puts were acknowledged: the others did not go on without the full replica")
                // Space returns: the held writes go out and the replica catches up by itself.
                checks.expect(Self.run("mount -o remount,size=1g '\(dir)'") == 0, "cannot grow the tmpfs")
                let caughtUp = InterposeHarness.waitUntil(.seconds(60)) {
                    let s = c.status(victim)
                    return s["storage_warning"] == nil && s["durable_index"] != nil && s["durable_index"] == s["last_index"]
                }
                checks.expect(caughtUp, "node \(victim) did not write its held entries after space returned: \(c.status(victim))")
                do { try c.waitConverged(timeout: .seconds(60)) } catch { checks.record("no convergence after space returned: \(error)\n" + c.logTails()) }
                var missing = 0
                for (k, v) in acked {
                    let got = try? client.localRead(Array(k.utf8), at: victim)
                    if got.flatMap(KeyValueStateMachine.decodeResult).map({ String(decoding: $0, as: UTF8.self) }) != v { missing += 1 }
                }
                checks.expect(missing == 0, "node \(victim) lacks \(missing) of \(acked.count) acknowledged writes after space returned")
            }
        }
    }
}
