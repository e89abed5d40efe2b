import Foundation
import PloverCheck
import Testing
@testable import PloverTesting
import RDMAPaxos

extension EndToEnd {
    /// Three unmodified Debian redis-server processes, each under `LD_PRELOAD=libinterpose.so` with
    /// its own replica (APUS mode). Clients talk to the leader's Redis port; each Redis is read
    /// directly through its unix socket, which the shim does not intercept.
    @Suite(.serialized, .timeLimit(.minutes(4))) struct InterposeRedisTests {
        final class ShimmedRedis {
            let root: String
            let cluster: DemoCluster
            let library: String
            var ports: [NodeID: Int] = [:]
            var processes: [NodeID: Process] = [:]
            /// With a value, every Redis runs with `INTERPOSE_SNAPSHOT=redis` and this many bytes of
            /// log between snapshots (its file: dump.rdb in its dir).
            var snapshotBytes: Int?
            /// More redis-server arguments for every replica.
            var redisArgs: [String] = []

            init(_ name: String) throws {
                guard FileManager.default.isExecutableFile(atPath: "/usr/bin/redis-server") else {
                    throw CLIError("redis-server is not installed (scripts/install-deps.sh installs it; make test runs that)")
                }
                root = ClusterProcessTests.scratch(name)
                library = try InterposeHarness.library()
                cluster = try DemoCluster(root: root, durability: "fsync", timing: DemoCluster.Timing(electionTimeoutTicks: 40),
                                          executable: "/usr/bin/redis-server")
                for id in cluster.ids { ports[id] = try freePort() }
            }

            func socketPath(_ id: NodeID) -> String { root + "/redis-\(id).sock" }

            /// Starts replica `id`'s Redis; `fdLimit` runs it under `prlimit --nofile=N:N` (soft and hard).
            /// `args`: more redis-server arguments for this start only.
            func start(_ id: NodeID, fdLimit: Int? = nil, environment: [String: String] = [:], args: [String] = []) throws {
                let dir = root + "/redis-\(id)"
                try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
                let (program, prefix) = fdLimit.map { ("/usr/bin/prlimit", ["--nofile=\($0):\($0)", "/usr/bin/redis-server"]) }
                    ?? ("/usr/bin/redis-server", [])
                processes[id] = try InterposeHarness.spawn(program, prefix + [
                    "--port", String(ports[id]!), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                    "--unixsocket", socketPath(id), "--unixsocketperm", "700", "--enable-debug-command", "local",
                    "--daemonize", "no", "--dir", dir,
                ] + redisArgs + args, log: root + "/redis-\(id).log", environment: [
                    "LD_PRELOAD": library, "INTERPOSE_CONFIG": cluster.configPath(id), "INTERPOSE_PORT": String(ports[id]!),
                    "INTERPOSE_LOG_LEVEL": "info",
                ].merging(snapshotEnvironment(id)) { $1 }.merging(environment) { $1 })
            }

            func snapshotEnvironment(_ id: NodeID) -> [String: String] {
                guard let bytes = snapshotBytes else { return [:] }
                return ["INTERPOSE_SNAPSHOT": "redis", "INTERPOSE_SNAPSHOT_FILE": root + "/redis-\(id)/dump.rdb",
                        "INTERPOSE_SNAPSHOT_BYTES": String(bytes)]
            }

            func kill(_ id: NodeID) { if let p = processes.removeValue(forKey: id) { InterposeHarness.kill9(p) } }
            func stopAll() { for id in processes.keys { kill(id) } }

            func leader(timeout: Duration = .seconds(30)) throws -> NodeID {
                try InterposeHarness.waitForLeader(cluster.endpoints, among: processes.keys.sorted(), timeout: timeout)
            }

            /// A connection to the leader's Redis that answered PING. A just-elected leader closes
            /// connections until it has replayed everything committed before it, so this retries.
            func connectToLeader(timeout: Duration = .seconds(30)) throws -> (NodeID, RespClient) {
                let deadline = ContinuousClock.now + timeout
                while ContinuousClock.now < deadline {
                    if let l = InterposeHarness.leader(cluster.endpoints, among: processes.keys.sorted()),
                       let c = try? RespClient(port: ports[l]!), (try? c.call("PING")) == .simple("PONG") {
                        return (l, c)
                    }
                    Thread.sleep(forTimeInterval: 0.05)
                }
                throw CLIError("no leader's Redis answered PING within \(timeout):\n" + logTails())
            }

            /// One Redis's state hash (`DEBUG DIGEST` over its unix socket), nil if unreachable.
            func digest(_ id: NodeID) -> String? {
                guard let c = try? RespClient(unixPath: socketPath(id)), case let .simple(d)? = try? c.call("DEBUG", "DIGEST") else { return nil }
                return d
            }

            /// Waits until every running Redis reports the same digest.
            func converged(timeout: Duration = .seconds(20)) -> Bool {
                InterposeHarness.waitUntil(timeout) {
                    let ds = processes.keys.map { digest($0) }
                    return ds.allSatisfy { $0 != nil } && Set(ds).count == 1
                }
            }

            func logTails() -> String {
                cluster.ids.map { id in
                    let text = (try? String(contentsOfFile: root + "/redis-\(id).log", encoding: .utf8)) ?? ""
                    let status = cluster.status(id)
                    let local = try? RespClient(unixPath: socketPath(id))
                    let keys = (try? local?.call("DBSIZE")).flatMap { $0 }.map { "\($0)" } ?? "-"
                    return "redis \(id) (role \(status["role"] ?? "-"), applied \(status["applied_index"] ?? "-") of \(status["commit_index"] ?? "-"), keys \(keys)):\n"
                        + text.split(separator: "\n").suffix(8).map { "  " + $0 }.joined(separator: "\n")
                }.joined(separator: "\n")
            }
        }

        static func withRedis(_ name: String, fdLimit: Int? = nil, environment: [String: String] = [:],
                              snapshotBytes: Int? = nil, redisArgs: [String] = [], startReplicas: Bool = true,
                              _ body: @escaping @Sendable (ShimmedRedis, Checks) throws -> Void) async throws {
            let checks = Checks()
            defer { checks.recordIssues() }
            try await onOwnThread {
                let r = try ShimmedRedis(name)
                r.snapshotBytes = snapshotBytes
                r.redisArgs = redisArgs
                defer { r.stopAll() }
                if startReplicas { for id in r.cluster.ids { try r.start(id, fdLimit: fdLimit, environment: environment) } }
                try body(r, checks)
                r.stopAll()
                if !checks.hasFailures { try? FileManager.default.removeItem(atPath: r.root) }
            }
        }

        @Test func writesThroughTheLeaderReachEveryReplicasRedis() async throws {
            try await Self.withRedis("redis-replicate") { r, checks in
                let (leader, c) = try r.connectToLeader()
                for i in 1...100 { checks.expect(try c.call("SET", "key-\(i)", "value-\(i)") == .simple("OK"), "SET key-\(i)") }
                for _ in 1...20 { _ = try c.call("INCR", "counter") }
                checks.expect(try c.call("RPUSH", "list", "a", "b", "c") == .integer(3))
                checks.expect(try c.call("GET", "key-7") == .bulk("value-7"))
                checks.expect(r.converged(), "the replicas' Redis digests differ:\n" + r.logTails())
                for id in r.cluster.ids {
                    let local = try RespClient(unixPath: r.socketPath(id))
                    checks.expect(try local.call("DBSIZE") == .integer(102), "Redis \(id) holds the wrong number of keys")
                    checks.expect(try local.call("GET", "counter") == .bulk("20"), "Redis \(id)'s counter")
                    checks.expect(try local.call("GET", "key-100") == .bulk("value-100"), "Redis \(id)'s key-100")
                }
                // Followers serve no clients: their connections are closed at once.
                let follower = r.cluster.ids.first { $0 != leader }!
                let refused = (try? RespClient(port: r.ports[follower]!).call("PING")) == nil
                checks.expect(refused, "a follower's Redis answered a client")
                // redis-benchmark completes against the leader, and the replicas still agree.
                let (status, out) = try InterposeHarness.run("/usr/bin/redis-benchmark", [
                    "-p", String(r.ports[leader]!), "-n", "2000", "-c", "8", "-P", "4", "-t", "set,incr,lpush", "-q"])
                checks.expect(status == 0 && out.contains("requests per second"), "redis-benchmark failed (\(status)): \(out.suffix(400))")
                checks.expect(r.converged(), "digests differ after redis-benchmark:\n" + r.logTails())
                // BGSAVE goes through the log too: every Redis forks a child to save (the shim's hooks
                // pass through in the child) and keeps replicating afterwards.
                let c2 = try RespClient(port: r.ports[leader]!)
                checks.expect(try c2.call("BGSAVE") == .simple("Background saving started"), "BGSAVE through the leader")
                let saved = InterposeHarness.waitUntil(.seconds(20)) {
                    r.cluster.ids.allSatisfy { id in
                        guard let local = try? RespClient(unixPath: r.socketPath(id)),
                              case let .bulk(info?)? = try? local.call("INFO", "persistence") else { return false }
                        return info.contains("rdb_bgsave_in_progress:0") && info.contains("rdb_last_bgsave_status:ok")
                            && FileManager.default.fileExists(atPath: r.root + "/redis-\(id)/dump.rdb")
                    }
                }
                checks.expect(saved, "not every replica's Redis finished its fork-based save:\n" + r.logTails())
                for i in 1...20 { checks.expect(try c2.call("SET", "after-fork-\(i)", "x") == .simple("OK"), "SET after the fork") }
                checks.expect(r.converged(), "digests differ after the fork:\n" + r.logTails())
            }
        }

        /// Redis reads only the rest of a bulk value of 32 KiB or more, so with large values it
        /// consumes part of one client's committed bytes, serves another client, and comes back:
        /// the leader must still hand bytes to the server in log order, or its lists are ordered
        /// unlike the followers'. Writers pipeline a large SET and an RPUSH; racers RPUSH alone.
        @Test func pipelinedLargeValuesBesideSmallOnesKeepEveryReplicaEqual() async throws {
            try await Self.withRedis("redis-order") { r, checks in
                let (leader, _) = try r.connectToLeader()
                let port = r.ports[leader]!
                var threads: [Thread] = []
                let done = DispatchGroup()
                for w in 0..<6 {
                    done.enter()
                    let t = Thread {
                        defer { done.leave() }
                        guard let c = try? RespClient(port: port) else { checks.record("writer \(w) cannot connect"); return }
                        for i in 0..<15 {
                            let list = "list-\(i % 3)"
                            if w < 3 {
                                let size = 40_000 + (w * 7_919 + i * 3_001) % 30_000
                                let big = String(repeating: Character(UnicodeScalar(UInt8(97 + (w + i) % 26))), count: size)
                                let replies = (try? c.pipeline([["SET", "big-\(w)-\(i)", big], ["RPUSH", list, "w\(w)-\(i)"]])) ?? []
                                if replies.count != 2 || replies[0] != .simple("OK") { checks.record("writer \(w) round \(i): \(replies)"); return }
                            } else {
                                let replies = (try? c.pipeline([["RPUSH", list, "r\(w)-\(i)-a"], ["RPUSH", list, "r\(w)-\(i)-b"]])) ?? []
                                if replies.count != 2 { checks.record("racer \(w) round \(i): \(replies)"); return }
                            }
                        }
                    }
                    threads.append(t)
                }
                for t in threads { t.start() }
                done.wait()
                let same = r.converged(timeout: .seconds(30))
                let lists = r.cluster.ids.map { id -> String in
                    guard let local = try? RespClient(unixPath: r.socketPath(id)) else { return "\(id): unreachable" }
                    return "\(id): " + (0..<3).map { list -> String in
                        guard case let .array(items)? = try? local.call("LRANGE", "list-\(list)", "0", "-1") else { return "?" }
                        return items.map { if case let .bulk(v?) = $0 { v } else { "?" } }.joined(separator: ",")
                    }.joined(separator: " | ")
                }
                checks.expect(same, "the replicas' Redis digests differ (leader \(leader)):\n" + lists.joined(separator: "\n") + "\n" + r.logTails())
            }
        }

        @Test func leaderKilledClientsMoveOnAndNothingAcknowledgedIsLost() async throws {
            try await Self.withRedis("redis-kill") { r, checks in
                let (first, _) = try r.connectToLeader()
                var acked: [String: String] = [:]
                var n = 0
                // Writes until the current leader's Redis fails, then finds the next leader.
                func write(for duration: Duration, killing victim: NodeID?) throws {
                    let deadline = ContinuousClock.now + duration
                    var killAt = victim.map { _ in ContinuousClock.now + .milliseconds(700) }
                    while ContinuousClock.now < deadline {
                        guard let l = InterposeHarness.leader(r.cluster.endpoints, among: r.processes.keys.sorted()),
                              let c = try? RespClient(port: r.ports[l]!) else { Thread.sleep(forTimeInterval: 0.05); continue }
                        while ContinuousClock.now < deadline {
                            if let at = killAt, ContinuousClock.now >= at, let v = victim { r.kill(v); killAt = nil }
                            n += 1
                            guard let reply = try? c.call("SET", "k\(n)", "v\(n)") else { break }
                            if reply == .simple("OK") { acked["k\(n)"] = "v\(n)" }
                        }
                    }
                }
                try write(for: .seconds(3), killing: first)
                let second = try r.leader()
                checks.expect(second != first, "no new leader after the kill")
                checks.expect(acked.count > 30, "too few writes were acknowledged (\(acked.count)) to prove anything")
                // The killed replica restarts with an empty Redis and rebuilds it from the log.
                try r.start(first)
                try write(for: .seconds(1), killing: nil)
                checks.expect(r.converged(timeout: .seconds(40)), "the replicas' Redis digests differ after the restart:\n" + r.logTails())
                for id in r.cluster.ids {
                    let local = try RespClient(unixPath: r.socketPath(id))
                    var missing = 0
                    for (k, v) in acked where try local.call("GET", k) != .bulk(v) { missing += 1 }
                    checks.expect(missing == 0, "Redis \(id) lacks \(missing) of \(acked.count) acknowledged writes")
                }
            }
        }
    }
}
