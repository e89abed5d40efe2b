import Foundation
import Testing
@testable import PloverTesting
import RDMAPaxos

extension EndToEnd.InterposeRedisTests {
    /// The log's end (docs/design/interpose.md, "Snapshots"): with `INTERPOSE_SNAPSHOT=redis` every
    /// replica's Redis saves at the leader's SNAPSHOT entries and the log is compacted behind them.
    /// A follower restarted after a compaction comes back from its own snapshot, one restarted
    /// after the leader compacted past its whole log gets the leader's, and so does one paused
    /// meanwhile with a connection open; every replica's data set stays equal and every
    /// acknowledged write is on every replica.
    @Test func followersComeBackFromSnapshotsOfACompactedLog() async throws {
        try await Self.withRedis("redis-snapshots", snapshotBytes: 64 << 10) { r, checks in
            let (leader, _) = try r.connectToLeader()
            let follower = r.cluster.ids.first { $0 != leader }!
            let writer = SnapshotWriter(r)
            // Enough log for a few snapshots on every replica.
            try writer.write(bytes: 300 << 10)
            let taken = InterposeHarness.waitUntil(.seconds(20)) {
                r.cluster.ids.allSatisfy { !r.snapshotsTaken($0).isEmpty && r.firstIndex($0) > 1 }
            }
            checks.expect(taken, "not every replica took a snapshot and compacted its log:\n" + r.snapshotSummary())
            checks.expect(r.converged(timeout: .seconds(30)), "digests differ after the snapshots:\n" + r.logTails())

            // A follower restarted after compacting comes back from its own latest snapshot, not
            // from index 1: its log still starts past 1 and its Redis loads the file. It comes
            // back saving slowly (Redis's rdb-key-save-delay), so the next cut's save outlasts
            // entries its replica applies meanwhile: the snapshot must still be labelled with the
            // cut's entry, not with how far the replica got.
            let own = Set(r.snapshotsTaken(follower))
            r.kill(follower)
            try writer.write(bytes: 8 << 10)
            try r.start(follower, args: ["--rdb-key-save-delay", "10000"])
            let loadedOwn = InterposeHarness.waitUntil(.seconds(30)) { r.snapshotsLoaded(follower).contains { own.contains($0) } }
            checks.expect(loadedOwn, "follower \(follower) did not load one of its own snapshots (\(own.sorted())) after a restart:\n" + r.snapshotSummary())
            try writer.write(bytes: 4 << 10) // a restarted follower learns the commit index from the next accept
            checks.expect(r.converged(timeout: .seconds(30)), "digests differ after the follower came back from its snapshot:\n" + r.logTails())
            checks.expect(r.firstIndex(follower) > 1, "follower \(follower) replays from index 1:\n" + r.snapshotSummary())
            let slowBefore = Set(r.snapshotsTaken(follower))
            try writer.write(bytes: 160 << 10)
            let slowSaved = InterposeHarness.waitUntil(.seconds(30)) { r.snapshotsTaken(follower).contains { !slowBefore.contains($0) } }
            checks.expect(slowSaved, "follower \(follower) took no snapshot while saving slowly:\n" + r.snapshotSummary())
            r.kill(follower)
            try r.start(follower)
            try writer.write(bytes: 4 << 10)
            checks.expect(r.converged(timeout: .seconds(30)), "digests differ after the follower came back from a snapshot it saved slowly:\n" + r.logTails())

            // A follower that is down while the leader compacts past everything it holds needs
            // the leader's snapshot: it loads one it never took itself.
            let before = Set(r.snapshotsTaken(follower))
            let lastHeld = r.lastIndex(follower)
            r.kill(follower)
            let leaderBefore = r.snapshotsTaken(leader).max() ?? 0
            try writer.write(bytes: 300 << 10)
            let compactedPast = InterposeHarness.waitUntil(.seconds(20)) { r.firstIndex(leader) > lastHeld + 1 }
            checks.expect(compactedPast, "the leader did not compact past follower \(follower)'s last index \(lastHeld):\n" + r.snapshotSummary())
            try r.start(follower)
            try writer.write(bytes: 4 << 10)
            let fromPeer = InterposeHarness.waitUntil(.seconds(30)) {
                r.snapshotsLoaded(follower).contains { $0 > leaderBefore && !before.contains($0) }
            }
            checks.expect(fromPeer, "follower \(follower) did not load a snapshot from the leader after entry \(leaderBefore):\n" + r.snapshotSummary())
            checks.expect(r.converged(timeout: .seconds(30)), "digests differ after the follower loaded the leader's snapshot:\n" + r.logTails())

            // A follower paused (SIGSTOP) with a client's replay connection open, while the leader
            // compacts past its log, gets the leader's snapshot while its Redis runs: the load ends
            // that connection first (it was closed in the part of the log the snapshot replaces).
            try writer.write(bytes: 2 << 10) // the writer's connection stays open
            let pausedLoads = r.snapshotsLoaded(follower).count
            let pausedLast = r.lastIndex(follower)
            Glibc.kill(r.processes[follower]!.processIdentifier, SIGSTOP)
            try writer.write(bytes: 300 << 10)
            _ = InterposeHarness.waitUntil(.seconds(20)) { r.firstIndex(leader) > pausedLast + 1 }
            Glibc.kill(r.processes[follower]!.processIdentifier, SIGCONT)
            try writer.write(bytes: 4 << 10)
            let loadedLive = InterposeHarness.waitUntil(.seconds(30)) { r.snapshotsLoaded(follower).count > pausedLoads }
            checks.expect(loadedLive, "follower \(follower), paused while the leader compacted past entry \(pausedLast), loaded no snapshot:\n" + r.snapshotSummary())
            try writer.write(bytes: 4 << 10)
            checks.expect(r.converged(timeout: .seconds(30)), "digests differ after a running follower loaded the leader's snapshot:\n" + r.logTails())
            writer.checkAcknowledged(checks)
        }
    }

    /// The differential test with the log cut and compacted every 256 KiB: seeded random
    /// pipelines, the leader killed with `kill -9` while its Redis saves a snapshot (Redis's
    /// `rdb-key-save-delay` stretches a save) and once more at random, both restarted. Every
    /// replica's digest is equal, every acknowledged SET is on every replica, every log was
    /// compacted and the restarted replicas came back from snapshots.
    @Test func randomPipelinesWithSnapshotsAndLeaderKillsLeaveEveryReplicaEqual() async throws {
        let seed = UInt64(ProcessInfo.processInfo.environment["PLOVER_INTERPOSE_SEED"] ?? "") ?? 1
        try await Self.withRedis("redis-differential-snapshots", snapshotBytes: 256 << 10,
                                 redisArgs: ["--rdb-key-save-delay", "300"]) { r, checks in
            _ = try r.connectToLeader()
            let acked = AckedWrites()
            let stop = ManagedAtomicFlag()
            let group = DispatchGroup()
            let (ports, endpoints) = (r.ports, r.cluster.endpoints)
            for client in 0..<6 {
                group.enter()
                Thread {
                    defer { group.leave() }
                    var random = SeededRandom(seed: seed &* 1_000_003 &+ UInt64(client))
                    RandomRedisClient(id: client, ports: ports, endpoints: endpoints, acked: acked).run(&random, until: stop)
                }.start()
            }
            var killedSaving = false
            for round in 0..<2 {
                Thread.sleep(forTimeInterval: 1.5)
                guard let victim = InterposeHarness.leader(r.cluster.endpoints, among: r.processes.keys.sorted()) else {
                    checks.record("seed \(seed): no leader before kill \(round + 1)"); continue
                }
                if round == 0 {
                    // Kill while the leader's Redis is inside a snapshot's save.
                    killedSaving = InterposeHarness.waitUntil(.seconds(20)) { r.saving(victim) }
                }
                r.kill(victim)
                Thread.sleep(forTimeInterval: 1.0)
                try r.start(victim)
            }
            Thread.sleep(forTimeInterval: 1.5)
            stop.set()
            group.wait()
            checks.expect(killedSaving, "seed \(seed): the leader was never seen saving a snapshot, so it was not killed in one:\n" + r.snapshotSummary())
            let writes = acked.all
            checks.expect(writes.count > 20, "seed \(seed): only \(writes.count) SETs were acknowledged: too few to prove anything")
            // A restarted replica learns the commit index from the next accept.
            if let (_, c) = try? r.connectToLeader() { _ = try? c.call("SET", "last", "x") }
            checks.expect(r.converged(timeout: .seconds(60)), "seed \(seed): the replicas' Redis digests differ:\n" + r.logTails())
            for id in r.cluster.ids {
                guard let local = try? RespClient(unixPath: r.socketPath(id)) else { checks.record("seed \(seed): Redis \(id) is unreachable"); continue }
                var missing: [String] = []
                for (k, v) in writes where (try? local.call("GET", k)) != .bulk(v) { missing.append(k) }
                checks.expect(missing.isEmpty, "seed \(seed): Redis \(id) lacks \(missing.count) of \(writes.count) acknowledged writes, e.g. \(missing.prefix(3))")
                checks.expect(r.firstIndex(id) > 1, "seed \(seed): replica \(id)'s log was never compacted:\n" + r.snapshotSummary())
            }
            let loaded = r.cluster.ids.flatMap { r.snapshotsLoaded($0) }
            checks.expect(!loaded.isEmpty, "seed \(seed): no restarted replica came back from a snapshot:\n" + r.snapshotSummary())
        }
    }
}

extension EndToEnd.InterposeRedisTests.ShimmedRedis {
    func logText(_ id: NodeID) -> String { (try? String(contentsOfFile: root + "/redis-\(id).log", encoding: .utf8)) ?? "" }

    /// Log entries the shim's lines say something happened at, e.g. "saved the server at log entry 123: …".
    func entries(_ id: NodeID, after prefix: String) -> [UInt64] {
        logText(id).split(separator: "\n").compactMap { line in
            guard let r = line.range(of: prefix) else { return nil }
            return UInt64(line[r.upperBound...].prefix { $0.isNumber })
        }
    }

    func snapshotsTaken(_ id: NodeID) -> [UInt64] { entries(id, after: "saved the server at log entry ") }
    func snapshotsLoaded(_ id: NodeID) -> [UInt64] { entries(id, after: "loaded the snapshot of log entry ") }
    /// Inside a save: more saves started than finished (taken or not).
    func saving(_ id: NodeID) -> Bool {
        entries(id, after: "saving the server at log entry ").count > snapshotsTaken(id).count + entries(id, after: "no snapshot at log entry ").count
    }

    func firstIndex(_ id: NodeID) -> UInt64 { UInt64(cluster.status(id)["first_index"] ?? "") ?? 0 }
    func lastIndex(_ id: NodeID) -> UInt64 { UInt64(cluster.status(id)["last_index"] ?? "") ?? 0 }

    func snapshotSummary() -> String {
        cluster.ids.map { id in
            "replica \(id): first_index \(firstIndex(id)), last_index \(lastIndex(id)), taken \(snapshotsTaken(id).suffix(6)), loaded \(snapshotsLoaded(id))"
        }.joined(separator: "\n") + "\n" + logTails()
    }
}

/// Writes SETs of 2 KiB values to whichever Redis leads, reconnecting when a cut (or a leader
/// change) ends its connection, and remembers the acknowledged ones.
final class SnapshotWriter {
    let r: EndToEnd.InterposeRedisTests.ShimmedRedis
    var acked: [String: String] = [:]
    var n = 0
    var connection: RespClient?

    init(_ r: EndToEnd.InterposeRedisTests.ShimmedRedis) { self.r = r }

    func write(bytes: Int) throws {
        let deadline = ContinuousClock.now + .seconds(60)
        var written = 0
        while written < bytes {
            guard ContinuousClock.now < deadline else { throw CLIError("could not write \(bytes) bytes within 60 s:\n" + r.logTails()) }
            if connection == nil { connection = try? r.connectToLeader(timeout: .seconds(10)).1 }
            guard let c = connection else { continue }
            n += 1
            let value = String(repeating: Character(UnicodeScalar(UInt8(97 + n % 26))), count: 2048)
            guard let reply = try? c.call("SET", "w\(n)", value) else { connection = nil; continue }
            if reply == .simple("OK") { acked["w\(n)"] = value; written += value.utf8.count }
        }
    }

    func checkAcknowledged(_ checks: Checks) {
        for id in r.cluster.ids {
            guard let local = try? RespClient(unixPath: r.socketPath(id)) else { checks.record("Redis \(id) is unreachable"); continue }
            var missing = 0
            for (k, v) in acked where (try? local.call("GET", k)) != .bulk(v) { missing += 1 }
            checks.expect(missing == 0, "Redis \(id) lacks \(missing) of \(acked.count) acknowledged writes")
        }
    }
}
