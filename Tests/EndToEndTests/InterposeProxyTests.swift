import Foundation
import Testing
@testable import PloverTesting
import RDMAPaxos

extension EndToEnd.InterposeRedisTests {
    /// `plover proxy` gives the clients of replicated Redis one address: a client that writes
    /// through it while the leader is killed goes on after reconnecting to the same address.
    @Test func aClientOfTheProxySurvivesALeaderKillWithOnlyAReconnect() async throws {
        try await Self.withRedis("redis-proxy") { r, checks in
            let (first, _) = try r.connectToLeader()
            let port = try freePort()
            let endpoints = r.cluster.endpoints.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }.joined(separator: ",")
            let servers = r.ports.sorted { $0.key < $1.key }.map { "\($0.key)=127.0.0.1:\($0.value)" }.joined(separator: ",")
            let proxy = try InterposeHarness.spawn(try EndToEnd.ClusterProcessTests.ploverExecutable(),
                                                   ["proxy", "--endpoints", endpoints, "--listen", "127.0.0.1:\(port)", "--servers", servers],
                                                   log: r.root + "/proxy.log")
            defer { InterposeHarness.kill9(proxy) }
            func connect() -> RespClient? {
                for _ in 0..<200 {
                    if let c = try? RespClient(port: port), (try? c.call("PING")) == .simple("PONG") { return c }
                    Thread.sleep(forTimeInterval: 0.05)
                }
                return nil
            }
            var acked: [String: String] = [:]
            var connection = connect()
            var reconnects = 0, n = 0, ackedAfterKill = 0
            var killed = false
            let deadline = ContinuousClock.now + .seconds(8)
            while ContinuousClock.now < deadline {
                if !killed && acked.count >= 50 { r.kill(first); killed = true }
                guard let c = connection else {
                    connection = connect()
                    reconnects += 1
                    continue
                }
                n += 1
                if (try? c.call("SET", "p\(n)", "v\(n)")) == .simple("OK") {
                    acked["p\(n)"] = "v\(n)"
                    if killed { ackedAfterKill += 1 }
                } else {
                    connection = nil // its outcome is unknown: not counted
                }
            }
            checks.expect(killed, "only \(acked.count) writes went through the proxy before the kill")
            checks.expect(reconnects >= 1, "the client never had to reconnect: was the leader killed?")
            checks.expect(ackedAfterKill > 20, "only \(ackedAfterKill) writes went through the proxy after the leader was killed:\n" + r.logTails())
            checks.expect(r.converged(timeout: .seconds(30)), "the surviving replicas' digests differ:\n" + r.logTails())
            for id in r.processes.keys {
                guard let local = try? RespClient(unixPath: r.socketPath(id)) else { checks.record("Redis \(id) is unreachable"); continue }
                var missing = 0
                for (k, v) in acked where (try? local.call("GET", k)) != .bulk(v) { missing += 1 }
                checks.expect(missing == 0, "Redis \(id) lacks \(missing) of \(acked.count) writes acknowledged through the proxy")
            }
        }
    }
}
