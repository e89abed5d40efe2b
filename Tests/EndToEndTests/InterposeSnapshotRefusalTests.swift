import Foundation
import Testing
@testable import PloverTesting
import RDMAPaxos

extension EndToEnd.InterposeRedisTests {
    /// Every bad snapshot setting stops the server at load (exit 78) with a message naming the
    /// variable and what is wrong with it, before Redis reads a file or a client byte.
    @Test func badSnapshotSettingsStopTheServerNamingTheVariable() async throws {
        try await Self.withRedis("redis-snapshot-settings", startReplicas: false) { r, checks in
            let dir = r.root + "/redis-1"
            let cases: [([String: String], String)] = [
                (["INTERPOSE_SNAPSHOT": "memcached", "INTERPOSE_SNAPSHOT_FILE": dir + "/dump.rdb"],
                 "INTERPOSE_SNAPSHOT=memcached is not a snapshot protocol libinterpose knows"),
                (["INTERPOSE_SNAPSHOT": "redis"], "INTERPOSE_SNAPSHOT_FILE is missing"),
                (["INTERPOSE_SNAPSHOT": "redis", "INTERPOSE_SNAPSHOT_FILE": "dump.rdb"], "INTERPOSE_SNAPSHOT_FILE is dump.rdb, not an absolute path"),
                (["INTERPOSE_SNAPSHOT": "redis", "INTERPOSE_SNAPSHOT_FILE": r.root + "/no-such-dir/dump.rdb"], "its directory does not exist"),
                (["INTERPOSE_SNAPSHOT": "redis", "INTERPOSE_SNAPSHOT_FILE": dir + "/dump.rdb", "INTERPOSE_SNAPSHOT_BYTES": "4096"],
                 "INTERPOSE_SNAPSHOT_BYTES=4096 is not a whole number from 65536"),
                (["INTERPOSE_SNAPSHOT_FILE": dir + "/dump.rdb"], "INTERPOSE_SNAPSHOT_FILE is set but INTERPOSE_SNAPSHOT"),
            ]
            for (environment, message) in cases {
                try? FileManager.default.removeItem(atPath: r.root + "/redis-1.log")
                try r.start(1, environment: environment)
                let p = r.processes[1]!
                let exited = InterposeHarness.waitUntil(.seconds(10)) { !p.isRunning }
                r.kill(1)
                let log = r.logText(1)
                checks.expect(exited && p.terminationStatus == 78, "\(environment): the server did not stop with 78 (running: \(!exited)):\n\(log.suffix(600))")
                checks.expect(log.contains(message), "\(environment): the log does not say \"\(message)\":\n\(log.suffix(600))")
            }
        }
    }

    /// `INTERPOSE_SNAPSHOT_FILE` naming a file the server does not save to: after each save the
    /// file is missing (the shim removes it before saving, so a stale one cannot pass for new),
    /// every replica says so and takes no snapshot, nothing is compacted, and they stay equal.
    @Test func aSnapshotFileTheServerDoesNotWriteIsReportedAndNothingIsCompacted() async throws {
        let wrong = FileManager.default.temporaryDirectory.path + "/plover-not-saved-by-redis-\(getpid()).rdb"
        try await Self.withRedis("redis-snapshot-wrong-file", environment: ["INTERPOSE_SNAPSHOT_FILE": wrong], snapshotBytes: 64 << 10) { r, checks in
            let writer = SnapshotWriter(r)
            try writer.write(bytes: 160 << 10)
            let reported = InterposeHarness.waitUntil(.seconds(20)) {
                r.cluster.ids.allSatisfy { r.logText($0).contains("INTERPOSE_SNAPSHOT_FILE=\(wrong) cannot be read after the server saved") }
            }
            checks.expect(reported, "not every replica reported the missing snapshot file:\n" + r.snapshotSummary())
            for id in r.cluster.ids {
                checks.expect(r.snapshotsTaken(id).isEmpty && r.firstIndex(id) == 1, "replica \(id) compacted without its server's file:\n" + r.snapshotSummary())
            }
            checks.expect(r.converged(timeout: .seconds(30)), "digests differ:\n" + r.logTails())
            writer.checkAcknowledged(checks)
        }
    }

    /// A replica whose stored snapshot is corrupt stops and names the file, never loading it; one
    /// whose Redis refuses to load a snapshot (DEBUG disabled) stops and says what to enable;
    /// with both put right it comes back from the snapshot equal to the others.
    @Test func aSnapshotThatCannotBeLoadedStopsTheReplicaAndSaysWhy() async throws {
        try await Self.withRedis("redis-snapshot-load", snapshotBytes: 64 << 10) { r, checks in
            let (leader, _) = try r.connectToLeader()
            let follower = r.cluster.ids.first { $0 != leader }!
            let writer = SnapshotWriter(r)
            try writer.write(bytes: 160 << 10)
            let taken = InterposeHarness.waitUntil(.seconds(20)) { !r.snapshotsTaken(follower).isEmpty && r.firstIndex(follower) > 1 }
            checks.expect(taken, "follower \(follower) took no snapshot:\n" + r.snapshotSummary())
            Thread.sleep(forTimeInterval: 0.5) // the snapshot is saved off the node's thread
            r.kill(follower)
            let stored = r.cluster.dataDir(follower) + "/snapshot.bin"
            let good = try Data(contentsOf: URL(fileURLWithPath: stored))

            // A flipped byte in the stored snapshot.
            var bad = good
            bad[bad.count / 2] ^= 0x40
            try bad.write(to: URL(fileURLWithPath: stored))
            let loadedBefore = r.snapshotsLoaded(follower).count
            try r.start(follower)
            let stopped = InterposeHarness.waitUntil(.seconds(20)) { !(r.processes[follower]?.isRunning ?? false) }
            var log = r.logText(follower)
            checks.expect(stopped, "follower \(follower) runs on a corrupt snapshot:\n" + r.snapshotSummary())
            checks.expect(log.contains(stored) && log.contains("corrupt"), "the log does not name the corrupt snapshot \(stored):\n\(log.suffix(800))")
            checks.expect(r.snapshotsLoaded(follower).count == loadedBefore, "a corrupt snapshot was loaded into Redis")
            r.kill(follower)

            // The snapshot intact, but DEBUG RELOAD refused by Redis.
            try good.write(to: URL(fileURLWithPath: stored))
            try r.start(follower, args: ["--enable-debug-command", "no"])
            let refused = InterposeHarness.waitUntil(.seconds(20)) { !(r.processes[follower]?.isRunning ?? false) }
            log = r.logText(follower)
            checks.expect(refused && r.processes[follower]?.terminationStatus == 70,
                          "follower \(follower) did not stop when its Redis refused to load the snapshot:\n\(log.suffix(800))")
            checks.expect(log.contains("did not load the snapshot") && log.contains("enable-debug-command"),
                          "the log does not say why the snapshot was not loaded:\n\(log.suffix(800))")
            r.kill(follower)

            try r.start(follower)
            try writer.write(bytes: 4 << 10)
            checks.expect(r.converged(timeout: .seconds(30)), "digests differ once the follower could load its snapshot:\n" + r.logTails())
            writer.checkAcknowledged(checks)
        }
    }
}
